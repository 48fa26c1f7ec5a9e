// Measuring helpers shared by the `cowtap bench` runners: the request
// sequence every peer of a row replays (OpPattern), a bounded latency
// histogram, and the process's CPU time and peak RSS.
//
// Thread-safety: OpPattern and LatencyHistogram are used by one thread at a
// time; the free functions are thread-safe.
#pragma once

#include <array>
#include <cstdint>

#include "tools/cli/bench_types.h"

namespace cowtap::cli::bench {

// One request of a pattern: bytes [offset, offset + length).
struct PatternOp {
  bool write = false;
  uint64_t offset = 0;
  uint32_t length = 0;
};

// The deterministic request sequence of a Workload: the same seed gives the
// same sequence to every peer. Sequential patterns start at 0 and wrap at
// the end of the region; random ones pick block-aligned offsets uniformly.
// Requests never cross region_bytes.
class OpPattern {
 public:
  // REQUIRES: region_bytes >= both block sizes, block sizes > 0.
  explicit OpPattern(const Workload& workload);
  PatternOp Next();

 private:
  uint64_t Random();
  Workload w_;
  uint64_t rng_;
  uint64_t cursor_ = 0;
};

// Checks a Workload before any runner uses it: block sizes multiples of 512
// within 1 MiB, queue depth 1..256, a region holding at least one block.
// Returns an empty string when valid, else what is wrong.
std::string ValidateWorkload(const Workload& workload);

// Latencies in nanoseconds, log-linear buckets (32 per power of two, so a
// percentile is within ~3% of the truth); fixed memory whatever the count.
class LatencyHistogram {
 public:
  void Record(uint64_t ns);
  uint64_t count() const { return count_; }
  // The p-th percentile (0 < p <= 100) in microseconds; 0 when empty.
  double PercentileUs(double p) const;

 private:
  static constexpr int kSubBits = 5;
  static constexpr size_t kBuckets = (64 - kSubBits + 1) << kSubBits;
  static size_t Bucket(uint64_t ns);
  static uint64_t BucketMid(size_t bucket);
  std::array<uint64_t, kBuckets> buckets_{};
  uint64_t count_ = 0;
};

// Monotonic nanoseconds.
uint64_t NowNs();
// User + system CPU seconds of this process (all threads).
double ProcessCpuSeconds();
// Resets the kernel's peak-RSS mark of this process (/proc/self/clear_refs
// "5"); false where the kernel does not allow it (PeakRssBytes is then the
// lifetime peak).
bool ResetPeakRss();
// VmHWM of this process in bytes (ru_maxrss if /proc is unavailable).
uint64_t PeakRssBytes();

}  // namespace cowtap::cli::bench
