#include "tools/daemon/managed_vbd.h"

#include <fmt/format.h>
#include <spdlog/spdlog.h>

#include "tools/daemon/backend_params.h"

namespace cowtap::daemon {

const char* XenbusStateName(backend::XenbusState state) {
  switch (state) {
    case backend::XenbusState::kUnknown:
      return "Unknown";
    case backend::XenbusState::kInitialising:
      return "Initialising";
    case backend::XenbusState::kInitWait:
      return "InitWait";
    case backend::XenbusState::kInitialised:
      return "Initialised";
    case backend::XenbusState::kConnected:
      return "Connected";
    case backend::XenbusState::kClosing:
      return "Closing";
    case backend::XenbusState::kClosed:
      return "Closed";
    case backend::XenbusState::kReconfiguring:
      return "Reconfiguring";
    case backend::XenbusState::kReconfigured:
      return "Reconfigured";
  }
  return "?";
}

ManagedVbd::ManagedVbd(xen::XenPlatform& platform, ManagedVbdConfig config)
    : platform_(platform), config_(std::move(config)) {
  tag_ = fmt::format("[vbd {}]", config_.id);
  thread_ = std::thread([this] { Run(); });
}

ManagedVbd::~ManagedVbd() {
  RequestStop();
  Join();
}

ManagedVbd::Phase ManagedVbd::phase() const {
  std::lock_guard lock(mu_);
  return phase_;
}

bool ManagedVbd::finished() const {
  std::lock_guard lock(mu_);
  return phase_ == Phase::kDone || phase_ == Phase::kFailed;
}

Status ManagedVbd::error() const {
  std::lock_guard lock(mu_);
  return error_;
}

bool ManagedVbd::WaitOpened(std::chrono::milliseconds timeout) {
  std::unique_lock lock(mu_);
  return cv_.wait_for(lock, timeout, [&] { return phase_ != Phase::kOpening; });
}

void ManagedVbd::RequestStop() {
  {
    std::lock_guard lock(mu_);
    stop_ = true;
  }
  cv_.notify_all();
}

void ManagedVbd::Join() {
  if (thread_.joinable()) thread_.join();
}

std::shared_ptr<backend::Vbd> ManagedVbd::vbd() const {
  std::lock_guard lock(mu_);
  return vbd_;
}

bool ManagedVbd::domain_gone() const {
  auto v = vbd();
  return v && v->domain_gone();
}

backend::XenbusState ManagedVbd::vbd_state() const {
  auto v = vbd();
  return v ? v->state() : backend::XenbusState::kUnknown;
}

Status ManagedVbd::Pause() {
  auto v = vbd();
  if (!v) return Status::NotFound(fmt::format("{} is not serving (nothing to pause)", tag_));
  return v->Pause();
}

Status ManagedVbd::Resume() {
  auto v = vbd();
  if (!v) return Status::NotFound(fmt::format("{} is not serving (nothing to resume)", tag_));
  v->Resume();
  return Status::Ok();
}

void ManagedVbd::Run() {
  Status s = Open();
  if (!s.ok()) {
    Fail(s);
    return;
  }
  std::unique_lock lock(mu_);
  cv_.wait(lock, [&] { return stop_; });
  phase_ = Phase::kStopping;
  std::shared_ptr<backend::Vbd> vbd = vbd_;
  lock.unlock();

  // Drain and release the guest's resources, then let go of the image.
  vbd->Detach();
  VbdStatsSnapshot last = Snapshot();
  lock.lock();
  final_ = std::move(last);
  vbd_.reset();
  std::shared_ptr<cow::Image> image = std::move(image_);
  device_.reset();
  lock.unlock();
  vbd.reset();  // the Vbd (and with it the device) goes when no Pause/Stats call holds it
  if (image) {
    Status closed = image->Close();
    if (!closed.ok()) spdlog::error("{} closing {}: {}", tag_, image->info().path, closed.ToString());
    image.reset();  // the file, and with it its lock, goes before we say we are done
  }
  spdlog::info("{} detached", tag_);
  lock.lock();
  phase_ = Phase::kDone;
  lock.unlock();
  cv_.notify_all();
}

Status ManagedVbd::Open() {
  COWTAP_ASSIGN_OR_RETURN(auto store, platform_.OpenXenStore());
  COWTAP_ASSIGN_OR_RETURN(DiskSource source, ReadDiskSource(*store, config_.backend_path));
  {
    std::lock_guard lock(mu_);
    image_path_ = source.path;
    format_ = source.format;
  }
  cow::OpenOptions open = config_.open;
  open.read_only = !source.writable;
  if (!source.format.empty()) open.format = cow::ParseFormatName(source.format);
  auto opened = cow::OpenImage(source.path, open);
  if (!opened.ok()) {
    return opened.status().Annotate(fmt::format("opening {} (from {})", source.path, config_.backend_path));
  }
  std::shared_ptr<cow::Image> image = std::move(opened).value();
  backend::ImageDeviceOptions device_options;
  device_options.read_only = !source.writable;
  std::shared_ptr<backend::BlockDevice> device = backend::NewImageBlockDevice(image, device_options);
  auto vbd = backend::Vbd::Attach(platform_, config_.vbd, device);
  if (!vbd.ok()) {
    image->Close().IgnoreError();
    return vbd.status();
  }
  spdlog::info("{} serving {} ({}{}, {} MiB)", tag_, source.path, cow::FormatName(image->info().format),
               source.writable ? "" : ", read-only", image->size_bytes() >> 20);
  {
    std::lock_guard lock(mu_);
    format_ = std::string(cow::FormatName(image->info().format));
    image_ = std::move(image);
    device_ = std::move(device);
    vbd_ = std::move(vbd).value();
    phase_ = Phase::kServing;
  }
  cv_.notify_all();
  return Status::Ok();
}

void ManagedVbd::Fail(const Status& why) {
  spdlog::error("{} cannot serve: {}", tag_, why.ToString());
  auto store = platform_.OpenXenStore();
  if (store.ok()) {
    // As blkback's xenbus_dev_fatal: the reason, then Closing.
    (*store)->Write(xen::XsJoin(config_.backend_path, "error"), why.ToString()).IgnoreError();
    (*store)
        ->Write(xen::XsJoin(config_.backend_path, "state"),
                std::to_string(static_cast<int>(backend::XenbusState::kClosing)))
        .IgnoreError();
  }
  {
    std::lock_guard lock(mu_);
    error_ = why;
    phase_ = Phase::kFailed;
  }
  cv_.notify_all();
}

std::shared_ptr<backend::BlockDevice> ManagedVbd::device() const {
  std::lock_guard lock(mu_);
  return device_;
}

VbdStatsSnapshot ManagedVbd::Snapshot() const {
  std::unique_lock lock(mu_);
  const Phase phase = phase_;
  std::shared_ptr<backend::Vbd> vbd = vbd_;
  std::shared_ptr<cow::Image> image = image_;
  VbdStatsSnapshot s = phase == Phase::kDone ? final_ : VbdStatsSnapshot{};
  s.id = config_.id;
  s.image = image_path_;
  s.format = format_;
  const Status error = error_;
  lock.unlock();

  if (!vbd) {
    switch (phase) {
      case Phase::kOpening:
        s.state = "opening";
        break;
      case Phase::kFailed:
        s.state = "error: " + error.ToString();
        break;
      default:
        s.state = "Closed";
        break;
    }
    return s;
  }
  const backend::VbdStats v = vbd->stats();
  s.paused = vbd->paused();
  s.state = s.paused ? "paused" : XenbusStateName(vbd->state());
  s.reads = v.reads;
  s.writes = v.writes;
  s.flushes = v.flushes;
  s.discards = v.discards;
  s.errors = v.errors + v.eopnotsupp;
  s.bytes_read = v.bytes_read;
  s.bytes_written = v.bytes_written;
  s.queues = v.queues;
  s.queue_depth = static_cast<uint32_t>(v.in_flight);
  s.latency_us_log2 = v.latency_us_log2;
  s.memory_bytes = v.mapped_pages * xen::kPageSize;
  s.leaked_pages = v.leaked_pages;
  s.notify_failures = v.notify_failures;
  if (image) {
    const cow::ImageIoStats io = image->io_stats();  // documented as readable racily
    s.fast_path_ios = io.fast_reads + io.fast_writes;
    s.slow_path_ios = io.slow_reads + io.slow_writes;
    s.allocations = io.allocations;
    // RemapCache::Stats() is documented as readable while I/O runs.
    if (cow::RemapCache* cache = image->remap_cache()) {
      const cow::RemapCacheStats r = cache->Stats();
      s.remap_lookups = r.lookups;
      s.remap_hits = r.hits;
      s.remap_mean_probe = r.mean_probe_length();
      s.memory_bytes += cache->MemoryBytes();
    }
  }
  return s;
}

}  // namespace cowtap::daemon
