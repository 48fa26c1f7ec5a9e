// Implementation of the integration-test helpers (see test_util.h).
#include "tests/interop/test_util.h"

#include <fcntl.h>
#include <gtest/gtest.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <csignal>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <memory>
#include <sstream>

namespace cowtap::tests {

CommandResult RunCommand(const std::vector<std::string>& argv) {
  CommandResult result;
  if (argv.empty()) return result;
  int fds[2];
  if (::pipe2(fds, O_CLOEXEC) != 0) {
    result.output = std::string("pipe: ") + std::strerror(errno);
    return result;
  }
  std::vector<char*> args;
  for (const std::string& a : argv) args.push_back(const_cast<char*>(a.c_str()));
  args.push_back(nullptr);
  pid_t pid = ::fork();
  if (pid < 0) {
    result.output = std::string("fork: ") + std::strerror(errno);
    ::close(fds[0]);
    ::close(fds[1]);
    return result;
  }
  if (pid == 0) {
    ::dup2(fds[1], 1);
    ::dup2(fds[1], 2);
    int devnull = ::open("/dev/null", O_RDONLY);
    if (devnull >= 0) ::dup2(devnull, 0);
    ::execvp(args[0], args.data());
    std::fprintf(stderr, "exec %s: %s\n", args[0], std::strerror(errno));
    ::_exit(127);
  }
  ::close(fds[1]);
  char buf[4096];
  for (;;) {
    ssize_t n = ::read(fds[0], buf, sizeof(buf));
    if (n > 0) {
      result.output.append(buf, static_cast<size_t>(n));
    } else if (n == 0 || errno != EINTR) {
      break;
    }
  }
  ::close(fds[0]);
  int status = 0;
  while (::waitpid(pid, &status, 0) < 0 && errno == EINTR) {
  }
  if (WIFEXITED(status))
    result.exit_code = WEXITSTATUS(status);
  else if (WIFSIGNALED(status))
    result.exit_code = 128 + WTERMSIG(status);
  return result;
}

std::string CommandLine(const std::vector<std::string>& argv) {
  std::string line;
  for (const std::string& a : argv) {
    if (!line.empty()) line += ' ';
    if (a.find_first_of(" \t'\"") != std::string::npos)
      line += "'" + a + "'";
    else
      line += a;
  }
  return line;
}

bool HaveTool(const std::string& name) {
  const char* path = std::getenv("PATH");
  if (!path) return false;
  std::stringstream dirs(path);
  std::string dir;
  while (std::getline(dirs, dir, ':')) {
    std::string full = (dir.empty() ? "." : dir) + "/" + name;
    if (::access(full.c_str(), X_OK) == 0) return true;
  }
  return false;
}

std::string MissingQemuToolsReason() {
  std::string missing;
  for (const char* tool : {"qemu-img", "qemu-io"})
    if (!HaveTool(tool)) missing += std::string(missing.empty() ? "" : " and ") + tool;
  if (missing.empty()) return "";
  return missing + " not found in PATH (install Debian's qemu-utils to run the interop tests)";
}

namespace {

std::string TempRoot() {
  if (const char* env = std::getenv("COWTAP_TEST_TMPDIR"); env && *env) return env;
  struct stat st;
  if (::stat("/dev/shm", &st) == 0 && S_ISDIR(st.st_mode) && ::access("/dev/shm", W_OK) == 0) return "/dev/shm";
  return "/tmp";
}

}  // namespace

TempDir::TempDir(const std::string& label) {
  std::string clean;
  for (char c : label) clean += (std::isalnum(static_cast<unsigned char>(c)) || c == '-') ? c : '_';
  std::string templ = TempRoot() + "/cowtap-" + clean.substr(0, 80) + "-XXXXXX";
  std::vector<char> buf(templ.begin(), templ.end());
  buf.push_back('\0');
  if (::mkdtemp(buf.data()) == nullptr) {
    ADD_FAILURE() << "mkdtemp " << templ << ": " << std::strerror(errno);
    path_ = templ;
    return;
  }
  path_ = buf.data();
}

TempDir::~TempDir() {
  if (std::getenv("COWTAP_KEEP_TEST_DIRS")) {
    std::fprintf(stderr, "kept test directory %s\n", path_.c_str());
    return;
  }
  std::error_code ec;
  std::filesystem::remove_all(path_, ec);
}

Result<std::vector<uint8_t>> ReadWholeFile(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) return Status::NotFound(path + ": cannot open for reading");
  std::vector<uint8_t> bytes((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  if (in.bad()) return Status::IoError(path + ": read failed");
  return bytes;
}

Status WriteWholeFile(const std::string& path, const std::vector<uint8_t>& bytes) {
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  if (!out) return Status::IoError(path + ": cannot open for writing");
  out.write(reinterpret_cast<const char*>(bytes.data()), static_cast<std::streamsize>(bytes.size()));
  if (!out) return Status::IoError(path + ": write failed");
  return Status::Ok();
}

Result<uint64_t> HashFile(const std::string& path) {
  COWTAP_ASSIGN_OR_RETURN(std::vector<uint8_t> bytes, ReadWholeFile(path));
  uint64_t h = 0xcbf29ce484222325ull;
  for (uint8_t b : bytes) {
    h ^= b;
    h *= 0x100000001b3ull;
  }
  return h;
}

Result<std::vector<uint8_t>> ReadImageWithCowtap(const std::string& path, cow::OpenOptions options) {
  COWTAP_ASSIGN_OR_RETURN(std::unique_ptr<cow::Image> image, cow::OpenImage(path, options));
  std::vector<uint8_t> bytes(image->size_bytes());
  constexpr uint64_t kChunk = 1 << 20;
  for (uint64_t off = 0; off < bytes.size(); off += kChunk) {
    uint64_t len = std::min<uint64_t>(kChunk, bytes.size() - off);
    iovec iov = MakeIoVec(bytes.data() + off, len);
    Status s = image->Read(off, IoVecs(&iov, 1));
    if (!s.ok()) return s.Annotate("cowtap read of " + path + " at offset " + std::to_string(off));
  }
  COWTAP_RETURN_IF_ERROR(image->Close());
  return bytes;
}

std::string RunIsolated(const std::function<std::string()>& fn) {
  int fds[2];
  if (::pipe2(fds, O_CLOEXEC) != 0) return std::string("pipe: ") + std::strerror(errno);
  std::fflush(nullptr);
  pid_t pid = ::fork();
  if (pid < 0) {
    ::close(fds[0]);
    ::close(fds[1]);
    return std::string("fork: ") + std::strerror(errno);
  }
  if (pid == 0) {
    ::close(fds[0]);
    std::string result = fn();
    size_t done = 0;
    while (done < result.size()) {
      ssize_t n = ::write(fds[1], result.data() + done, result.size() - done);
      if (n <= 0) break;
      done += static_cast<size_t>(n);
    }
    std::fflush(nullptr);
    ::_exit(0);
  }
  ::close(fds[1]);
  std::string result;
  char buf[4096];
  for (;;) {
    ssize_t n = ::read(fds[0], buf, sizeof(buf));
    if (n > 0) {
      result.append(buf, static_cast<size_t>(n));
    } else if (n == 0 || errno != EINTR) {
      break;
    }
  }
  ::close(fds[0]);
  int status = 0;
  while (::waitpid(pid, &status, 0) < 0 && errno == EINTR) {
  }
  if (WIFSIGNALED(status))
    return "cowtap crashed: killed by signal " + std::to_string(WTERMSIG(status)) + " (" + strsignal(WTERMSIG(status)) +
           ")" + (result.empty() ? "" : " after: " + result);
  if (!WIFEXITED(status) || WEXITSTATUS(status) != 0)
    return "cowtap child exited with status " + std::to_string(WEXITSTATUS(status));
  return result;
}

Result<std::vector<uint8_t>> ReadImageWithCowtapIsolated(const std::string& path, const cow::OpenOptions& options,
                                                         const std::string& scratch_file) {
  std::string error = RunIsolated([&]() -> std::string {
    auto bytes = ReadImageWithCowtap(path, options);
    if (!bytes.ok()) return bytes.status().ToString();
    Status s = WriteWholeFile(scratch_file, *bytes);
    return s.ok() ? "" : s.ToString();
  });
  if (!error.empty()) return Status::Internal(error);
  return ReadWholeFile(scratch_file);
}

std::string DescribeDifference(const std::vector<uint8_t>& expected, const std::vector<uint8_t>& actual) {
  std::ostringstream out;
  if (expected.size() != actual.size())
    out << "sizes differ: expected " << expected.size() << " bytes, got " << actual.size() << "; ";
  size_t n = std::min(expected.size(), actual.size());
  size_t first = n, diff_bytes = 0;
  for (size_t i = 0; i < n; ++i) {
    if (expected[i] != actual[i]) {
      if (first == n) first = i;
      ++diff_bytes;
    }
  }
  if (first == n) return out.str();
  size_t end = first;
  while (end < n && expected[end] != actual[end]) ++end;
  char buf[160];
  std::snprintf(buf, sizeof(buf),
                "first difference at byte %zu (0x%zx), run of %zu bytes to 0x%zx: expected 0x%02x, got 0x%02x; ", first,
                first, end - first, end, expected[first], actual[first]);
  out << buf << diff_bytes << " bytes differ in all";
  return out.str();
}

namespace {

class SummaryEnvironment : public ::testing::Environment {
 public:
  explicit SummaryEnvironment(std::string label) : label_(std::move(label)) {}
  void TearDown() override {
    const ::testing::UnitTest& unit = *::testing::UnitTest::GetInstance();
    int total = 0, passed = 0, failed = 0, skipped = 0;
    std::vector<std::string> failures;
    for (int i = 0; i < unit.total_test_suite_count(); ++i) {
      const ::testing::TestSuite& suite = *unit.GetTestSuite(i);
      for (int j = 0; j < suite.total_test_count(); ++j) {
        const ::testing::TestInfo& test = *suite.GetTestInfo(j);
        if (!test.should_run()) continue;
        ++total;
        const ::testing::TestResult& r = *test.result();
        if (r.Failed()) {
          ++failed;
          failures.push_back(std::string(suite.name()) + "." + test.name());
        } else if (r.Skipped()) {
          ++skipped;
        } else {
          ++passed;
        }
      }
    }
    std::printf("%s: %d cases, %d passed, %d failed", label_.c_str(), total, passed, failed);
    if (skipped) std::printf(", %d skipped", skipped);
    std::printf("\n");
    for (const std::string& f : failures) std::printf("  FAILED %s\n", f.c_str());
    std::fflush(stdout);
  }

 private:
  std::string label_;
};

}  // namespace

bool RegisterSummary(const std::string& label) {
  // One summary per binary even when several files of it register.
  static bool registered = false;
  if (!registered) ::testing::AddGlobalTestEnvironment(new SummaryEnvironment(label));
  registered = true;
  return true;
}

uint64_t SeededRandom::Next() {
  uint64_t z = (state_ += 0x9e3779b97f4a7c15ull);
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  return z ^ (z >> 31);
}

uint64_t SeededRandom::Between(uint64_t lo, uint64_t hi) {
  uint64_t span = hi - lo + 1;
  if (span == 0) return Next();
  return lo + Next() % span;
}

}  // namespace cowtap::tests
