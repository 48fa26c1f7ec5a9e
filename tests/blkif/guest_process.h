// GuestProcess: runs the simulated guest program (tools/cowtap_guest) as a
// separate process for the end-to-end blkif tests, captures its output and
// parses the lines it prints (PASS/FAIL, "info k=v ...", "result: ...").
//
// Thread-safety: one GuestProcess is driven by one thread.
#pragma once

#include <sys/types.h>

#include <chrono>
#include <map>
#include <string>
#include <vector>

#include "base/status.h"

namespace cowtap::blkif_test {

struct GuestOutcome {
  bool exited = false;    // exited normally (else killed by a signal)
  int exit_code = -1;
  int signal = 0;
  bool timed_out = false;
  std::string output;
  int passed = -1;        // from "result: N passed, M failed"; -1 if absent
  int failed = -1;
  std::map<std::string, std::string> info;  // every "info k=v" pair, last wins
  std::vector<std::string> failures;        // the FAIL lines

  // "exit 0, 12 passed, 0 failed" plus the failures, for test messages.
  std::string Describe() const;
  // exited, code 0, at least one check and no failure.
  bool Passed() const { return exited && exit_code == 0 && passed > 0 && failed == 0; }
  int64_t InfoInt(const std::string& key, int64_t dflt = -1) const;
};

class GuestProcess {
 public:
  // Starts the guest binary with args (the binary path comes from the build).
  static Result<GuestProcess> Start(const std::vector<std::string>& args);
  GuestProcess(GuestProcess&& other) noexcept;
  GuestProcess& operator=(GuestProcess&&) = delete;
  // Kills (SIGKILL) and reaps the process if still running.
  ~GuestProcess();

  // Reads output until a line starting with prefix appears; false on EOF or
  // timeout. The line is left in the collected output.
  bool WaitForLine(const std::string& prefix, std::chrono::milliseconds timeout);
  // Waits for exit (SIGKILL after timeout) and parses the output.
  GuestOutcome Wait(std::chrono::milliseconds timeout);
  pid_t pid() const { return pid_; }

 private:
  GuestProcess(pid_t pid, int out_fd) : pid_(pid), out_fd_(out_fd) {}
  // Reads what is available within timeout; false on EOF.
  bool ReadSome(std::chrono::milliseconds timeout);

  pid_t pid_ = -1;
  int out_fd_ = -1;
  std::string output_;
  size_t scanned_ = 0;
};

// Runs the guest to completion.
GuestOutcome RunGuest(const std::vector<std::string>& args, std::chrono::milliseconds timeout);

// The guest binary (set by CMake).
const char* GuestBinary();

}  // namespace cowtap::blkif_test
