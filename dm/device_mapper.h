// DeviceMapper: the kernel's device-mapper as the offload sees it — create a
// named device, load a table into its inactive slot, suspend/resume (resume
// swaps the loaded table in), remove, and report status. Two
// implementations: NewKernelDeviceMapper() over libdevmapper (needs
// /dev/mapper/control and CAP_SYS_ADMIN), and FakeDeviceMapper, which keeps
// the same state machine in memory and records every call for tests.
//
// Thread-safety: implementations are thread-safe; callers serialize the
// load/suspend/resume sequence of one device themselves (ReloadTable does it
// in one call).
#pragma once

#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <vector>

#include "base/status.h"
#include "dm/dm_table.h"

namespace cowtap::dm {

struct DmDeviceStatus {
  bool suspended = false;
  bool has_live_table = false;
  bool has_inactive_table = false;
  uint64_t live_size_sectors = 0;
  uint32_t live_target_count = 0;
};

class DeviceMapper {
 public:
  DeviceMapper() = default;
  DeviceMapper(const DeviceMapper&) = delete;
  DeviceMapper& operator=(const DeviceMapper&) = delete;
  virtual ~DeviceMapper() = default;

  // Creates an empty device (no table). kBusy if the name exists.
  virtual Status Create(const std::string& name) = 0;
  // Loads table into the inactive slot (replacing one loaded before). The
  // live table does not change until Resume. kNotFound if no such device.
  virtual Status Load(const std::string& name, const DmTable& table, const DmDevices& devices) = 0;
  // Suspends: returns once in-flight I/O has completed; new I/O is queued.
  virtual Status Suspend(const std::string& name) = 0;
  // Resumes; a loaded inactive table becomes live first.
  virtual Status Resume(const std::string& name) = 0;
  // Removes the device. kNotFound if no such device.
  virtual Status Remove(const std::string& name) = 0;
  virtual Result<DmDeviceStatus> GetStatus(const std::string& name) = 0;
};

// Load, Suspend, Resume: the table is live when this returns OK. On a
// failure after Suspend, tries to Resume (with the old table) before
// returning the first error, so the device is not left frozen.
Status ReloadTable(DeviceMapper& dm, const std::string& name, const DmTable& table, const DmDevices& devices);

// The real one (libdevmapper). kNotSupported if /dev/mapper/control is absent.
Result<std::unique_ptr<DeviceMapper>> NewKernelDeviceMapper();

// In-memory device-mapper recording every call.
class FakeDeviceMapper : public DeviceMapper {
 public:
  struct Call {
    enum Kind { kCreate, kLoad, kSuspend, kResume, kRemove } kind;
    std::string name;
    std::string table_text;  // kLoad: dmsetup form
  };
  Status Create(const std::string& name) override;
  Status Load(const std::string& name, const DmTable& table, const DmDevices& devices) override;
  Status Suspend(const std::string& name) override;
  Status Resume(const std::string& name) override;
  Status Remove(const std::string& name) override;
  Result<DmDeviceStatus> GetStatus(const std::string& name) override;

  // The live table of a device, if any.
  std::optional<DmTable> LiveTable(const std::string& name) const;
  std::vector<Call> calls() const;
  // Number of resumes that swapped a new table in.
  uint64_t reloads() const;
  // Makes the next call of this kind fail with kIoError (for error paths).
  void FailNext(Call::Kind kind);

 private:
  struct Dev {
    std::optional<DmTable> live, inactive;
    bool suspended = false;
  };
  Status TakeFailure(Call::Kind kind);
  mutable std::mutex mu_;
  std::map<std::string, Dev> devs_;
  std::vector<Call> calls_;
  std::optional<Call::Kind> fail_next_;
  uint64_t reloads_ = 0;
};

}  // namespace cowtap::dm
