#include "tools/cli/bench_stats.h"

#include <fmt/format.h>
#include <sys/resource.h>

#include <algorithm>
#include <bit>
#include <chrono>
#include <cstdio>
#include <cstring>

namespace cowtap::cli::bench {

OpPattern::OpPattern(const Workload& workload) : w_(workload), rng_(workload.seed * 0x9E3779B97F4A7C15ull + 1) {}

uint64_t OpPattern::Random() {
  // splitmix64: cheap, and the same sequence on every peer.
  uint64_t z = (rng_ += 0x9E3779B97F4A7C15ull);
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

PatternOp OpPattern::Next() {
  PatternOp op;
  op.write = w_.read_percent < 100 && (w_.read_percent == 0 || Random() % 100 >= w_.read_percent);
  op.length = op.write ? w_.write_block_bytes : w_.read_block_bytes;
  if (w_.sequential) {
    if (cursor_ + op.length > w_.region_bytes) cursor_ = 0;
    op.offset = cursor_;
    cursor_ += op.length;
  } else {
    const uint64_t blocks = w_.region_bytes / op.length;
    op.offset = (Random() % blocks) * op.length;
  }
  return op;
}

std::string ValidateWorkload(const Workload& w) {
  for (uint32_t block : {w.read_block_bytes, w.write_block_bytes}) {
    if (block == 0 || block % 512 != 0 || block > (1u << 20)) {
      return fmt::format("block size {} is not a multiple of 512 between 512 and 1 MiB", block);
    }
    if (w.region_bytes < block) return fmt::format("region of {} bytes holds no {}-byte block", w.region_bytes, block);
  }
  if (w.queue_depth == 0 || w.queue_depth > 256) return fmt::format("queue depth {} is not in 1..256", w.queue_depth);
  if (w.read_percent > 100) return fmt::format("read percentage {} is over 100", w.read_percent);
  return "";
}

size_t LatencyHistogram::Bucket(uint64_t ns) {
  if (ns < (2u << kSubBits)) return static_cast<size_t>(ns);
  const int msb = 63 - std::countl_zero(ns);
  const int shift = msb - kSubBits;
  return (static_cast<size_t>(shift) << kSubBits) + static_cast<size_t>(ns >> shift);
}

uint64_t LatencyHistogram::BucketMid(size_t bucket) {
  if (bucket < (2u << kSubBits)) return bucket;
  const size_t shift = (bucket >> kSubBits) - 1;
  const uint64_t mantissa = (bucket & ((1u << kSubBits) - 1)) + (1u << kSubBits);
  return (mantissa << shift) + ((uint64_t{1} << shift) >> 1);
}

void LatencyHistogram::Record(uint64_t ns) {
  ++buckets_[std::min(Bucket(ns), kBuckets - 1)];
  ++count_;
}

double LatencyHistogram::PercentileUs(double p) const {
  if (count_ == 0) return 0;
  const double want = std::clamp(p, 0.0, 100.0) / 100.0 * static_cast<double>(count_);
  uint64_t seen = 0;
  for (size_t i = 0; i < kBuckets; ++i) {
    seen += buckets_[i];
    if (seen > 0 && static_cast<double>(seen) >= want) return static_cast<double>(BucketMid(i)) / 1000.0;
  }
  return static_cast<double>(BucketMid(kBuckets - 1)) / 1000.0;
}

uint64_t NowNs() {
  return static_cast<uint64_t>(
      std::chrono::duration_cast<std::chrono::nanoseconds>(std::chrono::steady_clock::now().time_since_epoch())
          .count());
}

double ProcessCpuSeconds() {
  rusage ru{};
  if (getrusage(RUSAGE_SELF, &ru) != 0) return 0;
  auto secs = [](const timeval& tv) { return static_cast<double>(tv.tv_sec) + static_cast<double>(tv.tv_usec) / 1e6; };
  return secs(ru.ru_utime) + secs(ru.ru_stime);
}

bool ResetPeakRss() {
  std::FILE* f = std::fopen("/proc/self/clear_refs", "w");
  if (f == nullptr) return false;
  const bool ok = std::fputs("5", f) >= 0;
  return std::fclose(f) == 0 && ok;
}

uint64_t PeakRssBytes() {
  if (std::FILE* f = std::fopen("/proc/self/status", "r")) {
    char line[256];
    uint64_t kib = 0;
    bool found = false;
    while (std::fgets(line, sizeof(line), f)) {
      if (std::strncmp(line, "VmHWM:", 6) == 0) {
        found = std::sscanf(line + 6, "%lu", &kib) == 1;
        break;
      }
    }
    std::fclose(f);
    if (found) return kib * 1024;
  }
  rusage ru{};
  if (getrusage(RUSAGE_SELF, &ru) != 0) return 0;
  return static_cast<uint64_t>(ru.ru_maxrss) * 1024;
}

}  // namespace cowtap::cli::bench
