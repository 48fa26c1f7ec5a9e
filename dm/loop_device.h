// LoopDevice: an image file attached to a free /dev/loopN, so that
// device-mapper linear segments can point at host offsets inside it. Set up
// with LOOP_CTL_GET_FREE and LOOP_CONFIGURE (Linux >= 5.8) in one step,
// with direct I/O (no second copy of the data in the page cache) and
// optionally read-only; LO_FLAGS_AUTOCLEAR makes the kernel free the device
// once the last user closes it.
//
// Needs /dev/loop-control and CAP_SYS_ADMIN: where absent, Attach fails with
// kNotSupported. Thread-safety: none needed (immutable after Attach; the
// destructor detaches).
#pragma once

#include <memory>
#include <string>

#include "base/status.h"

namespace cowtap::dm {

struct LoopOptions {
  bool read_only = false;
  bool direct_io = true;
};

class LoopDevice {
 public:
  // Attaches file to a free loop device. Retries a few times when another
  // process takes the free device first (EBUSY).
  static Result<std::unique_ptr<LoopDevice>> Attach(const std::string& file, const LoopOptions& options = {});
  LoopDevice(const LoopDevice&) = delete;
  LoopDevice& operator=(const LoopDevice&) = delete;
  ~LoopDevice();  // Detach(); errors are logged

  // "/dev/loopN".
  const std::string& path() const { return path_; }
  // The device's size as the kernel sees it (BLKGETSIZE64).
  Result<uint64_t> SizeBytes() const;
  // Re-reads the file's size into the device (LOOP_SET_CAPACITY): the size
  // is fixed at Attach, so clusters an image allocates past the file's
  // end of then are beyond the device — device-mapper refuses a table that
  // points there — until this is called. Safe while the device is in use.
  Status RefreshCapacity();
  // Detaches the file (LOOP_CLR_FD). Idempotent.
  Status Detach();

 private:
  LoopDevice(std::string path, int fd) : path_(std::move(path)), fd_(fd) {}
  std::string path_;
  int fd_ = -1;
};

// Whether this machine can attach loop devices (/dev/loop-control usable).
bool LoopAvailable();

}  // namespace cowtap::dm
