// DaemonProcess: the cowtapd program run as a child process for the
// process-level tests (SIGTERM/SIGKILL, single instance, the kill
// campaign), its stdout and stderr in a log file.
//
// Thread-safety: one DaemonProcess is driven by one thread.
#pragma once

#include <sys/types.h>

#include <chrono>
#include <string>
#include <vector>

namespace cowtap::blkif_test {

class DaemonProcess {
 public:
  // Starts `binary args...`, output to log (truncated).
  DaemonProcess(const std::string& binary, const std::vector<std::string>& args, const std::string& log);
  DaemonProcess(const DaemonProcess&) = delete;
  DaemonProcess& operator=(const DaemonProcess&) = delete;
  // Kill().
  ~DaemonProcess();

  // SIGKILL and reap, if still running.
  void Kill();
  // Sends sig (no-op once reaped).
  void Signal(int sig);
  // Still running (reaps it if it exited).
  bool Alive();
  // Waits for exit: the exit code, or -1 (killed by a signal, or timeout).
  int Wait(std::chrono::milliseconds timeout);
  // The log so far.
  std::string Log() const;
  // Polls the log for text; false on timeout or if the process exits first.
  bool WaitForLog(const std::string& text, std::chrono::milliseconds timeout);

 private:
  pid_t pid_ = -1;
  std::string log_;
};

}  // namespace cowtap::blkif_test
