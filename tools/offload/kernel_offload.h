// KernelOffloadProvider: cowtapd's kernel offload (`cowtap ctl offload on`)
// over Linux's device-mapper, loop and nbd — one dm::OffloadAttachment per
// image (the image served to the kernel's nbd client on a Unix socket under
// socket_dir, a loop device over the image file, /dev/mapper/<name> kept
// reloaded from the remap cache) and a reload thread per offload that
// replans at most once per reload_interval, so the table follows the remaps
// the miss path learns at a bounded rate.
//
// Where the kernel lacks a piece, Start fails with kNotSupported saying
// which and how to get it (modprobe dm_mod / loop / nbd, root); cowtapd
// itself starts and serves VBDs either way.
//
// Thread-safety: Start may be called concurrently; a KernelOffload's
// methods from any thread. The provider must outlive its offloads.
#pragma once

#include <chrono>
#include <memory>
#include <mutex>
#include <string>

#include "dm/device_mapper.h"
#include "dm/offload_attachment.h"
#include "tools/daemon/offload.h"

namespace cowtap::offload {

struct KernelOffloadOptions {
  // Where the miss path's NBD sockets live (<socket_dir>/<dm name>.nbd).
  std::string socket_dir = "/run/cowtap";
  // The reload thread replans this often (a reload happens only when the
  // table changed), which bounds the reload rate.
  std::chrono::milliseconds reload_interval{1000};
  // Template for each attachment (dm_name and socket_path are set per image).
  dm::OffloadAttachmentOptions attach;
};

// What the kernel lacks for the offload, as kNotSupported naming each
// missing device node and what to do; OK when /dev/mapper/control,
// /dev/loop-control and /dev/nbd0 are all usable.
Status CheckOffloadKernel();

// The I/O a block device completed, from /sys/dev/block/<maj>:<min>/stat.
struct BlockDeviceIo {
  uint64_t sectors_read = 0;
  uint64_t sectors_written = 0;
};
Result<BlockDeviceIo> ReadBlockDeviceIo(const std::string& device_path);

class KernelOffloadProvider : public daemon::OffloadProvider {
 public:
  explicit KernelOffloadProvider(KernelOffloadOptions options = {}) : options_(std::move(options)) {}
  Result<std::unique_ptr<daemon::ImageOffload>> Start(std::shared_ptr<cow::Image> image, const std::string& image_file,
                                                      const std::string& dm_name) override;

 private:
  // The libdevmapper DeviceMapper, made on the first Start that finds the
  // kernel ready, then shared by every offload.
  Result<dm::DeviceMapper*> Mapper();

  const KernelOffloadOptions options_;
  std::mutex mu_;
  std::unique_ptr<dm::DeviceMapper> dm_;  // GUARDED_BY(mu_) until set
};

}  // namespace cowtap::offload
