#include "dm/loop_device.h"

#include <errno.h>
#include <fcntl.h>
#include <linux/fs.h>
#include <linux/loop.h>
#include <sys/ioctl.h>
#include <unistd.h>

#include <cstring>

#include <fmt/format.h>

#include <spdlog/spdlog.h>

namespace cowtap::dm {
namespace {
constexpr const char* kLoopControl = "/dev/loop-control";
}  // namespace

bool LoopAvailable() { return access(kLoopControl, R_OK | W_OK) == 0; }

Result<std::unique_ptr<LoopDevice>> LoopDevice::Attach(const std::string& file, const LoopOptions& options) {
  if (!LoopAvailable()) {
    return Status::NotSupported(fmt::format("{} is absent or not accessible: load loop and run as root", kLoopControl));
  }
  int ctl = open(kLoopControl, O_RDWR | O_CLOEXEC);
  if (ctl < 0) return Status::FromErrno(errno, kLoopControl);
  int backing = open(file.c_str(), (options.read_only ? O_RDONLY : O_RDWR) | O_CLOEXEC);
  if (backing < 0) {
    Status s = Status::FromErrno(errno, file);
    close(ctl);
    return s;
  }
  Status last = Status::Busy("loop: no free device");
  for (int attempt = 0; attempt < 8; ++attempt) {
    int n = ioctl(ctl, LOOP_CTL_GET_FREE);
    if (n < 0) {
      last = Status::FromErrno(errno, "LOOP_CTL_GET_FREE");
      break;
    }
    std::string path = fmt::format("/dev/loop{}", n);
    int fd = open(path.c_str(), (options.read_only ? O_RDONLY : O_RDWR) | O_CLOEXEC);
    if (fd < 0) {
      last = Status::FromErrno(errno, path);
      break;
    }
    loop_config cfg;
    std::memset(&cfg, 0, sizeof(cfg));
    cfg.fd = static_cast<uint32_t>(backing);
    cfg.info.lo_flags = LO_FLAGS_AUTOCLEAR;
    if (options.read_only) cfg.info.lo_flags |= LO_FLAGS_READ_ONLY;
    if (options.direct_io) cfg.info.lo_flags |= LO_FLAGS_DIRECT_IO;
    std::strncpy(reinterpret_cast<char*>(cfg.info.lo_file_name), file.c_str(), LO_NAME_SIZE - 1);
    if (ioctl(fd, LOOP_CONFIGURE, &cfg) == 0) {
      close(backing);  // the loop device holds its own reference
      close(ctl);
      return std::unique_ptr<LoopDevice>(new LoopDevice(std::move(path), fd));
    }
    const int err = errno;
    close(fd);
    last = Status::FromErrno(err, fmt::format("LOOP_CONFIGURE {} on {}", file, path));
    if (err != EBUSY) break;  // taken by someone else between GET_FREE and CONFIGURE: retry
  }
  close(backing);
  close(ctl);
  return last;
}

Result<uint64_t> LoopDevice::SizeBytes() const {
  uint64_t size = 0;
  if (fd_ < 0) return Status::InvalidArgument("loop: " + path_ + " is detached");
  if (ioctl(fd_, BLKGETSIZE64, &size) != 0) return Status::FromErrno(errno, "BLKGETSIZE64 " + path_);
  return size;
}

Status LoopDevice::RefreshCapacity() {
  if (fd_ < 0) return Status::InvalidArgument("loop: " + path_ + " is detached");
  if (ioctl(fd_, LOOP_SET_CAPACITY, 0) != 0) return Status::FromErrno(errno, "LOOP_SET_CAPACITY " + path_);
  return Status::Ok();
}

Status LoopDevice::Detach() {
  if (fd_ < 0) return Status::Ok();
  Status s;
  if (ioctl(fd_, LOOP_CLR_FD, 0) != 0 && errno != ENXIO) s = Status::FromErrno(errno, "LOOP_CLR_FD " + path_);
  close(fd_);
  fd_ = -1;
  return s;
}

LoopDevice::~LoopDevice() {
  Status s = Detach();
  if (!s.ok()) spdlog::warn("loop: detaching {}: {}", path_, s.ToString());
}

}  // namespace cowtap::dm
