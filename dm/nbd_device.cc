#include "dm/nbd_device.h"

#include <errno.h>
#include <fcntl.h>
#include <linux/nbd.h>
#include <sys/ioctl.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include <chrono>
#include <cstdlib>
#include <cstring>

#include <fmt/format.h>
#include <spdlog/spdlog.h>

#include "backend/nbd_protocol.h"
#include "base/endian.h"

namespace cowtap::dm {
namespace {

using namespace cowtap::backend;  // the protocol constants

Status ReadFull(int fd, uint8_t* p, size_t n) {
  while (n > 0) {
    ssize_t r = read(fd, p, n);
    if (r < 0 && errno == EINTR) continue;
    if (r < 0) return Status::FromErrno(errno, "nbd handshake: read");
    if (r == 0) return Status::IoError("nbd handshake: server closed the connection");
    p += r;
    n -= static_cast<size_t>(r);
  }
  return Status::Ok();
}

Status WriteFull(int fd, const uint8_t* p, size_t n) {
  while (n > 0) {
    ssize_t r = send(fd, p, n, MSG_NOSIGNAL);
    if (r < 0 && errno == EINTR) continue;
    if (r < 0) return Status::FromErrno(errno, "nbd handshake: write");
    p += r;
    n -= static_cast<size_t>(r);
  }
  return Status::Ok();
}

// How long Connect waits for the kernel to start the device.
constexpr int kStartTimeoutMs = 10000;

// A sysfs number, or UINT64_MAX if unreadable.
uint64_t ReadSysfsU64(const std::string& file) {
  int fd = open(file.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) return UINT64_MAX;
  char buf[32] = {};
  ssize_t n = read(fd, buf, sizeof(buf) - 1);
  close(fd);
  if (n <= 0) return UINT64_MAX;
  char* end = nullptr;
  const unsigned long long v = std::strtoull(buf, &end, 10);
  return end == buf ? UINT64_MAX : v;
}

}  // namespace

bool NbdAvailable() { return access("/dev/nbd0", F_OK) == 0; }

Result<int> ConnectUnixSocket(const std::string& path) {
  sockaddr_un addr{};
  addr.sun_family = AF_UNIX;
  if (path.size() >= sizeof(addr.sun_path)) return Status::InvalidArgument("nbd: socket path too long: " + path);
  std::memcpy(addr.sun_path, path.data(), path.size());
  int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (fd < 0) return Status::FromErrno(errno, "socket");
  if (connect(fd, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) != 0) {
    Status s = Status::FromErrno(errno, "connect " + path);
    close(fd);
    return s;
  }
  return fd;
}

Result<NbdExport> NbdClientHandshake(int fd, const std::string& export_name) {
  if (export_name.size() > 4096) return Status::InvalidArgument("nbd: export name longer than 4096 bytes");
  uint8_t hello[18];
  COWTAP_RETURN_IF_ERROR(ReadFull(fd, hello, sizeof(hello)));
  if (LoadBe64(hello) != kNbdMagic || LoadBe64(hello + 8) != kNbdOptionMagic) {
    return Status::Corrupt("nbd handshake: server is not a newstyle NBD server");
  }
  const uint16_t server_flags = LoadBe16(hello + 16);
  if (!(server_flags & kNbdFlagFixedNewstyle)) return Status::Corrupt("nbd handshake: server lacks fixed newstyle");
  const bool no_zeroes = server_flags & kNbdFlagNoZeroes;
  uint8_t cflags[4];
  StoreBe32(cflags, kNbdFlagCFixedNewstyle | (no_zeroes ? kNbdFlagCNoZeroes : 0));
  COWTAP_RETURN_IF_ERROR(WriteFull(fd, cflags, sizeof(cflags)));
  std::vector<uint8_t> opt(16 + export_name.size());
  StoreBe64(opt.data(), kNbdOptionMagic);
  StoreBe32(opt.data() + 8, kNbdOptExportName);
  StoreBe32(opt.data() + 12, static_cast<uint32_t>(export_name.size()));
  std::memcpy(opt.data() + 16, export_name.data(), export_name.size());
  COWTAP_RETURN_IF_ERROR(WriteFull(fd, opt.data(), opt.size()));
  uint8_t reply[10 + 124];
  const size_t n = no_zeroes ? 10 : sizeof(reply);
  COWTAP_RETURN_IF_ERROR(ReadFull(fd, reply, n));
  NbdExport e;
  e.size_bytes = LoadBe64(reply);
  e.transmission_flags = LoadBe16(reply + 8);
  if (!(e.transmission_flags & kNbdFlagHasFlags)) return Status::Corrupt("nbd handshake: export flags lack HAS_FLAGS");
  return e;
}

Result<std::unique_ptr<NbdDevice>> NbdDevice::Connect(int socket_fd, const std::string& export_name, int index) {
  auto fail = [&](Status s) -> Result<std::unique_ptr<NbdDevice>> {
    close(socket_fd);
    return s;
  };
  if (!NbdAvailable()) return fail(Status::NotSupported("/dev/nbd0 is absent: load the nbd module (modprobe nbd)"));
  auto exp = NbdClientHandshake(socket_fd, export_name);
  if (!exp.ok()) return fail(exp.status());
  if (exp->size_bytes % 512 != 0) return fail(Status::Corrupt("nbd: export size is not whole sectors"));
  for (int i = (index >= 0 ? index : 0); i < (index >= 0 ? index + 1 : 64); ++i) {
    // A device in use has a pid in sysfs.
    if (index < 0 && access(fmt::format("/sys/block/nbd{}/pid", i).c_str(), F_OK) == 0) continue;
    std::string path = fmt::format("/dev/nbd{}", i);
    int dev = open(path.c_str(), O_RDWR | O_CLOEXEC);
    if (dev < 0) {
      if (errno == ENOENT) break;
      return fail(Status::FromErrno(errno, path));
    }
    if (ioctl(dev, NBD_SET_SOCK, socket_fd) != 0) {
      const int err = errno;
      close(dev);
      if (err == EBUSY && index < 0) continue;
      return fail(Status::FromErrno(err, "NBD_SET_SOCK " + path));
    }
    auto ioctl_or = [&](unsigned long req, unsigned long arg, const char* what) -> Status {
      if (ioctl(dev, req, arg) != 0) return Status::FromErrno(errno, fmt::format("{} {}", what, path));
      return Status::Ok();
    };
    Status s = ioctl_or(NBD_SET_BLKSIZE, 512, "NBD_SET_BLKSIZE");
    if (s.ok()) s = ioctl_or(NBD_SET_SIZE_BLOCKS, exp->size_bytes / 512, "NBD_SET_SIZE_BLOCKS");
    if (s.ok()) s = ioctl_or(NBD_SET_FLAGS, exp->transmission_flags, "NBD_SET_FLAGS");
    if (!s.ok()) {
      ioctl(dev, NBD_CLEAR_SOCK);
      close(dev);
      return fail(s);
    }
    std::unique_ptr<NbdDevice> d(new NbdDevice(path, dev, exp->size_bytes));
    NbdDevice* raw = d.get();
    d->do_it_ = std::thread([raw] {
      if (ioctl(raw->dev_fd_, NBD_DO_IT) != 0 && errno != EPIPE) {
        spdlog::warn("nbd: NBD_DO_IT {}: {}", raw->path_, std::strerror(errno));
      }
      raw->do_it_returned_.store(true);
    });
    close(socket_fd);  // the kernel holds its own reference
    // The kernel sets the capacity only when NBD_DO_IT starts the device
    // (NBD_SET_SIZE_BLOCKS just records it): until then the device reads as
    // empty, so return only once sysfs shows the whole size.
    const std::string size_file = fmt::format("/sys/block/nbd{}/size", i);
    const uint64_t want_sectors = exp->size_bytes / 512;
    for (int waited_ms = 0;; waited_ms += 5) {
      if (ReadSysfsU64(size_file) == want_sectors) return d;
      if (raw->do_it_returned_.load()) return Status::IoError("nbd: NBD_DO_IT " + path + " returned at once");
      if (waited_ms >= kStartTimeoutMs) {
        return Status::IoError(fmt::format("nbd: {} did not reach {} sectors within {} ms of NBD_DO_IT", path,
                                           want_sectors, kStartTimeoutMs));
      }
      std::this_thread::sleep_for(std::chrono::milliseconds(5));
    }
  }
  return fail(Status::Busy("nbd: no free /dev/nbdN"));
}

Status NbdDevice::Disconnect() {
  if (dev_fd_ < 0) return Status::Ok();
  Status s;
  if (ioctl(dev_fd_, NBD_DISCONNECT) != 0) {
    s = Status::FromErrno(errno, "NBD_DISCONNECT " + path_);
    ioctl(dev_fd_, NBD_CLEAR_SOCK);  // makes NBD_DO_IT return without the server's help
  }
  if (do_it_.joinable()) do_it_.join();
  ioctl(dev_fd_, NBD_CLEAR_SOCK);
  close(dev_fd_);
  dev_fd_ = -1;
  return s;
}

NbdDevice::~NbdDevice() {
  Status s = Disconnect();
  if (!s.ok()) spdlog::warn("nbd: disconnecting {}: {}", path_, s.ToString());
}

}  // namespace cowtap::dm
