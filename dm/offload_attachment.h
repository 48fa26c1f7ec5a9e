// OffloadAttachment: the kernel offload of one open image, wired end to end —
// the image served by an NbdServer (over NewImageBlockDevice) on a Unix
// socket, the kernel's nbd client connected to it (the miss device), a loop
// device over the image file (the linear device), and an OffloadController
// that keeps /dev/mapper/<name> reloaded from the image's remap cache,
// primed at attach so clusters the image already owns go linear at once.
//
// Detach (or the destructor) tears it down in the order the kernel needs:
// the dm device first (it holds both block devices), then the nbd client,
// the loop device, the server, and finally a flush of the image.
//
// The image must stay open (and nothing else may write its file) while
// attached. Thread-safety: controller() is thread-safe (OffloadController);
// Detach may be called from one thread while no I/O is submitted to the
// dm device.
#pragma once

#include <atomic>
#include <memory>
#include <string>

#include "backend/block_device.h"
#include "backend/nbd_server.h"
#include "base/status.h"
#include "cow/image.h"
#include "dm/device_mapper.h"
#include "dm/loop_device.h"
#include "dm/nbd_device.h"
#include "dm/offload_controller.h"
#include "dm/offload_miss_device.h"

namespace cowtap::dm {

struct OffloadAttachmentOptions {
  std::string dm_name;      // the device is /dev/mapper/<dm_name>
  std::string socket_path;  // where the NBD server listens for the kernel client
  size_t max_segments = 4096;
  uint64_t prime_max_clusters = 1 << 16;  // 0: no priming
  ReloadPolicy policy;
  bool loop_direct_io = true;
};

// Zeroes [offset, offset + length) of an open file in place for mode
// (fallocate; zeros written where the filesystem has no such fallocate).
Status ZeroFileRange(int fd, const std::string& name, uint64_t offset, uint64_t length, ZeroMode mode);

class OffloadAttachment {
 public:
  // REQUIRES: image_file is the path of image's top layer file. Fails with
  // kNotSupported where the image cannot be offloaded
  // (OffloadPlanner::OptionsFor) or the kernel lacks dm/loop/nbd.
  static Result<std::unique_ptr<OffloadAttachment>> Attach(std::shared_ptr<cow::Image> image,
                                                           const std::string& image_file, DeviceMapper& dm,
                                                           const OffloadAttachmentOptions& options);
  OffloadAttachment(const OffloadAttachment&) = delete;
  OffloadAttachment& operator=(const OffloadAttachment&) = delete;
  ~OffloadAttachment();  // Detach(); errors are logged

  // "/dev/mapper/<dm_name>".
  std::string device_path() const { return "/dev/mapper/" + dm_name_; }
  OffloadController& controller() { return *controller_; }
  const DmDevices& devices() const { return devices_; }
  // What user space (the miss path) has served so far.
  backend::NbdServerStats miss_stats() const { return server_->stats(); }
  uint64_t primed_clusters() const { return primed_; }
  // How the miss path's discards and write-zeroes were split (see
  // offload_miss_device.h).
  const MissRoutingCounters& routing_counters() const { return *routing_counters_; }

  // Tears down (see the top of the file); the first error is returned, the
  // remaining steps still run. Idempotent.
  Status Detach();

 private:
  OffloadAttachment() = default;

  std::shared_ptr<cow::Image> image_;
  std::string dm_name_;
  DmDevices devices_;
  uint64_t primed_ = 0;
  std::shared_ptr<backend::BlockDevice> engine_;
  std::unique_ptr<backend::NbdServer> server_;
  std::unique_ptr<NbdDevice> nbd_;
  std::unique_ptr<LoopDevice> loop_;
  std::unique_ptr<OffloadController> controller_;
  // controller_ for the miss path's threads, set once it exists.
  std::atomic<OffloadController*> live_controller_{nullptr};
  std::shared_ptr<MissRoutingCounters> routing_counters_;
  int file_fd_ = -1;  // the image file, for zeroing linear clusters in place
  // The fence's generation when the last plan's clusters were collected;
  // used only under the controller's lock (its source and gate).
  uint64_t planned_generation_ = 0;
  bool plan_fresh_ = false;  // the next gate call is for the plan just collected
  bool detached_ = false;
};

}  // namespace cowtap::dm
