#include "tools/daemon/daemon.h"

#include <fmt/format.h>
#include <poll.h>
#include <spdlog/spdlog.h>
#include <sys/eventfd.h>
#include <unistd.h>

#include <algorithm>
#include <cctype>
#include <charconv>
#include <climits>
#include <cstdlib>
#include <cstring>

#include "tools/daemon/locking_fs.h"
#include "tools/daemon/toolstack.h"

namespace cowtap::daemon {
namespace {

constexpr char kReleaseToken[] = "cowtapd-release";

ToolstackDisk DiskOf(const std::string& type, xen::DomId domid, uint32_t devid) {
  ToolstackDisk d;
  d.domid = domid;
  d.devid = devid;
  d.backend_type = type;
  return d;
}

Result<uint64_t> ParseNumber(std::string_view text, uint64_t max, std::string_view what) {
  uint64_t v = 0;
  const auto [end, ec] = std::from_chars(text.data(), text.data() + text.size(), v);
  if (text.empty() || ec != std::errc() || end != text.data() + text.size() || v > max) {
    return Status::InvalidArgument(fmt::format("{} \"{}\" is not a number in 0..{}", what, text, max));
  }
  return v;
}

}  // namespace

Result<std::pair<xen::DomId, uint32_t>> ParseVbdId(const std::string& id) {
  const size_t slash = id.find('/');
  if (slash == std::string::npos) {
    return Status::InvalidArgument(fmt::format("VBD id \"{}\" is not <domid>/<devid> (e.g. 5/51712)", id));
  }
  COWTAP_ASSIGN_OR_RETURN(uint64_t domid, ParseNumber(std::string_view(id).substr(0, slash), 0x7fef, "domid"));
  COWTAP_ASSIGN_OR_RETURN(uint64_t devid, ParseNumber(std::string_view(id).substr(slash + 1), UINT32_MAX, "devid"));
  return std::pair<xen::DomId, uint32_t>(static_cast<xen::DomId>(domid), static_cast<uint32_t>(devid));
}

Result<std::unique_ptr<Daemon>> Daemon::Start(const DaemonOptions& options) {
  if (options.backend_types.empty()) return Status::InvalidArgument("no --backend-type to serve");
  for (const auto& t : options.backend_types) {
    if (t.empty() || t.find('/') != std::string::npos) {
      return Status::InvalidArgument(fmt::format("backend type \"{}\" is not a xenstore directory name", t));
    }
  }
  std::unique_ptr<Daemon> d(new Daemon(options));
  COWTAP_RETURN_IF_ERROR(d->Init());
  return d;
}

Status Daemon::Init() {
  if (options_.platform == "sim") {
    if (options_.sim_socket.empty()) return Status::InvalidArgument("--platform sim needs --sim-socket PATH");
    COWTAP_ASSIGN_OR_RETURN(sim_, xen::SimHypervisor::Start(options_.sim_socket));
    platform_ = sim_->NewPlatform(xen::kDom0);
  } else if (options_.platform == "xen") {
    COWTAP_ASSIGN_OR_RETURN(platform_, xen::NewLibxenPlatform());
  } else {
    return Status::InvalidArgument(fmt::format("platform \"{}\" is neither sim nor xen", options_.platform));
  }
  wake_fd_ = ::eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
  if (wake_fd_ < 0) return Status::FromErrno(errno, "eventfd");
  COWTAP_ASSIGN_OR_RETURN(watch_store_, platform_->OpenXenStore());
  COWTAP_ASSIGN_OR_RETURN(control_store_, platform_->OpenXenStore());
  for (const auto& type : options_.backend_types) {
    const std::string dir =
        xen::XsJoin(xen::XsJoin("/local/domain/" + std::to_string(platform_->self_domid()), "backend"), type);
    COWTAP_RETURN_IF_ERROR(watch_store_->Watch(dir, type).Annotate("watching " + dir));
  }
  COWTAP_RETURN_IF_ERROR(watch_store_->Watch("@releaseDomain", kReleaseToken));
  Rescan();  // serve what the toolstack created before we started
  watcher_ = std::thread([this] { WatchLoop(); });
  spdlog::info("cowtapd serving backend type(s) {} on platform {}", fmt::join(options_.backend_types, ", "),
               options_.platform);
  return Status::Ok();
}

Daemon::~Daemon() {
  Shutdown();
  if (wake_fd_ >= 0) ::close(wake_fd_);
}

void Daemon::Wake() {
  uint64_t one = 1;
  if (::write(wake_fd_, &one, sizeof(one)) < 0) spdlog::error("cowtapd: cannot wake the watch thread");
}

void Daemon::Shutdown() {
  {
    std::lock_guard lock(mu_);
    if (shut_down_) return;
    shut_down_ = true;
  }
  if (watcher_.joinable()) {
    Wake();
    watcher_.join();
  }
  std::vector<std::string> exported;
  {
    std::lock_guard lock(exports_mu_);
    for (const auto& [address, e] : exports_) exported.push_back(address);
  }
  for (const auto& address : exported) Unexport(address).IgnoreError();
  std::vector<std::string> offloaded;
  {
    std::lock_guard lock(offloads_mu_);
    for (const auto& [key, e] : offloads_) offloaded.push_back(e.given_path);
  }
  for (const auto& image : offloaded) {
    Status s = OffloadOff(image);
    if (!s.ok()) spdlog::error("cowtapd: offload off {}: {}", image, s.ToString());
  }
  std::vector<std::shared_ptr<ManagedVbd>> all;
  {
    std::lock_guard lock(mu_);
    for (auto& [key, e] : vbds_) all.push_back(e.vbd);
    vbds_.clear();
    for (auto& v : stopping_) all.push_back(v);
    stopping_.clear();
    remove_when_stopped_.clear();
  }
  if (!all.empty()) spdlog::info("cowtapd: detaching {} VBD(s)", all.size());
  // All at once: one slow device does not delay the others' release.
  for (auto& v : all) v->RequestStop();
  for (auto& v : all) v->Join();
  all.clear();
  watch_store_.reset();
  control_store_.reset();
  platform_.reset();
  sim_.reset();
}

void Daemon::WatchLoop() {
  while (true) {
    pollfd fds[2] = {{wake_fd_, POLLIN, 0}, {watch_store_->fd(), POLLIN, 0}};
    if (::poll(fds, 2, 1000) < 0 && errno != EINTR) {
      spdlog::error("cowtapd: watch poll failed: {}", std::strerror(errno));
      usleep(100000);
    }
    if (fds[0].revents) {
      uint64_t v;
      if (::read(wake_fd_, &v, sizeof(v)) < 0) {
      }
    }
    {
      std::lock_guard lock(mu_);
      if (shut_down_) return;
    }
    // Any event only means "look again": the directories are re-read.
    while (true) {
      auto ev = watch_store_->ReadWatch();
      if (!ev.ok() || !ev->has_value()) break;
    }
    Rescan();
    // Bursts of events (every state write of every VBD) coalesce here.
    usleep(2000);
  }
}

std::set<Daemon::Key> Daemon::ListDirectories() {
  std::set<Key> present;
  const std::string base = xen::XsJoin("/local/domain/" + std::to_string(platform_->self_domid()), "backend");
  for (const auto& type : options_.backend_types) {
    const std::string type_dir = xen::XsJoin(base, type);
    auto domids = watch_store_->Directory(type_dir);
    if (!domids.ok()) continue;  // kNotFound: nothing of this type yet
    for (const auto& d : *domids) {
      auto domid = ParseNumber(d, 0x7fef, "domid");
      if (!domid.ok()) continue;
      auto devids = watch_store_->Directory(xen::XsJoin(type_dir, d));
      if (!devids.ok()) continue;
      for (const auto& v : *devids) {
        auto devid = ParseNumber(v, UINT32_MAX, "devid");
        if (devid.ok()) present.insert(Key{type, static_cast<xen::DomId>(*domid), static_cast<uint32_t>(*devid)});
      }
    }
  }
  return present;
}

void Daemon::Rescan() {
  const std::set<Key> present = ListDirectories();
  // Decide outside the lock (reads of `online`), apply under it.
  std::vector<std::pair<Key, std::shared_ptr<ManagedVbd>>> current;
  {
    std::lock_guard lock(mu_);
    for (auto& [key, e] : vbds_) current.emplace_back(key, e.vbd);
  }
  std::vector<std::pair<Key, std::shared_ptr<ManagedVbd>>> ending;
  for (auto& [key, vbd] : current) {
    bool end = !present.count(key) || vbd->domain_gone();
    if (!end && vbd->vbd_state() == backend::XenbusState::kClosed) {
      auto online = watch_store_->Read(xen::XsJoin(vbd->config().backend_path, "online"));
      end = online.ok() && *online == "0";
    }
    if (end) ending.emplace_back(key, vbd);
  }
  std::vector<ToolstackDisk> remove_dirs;
  {
    std::lock_guard lock(mu_);
    if (shut_down_) return;
    for (auto it = retired_.begin(); it != retired_.end();) {
      it = present.count(*it) ? std::next(it) : retired_.erase(it);
    }
    for (auto& [key, vbd] : ending) {
      auto it = vbds_.find(key);
      if (it == vbds_.end() || it->second.vbd != vbd) continue;  // Detach got there first
      if (present.count(key)) {
        spdlog::info("[vbd {}] {}; detaching", key.id(),
                     vbd->domain_gone() ? "frontend domain is gone" : "backend offline and closed");
        retired_.insert(key);
      } else {
        spdlog::info("[vbd {}] toolstack removed the device; detaching", key.id());
      }
      vbd->RequestStop();
      stopping_.push_back(vbd);
      if (it->second.sim_owned && present.count(key)) {
        // We played the toolstack: clean up as libxl does after a domain
        // dies, once the worker has written its last state.
        remove_when_stopped_.emplace_back(vbd, DiskOf(key.type, key.domid, key.devid));
      }
      vbds_.erase(it);
    }
    for (const Key& key : present) {
      if (!vbds_.count(key) && !retired_.count(key)) StartVbd(key, sim_owned_.count(key) > 0);
    }
    // Left in remove_when_stopped_ (so vbd_count counts them) until removed.
    for (const auto& [v, disk] : remove_when_stopped_) {
      if (v->finished()) remove_dirs.push_back(disk);
    }
    for (auto it = stopping_.begin(); it != stopping_.end();) {
      if ((*it)->finished()) {
        (*it)->Join();  // returns at once
        it = stopping_.erase(it);
      } else {
        ++it;
      }
    }
  }
  if (!remove_dirs.empty()) {
    std::lock_guard lock(control_mu_);
    for (const auto& d : remove_dirs) {
      Status s = ToolstackRemoveDisk(*control_store_, d);
      if (!s.ok()) spdlog::warn("[vbd {}/{}] {}", d.domid, d.devid, s.ToString());
      std::lock_guard table(mu_);
      sim_owned_.erase(Key{d.backend_type, d.domid, d.devid});
      // Gone from xenstore by our hand: the next Attach need not wait for a
      // rescan to see that.
      if (s.ok()) retired_.erase(Key{d.backend_type, d.domid, d.devid});
      std::erase_if(remove_when_stopped_, [&](const auto& e) {
        return e.second.domid == d.domid && e.second.devid == d.devid && e.second.backend_type == d.backend_type;
      });
    }
  }
}

void Daemon::StartVbd(const Key& key, bool sim_owned) {
  ManagedVbdConfig config;
  config.id = key.id();
  config.backend_path = xen::XsBackendDir(platform_->self_domid(), key.type, key.domid, key.devid);
  config.vbd = options_.vbd;
  config.vbd.frontend_domid = key.domid;
  config.vbd.devid = key.devid;
  config.vbd.backend_type = key.type;
  config.open = options_.open;
  if (config.open.fs == nullptr) config.open.fs = LockingFileSystem();
  for (const auto& [other, e] : vbds_) {
    if (other.domid == key.domid && other.devid == key.devid) {
      spdlog::error("[vbd {}] also present under backend/{}; serving only the one under backend/{}", key.id(), key.type,
                    other.type);
      retired_.insert(key);
      return;
    }
  }
  spdlog::info("[vbd {}] new device under {}", key.id(), config.backend_path);
  Entry e;
  e.key = key;
  e.sim_owned = sim_owned;
  e.vbd = std::make_shared<ManagedVbd>(*platform_, std::move(config));
  vbds_.emplace(key, std::move(e));
}

std::shared_ptr<ManagedVbd> Daemon::Find(const std::string& id) {
  std::lock_guard lock(mu_);
  for (auto& [key, e] : vbds_) {
    if (key.id() == id) return e.vbd;
  }
  return nullptr;
}

size_t Daemon::vbd_count() {
  std::lock_guard lock(mu_);
  size_t n = vbds_.size();
  for (const auto& v : stopping_) n += v->finished() ? 0 : 1;
  // Finished, but its toolstack directories are not removed yet.
  for (const auto& [v, disk] : remove_when_stopped_) n += v->finished() ? 1 : 0;
  return n;
}

std::vector<VbdStatsSnapshot> Daemon::List() {
  std::vector<std::shared_ptr<ManagedVbd>> all;
  {
    std::lock_guard lock(mu_);
    for (auto& [key, e] : vbds_) all.push_back(e.vbd);
  }
  std::vector<VbdStatsSnapshot> out;
  out.reserve(all.size());
  for (auto& v : all) out.push_back(v->Snapshot());
  return out;
}

Result<VbdStatsSnapshot> Daemon::Stats(const std::string& id) {
  COWTAP_RETURN_IF_ERROR(ParseVbdId(id).status());
  auto v = Find(id);
  if (!v) return Status::NotFound(fmt::format("no VBD {} (see `cowtap ctl list`)", id));
  return v->Snapshot();
}

Status Daemon::Attach(const AttachSpec& spec) {
  if (!sim_) {
    return Status::NotSupported(
        "attach on --platform xen is the toolstack's job: add the disk to the guest's config or use "
        "`xl block-attach` (see docs/xl.md)");
  }
  if (spec.domid == 0 || spec.domid > 0x7fef) {
    return Status::InvalidArgument(fmt::format("domid {} is not a guest domain (1..32751)", spec.domid));
  }
  if (spec.image.empty()) return Status::InvalidArgument("attach needs an image path");
  if (!spec.format.empty() && !cow::ParseFormatName(spec.format)) {
    return Status::InvalidArgument(fmt::format("format \"{}\" is not qcow2, qcow or raw", spec.format));
  }
  const Key key{options_.backend_types.front(), static_cast<xen::DomId>(spec.domid), spec.devid};
  const std::string id = key.id();
  // A VBD of the same disk whose guest just left is released within a
  // rescan or two (its worker finishes, then its directories go): wait for
  // that, as libxl's hotplug does, rather than refuse at once.
  for (const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(5);
       std::chrono::steady_clock::now() < deadline;) {
    {
      std::lock_guard lock(mu_);
      if (!retired_.count(key)) break;
    }
    Wake();
    usleep(5000);
  }
  {
    std::lock_guard control(control_mu_);
    {
      std::lock_guard lock(mu_);
      for (const auto& [k, e] : vbds_) {
        if (k.domid == key.domid && k.devid == key.devid) {
          return Status::Busy(fmt::format("VBD {} is already attached (detach it first)", id));
        }
      }
      if (retired_.count(key)) {
        return Status::Busy(fmt::format("VBD {} is still being released; retry in a moment", id));
      }
      sim_owned_.insert(key);
    }
    ToolstackDisk disk{key.domid, key.devid, key.type, spec.image, spec.format, spec.writable};
    Status s = ToolstackWriteDisk(*control_store_, disk);
    if (!s.ok()) {
      std::lock_guard lock(mu_);
      sim_owned_.erase(key);
      return s;
    }
  }
  Wake();
  // The watch thread starts it; wait for the image to be opened.
  std::shared_ptr<ManagedVbd> vbd;
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(5);
  while (!(vbd = Find(id)) && std::chrono::steady_clock::now() < deadline) usleep(2000);
  if (!vbd) return Status::Internal(fmt::format("VBD {} was written to xenstore but did not start", id));
  if (!vbd->WaitOpened(options_.attach_timeout)) {
    return Status::Busy(fmt::format("VBD {} is still opening {} after {} s; see `cowtap ctl list`", id, spec.image,
                                    options_.attach_timeout.count() / 1000));
  }
  if (vbd->phase() == ManagedVbd::Phase::kFailed) {
    Status why = vbd->error();
    // As libxl does when a hotplug fails: take the device away again.
    std::lock_guard control(control_mu_);
    ToolstackRemoveDisk(*control_store_, DiskOf(key.type, key.domid, key.devid)).IgnoreError();
    Wake();
    return why;
  }
  return Status::Ok();
}

Status Daemon::Detach(const std::string& id) {
  COWTAP_RETURN_IF_ERROR(ParseVbdId(id).status());
  Entry entry;
  {
    std::lock_guard lock(mu_);
    auto it = vbds_.begin();
    while (it != vbds_.end() && it->first.id() != id) ++it;
    if (it == vbds_.end()) return Status::NotFound(fmt::format("no VBD {} (see `cowtap ctl list`)", id));
    entry = it->second;
    vbds_.erase(it);
    retired_.insert(entry.key);  // not restarted while its directory stays
  }
  entry.vbd->RequestStop();
  entry.vbd->Join();
  if (entry.sim_owned) {
    std::lock_guard control(control_mu_);
    Status s = ToolstackRemoveDisk(*control_store_, DiskOf(entry.key.type, entry.key.domid, entry.key.devid));
    std::lock_guard lock(mu_);
    sim_owned_.erase(entry.key);
    if (!s.ok()) return s;
  }
  Wake();
  return Status::Ok();
}

Status Daemon::Pause(const std::string& id) {
  COWTAP_RETURN_IF_ERROR(ParseVbdId(id).status());
  auto v = Find(id);
  if (!v) return Status::NotFound(fmt::format("no VBD {} (see `cowtap ctl list`)", id));
  return v->Pause();
}

Status Daemon::Resume(const std::string& id) {
  COWTAP_RETURN_IF_ERROR(ParseVbdId(id).status());
  auto v = Find(id);
  if (!v) return Status::NotFound(fmt::format("no VBD {} (see `cowtap ctl list`)", id));
  return v->Resume();
}

Status Daemon::SetLogLevel(const std::string& level) {
  static const char* const kLevels[] = {"trace", "debug", "info", "warn", "warning", "error", "err", "critical", "off"};
  for (const char* l : kLevels) {
    if (level == l) {
      spdlog::set_level(spdlog::level::from_str(level == "warning" ? "warn" : level == "error" ? "err" : level));
      spdlog::info("log level set to {}", level);
      return Status::Ok();
    }
  }
  return Status::InvalidArgument(
      fmt::format("log level \"{}\" is not one of trace, debug, info, warn, error, critical, off", level));
}

Result<std::string> Daemon::Export(const std::string& what, const std::string& address, bool read_only) {
  if (what.empty()) return Status::InvalidArgument("export needs a VBD id (domid/devid) or an image path");
  std::shared_ptr<backend::BlockDevice> device;
  std::shared_ptr<cow::Image> image;
  if (what.front() != '/' && ParseVbdId(what).ok()) {
    auto vbd = Find(what);
    if (!vbd) return Status::NotFound(fmt::format("no VBD {} (see `cowtap ctl list`)", what));
    device = vbd->device();
    if (!device) return Status::NotFound(fmt::format("VBD {} is not serving (state {})", what, vbd->Snapshot().state));
  } else {
    cow::OpenOptions open = options_.open;
    open.read_only = read_only;
    if (open.fs == nullptr) open.fs = LockingFileSystem();
    auto opened = cow::OpenImage(what, open);
    if (!opened.ok()) return opened.status().Annotate("export " + what);
    image = std::move(opened).value();
    backend::ImageDeviceOptions device_options;
    device_options.read_only = read_only;
    device = backend::NewImageBlockDevice(image, device_options);
  }
  backend::NbdServerOptions nbd;
  nbd.address = address;
  nbd.export_name = what;
  nbd.description = "cowtapd export of " + what;
  nbd.read_only = read_only;
  auto server = backend::NbdServer::Start(device, nbd);
  if (!server.ok()) {
    if (image) image->Close().IgnoreError();
    return server.status().Annotate("export " + what);
  }
  const std::string bound = (*server)->address();
  std::lock_guard lock(exports_mu_);
  if (exports_.count(bound)) {
    return Status::Busy(fmt::format("{} is already exported (unexport it first)", bound));
  }
  spdlog::info("exporting {} over NBD at {}{}", what, bound, read_only ? " (read-only)" : "");
  exports_.emplace(bound, ExportEntry{std::move(server).value(), std::move(image)});
  return bound;
}

Status Daemon::Unexport(const std::string& address) {
  ExportEntry entry;
  {
    std::lock_guard lock(exports_mu_);
    auto it = exports_.find(address);
    if (it == exports_.end()) return Status::NotFound(fmt::format("nothing is exported at {}", address));
    entry = std::move(it->second);
    exports_.erase(it);
  }
  entry.server->Stop();
  entry.server.reset();
  if (entry.image) {
    Status s = entry.image->Close();
    if (!s.ok()) return s.Annotate("closing the exported image");
  }
  spdlog::info("NBD export at {} stopped", address);
  return Status::Ok();
}

// --- kernel offload ---------------------------------------------------------

namespace {

// "cowtap-" and the image file's name without its extension, reduced to the
// characters a dm name and a socket file name take.
std::string DmNameFor(const std::string& canonical_path) {
  std::string stem = canonical_path.substr(canonical_path.rfind('/') + 1);
  if (const size_t dot = stem.rfind('.'); dot != std::string::npos && dot > 0) stem.resize(dot);
  std::string name = "cowtap-";
  for (char c : stem.substr(0, 64))
    name += (std::isalnum(static_cast<unsigned char>(c)) || c == '-' || c == '_') ? c : '_';
  return name;
}

}  // namespace

Result<std::string> Daemon::OffloadKey(const std::string& image) {
  char resolved[PATH_MAX];
  if (::realpath(image.c_str(), resolved) == nullptr) return Status::FromErrno(errno, image);
  return std::string(resolved);
}

Result<OffloadSnapshot> Daemon::OffloadOn(const std::string& image) {
  if (image.empty()) return Status::InvalidArgument("offload on needs an image path");
  if (image.front() != '/' && ParseVbdId(image).ok()) {
    return Status::InvalidArgument(fmt::format(
        "offload takes an image path, not the VBD {}: in kernel-offload mode the guest's disk is the dm device "
        "(phy:/dev/mapper/cowtap-... in the xl disk line, served by blkback), so the image must not also be a VBD "
        "cowtapd serves; detach it and give its path",
        image));
  }
  if (!options_.offload) {
    return Status::NotSupported("this cowtapd was started without kernel offload support");
  }
  COWTAP_ASSIGN_OR_RETURN(std::string key, OffloadKey(image));
  std::lock_guard lock(offloads_mu_);
  if (offloads_.count(key)) {
    return Status::Busy(fmt::format("{} is offloaded already (as {}); `cowtap ctl offload off {}` first", image,
                                    "/dev/mapper/" + offloads_[key].dm_name, image));
  }
  std::string dm_name = DmNameFor(key);
  for (int n = 2;
       std::any_of(offloads_.begin(), offloads_.end(), [&](const auto& e) { return e.second.dm_name == dm_name; });
       ++n) {
    dm_name = DmNameFor(key) + "-" + std::to_string(n);
  }
  cow::OpenOptions open = options_.open;
  open.read_only = false;
  if (open.fs == nullptr) open.fs = LockingFileSystem();
  auto opened = cow::OpenImage(key, open);
  if (!opened.ok()) return opened.status().Annotate("offload " + image);
  std::shared_ptr<cow::Image> img = std::move(opened).value();
  auto started = options_.offload->Start(img, key, dm_name);
  if (!started.ok()) {
    img->Close().IgnoreError();
    return started.status().Annotate("offload " + image);
  }
  OffloadEntry& e = offloads_[key];
  e.given_path = image;
  e.dm_name = dm_name;
  e.image = std::move(img);
  e.offload = std::move(started).value();
  OffloadSnapshot snap = e.offload->Snapshot();
  snap.image = image;
  spdlog::info("offload of {} on: {} ({} segments, {} of {} sectors linear)", image, snap.device, snap.segments,
               snap.linear_sectors, snap.size_sectors);
  return snap;
}

Status Daemon::OffloadOff(const std::string& image) {
  OffloadEntry e;
  {
    std::lock_guard lock(offloads_mu_);
    auto it = offloads_.end();
    auto key = OffloadKey(image);
    if (key.ok()) it = offloads_.find(*key);
    if (it == offloads_.end()) {
      it =
          std::find_if(offloads_.begin(), offloads_.end(), [&](const auto& p) { return p.second.given_path == image; });
    }
    if (it == offloads_.end()) {
      return Status::NotFound(fmt::format("no offload of {} (`cowtap ctl offload status` lists them)", image));
    }
    e = std::move(it->second);
    offloads_.erase(it);
  }
  Status first = e.offload->Stop();
  e.offload.reset();
  Status closed = e.image->Close();
  if (first.ok() && !closed.ok()) first = closed.Annotate("closing the offloaded image");
  if (first.ok()) spdlog::info("offload of {} off", image);
  return first.Annotate("offload off " + image);
}

Result<std::vector<OffloadSnapshot>> Daemon::OffloadStatus(const std::string& image) {
  std::string key;
  if (!image.empty()) {
    auto k = OffloadKey(image);
    key = k.ok() ? *k : image;
  }
  std::lock_guard lock(offloads_mu_);
  std::vector<OffloadSnapshot> out;
  for (const auto& [k, e] : offloads_) {
    if (!image.empty() && k != key && e.given_path != image) continue;
    OffloadSnapshot s = e.offload->Snapshot();
    s.image = e.given_path;
    out.push_back(std::move(s));
  }
  if (!image.empty() && out.empty()) {
    return Status::NotFound(fmt::format("no offload of {} (`cowtap ctl offload status` lists them)", image));
  }
  return out;
}

}  // namespace cowtap::daemon
