// Microbenchmark of RemapCache::Lookup: hits and misses at 50%, 75% and 90% of
// the slot table filled, with the mean probe length (slots examined per
// lookup) reported as a counter. The table is sized so that the fill equals
// the load factor exactly (capacity = load * slots, filled to capacity), i.e.
// a full cache at that max_load_factor; 75% is the default.
//
// Run: build-dir/cow/cowtap_remap_cache_bench [--benchmark_filter=...]
#include <benchmark/benchmark.h>

#include <algorithm>
#include <cstdint>
#include <random>
#include <vector>

#include "cow/remap_cache.h"

namespace cowtap::cow {
namespace {

constexpr uint64_t kSlots = uint64_t{1} << 20;  // 24 MiB of slots: beyond L2

struct Fixture {
  explicit Fixture(int load_percent)
      : capacity(kSlots * static_cast<uint64_t>(load_percent) / 100),
        cache(capacity, static_cast<double>(load_percent) / 100.0) {
    // Cluster numbers as a disk produces them: runs of sequential clusters
    // at random places.
    std::mt19937_64 rng(42);
    present.reserve(capacity);
    while (present.size() < capacity) {
      uint64_t base = rng() % (uint64_t{1} << 32);
      for (int i = 0; i < 64 && present.size() < capacity; ++i) present.push_back(base + i);
    }
    for (uint64_t c : present) cache.Insert(c, Remap{c << 16, 0, Remap::kWritable});
    absent.reserve(capacity);
    for (uint64_t i = 0; i < capacity; ++i) absent.push_back((uint64_t{1} << 40) + rng() % (uint64_t{1} << 32));
    std::shuffle(present.begin(), present.end(), rng);
  }
  uint64_t capacity;
  RemapCache cache;
  std::vector<uint64_t> present;
  std::vector<uint64_t> absent;
};

void Run(benchmark::State& state, bool hit) {
  Fixture f(static_cast<int>(state.range(0)));
  const std::vector<uint64_t>& keys = hit ? f.present : f.absent;
  const RemapCacheStats before = f.cache.Stats();
  size_t i = 0;
  uint64_t found = 0;
  for (auto _ : state) {
    auto r = f.cache.Lookup(keys[i]);
    found += r.has_value();
    benchmark::DoNotOptimize(r);
    if (++i == keys.size()) i = 0;
  }
  const RemapCacheStats after = f.cache.Stats();
  const uint64_t lookups = after.lookups - before.lookups;
  if (hit ? found != lookups : found != 0) state.SkipWithError("lookup result disagrees with the fill");
  state.counters["mean_probe_length"] =
      lookups ? static_cast<double>(after.probes - before.probes) / static_cast<double>(lookups) : 0.0;
  state.counters["load"] = static_cast<double>(after.size) / static_cast<double>(kSlots);
  state.counters["table_MiB"] = static_cast<double>(f.cache.MemoryBytes()) / (1 << 20);
}

void BM_LookupHit(benchmark::State& state) { Run(state, true); }
void BM_LookupMiss(benchmark::State& state) { Run(state, false); }

BENCHMARK(BM_LookupHit)->Arg(50)->Arg(75)->Arg(90);
BENCHMARK(BM_LookupMiss)->Arg(50)->Arg(75)->Arg(90);

// The cache as images get it by default (OpenOptions::remap_cache_entries =
// 65536 at max_load_factor 0.75: 131072 slots, so a full cache is at load 0.5).
void BM_LookupHitDefaultCache(benchmark::State& state) {
  constexpr uint64_t kEntries = uint64_t{1} << 16;
  RemapCache cache(kEntries);
  std::mt19937_64 rng(7);
  std::vector<uint64_t> keys;
  for (uint64_t i = 0; i < kEntries; ++i) keys.push_back(rng() % (uint64_t{1} << 32));
  for (uint64_t c : keys) cache.Insert(c, Remap{c << 16, 0, Remap::kWritable});
  std::erase_if(keys, [&](uint64_t c) { return !cache.Lookup(c).has_value(); });  // drop duplicates' losers
  std::shuffle(keys.begin(), keys.end(), rng);
  const RemapCacheStats before = cache.Stats();
  size_t i = 0;
  for (auto _ : state) {
    benchmark::DoNotOptimize(cache.Lookup(keys[i]));
    if (++i == keys.size()) i = 0;
  }
  const RemapCacheStats after = cache.Stats();
  state.counters["mean_probe_length"] =
      static_cast<double>(after.probes - before.probes) / static_cast<double>(after.lookups - before.lookups);
  state.counters["load"] = static_cast<double>(after.size) / 131072.0;
}
BENCHMARK(BM_LookupHitDefaultCache);

// Insert into a full cache (each insert evicts one entry).
void BM_InsertEvicting(benchmark::State& state) {
  Fixture f(75);
  uint64_t c = uint64_t{1} << 50;
  for (auto _ : state) f.cache.Insert(c++, Remap{c, 0, 0});
  state.counters["evictions"] = static_cast<double>(f.cache.Stats().evictions);
}
BENCHMARK(BM_InsertEvicting);

}  // namespace
}  // namespace cowtap::cow

BENCHMARK_MAIN();
