// InstanceLock: one cowtapd per control socket. Holds an exclusive flock on
// "<control socket>.lock" (created 0600 if missing, the holder's pid written
// into it) for as long as the object lives; the kernel drops it when the
// process dies, so a crash leaves no stale lock. The lock file itself is
// left in place (removing it would race with a starting daemon).
//
// Thread-safety: create and destroy on one thread.
#pragma once

#include <memory>
#include <string>

#include "base/status.h"

namespace cowtap::daemon {

class InstanceLock {
 public:
  // kBusy, naming the lock file and the holder's pid, if another process
  // (or another InstanceLock in this one) holds it; the errno's status if
  // the file cannot be created (e.g. its directory is missing).
  static Result<std::unique_ptr<InstanceLock>> Acquire(const std::string& control_socket);
  ~InstanceLock();
  InstanceLock(const InstanceLock&) = delete;
  InstanceLock& operator=(const InstanceLock&) = delete;

  const std::string& path() const { return path_; }

 private:
  InstanceLock(std::string path, int fd) : path_(std::move(path)), fd_(fd) {}
  std::string path_;
  int fd_;
};

}  // namespace cowtap::daemon
