// The libdevmapper-backed DeviceMapper (see device_mapper.h). Each call is
// one dm_task (DM_DEVICE_CREATE / RELOAD / SUSPEND / RESUME / REMOVE /
// INFO) run synchronously; libdevmapper serializes on the control node.
//
// /dev/mapper/<name>: the kernel (devtmpfs) only makes /dev/dm-N; the named
// node is libdevmapper's (or udev's) job, and libdevmapper only queues its
// node operations in dm_task_run — they happen in dm_task_update_nodes(),
// which Run() calls after every task, so the node exists once the first
// Resume returns and is gone once Remove returns, with or without udev.
#include <libdevmapper.h>
#include <unistd.h>

#include <fmt/format.h>

#include "dm/device_mapper.h"

namespace cowtap::dm {
namespace {

constexpr const char* kControl = "/dev/mapper/control";

struct TaskDeleter {
  void operator()(dm_task* t) const { dm_task_destroy(t); }
};
using Task = std::unique_ptr<dm_task, TaskDeleter>;

Result<Task> NewTask(int type, const std::string& name, const char* what) {
  Task t(dm_task_create(type));
  if (!t) return Status::NoSpace(fmt::format("dm {} {}: dm_task_create failed", what, name));
  if (!dm_task_set_name(t.get(), name.c_str())) {
    return Status::InvalidArgument(fmt::format("dm {} {}: bad device name", what, name));
  }
  return t;
}

Status Run(dm_task* t, const std::string& name, const char* what) {
  if (!dm_task_run(t)) {
    return Status::IoError(
        fmt::format("dm {} {} failed (see the kernel log; is dm_mod loaded and are we root?)", what, name));
  }
  dm_task_update_nodes();
  return Status::Ok();
}

class KernelDeviceMapper : public DeviceMapper {
 public:
  Status Create(const std::string& name) override {
    COWTAP_ASSIGN_OR_RETURN(Task t, NewTask(DM_DEVICE_CREATE, name, "create"));
    return Run(t.get(), name, "create");
  }

  Status Load(const std::string& name, const DmTable& table, const DmDevices& devices) override {
    COWTAP_ASSIGN_OR_RETURN(Task t, NewTask(DM_DEVICE_RELOAD, name, "load"));
    for (const DmSegment& s : table.segments()) {
      std::string params = DmTable::TargetParams(s, devices);
      if (!dm_task_add_target(t.get(), s.start_sector, s.sector_count, "linear", params.c_str())) {
        return Status::NoSpace(fmt::format("dm load {}: dm_task_add_target failed at sector {}", name, s.start_sector));
      }
    }
    return Run(t.get(), name, "load");
  }

  Status Suspend(const std::string& name) override {
    COWTAP_ASSIGN_OR_RETURN(Task t, NewTask(DM_DEVICE_SUSPEND, name, "suspend"));
    return Run(t.get(), name, "suspend");
  }

  Status Resume(const std::string& name) override {
    COWTAP_ASSIGN_OR_RETURN(Task t, NewTask(DM_DEVICE_RESUME, name, "resume"));
    return Run(t.get(), name, "resume");
  }

  Status Remove(const std::string& name) override {
    COWTAP_ASSIGN_OR_RETURN(Task t, NewTask(DM_DEVICE_REMOVE, name, "remove"));
    return Run(t.get(), name, "remove");
  }

  Result<DmDeviceStatus> GetStatus(const std::string& name) override {
    COWTAP_ASSIGN_OR_RETURN(Task t, NewTask(DM_DEVICE_TABLE, name, "status"));
    COWTAP_RETURN_IF_ERROR(Run(t.get(), name, "status"));
    dm_info info{};
    if (!dm_task_get_info(t.get(), &info)) return Status::IoError(fmt::format("dm status {}: no info", name));
    if (!info.exists) return Status::NotFound(fmt::format("dm device {} does not exist", name));
    DmDeviceStatus st;
    st.suspended = info.suspended != 0;
    st.has_live_table = info.live_table != 0;
    st.has_inactive_table = info.inactive_table != 0;
    st.live_target_count = static_cast<uint32_t>(info.target_count);
    void* next = nullptr;
    do {
      uint64_t start = 0, length = 0;
      char* type = nullptr;
      char* params = nullptr;
      next = dm_get_next_target(t.get(), next, &start, &length, &type, &params);
      if (type) st.live_size_sectors = std::max(st.live_size_sectors, start + length);
    } while (next);
    return st;
  }
};

}  // namespace

Result<std::unique_ptr<DeviceMapper>> NewKernelDeviceMapper() {
  if (access(kControl, R_OK | W_OK) != 0) {
    return Status::NotSupported(
        fmt::format("{} is absent or not accessible: load dm_mod and run as root", kControl));
  }
  return std::unique_ptr<DeviceMapper>(new KernelDeviceMapper());
}

}  // namespace cowtap::dm
