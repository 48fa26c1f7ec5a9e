#include "dm/offload_attachment.h"

#include <fmt/format.h>
#include <spdlog/spdlog.h>
#include <unistd.h>

#include "dm/offload_miss_device.h"
#include "dm/offload_planner.h"

namespace cowtap::dm {

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
  // The miss path offers no discard and writes zeroes as data (see
  // offload_miss_device.h): until the engine revokes before freeing, no
  // cluster the table may route linear stops being writable in place.
  a->engine_ = NewOffloadMissDevice(backend::NewImageBlockDevice(image));
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
  auto source = [img, loop, cluster_size] {
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
  return first;
}

OffloadAttachment::~OffloadAttachment() {
  Status s = Detach();
  if (!s.ok()) spdlog::warn("offload {}: detaching: {}", dm_name_, s.ToString());
}

}  // namespace cowtap::dm
