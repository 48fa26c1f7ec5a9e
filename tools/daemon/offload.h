// OffloadProvider: how the daemon turns on the kernel offload of an image it
// holds open. The daemon keeps the table of offloads (Daemon::OffloadOn);
// the provider builds the machinery (dm device, loop, nbd miss path: see
// tools/offload/kernel_offload.h) and is chosen by the main, so the daemon
// does not depend on dm/ and is tested with a fake provider.
//
// Thread-safety: Start may be called from any thread, for different images
// concurrently; an ImageOffload's methods from any thread.
#pragma once

#include <memory>
#include <string>

#include "base/status.h"
#include "cow/image.h"
#include "tools/daemon/control.h"

namespace cowtap::daemon {

// One live offload. Destroying it stops it.
class ImageOffload {
 public:
  virtual ~ImageOffload() = default;
  // The figures now (image left empty: the daemon fills it).
  virtual OffloadSnapshot Snapshot() const = 0;
  // Removes the dm device and stops the miss path; the image stays open
  // (the daemon closes it). Idempotent; the first error is returned.
  virtual Status Stop() = 0;
};

class OffloadProvider {
 public:
  virtual ~OffloadProvider() = default;
  // Offloads image (whose top layer is the file image_file) as
  // /dev/mapper/<dm_name>. kNotSupported saying what is missing where the
  // kernel cannot (no device-mapper, nbd or loop).
  virtual Result<std::unique_ptr<ImageOffload>> Start(std::shared_ptr<cow::Image> image, const std::string& image_file,
                                                      const std::string& dm_name) = 0;
};

}  // namespace cowtap::daemon
