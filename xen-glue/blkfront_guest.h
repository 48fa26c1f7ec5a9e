// The simulated guest as a program: connect to a sim hypervisor as a domain,
// attach BlkFront to one VBD, run a scenario (a verified workload, every op,
// a protocol misbehaviour, reconnect, resize, die mid-I/O) and print what
// happened. tools/cowtap_guest_main.cc maps its flags onto GuestRunOptions;
// the end-to-end tests (tests/blkif) run that program as a separate process
// and read its output.
//
// Output: one line per check, "PASS <name>" or "FAIL <name>: <why>", lines
// "info <key>=<value> ..." with facts the tests assert (negotiated device,
// statuses the backend answered, whether a ring halted), the workload's
// summary, and last "result: N passed, M failed". Exit code 0 when nothing
// failed, 1 when a check failed, 2 when setup failed.
//
// Thread-safety: RunGuest is called once per process.
#pragma once

#include <cstdint>
#include <ostream>
#include <string>

#include "xen-glue/blkfront.h"
#include "xen-glue/blkfront_workload.h"

namespace cowtap::xen {

struct GuestRunOptions {
  std::string socket_path;
  DomId domid = 1;
  uint32_t devid = 51712;
  uint32_t ram_pages = 16384;
  uint32_t grant_entries = 16384;
  BlkfrontOptions front;
  WorkloadOptions workload;
  // workload | ops | fill | reconnect | resize | flush-then-die | die-mid-io |
  // garbage | out-of-range | bad-gref | bad-segments | unknown-op |
  // revoke-before-push | revoke-after-push | race-req-prod | notify-flood
  std::string scenario = "workload";
  uint32_t reconnects = 1;       // reconnect: disconnect/reconnect cycles
  int misbehave_wait_ms = 1500;  // how long to wait for answers to bad requests
  std::string model_out;         // write the workload's final model here (uint32 LE per sector)
  std::string initial_model;     // the region's model tags at start (same format; empty: initial content)
};

// Runs the scenario and returns the process exit code (0 / 1 / 2).
int RunGuest(const GuestRunOptions& options, std::ostream& out);

// The scenario names RunGuest accepts.
const std::vector<std::string>& GuestScenarios();

}  // namespace cowtap::xen
