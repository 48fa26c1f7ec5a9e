// NbdDevice: the kernel's nbd client on /dev/nbdN connected to an NBD server
// (cowtapd's backend/nbd_server), the user-space device that serves a dm
// table's misses. Set up with the nbd ioctls: the newstyle-fixed handshake
// is done here in user space (NbdClientHandshake), then NBD_SET_SOCK,
// NBD_SET_BLKSIZE, NBD_SET_SIZE_BLOCKS, NBD_SET_FLAGS, and NBD_DO_IT on a
// thread of this object (it blocks while the device is connected); Connect
// returns once the kernel shows the device's full size in sysfs.
// Disconnect sends NBD_DISCONNECT, joins the thread and NBD_CLEAR_SOCKs.
//
// Needs the nbd module (/dev/nbd0) and CAP_SYS_ADMIN: where absent,
// Connect fails with kNotSupported. Thread-safety: Disconnect may be called
// from any one thread; the object is otherwise immutable.
#pragma once

#include <atomic>
#include <cstdint>
#include <memory>
#include <string>
#include <thread>

#include "base/status.h"

namespace cowtap::dm {

struct NbdExport {
  uint64_t size_bytes = 0;
  uint16_t transmission_flags = 0;
};

// The client side of the NBD newstyle fixed handshake on a connected socket,
// ending with NBD_OPT_EXPORT_NAME (what the kernel's ioctl path expects:
// simple replies, no structured ones). kCorrupt if the server does not speak
// it, kIoError on socket errors / EOF.
Result<NbdExport> NbdClientHandshake(int fd, const std::string& export_name);

// Connects to an NBD server on a Unix socket path (no "unix:" prefix).
Result<int> ConnectUnixSocket(const std::string& path);

class NbdDevice {
 public:
  // Handshakes on socket_fd (taking ownership) and hands it to the first
  // free /dev/nbdN (or /dev/nbd<index> when index >= 0).
  static Result<std::unique_ptr<NbdDevice>> Connect(int socket_fd, const std::string& export_name, int index = -1);
  NbdDevice(const NbdDevice&) = delete;
  NbdDevice& operator=(const NbdDevice&) = delete;
  ~NbdDevice();  // Disconnect()

  const std::string& path() const { return path_; }
  uint64_t size_bytes() const { return size_bytes_; }
  Status Disconnect();

 private:
  NbdDevice(std::string path, int dev_fd, uint64_t size) : path_(std::move(path)), dev_fd_(dev_fd), size_bytes_(size) {}
  std::string path_;
  int dev_fd_ = -1;
  uint64_t size_bytes_ = 0;
  std::atomic<bool> do_it_returned_{false};
  std::thread do_it_;
};

// Whether this machine has nbd devices (/dev/nbd0 present).
bool NbdAvailable();

}  // namespace cowtap::dm
