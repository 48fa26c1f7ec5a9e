// The live side of the kernel offload for one VBD:
//
// ReloadScheduler decides WHEN to reload: it accumulates notes of changed
// remaps and says "reload now" once enough changes are pending
// (max_pending) or the oldest pending change has waited max_delay — but
// never sooner than min_interval after the previous reload (suspend flushes
// in-flight I/O, so reloads must stay rare). Pure logic over times the
// caller passes in; not thread-safe (the controller guards it).
//
// RemapRevoker is the hook the engine calls before a cluster stops being
// writable in place (discard, CoW because the refcount rose, snapshot,
// zeroing that frees it).
//
// OffloadController owns the dm device of a VBD: creates it all-miss, keeps
// it reloaded from the planner and a source of writable clusters, and
// implements RemapRevoker. Thread-safe: every method serializes on one
// mutex, so a Refresh never interleaves with a Revoke — except
// RoutingTables, which only takes a short lock of its own and so may be
// called from the miss path while a reload waits in suspend for that very
// request.
#pragma once

#include <chrono>
#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <vector>

#include "base/status.h"
#include "dm/device_mapper.h"
#include "dm/dm_table.h"
#include "dm/offload_planner.h"

namespace cowtap::dm {

using Clock = std::chrono::steady_clock;

struct ReloadPolicy {
  Clock::duration min_interval = std::chrono::milliseconds(200);  // rate bound
  Clock::duration max_delay = std::chrono::seconds(1);            // staleness bound
  uint64_t max_pending = 256;                                     // count bound
};

class ReloadScheduler {
 public:
  explicit ReloadScheduler(const ReloadPolicy& policy) : policy_(policy) {}
  // count remaps changed at now (new writable clusters seen).
  void NoteChanges(Clock::time_point now, uint64_t count = 1);
  // Whether a reload should happen at now.
  bool ShouldReload(Clock::time_point now) const;
  // A reload (scheduled or forced) completed at now: pending cleared.
  void NoteReloaded(Clock::time_point now);
  uint64_t pending() const { return pending_; }

 private:
  ReloadPolicy policy_;
  uint64_t pending_ = 0;
  std::optional<Clock::time_point> first_pending_;
  std::optional<Clock::time_point> last_reload_;
};

class RemapRevoker {
 public:
  virtual ~RemapRevoker() = default;
  // Routes virtual clusters [first_cluster, first_cluster + count) to user
  // space and returns only once the kernel runs the table that does (after
  // the reload's suspend drained every in-flight linear I/O). The engine
  // must call it AFTER invalidating those clusters in its remap cache and
  // BEFORE freeing, copying or reusing them; on error the cluster must not
  // be reused (fail the operation that wanted it).
  virtual Status RevokeBeforeReuse(uint64_t first_cluster, uint64_t count) = 0;
};

struct OffloadStats {
  uint64_t reloads = 0;
  uint64_t revokes = 0;
  uint64_t revokes_without_reload = 0;  // range was already all miss
  Clock::duration reload_time{};        // total time in ReloadTable
  uint64_t linear_sectors = 0;          // of the live table
  uint64_t segments = 0;
};

class OffloadController : public RemapRevoker {
 public:
  using Source = std::function<std::vector<WritableCluster>()>;
  using Now = std::function<Clock::time_point()>;
  // Last word on every table before it is loaded: may only turn ranges
  // miss. Runs under the lock RoutingTables takes, so a caller that marks
  // a range (for the gate to see) and then reads RoutingTables either has
  // its mark honoured or sees the table that ignored it.
  using Gate = std::function<DmTable(const DmTable&)>;

  OffloadController(DeviceMapper& dm, std::string name, DmDevices devices, OffloadPlanner planner, Source source,
                    ReloadPolicy policy = {}, Now now = Clock::now);
  ~OffloadController() override = default;

  // Creates the device with an all-miss table (live on return).
  Status Start();
  // Plans from the source and reloads if the table changed. Returns whether
  // a reload happened.
  Result<bool> ReloadNow();
  // Tells the scheduler about count changed remaps; reloads if it says so.
  Result<bool> NoteChanges(uint64_t count);
  Status RevokeBeforeReuse(uint64_t first_cluster, uint64_t count) override;
  // Removes the device.
  Status Stop();
  // Set before Start.
  void SetGate(Gate gate) { gate_ = std::move(gate); }

  DmTable live_table() const;
  // Every table the kernel may be running right now: the live one, and
  // while a reload is between Load and Resume (or failed there) the
  // loaded ones too. Empty before Start and after Stop.
  std::vector<std::shared_ptr<const DmTable>> RoutingTables() const;
  OffloadStats stats() const;

 private:
  // Gates table and publishes it in maybe_live_; false if it then equals
  // the live table (nothing to load).
  bool GateAndPublishLocked(DmTable& table);
  Status ApplyLocked(const DmTable& table);  // REQUIRES: GateAndPublishLocked

  DeviceMapper& dm_;
  const std::string name_;
  const DmDevices devices_;
  const OffloadPlanner planner_;
  const Source source_;
  const Now now_;
  mutable std::mutex mu_;
  ReloadScheduler scheduler_;  // GUARDED_BY(mu_)
  DmTable live_;               // GUARDED_BY(mu_)
  bool started_ = false;       // GUARDED_BY(mu_)
  // A reload failed after its Load: the kernel may run either table, so
  // live_ is not trusted to say a range is already miss.
  bool live_uncertain_ = false;  // GUARDED_BY(mu_)
  OffloadStats stats_;           // GUARDED_BY(mu_)
  static constexpr size_t kMaxUncertainTables = 8;
  Gate gate_;
  mutable std::mutex routes_mu_;                            // taken inside mu_, never the other way
  std::vector<std::shared_ptr<const DmTable>> maybe_live_;  // GUARDED_BY(routes_mu_)
};

}  // namespace cowtap::dm
