#include "tests/blkif/blkif_rig.h"

#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <unistd.h>

#include <atomic>
#include <algorithm>
#include <mutex>
#include <thread>

#include <fmt/format.h>

#include "backend/vbd.h"
#include "cow/image.h"

namespace cowtap::blkif_test {

using xen::DomId;

// One VBD served by backend::Vbd, with a sampler that keeps the most its
// rings ever reported (a ring's counters go away when it is stopped, so a
// test that looks after the guest left still sees what happened).
class TestVbd {
 public:
  TestVbd(xen::SimHypervisor& hv, DomId domid, uint32_t devid, std::shared_ptr<backend::BlockDevice> device,
          const VbdFeatures& features)
      : hv_(hv), platform_(hv.NewPlatform(xen::kDom0)), device_(std::move(device)) {
    options_.frontend_domid = domid;
    options_.devid = devid;
    options_.max_ring_page_order = features.max_ring_page_order;
    options_.max_queues = features.max_queues;
    options_.max_indirect_segments = features.max_indirect_segments;
    options_.persistent = features.persistent;
    options_.flush = features.flush;
    options_.barrier = features.barrier;
  }
  ~TestVbd() {
    sampling_ = false;
    if (sampler_.joinable()) sampler_.join();
    if (vbd_) vbd_->Detach();
  }

  // As with xl, the device is attached once its domain exists: the Vbd
  // treats a domain that is not alive as dead. So attach on a thread when
  // the guest process has connected to the hypervisor.
  void Start() {
    sampling_ = true;
    sampler_ = std::thread([this] {
      while (sampling_ && !hv_.WaitForDomain(options_.frontend_domid, std::chrono::milliseconds(20))) {
      }
      if (!sampling_) return;
      auto vbd = backend::Vbd::Attach(*platform_, options_, device_);
      {
        std::lock_guard<std::mutex> lock(mu_);
        if (!vbd.ok()) {
          sticky_.halt_reason = vbd.status().ToString();
          return;
        }
        vbd_ = std::move(*vbd);
      }
      while (sampling_) {
        Sample();
        usleep(2000);
      }
    });
  }

  VbdStatus GetStatus() {
    Sample();
    std::lock_guard<std::mutex> lock(mu_);
    VbdStatus s = sticky_;
    s.state = vbd_ ? static_cast<int>(vbd_->state()) : 0;
    return s;
  }

  void Resize() {
    std::lock_guard<std::mutex> lock(mu_);
    if (vbd_) vbd_->Resize();
  }

 private:
  void Sample() {
    std::lock_guard<std::mutex> lock(mu_);
    if (!vbd_) return;
    const backend::VbdStats st = vbd_->stats();
    const int state = static_cast<int>(vbd_->state());
    if (state == 4 && last_state_ != 4) ++sticky_.connects;
    last_state_ = state;
    sticky_.requests = std::max(sticky_.requests, st.requests);
    sticky_.errors = std::max(sticky_.errors, st.errors);
    sticky_.eopnotsupp = std::max(sticky_.eopnotsupp, st.eopnotsupp);
    sticky_.queues = std::max(sticky_.queues, st.queues);
    if (st.halted_queues > 0) sticky_.any_ring_halted = true;
    const std::string err = vbd_->last_error();
    if (!err.empty()) sticky_.halt_reason = err;
  }

  xen::SimHypervisor& hv_;
  std::unique_ptr<xen::XenPlatform> platform_;
  std::shared_ptr<backend::BlockDevice> device_;
  backend::VbdOptions options_;
  std::unique_ptr<backend::Vbd> vbd_;
  std::atomic<bool> sampling_{false};
  std::thread sampler_;
  std::mutex mu_;
  VbdStatus sticky_;
  int last_state_ = 0;
};

Result<std::unique_ptr<BlkifRig>> BlkifRig::Create() {
  std::unique_ptr<BlkifRig> rig(new BlkifRig());
  char tmpl[] = "/tmp/cowtap-blkif-XXXXXX";
  if (mkdtemp(tmpl) == nullptr) return cowtap::Status::FromErrno(errno, "mkdtemp");
  rig->dir_ = tmpl;
  COWTAP_ASSIGN_OR_RETURN(rig->hv_, xen::SimHypervisor::Start(rig->dir_ + "/xen.sock"));
  rig->platform_ = rig->hv_->NewPlatform(xen::kDom0);
  COWTAP_ASSIGN_OR_RETURN(rig->xs_, rig->platform_->OpenXenStore());
  return rig;
}

BlkifRig::~BlkifRig() {
  vbds_.clear();
  xs_.reset();
  platform_.reset();
  hv_.reset();
  if (!dir_.empty()) RunCommand("rm -rf '" + dir_ + "'");
}

cowtap::Status BlkifRig::AddVbd(DomId domid, uint32_t devid, std::shared_ptr<backend::BlockDevice> device,
                                const VbdFeatures& features, bool writable) {
  xen::SimVbdConfig cfg;
  cfg.frontend_domid = domid;
  cfg.devid = devid;
  cfg.params = "test";
  cfg.writable = writable;
  COWTAP_RETURN_IF_ERROR(xen::ToolstackAddVbd(*xs_, cfg));
  auto vbd = std::make_unique<TestVbd>(*hv_, domid, devid, std::move(device), features);
  vbd->Start();
  vbds_[{domid, devid}] = std::move(vbd);
  return cowtap::Status::Ok();
}

cowtap::Status BlkifRig::RemoveVbd(DomId domid, uint32_t devid) {
  vbds_.erase({domid, devid});
  xen::SimVbdConfig cfg;
  cfg.frontend_domid = domid;
  cfg.devid = devid;
  return xen::ToolstackRemoveVbd(*xs_, cfg);
}

VbdStatus BlkifRig::GetStatus(DomId domid, uint32_t devid) {
  auto it = vbds_.find({domid, devid});
  return it == vbds_.end() ? VbdStatus{} : it->second->GetStatus();
}

bool BlkifRig::WaitState(DomId domid, uint32_t devid, int state, int timeout_ms) {
  for (int waited = 0; waited < timeout_ms; waited += 10) {
    if (GetStatus(domid, devid).state == state) return true;
    usleep(10000);
  }
  return false;
}

cowtap::Status BlkifRig::Resize(DomId domid, uint32_t devid) {
  auto it = vbds_.find({domid, devid});
  if (it == vbds_.end()) return cowtap::Status::NotFound("no such vbd");
  it->second->Resize();
  return cowtap::Status::Ok();
}

std::vector<std::string> BlkifRig::GuestArgs(DomId domid, uint32_t devid, std::vector<std::string> extra) const {
  std::vector<std::string> args = {"--socket", socket_path(), "--domid", std::to_string(domid), "--devid",
                                   std::to_string(devid), "--timeout-ms", "5000"};
  args.insert(args.end(), extra.begin(), extra.end());
  return args;
}

int RunCommand(const std::string& command, std::string* out) {
  FILE* p = popen((command + " 2>&1").c_str(), "r");
  if (p == nullptr) return -1;
  std::string text;
  char buf[4096];
  size_t n;
  while ((n = fread(buf, 1, sizeof(buf), p)) > 0) text.append(buf, n);
  const int rc = pclose(p);
  if (out != nullptr) *out = text;
  return WIFEXITED(rc) ? WEXITSTATUS(rc) : -1;
}

Result<std::shared_ptr<backend::BlockDevice>> OpenImageDevice(const std::string& path, bool read_only) {
  cow::OpenOptions options;
  options.read_only = read_only;
  COWTAP_ASSIGN_OR_RETURN(std::unique_ptr<cow::Image> image, cow::OpenImage(path, options));
  std::shared_ptr<cow::Image> shared(std::move(image));
  backend::ImageDeviceOptions dev;
  dev.read_only = read_only;
  return std::shared_ptr<backend::BlockDevice>(backend::NewImageBlockDevice(shared, dev));
}

}  // namespace cowtap::blkif_test
