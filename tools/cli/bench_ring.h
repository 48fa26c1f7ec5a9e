// RingBench: the "cowtap via ring" peer of `cowtap bench` — the whole data
// path as a guest sees it. The bench process runs a SimHypervisor and, per
// peer run, a backend::Vbd (xenbus state machine + one RingServer per queue)
// over an ImageBlockDevice; a guest PROCESS runs BlkFront (multi-page rings,
// several queues, persistent grants, indirect descriptors) and replays the
// row's Workload at its queue depth, timing every request from submit to
// response. The guest reports its numbers back over a socketpair.
//
// The guest process is forked once, in Start(), before the bench process has
// any thread (so the child never inherits a lock held by a thread that does
// not exist in it), and serves one request per peer run until the bench
// closes the socket. It never returns into the caller's code: it _exits.
//
// Thread-safety: one thread drives a RingBench.
#pragma once

#include <sys/types.h>

#include <memory>
#include <string>

#include "base/status.h"
#include "tools/cli/bench_runners.h"
#include "tools/cli/bench_types.h"
#include "xen-glue/platform.h"
#include "xen-glue/sim.h"

namespace cowtap::cli::bench {

class RingBench {
 public:
  // Forks the guest process. REQUIRES: the calling process has one thread.
  // dir holds the hypervisor's socket.
  static Result<std::unique_ptr<RingBench>> Start(const std::string& dir);
  // Ends the guest process (closes its socket, reaps it) and stops the
  // hypervisor.
  ~RingBench();
  RingBench(const RingBench&) = delete;
  RingBench& operator=(const RingBench&) = delete;

  // Serves image_path (read-only when the workload only reads) to a fresh
  // guest domain and lets the guest replay the workload. CPU is the bench
  // process's (backend + hypervisor threads) plus the guest's; peak RSS is
  // the bench process's. After a failure that leaves the guest process in
  // an unknown state, later calls fail at once.
  Result<PeerResult> Run(const Workload& workload, const std::string& image_path, const EngineRunOptions& options);

 private:
  RingBench() = default;
  Status StartHypervisor();

  std::string dir_;
  pid_t child_ = -1;
  int sock_ = -1;
  bool broken_ = false;
  std::string broken_why_;
  std::unique_ptr<xen::SimHypervisor> hv_;
  std::unique_ptr<xen::XenPlatform> platform_;
  std::unique_ptr<xen::XenStore> xs_;
  xen::DomId next_domid_ = 1;
};

}  // namespace cowtap::cli::bench
