#include "backend/vbd.h"

#include <fmt/format.h>
#include <poll.h>
#include <spdlog/spdlog.h>
#include <string.h>
#include <sys/eventfd.h>
#include <unistd.h>

#include <algorithm>
#include <cstring>

namespace cowtap::backend {
namespace {

constexpr char kFrontendToken[] = "cowtap-vbd-frontend";
constexpr char kReleaseToken[] = "cowtap-vbd-release";
constexpr char kIntroduceToken[] = "cowtap-vbd-introduce";

void AddRing(const RingServer& s, VbdStats* out) {
  const RingStats& r = s.stats();
  out->requests += r.requests.load();
  out->reads += r.reads.load();
  out->writes += r.writes.load();
  out->flushes += r.flushes.load();
  out->discards += r.discards.load();
  out->bytes_read += r.bytes_read.load();
  out->bytes_written += r.bytes_written.load();
  out->errors += r.errors.load();
  out->eopnotsupp += r.eopnotsupp.load();
  out->notifications += r.notifications.load();
  out->grant_maps += r.grant_maps.load();
  out->persistent_hits += r.persistent_hits.load();
  out->in_flight += r.in_flight.load();
  out->leaked_pages += r.leaked_pages.load();
  out->notify_failures += r.notify_failures.load();
  for (size_t i = 0; i < kLatencyBuckets; ++i) out->latency_us_log2[i] += r.latency_us_log2[i].load();
}
constexpr uint32_t kVdiskCdrom = 1;
constexpr uint32_t kVdiskReadonly = 4;

}  // namespace

Vbd::Vbd(xen::XenPlatform& platform, const VbdOptions& options, std::shared_ptr<BlockDevice> device)
    : platform_(platform), options_(options), device_(std::move(device)) {
  backend_path_ =
      xen::XsBackendDir(platform_.self_domid(), options_.backend_type, options_.frontend_domid, options_.devid);
  name_ = fmt::format("[vbd {}/{}]", options_.frontend_domid, options_.devid);
}

Result<std::unique_ptr<Vbd>> Vbd::Attach(xen::XenPlatform& platform, const VbdOptions& options,
                                         std::shared_ptr<BlockDevice> device) {
  if (options.max_ring_page_order > 4 || options.max_queues == 0 ||
      options.max_indirect_segments > kMaxIndirectSegmentsWire || options.backend_type.empty() ||
      options.backend_type.find('/') != std::string::npos) {
    return Status::InvalidArgument(
        "vbd options: ring order <= 4, queues >= 1, indirect segments <= 4096, a backend type without '/'");
  }
  std::unique_ptr<Vbd> vbd(new Vbd(platform, options, std::move(device)));
  COWTAP_RETURN_IF_ERROR(vbd->Init());
  vbd->thread_ = std::thread([v = vbd.get()] { v->Run(); });
  return vbd;
}

Vbd::~Vbd() {
  Detach();
  if (wake_fd_ >= 0) ::close(wake_fd_);
}

Status Vbd::Init() {
  wake_fd_ = ::eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
  if (wake_fd_ < 0) return Status::FromErrno(errno, name_ + " eventfd");
  COWTAP_ASSIGN_OR_RETURN(store_, platform_.OpenXenStore());
  auto read = [&](const char* key) { return store_->Read(xen::XsJoin(backend_path_, key)); };

  auto frontend = read("frontend");
  if (!frontend.ok()) {
    return frontend.status().Annotate(
        fmt::format("{} backend directory {} has no usable 'frontend' key "
                    "(did the toolstack create the device?)",
                    name_, backend_path_));
  }
  frontend_path_ = *frontend;
  COWTAP_ASSIGN_OR_RETURN(std::string id_text, read("frontend-id"));
  COWTAP_ASSIGN_OR_RETURN(uint64_t frontend_id,
                          ParseDecimal(id_text, UINT16_MAX, xen::XsJoin(backend_path_, "frontend-id")));
  if (frontend_id != options_.frontend_domid) {
    return Status::InvalidArgument(
        fmt::format("{} frontend-id is {}, expected {}", name_, frontend_id, options_.frontend_domid));
  }
  auto mode = read("mode");
  if (mode.ok()) {
    if (*mode != "r" && *mode != "w" && *mode != "ro" && *mode != "rw") {
      return Status::InvalidArgument(fmt::format("{} mode \"{}\" is neither r nor w", name_, *mode));
    }
    read_only_ = mode->front() == 'r' && *mode != "rw";
  } else if (mode.status().code() != ErrorCode::kNotFound) {
    return mode.status();
  }
  auto type = read("device-type");
  cdrom_ = type.ok() && *type == "cdrom";
  read_only_ = read_only_ || cdrom_ || device_->read_only();

  COWTAP_RETURN_IF_ERROR(PublishFeatures());
  COWTAP_RETURN_IF_ERROR(store_->Watch(xen::XsJoin(frontend_path_, "state"), kFrontendToken));
  COWTAP_RETURN_IF_ERROR(store_->Watch("@releaseDomain", kReleaseToken));
  COWTAP_RETURN_IF_ERROR(store_->Watch("@introduceDomain", kIntroduceToken));
  return Status::Ok();
}

DeviceLimits Vbd::Limits(bool large_sector_size) const {
  DeviceLimits l;
  l.sector_size = 512;  // every image is byte-addressable; 512 suits every frontend
  (void)large_sector_size;
  l.sectors = device_->size_bytes() / l.sector_size;
  l.read_only = read_only_;
  l.flush = options_.flush;
  l.barrier = options_.barrier;
  l.discard = device_->supports_discard() && !read_only_ && discard_enabled_;
  l.discard_secure = l.discard && device_->supports_secure_discard();
  l.max_indirect_segments = options_.max_indirect_segments;
  return l;
}

Status Vbd::PublishFeatures() {
  bool discard_enable = true;
  auto enable = store_->Read(xen::XsJoin(backend_path_, "discard-enable"));
  if (enable.ok()) discard_enable = *enable != "0";
  // What is advertised is also what the rings enforce (Limits()).
  discard_enabled_ = discard_enable;
  DeviceLimits l = Limits(false);
  const uint32_t granularity = std::max<uint32_t>(device_->discard_granularity_bytes(), 512);
  Status s = xen::RunXsTransaction(*store_, [&](xen::XsTransaction tx) -> Status {
    auto write = [&](const char* key, std::string value) {
      return store_->Write(xen::XsJoin(backend_path_, key), value, tx);
    };
    COWTAP_RETURN_IF_ERROR(write("feature-flush-cache", l.flush ? "1" : "0"));
    COWTAP_RETURN_IF_ERROR(write("feature-barrier", l.barrier ? "1" : "0"));
    COWTAP_RETURN_IF_ERROR(write("feature-discard", l.discard ? "1" : "0"));
    if (l.discard) {
      COWTAP_RETURN_IF_ERROR(write("discard-granularity", std::to_string(granularity)));
      COWTAP_RETURN_IF_ERROR(write("discard-alignment", "0"));
      COWTAP_RETURN_IF_ERROR(write("discard-secure", l.discard_secure ? "1" : "0"));
    }
    COWTAP_RETURN_IF_ERROR(write("feature-persistent", options_.persistent ? "1" : "0"));
    if (options_.max_indirect_segments > 0) {
      COWTAP_RETURN_IF_ERROR(write("feature-max-indirect-segments", std::to_string(options_.max_indirect_segments)));
    }
    COWTAP_RETURN_IF_ERROR(write("max-ring-page-order", std::to_string(options_.max_ring_page_order)));
    COWTAP_RETURN_IF_ERROR(write("max-ring-pages", std::to_string(1u << options_.max_ring_page_order)));
    COWTAP_RETURN_IF_ERROR(write("multi-queue-max-queues", std::to_string(options_.max_queues)));
    return write("state", std::to_string(static_cast<int>(XenbusState::kInitWait)));
  });
  if (s.ok()) state_ = XenbusState::kInitWait;
  return s;
}

void Vbd::Run() {
  int timeout_ms = Evaluate();
  while (!stop_.load()) {
    pollfd fds[2] = {{wake_fd_, POLLIN, 0}, {store_->fd(), POLLIN, 0}};
    if (::poll(fds, 2, timeout_ms) < 0 && errno != EINTR) {
      spdlog::error("{} poll failed: {}", name_, std::strerror(errno));
      return;
    }
    if (fds[0].revents) {
      uint64_t v;
      if (::read(wake_fd_, &v, sizeof(v)) < 0) {
      }
    }
    // Every queued event just means "look again"; the state is re-read.
    while (true) {
      auto ev = store_->ReadWatch();
      if (!ev.ok() || !ev->has_value()) break;
    }
    if (stop_.load()) return;
    timeout_ms = Evaluate();
  }
}

Result<XenbusState> Vbd::ReadFrontendState() {
  auto text = store_->Read(xen::XsJoin(frontend_path_, "state"));
  // A frontend whose directory is gone is as good as closed.
  if (!text.ok() && text.status().code() == ErrorCode::kNotFound) return XenbusState::kClosed;
  if (!text.ok()) return text.status();
  COWTAP_ASSIGN_OR_RETURN(uint64_t v, ParseDecimal(*text, 8, xen::XsJoin(frontend_path_, "state")));
  return static_cast<XenbusState>(v);
}

int Vbd::Evaluate() {
  if (resize_pending_.exchange(false)) {
    const DeviceLimits l = Limits(false);
    {
      std::lock_guard lock(mu_);
      for (auto& s : servers_) s->UpdateSectors(l.sectors);
    }
    if (state_ == XenbusState::kConnected) {
      Status s = WriteDiskProperties(/*kick=*/true);
      if (!s.ok()) spdlog::warn("{} publishing the new size: {}", name_, s.ToString());
      spdlog::info("{} resized to {} sectors", name_, l.sectors);
    }
  }
  const XenbusState ours = state_.load();
  if (!platform_.DomainAlive(options_.frontend_domid)) {
    if (!domain_seen_alive_) {
      // The toolstack may write the directories before the guest runs.
      const auto waited = std::chrono::steady_clock::now() - attached_at_;
      if (waited < options_.domain_wait) {
        const auto left = std::chrono::duration_cast<std::chrono::milliseconds>(options_.domain_wait - waited);
        return static_cast<int>(std::clamp<int64_t>(left.count() + 1, 1, 1000));
      }
    }
    if (!domain_gone_.load()) {
      spdlog::info("{} frontend domain {} is {}; tearing down", name_, options_.frontend_domid,
                   domain_seen_alive_ ? "gone" : "not there");
      Disconnect();
      domain_gone_ = true;
      SetState(XenbusState::kClosed).IgnoreError();
    }
    return -1;
  }
  domain_seen_alive_ = true;
  auto theirs = ReadFrontendState();
  if (!theirs.ok()) {
    if (ours != XenbusState::kClosing && ours != XenbusState::kClosed) Fail(theirs.status());
    return -1;
  }
  switch (*theirs) {
    case XenbusState::kInitialising:
    case XenbusState::kInitWait:
      if (ours != XenbusState::kInitWait) {
        // A reconnecting frontend (or one that restarted under us).
        Disconnect();
        {
          std::lock_guard lock(mu_);
          last_error_.clear();
        }
        store_->Remove(xen::XsJoin(backend_path_, "error")).IgnoreError();
        SetState(XenbusState::kInitWait).IgnoreError();
      }
      break;
    case XenbusState::kInitialised:
    case XenbusState::kConnected:
      if (ours == XenbusState::kClosed) {
        // A frontend that reconnected faster than we looked: its
        // Initialising and Initialised coalesced into one watch event.
        {
          std::lock_guard lock(mu_);
          last_error_.clear();
        }
        store_->Remove(xen::XsJoin(backend_path_, "error")).IgnoreError();
        SetState(XenbusState::kInitWait).IgnoreError();
        Status s = Connect();
        if (!s.ok()) Fail(s);
      } else if (ours == XenbusState::kInitWait) {
        Status s = Connect();
        if (!s.ok()) Fail(s);
      }
      break;
    case XenbusState::kClosing:
      if (ours != XenbusState::kClosing && ours != XenbusState::kClosed) {
        Disconnect();
        SetState(XenbusState::kClosing).IgnoreError();
      }
      break;
    case XenbusState::kClosed:
    case XenbusState::kUnknown:
      if (ours != XenbusState::kClosed) {
        Disconnect();
        SetState(XenbusState::kClosed).IgnoreError();
      }
      break;
    default:
      break;  // Reconfiguring/Reconfigured mean nothing for a vbd
  }
  return -1;
}

Status Vbd::Connect() {
  BackendOffer offer;
  offer.max_ring_page_order = options_.max_ring_page_order;
  offer.max_queues = options_.max_queues;
  offer.persistent = options_.persistent;
  COWTAP_ASSIGN_OR_RETURN(FrontendKeys keys, ReadFrontendKeys(*store_, frontend_path_, offer));
  const DeviceLimits limits = Limits(keys.large_sector_size);
  std::lock_guard pause_lock(pause_mu_);
  const bool start_paused = paused_;
  std::vector<std::unique_ptr<RingServer>> servers;
  for (size_t q = 0; q < keys.queues.size(); ++q) {
    RingConfig config;
    config.frontend_domid = options_.frontend_domid;
    config.name = fmt::format("{} queue {}", name_, q);
    config.abi = keys.abi;
    config.ring_refs = keys.queues[q].ring_refs;
    config.remote_port = keys.queues[q].event_channel;
    config.persistent = keys.persistent;
    config.max_persistent_grants = options_.max_persistent_grants_per_queue;
    config.limits = limits;
    config.start_paused = start_paused;
    auto server = RingServer::Start(platform_, std::move(config), device_);
    if (!server.ok()) return server.status().Annotate(fmt::format("queue {}", q));
    servers.push_back(std::move(server).value());
  }
  {
    std::lock_guard lock(mu_);
    servers_ = std::move(servers);
  }
  COWTAP_RETURN_IF_ERROR(WriteDiskProperties(/*kick=*/true));
  state_ = XenbusState::kConnected;
  spdlog::info("{} connected ({} queue(s), ring order {}, {}, persistent grants {})", name_, keys.queues.size(),
               keys.ring_page_order, AbiName(keys.abi), keys.persistent ? "on" : "off");
  return Status::Ok();
}

Status Vbd::WriteDiskProperties(bool kick) {
  const DeviceLimits l = Limits(false);
  const uint32_t info = (read_only_ ? kVdiskReadonly : 0) | (cdrom_ ? kVdiskCdrom : 0);
  uint32_t physical = device_->physical_sector_size();
  if (physical < l.sector_size || physical % l.sector_size != 0) physical = l.sector_size;
  return xen::RunXsTransaction(*store_, [&](xen::XsTransaction tx) -> Status {
    auto write = [&](const char* key, std::string value) {
      return store_->Write(xen::XsJoin(backend_path_, key), value, tx);
    };
    COWTAP_RETURN_IF_ERROR(write("sectors", std::to_string(l.sectors)));
    COWTAP_RETURN_IF_ERROR(write("info", std::to_string(info)));
    COWTAP_RETURN_IF_ERROR(write("sector-size", std::to_string(l.sector_size)));
    COWTAP_RETURN_IF_ERROR(write("physical-sector-size", std::to_string(physical)));
    if (kick) COWTAP_RETURN_IF_ERROR(write("state", std::to_string(static_cast<int>(XenbusState::kConnected))));
    return Status::Ok();
  });
}

void Vbd::Disconnect() {
  std::vector<std::unique_ptr<RingServer>> servers;
  {
    std::lock_guard lock(mu_);
    servers.swap(servers_);
  }
  // Destroying a server drains its in-flight I/O, answers it, unmaps every
  // grant and unbinds its port.
  for (auto& s : servers) s->Stop();
  std::lock_guard lock(mu_);
  for (const auto& s : servers) AddRing(*s, &retired_);
  retired_.in_flight = 0;
  servers.clear();
}

void Vbd::Fail(const Status& why) {
  if (fail_log_.Allow()) spdlog::error("{} {}; closing the device", name_, why.ToString());
  {
    std::lock_guard lock(mu_);
    last_error_ = why.ToString();
  }
  store_->Write(xen::XsJoin(backend_path_, "error"), why.ToString()).IgnoreError();
  Disconnect();
  SetState(XenbusState::kClosing).IgnoreError();
}

Status Vbd::SetState(XenbusState state) {
  state_ = state;
  Status s = store_->Write(xen::XsJoin(backend_path_, "state"), std::to_string(static_cast<int>(state)));
  if (!s.ok()) spdlog::warn("{} writing state {}: {}", name_, static_cast<int>(state), s.ToString());
  return s;
}

void Vbd::Detach() {
  if (thread_.joinable()) {
    stop_ = true;
    uint64_t one = 1;
    if (::write(wake_fd_, &one, sizeof(one)) < 0) spdlog::error("{} cannot wake control thread", name_);
    thread_.join();
    Disconnect();
    if (state_ != XenbusState::kClosed) SetState(XenbusState::kClosed).IgnoreError();
    store_->Unwatch(xen::XsJoin(frontend_path_, "state"), kFrontendToken).IgnoreError();
    store_->Unwatch("@releaseDomain", kReleaseToken).IgnoreError();
  }
}

void Vbd::Resize() {
  resize_pending_ = true;
  uint64_t one = 1;
  if (::write(wake_fd_, &one, sizeof(one)) < 0) spdlog::error("{} cannot wake control thread", name_);
}

std::string Vbd::last_error() const {
  std::lock_guard lock(mu_);
  return last_error_;
}

Status Vbd::Pause() {
  std::lock_guard pause_lock(pause_mu_);
  paused_ = true;
  {
    std::lock_guard lock(mu_);
    for (auto& s : servers_) s->Pause();
  }
  spdlog::info("{} paused", name_);
  return device_->Flush().Annotate(name_ + " flushing for pause");
}

void Vbd::Resume() {
  std::lock_guard pause_lock(pause_mu_);
  if (!paused_) return;
  paused_ = false;
  std::lock_guard lock(mu_);
  for (auto& s : servers_) s->Resume();
  spdlog::info("{} resumed", name_);
}

bool Vbd::paused() const {
  std::lock_guard pause_lock(pause_mu_);
  return paused_;
}

VbdStats Vbd::stats() const {
  std::lock_guard lock(mu_);
  VbdStats out = retired_;
  for (const auto& s : servers_) {
    AddRing(*s, &out);
    out.mapped_pages += s->mapped_pages();
    out.halted_queues += s->halted() ? 1 : 0;
    ++out.queues;
  }
  return out;
}

}  // namespace cowtap::backend
