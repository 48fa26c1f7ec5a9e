// OffloadMissDevice: the BlockDevice an offload's miss path (the NbdServer
// the kernel's nbd client talks to) serves, a decorator over the engine's
// device that keeps every cluster the dm table routes linear allocated, in
// place and not flagged zero while the offload is on.
//
// Why: a linear segment sends the guest's I/O straight to the image file.
// That is only right while the cluster behind it stays allocated, in place
// and not flagged zero: a discard that freed it (and a later allocation
// that reused it for another virtual cluster) or a qcow2 zero flag would
// let the kernel write where the engine no longer looks. Suspending the dm
// device from here to revoke the range first is impossible (the discard
// being served is itself in flight on the dm device, and a suspend waits
// for it), so a discard or write-zeroes is split by the table:
//   * clusters the live table routes linear are zeroed in place
//     (zero_in_place: a hole punched for a discard, a zeroed range kept
//     allocated for a write-zeroes, as the loop device does on the linear
//     path); their metadata is left as it is, so the route stays right;
//   * the rest goes to the engine (free, zero flag), while the range is
//     fenced (MissFence). The controller's gate (FenceTable) keeps fenced
//     ranges miss in every table it loads, and also the ranges changed
//     since the plan's clusters were collected, so a plan made before the
//     engine freed a cluster cannot route it linear afterwards.
// "Linear" means linear in any table the kernel may be running (the live
// one and one being loaded): zeroing a cluster in place is right whatever
// the table, so doubt goes that way.
// Without routing (OffloadMissRouting::zero_in_place empty) the device
// offers no discard and turns write-zeroes into writes of zero bytes, which
// change data only. Everything else forwards unchanged.
//
// Thread-safety: as the device it wraps; MissFence is thread-safe.
#pragma once

#include <atomic>
#include <deque>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <utility>
#include <vector>

#include "backend/block_device.h"
#include "dm/dm_table.h"

namespace cowtap::dm {

// Virtual clusters a discard or write-zeroes is changing right now, and a
// log of the ranges that were, so that a plan collected before a change
// can still drop what the change touched.
class MissFence {
 public:
  using Range = std::pair<uint64_t, uint64_t>;  // first cluster, count
  static constexpr size_t kLogRanges = 4096;

  void Enter(uint64_t first_cluster, uint64_t count);
  void Leave(uint64_t first_cluster, uint64_t count);  // REQUIRES: a matching Enter
  bool Holds(uint64_t cluster) const;
  bool empty() const;
  // Counts Leaves; read it before collecting the clusters of a plan.
  uint64_t generation() const;
  // The ranges fenced now plus those left after generation `since`;
  // nullopt when the log no longer reaches back that far (treat
  // everything as changed).
  std::optional<std::vector<Range>> ChangedSince(uint64_t since) const;

 private:
  mutable std::mutex mu_;
  std::multimap<uint64_t, uint64_t> ranges_;     // first -> count; GUARDED_BY(mu_)
  std::deque<std::pair<uint64_t, Range>> left_;  // generation -> range; GUARDED_BY(mu_)
  uint64_t generation_ = 0;                      // GUARDED_BY(mu_)
  uint64_t dropped_through_ = 0;                 // the log lost generations up to this; GUARDED_BY(mu_)
};

// The gate (OffloadController::Gate) that keeps every range in
// fence.ChangedSince(since) miss.
DmTable FenceTable(const DmTable& table, const MissFence& fence, uint64_t since, uint64_t cluster_size);

// What the routing did, for stats and tests.
struct MissRoutingCounters {
  std::atomic<uint64_t> in_place_requests{0}, in_place_bytes{0};  // linear: zeroed in the file
  std::atomic<uint64_t> engine_requests{0}, engine_bytes{0};      // the rest: to the engine, fenced
};

// How a linear cluster is zeroed in place: a discard may give the file's
// blocks back (punch a hole); a write-zeroes keeps them allocated (the
// guest may rely on it, as with REQ_NOUNMAP), like the loop device does.
enum class ZeroMode : uint8_t { kDeallocate, kKeepAllocated };

struct OffloadMissRouting {
  uint64_t cluster_size = 0;
  std::shared_ptr<MissFence> fence;
  std::shared_ptr<MissRoutingCounters> counters;  // optional
  // Every table the kernel may run now (OffloadController::RoutingTables;
  // empty: no device yet, nothing linear). Called with the range fenced.
  std::function<std::vector<std::shared_ptr<const DmTable>>()> routing_tables;
  // Makes [host_offset, host_offset + length) of the image file read as
  // zeros without touching image metadata.
  std::function<Status(uint64_t host_offset, uint64_t length, ZeroMode mode)> zero_in_place;
};

// 1 MiB of zero bytes, shared (read-only) by every writer of zeros here.
const std::vector<uint8_t>& ZeroChunk();

std::unique_ptr<backend::BlockDevice> NewOffloadMissDevice(std::shared_ptr<backend::BlockDevice> inner,
                                                           OffloadMissRouting routing = {});

}  // namespace cowtap::dm
