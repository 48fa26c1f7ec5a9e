// The guest half of the ring peer of `cowtap bench` (see bench_ring.h): the
// messages between the bench process and its guest process, and the loop the
// guest process runs. Messages are fixed-size, trivially copyable structs
// sent whole over a SOCK_SEQPACKET socketpair between two processes of the
// same binary.
//
// Thread-safety: the guest process is single-threaded.
#pragma once

#include <cstdint>
#include <type_traits>

#include "base/status.h"
#include "tools/cli/bench_types.h"
#include "xen-glue/blkfront_io.h"

namespace cowtap::cli::bench {

struct GuestRequest {
  char socket_path[256] = {};
  uint32_t domid = 0;
  uint32_t devid = 0;
  Workload workload;
};

struct GuestReply {
  int32_t ok = 0;  // 1: ran; 0: message says why not
  char message[512] = {};
  uint64_t ops = 0, bytes = 0, errors = 0;
  double elapsed_s = 0, p50_us = 0, p99_us = 0;
  double cpu_s = 0;
  uint64_t peak_rss_bytes = 0;
  uint32_t queues = 0, ring_page_order = 0, indirect_segments = 0;
  int32_t persistent = 0;
};

static_assert(std::is_trivially_copyable_v<GuestRequest>);
static_assert(std::is_trivially_copyable_v<GuestReply>);

// Replays workload on target (a connected BlkFront) at its queue depth and
// fills the counters and latencies of *reply. Non-OK when the target broke
// (a poll failed or no answer came for poll_timeout_ms).
Status DriveTarget(xen::BlockTarget& target, const Workload& workload, int poll_timeout_ms, GuestReply* reply);

// The guest process: answers each GuestRequest read from sock with a
// GuestReply (attach a BlkFront to the domain's device, drive the workload,
// disconnect) until sock closes; then _exits. Never returns.
[[noreturn]] void GuestProcessMain(int sock);

}  // namespace cowtap::cli::bench
