#include "dm/offload_attachment.h"

#include <fcntl.h>
#include <fmt/format.h>
#include <spdlog/spdlog.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <vector>

#include "dm/offload_miss_device.h"
#include "dm/offload_planner.h"

namespace cowtap::dm {

Status ZeroFileRange(int fd, const std::string& name, uint64_t offset, uint64_t length, ZeroMode mode) {
  // Punch a hole (discard) or zero the range keeping its blocks
  // (write-zeroes); where the filesystem has neither, write zeros.
  const int flags = mode == ZeroMode::kDeallocate ? FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE
                                                  : FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE;
  if (::fallocate(fd, flags, static_cast<off_t>(offset), static_cast<off_t>(length)) == 0) return Status::Ok();
  if (errno != EOPNOTSUPP) {
    return Status::FromErrno(errno, fmt::format("offload: zeroing {} bytes at {} of {} in place ({})", length, offset,
                                                name, mode == ZeroMode::kDeallocate ? "punch hole" : "zero range"));
  }
  const std::vector<uint8_t>& zeros = ZeroChunk();
  for (uint64_t done = 0; done < length;) {
    const size_t n = static_cast<size_t>(std::min<uint64_t>(length - done, zeros.size()));
    const ssize_t w = ::pwrite(fd, zeros.data(), n, static_cast<off_t>(offset + done));
    if (w < 0 && errno == EINTR) continue;
    if (w <= 0) {
      return Status::FromErrno(w < 0 ? errno : EIO,
                               fmt::format("offload: writing zeros to {} bytes at {} of {}", length, offset, name));
    }
    done += static_cast<uint64_t>(w);
  }
  // The loop device reads with O_DIRECT: the zeros must be on the file
  // before the request is answered.
  if (::fdatasync(fd) != 0) return Status::FromErrno(errno, "offload: fdatasync of " + name + " after zeroing");
  return Status::Ok();
}

Result<std::unique_ptr<OffloadAttachment>> OffloadAttachment::Attach(std::shared_ptr<cow::Image> image,
                                                                     const std::string& image_file, DeviceMapper& dm,
                                                                     const OffloadAttachmentOptions& options) {
  COWTAP_ASSIGN_OR_RETURN(PlannerOptions popts, OffloadPlanner::OptionsFor(*image, options.max_segments));
  COWTAP_ASSIGN_OR_RETURN(OffloadPlanner planner, OffloadPlanner::Make(popts));
  std::unique_ptr<OffloadAttachment> a(new OffloadAttachment());
  a->image_ = image;
  a->dm_name_ = options.dm_name;
  if (options.prime_max_clusters > 0) {
    COWTAP_ASSIGN_OR_RETURN(a->primed_, PrimeRemapCache(*image, options.prime_max_clusters));
  }
  // Discard and write-zeroes are split by the live table (see
  // offload_miss_device.h): linear clusters are zeroed in the file in
  // place, the rest goes to the engine while fenced from the planner.
  auto fence = std::make_shared<MissFence>();
  a->file_fd_ = ::open(image_file.c_str(), O_RDWR | O_CLOEXEC);
  if (a->file_fd_ < 0) return Status::FromErrno(errno, "offload: opening " + image_file + " to zero in place");
  OffloadMissRouting routing;
  routing.cluster_size = popts.cluster_size;
  routing.fence = fence;
  a->routing_counters_ = std::make_shared<MissRoutingCounters>();
  routing.counters = a->routing_counters_;
  OffloadAttachment* self = a.get();
  routing.routing_tables = [self]() -> std::vector<std::shared_ptr<const DmTable>> {
    OffloadController* c = self->live_controller_.load(std::memory_order_acquire);
    if (c == nullptr) return {};
    return c->RoutingTables();
  };
  const int file_fd = a->file_fd_;
  const std::string file_name = image_file;
  routing.zero_in_place = [file_fd, file_name](uint64_t host_offset, uint64_t length, ZeroMode mode) -> Status {
    return ZeroFileRange(file_fd, file_name, host_offset, length, mode);
  };
  a->engine_ = NewOffloadMissDevice(backend::NewImageBlockDevice(image), std::move(routing));
  backend::NbdServerOptions so;
  so.address = "unix:" + options.socket_path;
  so.export_name = options.dm_name;
  so.max_clients = 1;
  COWTAP_ASSIGN_OR_RETURN(a->server_, backend::NbdServer::Start(a->engine_, so));
  COWTAP_ASSIGN_OR_RETURN(int fd, ConnectUnixSocket(options.socket_path));
  COWTAP_ASSIGN_OR_RETURN(a->nbd_, NbdDevice::Connect(fd, options.dm_name));
  COWTAP_ASSIGN_OR_RETURN(a->loop_, LoopDevice::Attach(image_file, {.direct_io = options.loop_direct_io}));
  a->devices_ = {a->loop_->path(), a->nbd_->path()};
  cow::Image* img = image.get();
  LoopDevice* loop = a->loop_.get();
  const uint64_t cluster_size = popts.cluster_size;
  // The engine grows the image file as it allocates; the loop device keeps
  // the size it had at attach until told, and the kernel refuses a table
  // with a target past the device's end ("loop0 too small for target").
  // So every plan collects the clusters, then refreshes the loop's capacity
  // (the file already covers every cluster collected), and any cluster
  // still beyond the device stays miss, which is always safe.
  // The gate (below) drops what a discard or write-zeroes changed since
  // the generation read here, before the clusters are collected.
  auto source = [img, loop, cluster_size, fence, self] {
    self->planned_generation_ = fence->generation();
    self->plan_fresh_ = true;
    std::vector<WritableCluster> clusters = CollectWritableClusters(*img);
    Status s = loop->RefreshCapacity();
    if (!s.ok()) spdlog::warn("offload: {}", s.ToString());
    auto size = loop->SizeBytes();
    const uint64_t limit = size.ok() ? *size : 0;
    std::erase_if(clusters, [&](const WritableCluster& c) { return c.host_offset + cluster_size > limit; });
    return clusters;
  };
  a->controller_ =
      std::make_unique<OffloadController>(dm, options.dm_name, a->devices_, planner, std::move(source), options.policy);
  // A fresh plan drops what changed since its clusters were collected;
  // any other table (a revoke's, Start's) only narrows tables already
  // published, whose linear clusters the miss path never frees, so what is
  // fenced now is enough.
  a->controller_->SetGate([fence, self, cluster_size](const DmTable& t) {
    const uint64_t since = self->plan_fresh_ ? self->planned_generation_ : fence->generation();
    self->plan_fresh_ = false;
    return FenceTable(t, *fence, since, cluster_size);
  });
  a->live_controller_.store(a->controller_.get(), std::memory_order_release);
  COWTAP_RETURN_IF_ERROR(a->controller_->Start());
  // Start left the device all miss; the primed remaps go linear now.
  COWTAP_RETURN_IF_ERROR(a->controller_->ReloadNow().status());
  return a;
}

Status OffloadAttachment::Detach() {
  if (detached_) return Status::Ok();
  detached_ = true;
  Status first;
  auto note = [&first](Status s) {
    if (first.ok() && !s.ok()) first = std::move(s);
  };
  if (controller_) note(controller_->Stop());
  if (nbd_) note(nbd_->Disconnect());
  if (loop_) note(loop_->Detach());
  if (server_) server_->Stop();
  if (engine_) note(engine_->Flush());
  if (file_fd_ >= 0) {
    ::close(file_fd_);
    file_fd_ = -1;
  }
  return first;
}

OffloadAttachment::~OffloadAttachment() {
  Status s = Detach();
  if (!s.ok()) spdlog::warn("offload {}: detaching: {}", dm_name_, s.ToString());
}

}  // namespace cowtap::dm
