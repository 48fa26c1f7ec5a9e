#include "tests/blkif/blkif_rig.h"

#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <unistd.h>

#include <atomic>
#include <charconv>
#include <mutex>
#include <thread>

#include <fmt/format.h>

#include "backend/blkif.h"
#include "backend/ring_server.h"
#include "cow/image.h"

namespace cowtap::blkif_test {

using xen::DomId;

// One VBD's xenbus state machine (backend side), on its own thread.
class TestVbd {
 public:
  TestVbd(xen::SimHypervisor& hv, DomId domid, uint32_t devid, std::shared_ptr<backend::BlockDevice> device,
          const VbdFeatures& features, bool writable)
      : platform_(hv.NewPlatform(xen::kDom0)),
        domid_(domid),
        devid_(devid),
        device_(std::move(device)),
        features_(features),
        writable_(writable) {
    be_ = xen::XsBackendDir(xen::kDom0, "vbd", domid, devid);
    fe_ = xen::XsFrontendDir(domid, "vbd", devid);
  }
  ~TestVbd() { Stop(); }

  cowtap::Status Start() {
    COWTAP_ASSIGN_OR_RETURN(xs_, platform_->OpenXenStore());
    const bool discard = features_.discard && device_->supports_discard() && writable_;
    const std::pair<std::string, std::string> keys[] = {
        {"feature-flush-cache", features_.flush ? "1" : "0"},
        {"feature-barrier", features_.barrier ? "1" : "0"},
        {"feature-discard", discard ? "1" : "0"},
        {"discard-granularity", std::to_string(device_->discard_granularity_bytes())},
        {"discard-alignment", "0"},
        {"discard-secure", device_->supports_secure_discard() ? "1" : "0"},
        {"feature-persistent", features_.persistent ? "1" : "0"},
        {"max-ring-page-order", std::to_string(features_.max_ring_page_order)},
        {"multi-queue-max-queues", std::to_string(features_.max_queues)},
    };
    for (const auto& [k, v] : keys) COWTAP_RETURN_IF_ERROR(xs_->Write(xen::XsJoin(be_, k), v));
    if (features_.max_indirect_segments > 0) {
      COWTAP_RETURN_IF_ERROR(xs_->Write(xen::XsJoin(be_, "feature-max-indirect-segments"),
                                        std::to_string(features_.max_indirect_segments)));
    }
    COWTAP_RETURN_IF_ERROR(SetState(2));
    COWTAP_RETURN_IF_ERROR(xs_->Watch(xen::XsJoin(fe_, "state"), "fe"));
    COWTAP_RETURN_IF_ERROR(xs_->Watch("@releaseDomain", "release"));
    running_ = true;
    thread_ = std::thread([this] { Loop(); });
    return cowtap::Status::Ok();
  }

  void Stop() {
    running_ = false;
    if (thread_.joinable()) thread_.join();
    StopRings();
  }

  VbdStatus GetStatus() {
    std::lock_guard<std::mutex> lock(mu_);
    VbdStatus s = status_;
    s.state = state_;
    for (const auto& r : rings_) {
      const backend::RingStats& st = r->stats();
      s.requests += st.requests;
      s.errors += st.errors;
      s.eopnotsupp += st.eopnotsupp;
      s.indirect += st.indirect;
      s.persistent_hits += st.persistent_hits;
      if (r->halted()) {
        s.any_ring_halted = true;
        s.halt_reason = r->halt_reason();
      }
    }
    s.queues = static_cast<uint32_t>(rings_.size());
    return s;
  }

  cowtap::Status Resize() {
    std::lock_guard<std::mutex> lock(mu_);
    const uint64_t sectors = device_->size_bytes() / 512;
    for (auto& r : rings_) r->UpdateSectors(sectors);
    COWTAP_RETURN_IF_ERROR(xs_->Write(xen::XsJoin(be_, "sectors"), std::to_string(sectors)));
    // Kick the frontend as blkback does: re-announce Connected.
    return xs_->Write(xen::XsJoin(be_, "state"), "4");
  }

 private:
  cowtap::Status SetState(int state) {
    state_ = state;
    return xs_->Write(xen::XsJoin(be_, "state"), std::to_string(state));
  }

  Result<std::string> Fe(const std::string& key) { return xs_->Read(xen::XsJoin(fe_, key)); }
  Result<uint64_t> FeUint(const std::string& key) {
    COWTAP_ASSIGN_OR_RETURN(std::string v, Fe(key));
    uint64_t out = 0;
    auto [p, ec] = std::from_chars(v.data(), v.data() + v.size(), out);
    if (ec != std::errc() || p != v.data() + v.size()) {
      return cowtap::Status::InvalidArgument(fmt::format("frontend key {} = '{}' is not a number", key, v));
    }
    return out;
  }

  cowtap::Status Connect() {
    auto proto = Fe("protocol");
    COWTAP_ASSIGN_OR_RETURN(backend::Abi abi, backend::ParseProtocol(proto.ok() ? *proto : ""));
    auto nq = FeUint("multi-queue-num-queues");
    const uint64_t queues = nq.ok() ? *nq : 1;
    if (queues < 1 || queues > features_.max_queues) return cowtap::Status::InvalidArgument("bad queue count");
    auto order_key = FeUint("ring-page-order");
    const bool legacy = !order_key.ok();
    const uint64_t order = legacy ? 0 : *order_key;
    if (order > features_.max_ring_page_order) return cowtap::Status::InvalidArgument("bad ring-page-order");
    auto persistent = FeUint("feature-persistent");
    backend::DeviceLimits limits;
    limits.sectors = device_->size_bytes() / 512;
    limits.read_only = !writable_ || device_->read_only();
    limits.flush = features_.flush;
    limits.barrier = features_.barrier;
    limits.discard = features_.discard && device_->supports_discard() && writable_;
    limits.discard_secure = limits.discard && device_->supports_secure_discard();
    limits.max_indirect_segments = features_.max_indirect_segments;
    std::vector<std::unique_ptr<backend::RingServer>> rings;
    for (uint64_t q = 0; q < queues; ++q) {
      const std::string dir = queues >= 2 ? fmt::format("queue-{}/", q) : "";
      backend::RingConfig cfg;
      cfg.frontend_domid = domid_;
      cfg.name = fmt::format("vbd {}/{} queue {}", domid_, devid_, q);
      cfg.abi = abi;
      if (legacy) {
        COWTAP_ASSIGN_OR_RETURN(uint64_t ref, FeUint(dir + "ring-ref"));
        cfg.ring_refs.push_back(static_cast<xen::GrantRef>(ref));
      } else {
        for (uint64_t i = 0; i < (uint64_t{1} << order); ++i) {
          COWTAP_ASSIGN_OR_RETURN(uint64_t ref, FeUint(fmt::format("{}ring-ref{}", dir, i)));
          cfg.ring_refs.push_back(static_cast<xen::GrantRef>(ref));
        }
      }
      COWTAP_ASSIGN_OR_RETURN(uint64_t port, FeUint(dir + "event-channel"));
      cfg.remote_port = static_cast<xen::EvtchnPort>(port);
      cfg.persistent = features_.persistent && persistent.ok() && *persistent == 1;
      cfg.limits = limits;
      COWTAP_ASSIGN_OR_RETURN(auto server, backend::RingServer::Start(*platform_, cfg, device_));
      rings.push_back(std::move(server));
    }
    {
      std::lock_guard<std::mutex> lock(mu_);
      rings_ = std::move(rings);
      ++status_.connects;
    }
    COWTAP_RETURN_IF_ERROR(xs_->Write(xen::XsJoin(be_, "sectors"), std::to_string(limits.sectors)));
    COWTAP_RETURN_IF_ERROR(xs_->Write(xen::XsJoin(be_, "info"), limits.read_only ? "4" : "0"));
    COWTAP_RETURN_IF_ERROR(xs_->Write(xen::XsJoin(be_, "sector-size"), "512"));
    COWTAP_RETURN_IF_ERROR(
        xs_->Write(xen::XsJoin(be_, "physical-sector-size"), std::to_string(device_->physical_sector_size())));
    return SetState(4);
  }

  void StopRings() {
    std::vector<std::unique_ptr<backend::RingServer>> rings;
    {
      std::lock_guard<std::mutex> lock(mu_);
      rings.swap(rings_);
      for (auto& r : rings) {
        if (r->halted()) {
          status_.any_ring_halted = true;
          status_.halt_reason = r->halt_reason();
        }
        status_.requests += r->stats().requests;
        status_.errors += r->stats().errors;
        status_.eopnotsupp += r->stats().eopnotsupp;
      }
    }
    for (auto& r : rings) r->Stop();
  }

  void Step() {
    if (!platform_->DomainAlive(domid_) && state_ != 6 && state_ != 2) {
      StopRings();
      SetState(6).IgnoreError();
      return;
    }
    auto fe_state = FeUint("state");
    if (!fe_state.ok()) return;
    switch (*fe_state) {
      case 3:
      case 4:
        if (state_ == 2) {
          cowtap::Status s = Connect();
          if (!s.ok()) {
            fprintf(stderr, "test vbd %u/%u: connect failed: %s\n", domid_, devid_, s.ToString().c_str());
            StopRings();
            SetState(5).IgnoreError();
          }
        }
        break;
      case 5:
        if (state_ == 4 || state_ == 2) {
          StopRings();
          SetState(5).IgnoreError();
        }
        break;
      case 6:
        if (state_ != 6) {
          StopRings();
          SetState(6).IgnoreError();
        }
        break;
      case 1:
        if (state_ == 5 || state_ == 6) SetState(2).IgnoreError();
        break;
      default:
        break;
    }
  }

  void Loop() {
    while (running_) {
      pollfd pfd{xs_->fd(), POLLIN, 0};
      poll(&pfd, 1, 20);
      bool any = false;
      while (true) {
        auto ev = xs_->ReadWatch();
        if (!ev.ok() || !*ev) break;
        any = true;
      }
      (void)any;
      Step();
    }
  }

  std::unique_ptr<xen::XenPlatform> platform_;
  std::unique_ptr<xen::XenStore> xs_;
  const DomId domid_;
  const uint32_t devid_;
  std::shared_ptr<backend::BlockDevice> device_;
  const VbdFeatures features_;
  const bool writable_;
  std::string be_, fe_;
  std::atomic<int> state_{1};
  std::atomic<bool> running_{false};
  std::thread thread_;
  std::mutex mu_;
  std::vector<std::unique_ptr<backend::RingServer>> rings_;
  VbdStatus status_;
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
  auto vbd = std::make_unique<TestVbd>(*hv_, domid, devid, std::move(device), features, writable);
  COWTAP_RETURN_IF_ERROR(vbd->Start());
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
  return it->second->Resize();
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
