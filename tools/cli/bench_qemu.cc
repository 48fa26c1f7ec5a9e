// The QEMU peer of `cowtap bench`: `qemu-img bench` on the same image kind,
// run as a child so that its CPU time and peak RSS are its own (wait4).
#include <fcntl.h>
#include <fmt/format.h>
#include <poll.h>
#include <sys/resource.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cstdlib>
#include <cstring>

#include "tools/cli/bench_runners.h"

namespace cowtap::cli::bench {

std::vector<std::string> QemuBenchArgs(const std::string& qemu_img, const RowSpec& row, const std::string& image_path,
                                       bool direct_io) {
  const Workload& w = row.workload;
  if (!row.qemu_unsupported.empty()) return {};
  const bool write = w.read_percent == 0;
  const uint32_t block = write ? w.write_block_bytes : w.read_block_bytes;
  std::vector<std::string> args = {qemu_img, "bench",
                                   "-f",     "qcow2",
                                   "-c",     std::to_string(w.ops),
                                   "-d",     std::to_string(w.queue_depth),
                                   "-s",     std::to_string(block)};
  if (write) args.push_back("-w");
  args.insert(args.end(), {"-t", direct_io ? "none" : "writeback", "-i", direct_io ? "io_uring" : "threads"});
  // One flush after the last request, as the other peers do.
  if (write && w.flush_at_end) args.push_back(fmt::format("--flush-interval={}", w.ops));
  args.push_back(image_path);
  return args;
}

std::optional<double> ParseQemuBenchSeconds(std::string_view output) {
  constexpr std::string_view kKey = "Run completed in ";
  const size_t at = output.find(kKey);
  if (at == std::string_view::npos) return std::nullopt;
  std::string_view rest = output.substr(at + kKey.size());
  const size_t end = rest.find(" seconds");
  if (end == std::string_view::npos || end == 0) return std::nullopt;
  const std::string number(rest.substr(0, end));
  char* stop = nullptr;
  const double secs = std::strtod(number.c_str(), &stop);
  if (stop != number.c_str() + number.size() || !(secs >= 0)) return std::nullopt;
  return secs;
}

std::optional<std::string> FindQemuImg() {
  if (const char* env = std::getenv("COWTAP_QEMU_IMG")) {
    if (*env == '\0' || ::access(env, X_OK) != 0) return std::nullopt;
    return std::string(env);
  }
  const char* path = std::getenv("PATH");
  std::string_view dirs = path ? path : "/usr/bin:/bin";
  while (!dirs.empty()) {
    const size_t colon = dirs.find(':');
    const std::string_view dir = dirs.substr(0, colon);
    const std::string candidate = fmt::format("{}/qemu-img", dir.empty() ? "." : dir);
    if (::access(candidate.c_str(), X_OK) == 0) return candidate;
    if (colon == std::string_view::npos) break;
    dirs.remove_prefix(colon + 1);
  }
  return std::nullopt;
}

Result<PeerResult> RunQemuPeer(const RowSpec& row, const std::vector<std::string>& args) {
  if (args.empty()) return Status::InvalidArgument("bench: no qemu-img command for row " + row.name);
  std::vector<char*> argv;
  for (const std::string& a : args) argv.push_back(const_cast<char*>(a.c_str()));
  argv.push_back(nullptr);
  int pipe_fds[2];
  if (::pipe2(pipe_fds, O_CLOEXEC) != 0) return Status::FromErrno(errno, "bench: pipe for qemu-img");
  const pid_t pid = ::fork();
  if (pid < 0) {
    const int e = errno;
    ::close(pipe_fds[0]);
    ::close(pipe_fds[1]);
    return Status::FromErrno(e, "bench: fork for qemu-img");
  }
  if (pid == 0) {
    ::dup2(pipe_fds[1], STDOUT_FILENO);
    ::dup2(pipe_fds[1], STDERR_FILENO);
    ::execv(argv[0], argv.data());
    _exit(127);
  }
  ::close(pipe_fds[1]);
  std::string output;
  char buf[4096];
  while (true) {
    const ssize_t n = ::read(pipe_fds[0], buf, sizeof(buf));
    if (n > 0) {
      if (output.size() < (1 << 16)) output.append(buf, static_cast<size_t>(n));
      continue;
    }
    if (n < 0 && errno == EINTR) continue;
    break;
  }
  ::close(pipe_fds[0]);
  int wstatus = 0;
  rusage ru{};
  while (::wait4(pid, &wstatus, 0, &ru) < 0) {
    if (errno != EINTR) return Status::FromErrno(errno, "bench: wait for qemu-img");
  }
  std::string command;
  for (const std::string& a : args) command += (command.empty() ? "" : " ") + a;
  if (!WIFEXITED(wstatus) || WEXITSTATUS(wstatus) != 0) {
    std::string first_line = output.substr(0, output.find('\n'));
    return Status::IoError(
        fmt::format("`{}` failed (exit {}): {}", command, WIFEXITED(wstatus) ? WEXITSTATUS(wstatus) : -1, first_line));
  }
  std::optional<double> secs = ParseQemuBenchSeconds(output);
  if (!secs) return Status::IoError(fmt::format("`{}` printed no \"Run completed in X seconds\"", command));
  const Workload& w = row.workload;
  PeerResult r;
  r.peer = Peer::kQemu;
  if (*secs <= 0) {
    r.note = "ran in under 1 ms, below qemu-img bench's resolution (raise --size)";
    return r;
  }
  const bool write = w.read_percent == 0;
  r.ran = true;
  r.ops = w.ops;
  r.bytes = w.ops * (write ? w.write_block_bytes : w.read_block_bytes);
  r.elapsed_s = *secs;
  auto tv = [](const timeval& t) { return static_cast<double>(t.tv_sec) + static_cast<double>(t.tv_usec) / 1e6; };
  r.cpu_s = tv(ru.ru_utime) + tv(ru.ru_stime);
  r.peak_rss_bytes = static_cast<uint64_t>(ru.ru_maxrss) * 1024;
  if (row.qemu_pattern_differs) r.note = "sequential: qemu-img bench has no random pattern";
  return r;
}

}  // namespace cowtap::cli::bench
