// BlkifRig: the backend half of an end-to-end blkif test, in the test
// process — a SimHypervisor on a Unix socket in a temp dir, and VBDs whose
// rings are served by backend::RingServer over a BlockDevice (an image file
// opened with cow::OpenImage, or a MemBlockDevice), each a backend::Vbd —
// the real xenbus state machine and ring servers. The guest half is the
// cowtap_guest program, started as a separate process (guest_process.h).
//
// Thread-safety: the rig's methods are called from the test thread; each
// VBD serves on its own threads.
#pragma once

#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "backend/block_device.h"
#include "base/status.h"
#include "xen-glue/sim.h"

namespace cowtap::blkif_test {

struct VbdFeatures {
  uint32_t max_ring_page_order = 4;
  uint32_t max_queues = 4;
  bool persistent = true;
  uint32_t max_indirect_segments = 256;  // 0: not offered
  bool flush = true;
  bool barrier = true;
};

struct VbdStatus {
  int state = 0;                 // the backend's xenbus state
  // The rest is the most the VBD ever reported while the test ran.
  bool any_ring_halted = false;
  std::string halt_reason;       // the VBD's last error, if any
  uint64_t requests = 0;
  uint64_t errors = 0;
  uint64_t eopnotsupp = 0;
  uint32_t queues = 0;
  uint32_t connects = 0;         // times it was seen entering Connected
};

class TestVbd;

class BlkifRig {
 public:
  static Result<std::unique_ptr<BlkifRig>> Create();
  ~BlkifRig();

  const std::string& dir() const { return dir_; }
  const std::string& socket_path() const { return hv_->socket_path(); }
  xen::SimHypervisor& hv() { return *hv_; }
  xen::XenStore& xs() { return *xs_; }

  // Writes the toolstack's dirs (mode "w" or "r") and attaches a Vbd serving
  // device for (domid, devid).
  Status AddVbd(xen::DomId domid, uint32_t devid, std::shared_ptr<backend::BlockDevice> device,
                const VbdFeatures& features = {}, bool writable = true);
  // Stops serving and removes the dirs.
  Status RemoveVbd(xen::DomId domid, uint32_t devid);
  VbdStatus GetStatus(xen::DomId domid, uint32_t devid);
  // Waits until the VBD's backend state is `state` (false on timeout).
  bool WaitState(xen::DomId domid, uint32_t devid, int state, int timeout_ms = 5000);
  // Grows or shrinks the served disk (the device has already changed size).
  Status Resize(xen::DomId domid, uint32_t devid);

  // Arguments for cowtap_guest to attach to (domid, devid), plus extra.
  std::vector<std::string> GuestArgs(xen::DomId domid, uint32_t devid, std::vector<std::string> extra = {}) const;

 private:
  BlkifRig() = default;
  std::string dir_;
  std::unique_ptr<xen::SimHypervisor> hv_;
  std::unique_ptr<xen::XenPlatform> platform_;
  std::unique_ptr<xen::XenStore> xs_;
  std::map<std::pair<xen::DomId, uint32_t>, std::unique_ptr<TestVbd>> vbds_;
};

// Image helpers (qemu-img is the oracle).
// Runs a shell command; returns its exit code and puts stdout+stderr in *out.
int RunCommand(const std::string& command, std::string* out = nullptr);
// Opens an image file (read-write unless read_only) as a BlockDevice.
Result<std::shared_ptr<backend::BlockDevice>> OpenImageDevice(const std::string& path, bool read_only = false);

}  // namespace cowtap::blkif_test
