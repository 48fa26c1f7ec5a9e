#include "tests/blkif/guest_process.h"

#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cstdio>
#include <sstream>

#include <fmt/format.h>

namespace cowtap::blkif_test {

const char* GuestBinary() { return COWTAP_GUEST_BIN; }

std::string GuestOutcome::Describe() const {
  std::string s = exited ? fmt::format("exit {}", exit_code) : fmt::format("killed by signal {}", signal);
  if (timed_out) s += " (timed out)";
  s += fmt::format(", {} passed, {} failed", passed, failed);
  for (const std::string& f : failures) s += "\n  " + f;
  s += "\n--- guest output ---\n" + output;
  return s;
}

int64_t GuestOutcome::InfoInt(const std::string& key, int64_t dflt) const {
  auto it = info.find(key);
  if (it == info.end()) return dflt;
  try {
    return std::stoll(it->second);
  } catch (...) {
    return dflt;
  }
}

Result<GuestProcess> GuestProcess::Start(const std::vector<std::string>& args) {
  int fds[2];
  if (pipe2(fds, O_CLOEXEC) != 0) return Status::FromErrno(errno, "pipe for the guest's output");
  std::vector<std::string> argv_store = {GuestBinary()};
  argv_store.insert(argv_store.end(), args.begin(), args.end());
  std::vector<char*> argv;
  for (std::string& a : argv_store) argv.push_back(a.data());
  argv.push_back(nullptr);
  const pid_t pid = fork();
  if (pid < 0) {
    close(fds[0]);
    close(fds[1]);
    return Status::FromErrno(errno, "fork of the guest");
  }
  if (pid == 0) {
    dup2(fds[1], STDOUT_FILENO);
    dup2(fds[1], STDERR_FILENO);
    execv(argv[0], argv.data());
    _exit(127);
  }
  close(fds[1]);
  return GuestProcess(pid, fds[0]);
}

GuestProcess::GuestProcess(GuestProcess&& other) noexcept
    : pid_(other.pid_), out_fd_(other.out_fd_), output_(std::move(other.output_)), scanned_(other.scanned_) {
  other.pid_ = -1;
  other.out_fd_ = -1;
}

GuestProcess::~GuestProcess() {
  if (pid_ > 0) {
    kill(pid_, SIGKILL);
    waitpid(pid_, nullptr, 0);
  }
  if (out_fd_ >= 0) close(out_fd_);
}

bool GuestProcess::ReadSome(std::chrono::milliseconds timeout) {
  pollfd pfd{out_fd_, POLLIN, 0};
  if (poll(&pfd, 1, static_cast<int>(timeout.count())) <= 0) return true;
  char buf[4096];
  const ssize_t n = read(out_fd_, buf, sizeof(buf));
  if (n <= 0) return false;
  output_.append(buf, static_cast<size_t>(n));
  return true;
}

bool GuestProcess::WaitForLine(const std::string& prefix, std::chrono::milliseconds timeout) {
  const auto deadline = std::chrono::steady_clock::now() + timeout;
  while (true) {
    size_t pos = 0;
    while ((pos = output_.find('\n', scanned_)) != std::string::npos) {
      if (output_.compare(scanned_, prefix.size(), prefix) == 0) {
        scanned_ = pos + 1;
        return true;
      }
      scanned_ = pos + 1;
    }
    if (std::chrono::steady_clock::now() >= deadline) return false;
    if (!ReadSome(std::chrono::milliseconds(50))) return false;
  }
}

GuestOutcome GuestProcess::Wait(std::chrono::milliseconds timeout) {
  GuestOutcome o;
  const auto deadline = std::chrono::steady_clock::now() + timeout;
  int status = 0;
  bool eof = false;
  bool reaped = false;
  while (!reaped && std::chrono::steady_clock::now() < deadline) {
    if (!eof) {
      eof = !ReadSome(std::chrono::milliseconds(50));
    } else {
      reaped = waitpid(pid_, &status, WNOHANG) == pid_;
      if (!reaped) usleep(5000);
    }
  }
  if (!reaped && waitpid(pid_, &status, WNOHANG) != pid_) {
    o.timed_out = true;
    kill(pid_, SIGKILL);
    waitpid(pid_, &status, 0);
  }
  pid_ = -1;
  if (!eof) {
    // Whatever the killed process left in the pipe.
    while (true) {
      pollfd pfd{out_fd_, POLLIN, 0};
      if (poll(&pfd, 1, 0) <= 0 || !ReadSome(std::chrono::milliseconds(0))) break;
    }
  }
  o.exited = WIFEXITED(status);
  o.exit_code = o.exited ? WEXITSTATUS(status) : -1;
  o.signal = WIFSIGNALED(status) ? WTERMSIG(status) : 0;
  o.output = output_;
  std::istringstream lines(output_);
  std::string line;
  while (std::getline(lines, line)) {
    if (line.rfind("FAIL ", 0) == 0) o.failures.push_back(line);
    if (std::sscanf(line.c_str(), "result: %d passed, %d failed", &o.passed, &o.failed) == 2) continue;
    if (line.rfind("info ", 0) == 0) {
      std::istringstream words(line.substr(5));
      std::string word;
      while (words >> word) {
        const size_t eq = word.find('=');
        if (eq != std::string::npos) o.info[word.substr(0, eq)] = word.substr(eq + 1);
      }
    }
  }
  return o;
}

GuestOutcome RunGuest(const std::vector<std::string>& args, std::chrono::milliseconds timeout) {
  auto p = GuestProcess::Start(args);
  if (!p.ok()) {
    GuestOutcome o;
    o.output = p.status().ToString();
    return o;
  }
  return p->Wait(timeout);
}

}  // namespace cowtap::blkif_test
