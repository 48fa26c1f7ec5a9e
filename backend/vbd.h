// Vbd: one virtual block device — the xenbus state machine of the backend
// directory /local/domain/<self>/backend/<type>/<domid>/<devid> (type "vbd"
// by default; "qdisk" or "cowtap" when the toolstack hands the disk to a
// user-space backend) — serving a BlockDevice to one frontend through one
// RingServer per queue.
//
// Lifecycle (blkif.h STATE DIAGRAMS), run on the Vbd's own control thread,
// which watches the frontend's state node and @releaseDomain:
//   Attach: read the toolstack's keys (frontend, frontend-id, mode,
//     device-type), publish features (feature-flush-cache, feature-barrier,
//     feature-discard + discard-granularity/-alignment/-secure,
//     feature-persistent, feature-max-indirect-segments,
//     max-ring-page-order, max-ring-pages, multi-queue-max-queues), go
//     InitWait.
//   Frontend Initialised or Connected: read its keys (frontend_keys.h), map
//     the rings, bind the event channels, start a RingServer per queue,
//     publish sectors, info, sector-size, physical-sector-size, go Connected.
//   Frontend Closing: drain in-flight I/O, stop the servers (every grant
//     unmapped, every port unbound), go Closing; frontend Closed: go Closed.
//   Frontend back to Initialising (reconnect): InitWait again, serve again.
//   Frontend domain dead, or its state node gone: tear down, go Closed,
//     domain_gone() turns true. A domain that has not been seen alive yet
//     (the toolstack wrote the directories before the guest started) is
//     waited for, up to options.domain_wait, before it counts as dead.
//   Pause(): every ring stops taking requests, in-flight I/O is answered,
//     the device flushed; a frontend reconnecting meanwhile gets paused
//     rings. Resume(): serve again (requests queued meanwhile are served).
//   A malformed frontend key: the reason goes to <backend>/error and the
//     log, the VBD goes Closing. Nothing a frontend writes crashes anything.
//   Resize(): re-reads the device size and, while Connected, rewrites
//     `sectors` (and `state`, to kick the frontend, as blkback does).
// Each state is computed afresh from the frontend's current state on every
// watch event, so lost or coalesced events cannot wedge the machine.
//
// Thread-safety: Attach/Detach/Resize/state/stats from any one control
// thread of the caller; the Vbd's own thread does the rest.
#pragma once

#include <atomic>
#include <chrono>
#include <cstdint>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "backend/block_device.h"
#include "backend/frontend_keys.h"
#include "backend/ring_server.h"
#include "base/log.h"
#include "base/status.h"
#include "xen-glue/platform.h"

namespace cowtap::backend {

// xenbus states (io/xenbus.h).
enum class XenbusState : int {
  kUnknown = 0,
  kInitialising = 1,
  kInitWait = 2,
  kInitialised = 3,
  kConnected = 4,
  kClosing = 5,
  kClosed = 6,
  kReconfiguring = 7,
  kReconfigured = 8,
};

struct VbdOptions {
  xen::DomId frontend_domid = 0;
  uint32_t devid = 0;
  // The backend directory's type component (backend/<type>/<domid>/<devid>).
  std::string backend_type = "vbd";
  // How long a frontend domain that was never seen alive is waited for.
  std::chrono::milliseconds domain_wait{30000};
  // Features offered.
  uint32_t max_ring_page_order = 4;
  uint32_t max_queues = 4;
  uint32_t max_indirect_segments = 256;  // 0: INDIRECT not offered
  bool persistent = true;
  bool flush = true;
  bool barrier = true;
  size_t max_persistent_grants_per_queue = 1056;
};

// Totals over the VBD's rings (current connection).
struct VbdStats {
  uint64_t requests = 0, reads = 0, writes = 0, flushes = 0, discards = 0;
  uint64_t bytes_read = 0, bytes_written = 0, errors = 0, eopnotsupp = 0;
  uint64_t notifications = 0, grant_maps = 0, persistent_hits = 0;
  uint32_t queues = 0, halted_queues = 0;
  size_t mapped_pages = 0;
  uint64_t leaked_pages = 0;     // guest pages whose unmap failed (see grant_pages.h)
  uint64_t notify_failures = 0;  // failed event-channel kicks (retried)
  uint64_t in_flight = 0;        // requests taken and not yet answered, now
  std::vector<uint64_t> latency_us_log2 = std::vector<uint64_t>(kLatencyBuckets, 0);  // see RingStats
};

class Vbd {
 public:
  // Reads the backend directory the toolstack wrote, publishes features,
  // goes InitWait and starts the control thread. `platform` must outlive
  // the Vbd. Fails (nothing started) if the backend directory is missing or
  // its keys are malformed, or frontend-id disagrees with options.
  static Result<std::unique_ptr<Vbd>> Attach(xen::XenPlatform& platform, const VbdOptions& options,
                                             std::shared_ptr<BlockDevice> device);
  // Detach().
  ~Vbd();
  Vbd(const Vbd&) = delete;
  Vbd& operator=(const Vbd&) = delete;

  // Stops the control thread, drains and stops every ring (releasing all
  // grants and ports) and writes state Closed. Idempotent.
  void Detach();
  // The device's size may have changed; see the file comment.
  void Resize();
  // See the file comment. Pause returns when the device is flushed: the
  // error of that flush, if any. Idempotent; callable from any thread.
  Status Pause();
  void Resume();
  bool paused() const;
  // True once the VBD tore down because its frontend domain died (or never
  // appeared within domain_wait).
  bool domain_gone() const { return domain_gone_.load(); }

  XenbusState state() const { return state_.load(); }
  // The last error reported to <backend>/error (empty if none).
  std::string last_error() const;
  // Totals since Attach (over every connection of the frontend).
  VbdStats stats() const;
  const std::string& backend_path() const { return backend_path_; }

 private:
  Vbd(xen::XenPlatform& platform, const VbdOptions& options, std::shared_ptr<BlockDevice> device);
  Status Init();
  Status PublishFeatures();
  void Run();
  // Returns how long to wait before evaluating again (-1: until an event).
  int Evaluate();
  Status Connect();
  void Disconnect();
  void Fail(const Status& why);
  Status SetState(XenbusState state);
  Result<XenbusState> ReadFrontendState();
  Status WriteDiskProperties(bool kick);
  DeviceLimits Limits(bool large_sector_size) const;

  xen::XenPlatform& platform_;
  const VbdOptions options_;
  const std::shared_ptr<BlockDevice> device_;
  std::string backend_path_;
  std::string frontend_path_;
  std::string name_;  // "vbd <domid>/<devid>" for logs
  bool read_only_ = false;
  bool discard_enabled_ = true;  // the toolstack's discard-enable key
  bool cdrom_ = false;
  std::unique_ptr<xen::XenStore> store_;  // control thread only (after Init)
  std::thread thread_;
  int wake_fd_ = -1;
  std::atomic<bool> stop_{false};
  std::atomic<bool> resize_pending_{false};
  std::atomic<XenbusState> state_{XenbusState::kInitialising};
  std::atomic<bool> domain_gone_{false};
  bool domain_seen_alive_ = false;  // control thread only
  std::chrono::steady_clock::time_point attached_at_ = std::chrono::steady_clock::now();
  // Serializes Pause/Resume with Connect, so rings started while paused
  // start paused.
  mutable std::mutex pause_mu_;
  bool paused_ = false;  // GUARDED_BY(pause_mu_)
  // Frontend-triggered errors (a guest can make them repeat at will).
  RateLimiter fail_log_{5, std::chrono::seconds(10)};

  mutable std::mutex mu_;
  std::vector<std::unique_ptr<RingServer>> servers_;  // GUARDED_BY(mu_)
  std::string last_error_;                            // GUARDED_BY(mu_)
  VbdStats retired_;                                  // counters of rings already stopped; GUARDED_BY(mu_)
};

}  // namespace cowtap::backend
