// RingServer: serves one blkif ring (one queue of one VBD) on its own thread.
//
// Start() maps the ring pages (2^order refs, one batch, contiguous), binds
// the event channel and starts the thread. The thread sleeps in poll() on
// the event channel's fd, a completion eventfd and a stop eventfd; each
// wakeup it acknowledges events (Pending, Unmask), then drains the ring in
// one batch: for every request — copy out once (BackRing), validate once
// (validate.h), map its grants (one batch per request; persistent grants
// from a bounded LRU when the frontend negotiated feature-persistent;
// indirect descriptor pages mapped, copied out, validated), build iovecs
// over the mapped pages and Submit() to the BlockDevice. Completions (on any
// thread) come back through a queue; each request is answered exactly once
// (PendingRequest answers ERROR if dropped), responses are published with
// the check-notify rule and the event channel is kicked only when the
// frontend asked. Before sleeping: RING_FINAL_CHECK_FOR_REQUESTS.
//
// Ordering: FLUSH_DISKCACHE and WRITE_BARRIER wait until every earlier
// request has completed, run alone, and later requests wait for them — so a
// flush is acknowledged only after all earlier writes are durable.
//
// Failure stays in the ring: a frontend that breaks the ring protocol
// (req_prod running past the ring) halts this ring (logged, rate-limited):
// requests already taken are still answered, nothing more is read, the
// process and other rings carry on. A bad request is answered with an error
// and the ring keeps going.
//
// Platform failures: a request whose grants cannot be mapped is answered
// ERROR. A failed unmap counts the pages as leaked (stats) and never touches
// them again. A failed event-channel kick is retried every few milliseconds
// until one succeeds (the responses are already on the ring), so a
// transient error costs the frontend latency, not a lost completion.
//
// Stop() takes no more requests, waits for in-flight I/O to complete and be
// answered, then unmaps every grant (ring, data, persistent) and unbinds the
// event channel. REQUIRES: the BlockDevice completes every submitted I/O.
//
// Pause() takes no more requests from the ring (events are still
// acknowledged, so the frontend is not lost) and returns once every request
// already taken has been answered; Resume() takes requests again and looks
// at the ring at once, so requests queued while paused are served.
//
// Stats: every answered request adds its service time (taken off the ring
// to answered) to a log2 histogram in microseconds; in_flight is the number
// of requests taken and not yet answered.
//
// Thread-safety: Start/Stop/Pause/Resume/UpdateSectors/stats may be called
// from any one control thread at a time; the serving happens on the
// server's own thread.
#pragma once

#include <array>
#include <atomic>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "backend/blkif.h"
#include "backend/block_device.h"
#include "backend/validate.h"
#include "base/status.h"
#include "xen-glue/platform.h"

namespace cowtap::backend {

struct RingConfig {
  xen::DomId frontend_domid = 0;
  std::string name;  // for logs: "vbd 5/51712 queue 0"
  Abi abi = Abi::kX86_64;
  std::vector<xen::GrantRef> ring_refs;  // 2^ring-page-order refs, page order
  xen::EvtchnPort remote_port = 0;       // the frontend's event-channel
  bool persistent = false;               // both sides offered feature-persistent
  // Bound of the persistent-grant LRU (pages kept mapped).
  size_t max_persistent_grants = 1056;
  DeviceLimits limits;  // what the VBD advertised
  // Start as if Pause() had been called (a VBD paused while its frontend
  // reconnected); Resume() starts serving.
  bool start_paused = false;
};

// Buckets of RingStats::latency_us_log2: bucket i counts requests answered
// in less than 2^i microseconds (and at least 2^(i-1)); the last bucket is
// open-ended.
inline constexpr size_t kLatencyBuckets = 32;
// The bucket a service time of `us` microseconds falls in.
size_t LatencyBucket(uint64_t us);

// Counters, readable at any time (relaxed atomics).
struct RingStats {
  std::atomic<uint64_t> requests{0};
  std::atomic<uint64_t> reads{0};
  std::atomic<uint64_t> writes{0};
  std::atomic<uint64_t> flushes{0};
  std::atomic<uint64_t> discards{0};
  std::atomic<uint64_t> indirect{0};
  std::atomic<uint64_t> bytes_read{0};
  std::atomic<uint64_t> bytes_written{0};
  std::atomic<uint64_t> bytes_discarded{0};
  std::atomic<uint64_t> errors{0};      // answered BLKIF_RSP_ERROR
  std::atomic<uint64_t> eopnotsupp{0};  // answered BLKIF_RSP_EOPNOTSUPP
  std::atomic<uint64_t> wakeups{0};
  std::atomic<uint64_t> notifications{0};  // event-channel kicks sent
  std::atomic<uint64_t> grant_maps{0};     // GrantTable::Map calls
  std::atomic<uint64_t> persistent_hits{0};
  std::atomic<uint64_t> persistent_evictions{0};
  std::atomic<uint64_t> max_batch{0};        // most requests taken in one pass
  std::atomic<uint64_t> in_flight{0};        // taken off the ring, not yet answered
  std::atomic<uint64_t> leaked_pages{0};     // guest pages whose unmap failed (see grant_pages.h)
  std::atomic<uint64_t> notify_failures{0};  // event-channel kicks that failed (each retried)
  std::array<std::atomic<uint64_t>, kLatencyBuckets> latency_us_log2{};
};

class RingServer {
 public:
  // Maps the ring, binds the event channel (through handles opened on
  // `platform`, which must outlive the server) and starts serving. Fails
  // with nothing left mapped or bound: kInvalidArgument for a ring-ref count
  // that is not a power of two in 1..16 or a ring too small, or whatever the
  // platform says about the refs or the port.
  static Result<std::unique_ptr<RingServer>> Start(xen::XenPlatform& platform, RingConfig config,
                                                   std::shared_ptr<BlockDevice> device);
  // Stop() then destroy.
  ~RingServer();
  RingServer(const RingServer&) = delete;
  RingServer& operator=(const RingServer&) = delete;

  // See the file comment. Idempotent. The server's status (halted or not) is
  // kept for inspection.
  void Stop();
  // See the file comment. Pause returns once nothing taken is unanswered
  // (at once if the server was stopped). Both are idempotent.
  void Pause();
  void Resume();
  bool paused() const;
  // The disk size changed (online resize): requests are checked against the
  // new size from now on.
  void UpdateSectors(uint64_t sectors);
  // True once the frontend broke the ring; halt_reason() says how.
  bool halted() const;
  std::string halt_reason() const;
  const RingStats& stats() const;
  // Grant pages currently mapped for this ring (ring + persistent +
  // in-flight requests).
  size_t mapped_pages() const;
  // Slots of the shared ring.
  uint32_t capacity() const;

  class Impl;

 private:
  explicit RingServer(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

}  // namespace cowtap::backend
