#include "tools/daemon/instance_lock.h"

#include <fcntl.h>
#include <fmt/format.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <string>

namespace cowtap::daemon {

Result<std::unique_ptr<InstanceLock>> InstanceLock::Acquire(const std::string& control_socket) {
  const std::string path = control_socket + ".lock";
  const size_t slash = control_socket.rfind('/');
  if (slash != std::string::npos && slash > 0) {
    // /run/cowtap does not survive a reboot; the control server makes it
    // too, but the lock comes first.
    if (::mkdir(control_socket.substr(0, slash).c_str(), 0755) != 0 && errno != EEXIST) {
      return Status::FromErrno(errno, "creating the directory of " + control_socket);
    }
  }
  const int fd = ::open(path.c_str(), O_RDWR | O_CREAT | O_CLOEXEC, 0600);
  if (fd < 0) return Status::FromErrno(errno, "creating the instance lock " + path);
  if (::flock(fd, LOCK_EX | LOCK_NB) != 0) {
    const int err = errno;
    char buf[32] = {};
    const ssize_t n = ::pread(fd, buf, sizeof(buf) - 1, 0);
    ::close(fd);
    if (err == EWOULDBLOCK) {
      std::string holder = n > 0 ? std::string(buf, static_cast<size_t>(n)) : "?";
      while (!holder.empty() && (holder.back() == '\n' || holder.back() == ' ')) holder.pop_back();
      return Status::Busy(
          fmt::format("another cowtapd (pid {}) is running on control socket {} (it holds {}); stop it first or use "
                      "another --control-socket",
                      holder, control_socket, path));
    }
    return Status::FromErrno(err, "locking " + path);
  }
  const std::string pid = std::to_string(::getpid()) + "\n";
  if (::ftruncate(fd, 0) != 0 || ::pwrite(fd, pid.data(), pid.size(), 0) != static_cast<ssize_t>(pid.size())) {
    // The lock holds without the pid; only the message of a refused
    // second daemon is poorer.
  }
  return std::unique_ptr<InstanceLock>(new InstanceLock(path, fd));
}

InstanceLock::~InstanceLock() {
  if (fd_ >= 0) ::close(fd_);  // releases the flock
}

}  // namespace cowtap::daemon
