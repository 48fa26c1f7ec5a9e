#include "dm/offload_controller.h"

#include <fmt/format.h>

#include <algorithm>

#include "base/checked_math.h"

namespace cowtap::dm {

void ReloadScheduler::NoteChanges(Clock::time_point now, uint64_t count) {
  if (count == 0) return;
  if (pending_ == 0) first_pending_ = now;
  pending_ = AddU64(pending_, count).value_or(UINT64_MAX);
}

bool ReloadScheduler::ShouldReload(Clock::time_point now) const {
  if (pending_ == 0) return false;
  if (last_reload_ && now - *last_reload_ < policy_.min_interval) return false;
  return pending_ >= policy_.max_pending || now - *first_pending_ >= policy_.max_delay;
}

void ReloadScheduler::NoteReloaded(Clock::time_point now) {
  pending_ = 0;
  first_pending_.reset();
  last_reload_ = now;
}

OffloadController::OffloadController(DeviceMapper& dm, std::string name, DmDevices devices, OffloadPlanner planner,
                                     Source source, ReloadPolicy policy, Now now)
    : dm_(dm),
      name_(std::move(name)),
      devices_(std::move(devices)),
      planner_(planner),
      source_(std::move(source)),
      now_(std::move(now)),
      scheduler_(policy) {}

bool OffloadController::GateAndPublishLocked(DmTable& table) {
  std::lock_guard lock(routes_mu_);
  if (gate_) table = gate_(table);
  // After this many failed reloads in a row, only go back to user space:
  // an all-miss table routes nothing, so it need not be remembered, and
  // once one loads the list is one table again.
  if (maybe_live_.size() >= kMaxUncertainTables) table = DmTable::AllMiss(table.size_sectors());
  if (started_ && table == live_ && !live_uncertain_) return false;
  // From its Load on, the kernel may run it.
  const bool known = std::any_of(maybe_live_.begin(), maybe_live_.end(), [&](const auto& t) { return *t == table; });
  if (!known && table.linear_sectors() > 0) maybe_live_.push_back(std::make_shared<const DmTable>(table));
  return true;
}

Status OffloadController::ApplyLocked(const DmTable& table) {
  const auto t0 = Clock::now();
  Status s = ReloadTable(dm_, name_, table, devices_);
  stats_.reload_time += Clock::now() - t0;
  if (!s.ok()) {
    live_uncertain_ = true;  // maybe_live_ keeps every table it may run
    return s;
  }
  {
    std::lock_guard lock(routes_mu_);
    maybe_live_.assign(1, std::make_shared<const DmTable>(table));
  }
  live_ = table;
  live_uncertain_ = false;
  ++stats_.reloads;
  stats_.linear_sectors = table.linear_sectors();
  stats_.segments = table.segments().size();
  scheduler_.NoteReloaded(now_());
  return Status::Ok();
}

Status OffloadController::Start() {
  std::lock_guard lock(mu_);
  if (started_) return Status::Busy(fmt::format("offload {} already started", name_));
  COWTAP_RETURN_IF_ERROR(dm_.Create(name_));
  DmTable all_miss = DmTable::AllMiss(planner_.options().disk_size_bytes / kSectorSize);
  GateAndPublishLocked(all_miss);
  Status s = ApplyLocked(all_miss);
  if (!s.ok()) {
    (void)dm_.Remove(name_);
    std::lock_guard routes(routes_mu_);
    maybe_live_.clear();
    return s;
  }
  started_ = true;
  return Status::Ok();
}

Result<bool> OffloadController::ReloadNow() {
  std::lock_guard lock(mu_);
  if (!started_) return Status::InvalidArgument(fmt::format("offload {} not started", name_));
  COWTAP_ASSIGN_OR_RETURN(DmTable table, planner_.Plan(source_()));
  if (!GateAndPublishLocked(table)) {
    scheduler_.NoteReloaded(now_());
    return false;
  }
  COWTAP_RETURN_IF_ERROR(ApplyLocked(table));
  return true;
}

Result<bool> OffloadController::NoteChanges(uint64_t count) {
  {
    std::lock_guard lock(mu_);
    scheduler_.NoteChanges(now_(), count);
    if (!scheduler_.ShouldReload(now_())) return false;
  }
  return ReloadNow();
}

Status OffloadController::RevokeBeforeReuse(uint64_t first_cluster, uint64_t count) {
  std::lock_guard lock(mu_);
  ++stats_.revokes;
  if (!started_) return Status::Ok();  // nothing is routed to the kernel
  const uint64_t spc = planner_.options().cluster_size / kSectorSize;
  const uint64_t first_sector = MulU64(first_cluster, spc).value_or(UINT64_MAX);
  const uint64_t sectors = MulU64(count, spc).value_or(UINT64_MAX);
  DmTable table = live_.WithMiss(first_sector, sectors);
  if (!GateAndPublishLocked(table)) {
    ++stats_.revokes_without_reload;
    return Status::Ok();
  }
  // Forced, whatever the rate bound says: the engine waits for it.
  return ApplyLocked(table);
}

Status OffloadController::Stop() {
  std::lock_guard lock(mu_);
  if (!started_) return Status::Ok();
  started_ = false;
  Status s = dm_.Remove(name_);
  if (s.ok()) {
    std::lock_guard routes(routes_mu_);
    maybe_live_.clear();
  }
  return s;
}

DmTable OffloadController::live_table() const {
  std::lock_guard lock(mu_);
  return live_;
}

std::vector<std::shared_ptr<const DmTable>> OffloadController::RoutingTables() const {
  std::lock_guard lock(routes_mu_);
  return maybe_live_;
}

OffloadStats OffloadController::stats() const {
  std::lock_guard lock(mu_);
  return stats_;
}

}  // namespace cowtap::dm
