// Shared helpers for the integration tests that use qemu-img / qemu-io as the
// oracle (tests/interop) and for the crash tests (tests/crash): running a
// tool and capturing its output, per-case temporary directories, reading a
// whole image through cowtap, comparing byte buffers with a readable first
// difference, and a summary line printed after all tests of a binary.
//
// Thread-safety: none of these helpers share mutable state except the
// summary registration (done once, before tests run); tests call them from
// one thread.
#pragma once

#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "base/status.h"
#include "cow/image.h"

namespace cowtap::tests {

struct CommandResult {
  int exit_code = -1;  // the exit status; 128 + signal if killed; -1 if not run
  std::string output;  // stdout and stderr interleaved
};

// Runs argv[0] (searched in PATH) with argv, without a shell, and waits.
CommandResult RunCommand(const std::vector<std::string>& argv);
// argv joined with spaces, quoting words with spaces (for failure messages).
std::string CommandLine(const std::vector<std::string>& argv);
// True if `name` is an executable in PATH.
bool HaveTool(const std::string& name);
// "qemu-img and qemu-io are needed" style reason, or empty when both exist.
std::string MissingQemuToolsReason();

// A fresh directory, removed with its contents on destruction unless the
// environment sets COWTAP_KEEP_TEST_DIRS (then its path is logged). Made
// under $COWTAP_TEST_TMPDIR, else /dev/shm (fsync is free there), else /tmp.
class TempDir {
 public:
  explicit TempDir(const std::string& label);
  ~TempDir();
  TempDir(const TempDir&) = delete;
  TempDir& operator=(const TempDir&) = delete;

  const std::string& path() const { return path_; }
  // path() + "/" + name.
  std::string File(const std::string& name) const { return path_ + "/" + name; }

 private:
  std::string path_;
};

// The whole contents of a file; an error if it cannot be read.
Result<std::vector<uint8_t>> ReadWholeFile(const std::string& path);
Status WriteWholeFile(const std::string& path, const std::vector<uint8_t>& bytes);
// FNV-1a 64 of a file's bytes (to prove a file was not modified).
Result<uint64_t> HashFile(const std::string& path);

// Opens path through cowtap (read-only unless options say otherwise) and
// returns every guest byte.
Result<std::vector<uint8_t>> ReadImageWithCowtap(const std::string& path, cow::OpenOptions options);

// Runs fn in a forked child, so that a crash of the code under test fails one
// case instead of killing the whole test binary. Returns what fn returned, or
// a description of how the child died ("killed by signal 11 (Segmentation
// fault)"). fn must not use GoogleTest assertions (they would be lost).
std::string RunIsolated(const std::function<std::string()>& fn);

// ReadImageWithCowtap in a child (RunIsolated); the bytes travel through
// scratch_file. An error or crash of the child comes back as the Status.
Result<std::vector<uint8_t>> ReadImageWithCowtapIsolated(const std::string& path, const cow::OpenOptions& options,
                                                         const std::string& scratch_file);

// Empty when equal; otherwise says where the first differing run starts and
// ends, the bytes there, and how many bytes differ in all.
std::string DescribeDifference(const std::vector<uint8_t>& expected, const std::vector<uint8_t>& actual);

// Registers a GoogleTest environment that prints, after all tests,
// "<label>: N cases, P passed, F failed[, S skipped]" and the failed names.
// Only the first call in a process registers. Returns true so it can
// initialise a namespace-scope bool.
bool RegisterSummary(const std::string& label);

// Deterministic pseudo-random numbers (splitmix64): same seed, same run on
// every machine and library version, unlike std:: distributions.
class SeededRandom {
 public:
  explicit SeededRandom(uint64_t seed) : state_(seed) {}
  uint64_t Next();
  // Uniform in [lo, hi]. REQUIRES: lo <= hi.
  uint64_t Between(uint64_t lo, uint64_t hi);
  bool OneIn(uint64_t n) { return Between(0, n - 1) == 0; }

 private:
  uint64_t state_;
};

}  // namespace cowtap::tests
