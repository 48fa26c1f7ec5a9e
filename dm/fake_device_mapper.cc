#include <fmt/format.h>

#include "dm/device_mapper.h"

namespace cowtap::dm {

Status ReloadTable(DeviceMapper& dm, const std::string& name, const DmTable& table, const DmDevices& devices) {
  COWTAP_RETURN_IF_ERROR(dm.Load(name, table, devices));
  COWTAP_RETURN_IF_ERROR(dm.Suspend(name));
  Status s = dm.Resume(name);
  if (!s.ok()) {
    // Still suspended: a second resume (which finds the table already
    // swapped or not) is the only way to unfreeze the guest's I/O.
    Status again = dm.Resume(name);
    (void)again;
  }
  return s;
}

Status FakeDeviceMapper::TakeFailure(Call::Kind kind) {
  if (fail_next_ && *fail_next_ == kind) {
    fail_next_.reset();
    return Status::IoError("fake device-mapper: injected failure");
  }
  return Status::Ok();
}

void FakeDeviceMapper::FailNext(Call::Kind kind) {
  std::lock_guard lock(mu_);
  fail_next_ = kind;
}

Status FakeDeviceMapper::Create(const std::string& name) {
  std::lock_guard lock(mu_);
  calls_.push_back({Call::kCreate, name, {}});
  COWTAP_RETURN_IF_ERROR(TakeFailure(Call::kCreate));
  if (devs_.count(name)) return Status::Busy(fmt::format("dm device {} exists", name));
  devs_[name] = Dev{};
  return Status::Ok();
}

Status FakeDeviceMapper::Load(const std::string& name, const DmTable& table, const DmDevices& devices) {
  std::lock_guard lock(mu_);
  calls_.push_back({Call::kLoad, name, table.ToText(devices)});
  COWTAP_RETURN_IF_ERROR(TakeFailure(Call::kLoad));
  auto it = devs_.find(name);
  if (it == devs_.end()) return Status::NotFound(fmt::format("dm device {} does not exist", name));
  it->second.inactive = table;
  return Status::Ok();
}

Status FakeDeviceMapper::Suspend(const std::string& name) {
  std::lock_guard lock(mu_);
  calls_.push_back({Call::kSuspend, name, {}});
  COWTAP_RETURN_IF_ERROR(TakeFailure(Call::kSuspend));
  auto it = devs_.find(name);
  if (it == devs_.end()) return Status::NotFound(fmt::format("dm device {} does not exist", name));
  it->second.suspended = true;
  return Status::Ok();
}

Status FakeDeviceMapper::Resume(const std::string& name) {
  std::lock_guard lock(mu_);
  calls_.push_back({Call::kResume, name, {}});
  COWTAP_RETURN_IF_ERROR(TakeFailure(Call::kResume));
  auto it = devs_.find(name);
  if (it == devs_.end()) return Status::NotFound(fmt::format("dm device {} does not exist", name));
  Dev& d = it->second;
  if (d.inactive) {
    d.live = std::move(d.inactive);
    d.inactive.reset();
    ++reloads_;
  }
  d.suspended = false;
  return Status::Ok();
}

Status FakeDeviceMapper::Remove(const std::string& name) {
  std::lock_guard lock(mu_);
  calls_.push_back({Call::kRemove, name, {}});
  COWTAP_RETURN_IF_ERROR(TakeFailure(Call::kRemove));
  if (devs_.erase(name) == 0) return Status::NotFound(fmt::format("dm device {} does not exist", name));
  return Status::Ok();
}

Result<DmDeviceStatus> FakeDeviceMapper::GetStatus(const std::string& name) {
  std::lock_guard lock(mu_);
  auto it = devs_.find(name);
  if (it == devs_.end()) return Status::NotFound(fmt::format("dm device {} does not exist", name));
  const Dev& d = it->second;
  DmDeviceStatus st;
  st.suspended = d.suspended;
  st.has_live_table = d.live.has_value();
  st.has_inactive_table = d.inactive.has_value();
  if (d.live) {
    st.live_size_sectors = d.live->size_sectors();
    st.live_target_count = static_cast<uint32_t>(d.live->segments().size());
  }
  return st;
}

std::optional<DmTable> FakeDeviceMapper::LiveTable(const std::string& name) const {
  std::lock_guard lock(mu_);
  auto it = devs_.find(name);
  if (it == devs_.end()) return std::nullopt;
  return it->second.live;
}

std::vector<FakeDeviceMapper::Call> FakeDeviceMapper::calls() const {
  std::lock_guard lock(mu_);
  return calls_;
}

uint64_t FakeDeviceMapper::reloads() const {
  std::lock_guard lock(mu_);
  return reloads_;
}

}  // namespace cowtap::dm
