// Google Benchmark microbenchmark of RemapCache: lookup hit and miss cost at
// 50%, 70% (the default max load factor), 75% and 90% load, single-threaded
// and from two threads at once, insert cost, and memory per entry. Counters:
//   mean_probe_length  buckets (64-byte cache lines) read per lookup
//   load               entries / slots of the full cache
//   bytes_per_entry    MemoryBytes() / capacity
//   items_per_second   lookups (or inserts) per second, all threads together
// Each cache is full (filled to capacity at that max_load_factor). "Big" is
// 2^20 slots (21 MiB, beyond L2, lookups mostly wait on DRAM); "Default" is the
// cache an image gets by default (OpenOptions::remap_cache_entries = 65536 at
// the default load factor, 1.9 MiB).
//
// Run: <build-dir>/cow/cowtap_remap_cache_bench [--benchmark_filter=...]
// It is built, never run, by ctest.
#include <benchmark/benchmark.h>

#include <algorithm>
#include <cstdint>
#include <memory>
#include <random>
#include <vector>

#include "cow/remap_cache.h"

namespace cowtap::cow {
namespace {

constexpr uint64_t kBigSlots = uint64_t{1} << 20;
constexpr uint64_t kDefaultEntries = uint64_t{1} << 16;

struct Fixture {
  Fixture(uint64_t entries, double load) : capacity(entries), cache(entries, load) {
    // Cluster numbers as a disk produces them: runs of sequential clusters
    // at random places.
    std::mt19937_64 rng(42);
    present.reserve(capacity);
    while (cache.Stats().size < capacity) {
      const uint64_t base = rng() % (uint64_t{1} << 32);
      for (uint64_t i = 0; i < 64 && cache.Stats().size < capacity; ++i) {
        cache.Insert(base + i, Remap{(base + i) << 16, 0, Remap::kWritable});
        present.push_back(base + i);
      }
    }
    // Keep only what is cached (a few inserts evict while filling; this
    // marks every entry referenced, which lookups would do anyway).
    std::erase_if(present, [&](uint64_t c) { return !cache.Lookup(c).has_value(); });
    absent.reserve(present.size());
    for (size_t i = 0; i < present.size(); ++i) absent.push_back((uint64_t{1} << 40) + rng() % (uint64_t{1} << 32));
    std::shuffle(present.begin(), present.end(), rng);
  }
  uint64_t capacity;
  RemapCache cache;
  std::vector<uint64_t> present;
  std::vector<uint64_t> absent;
};

// One fixture per (size, load), kept across the repetitions Google Benchmark
// makes and shared by the threads of a run: thread 0 builds it before the
// loop's start barrier, the others touch it only inside the loop.
Fixture& Shared(uint64_t entries, int load_percent) {
  static std::unique_ptr<Fixture> fixture;
  static uint64_t built_entries = 0;
  static int built_load = 0;
  if (!fixture || built_entries != entries || built_load != load_percent) {
    fixture.reset();
    fixture = std::make_unique<Fixture>(entries, load_percent / 100.0);
    built_entries = entries;
    built_load = load_percent;
  }
  return *fixture;
}
Fixture* g_fixture = nullptr;

uint64_t EntriesFor(bool big, int load_percent) {
  return big ? kBigSlots * static_cast<uint64_t>(load_percent) / 100 : kDefaultEntries;
}

void RunLookups(benchmark::State& state, bool big, bool hit) {
  const int load_percent = static_cast<int>(state.range(0));
  if (state.thread_index() == 0) g_fixture = &Shared(EntriesFor(big, load_percent), load_percent);
  RemapCacheStats before;
  const std::vector<uint64_t>* keys = nullptr;
  size_t i = 0;
  uint64_t found = 0;
  for (auto _ : state) {
    if (keys == nullptr) {  // first iteration: the fixture exists past the start barrier
      Fixture& f = *g_fixture;
      keys = hit ? &f.present : &f.absent;
      i = (keys->size() / static_cast<size_t>(state.threads())) * static_cast<size_t>(state.thread_index());
      if (state.thread_index() == 0) before = f.cache.Stats();
    }
    auto r = g_fixture->cache.Lookup((*keys)[i]);
    found += r.has_value();
    benchmark::DoNotOptimize(r);
    if (++i == keys->size()) i = 0;
  }
  state.SetItemsProcessed(static_cast<int64_t>(state.iterations()));
  const uint64_t mine = static_cast<uint64_t>(state.iterations());
  if (hit ? found != mine : found != 0) state.SkipWithError("lookup result disagrees with the fill");
  if (state.thread_index() == 0) {
    Fixture& f = *g_fixture;
    const RemapCacheStats after = f.cache.Stats();
    const uint64_t lookups = after.lookups - before.lookups;
    state.counters["mean_probe_length"] =
        lookups ? static_cast<double>(after.probes - before.probes) / static_cast<double>(lookups) : 0.0;
    state.counters["load"] =
        static_cast<double>(after.size) / static_cast<double>(f.cache.bucket_count() * RemapCache::kSlotsPerBucket);
    state.counters["bytes_per_entry"] = static_cast<double>(f.cache.MemoryBytes()) / static_cast<double>(f.capacity);
  }
}

void BM_BigLookupHit(benchmark::State& state) { RunLookups(state, true, true); }
void BM_BigLookupMiss(benchmark::State& state) { RunLookups(state, true, false); }
void BM_DefaultLookupHit(benchmark::State& state) { RunLookups(state, false, true); }
void BM_DefaultLookupMiss(benchmark::State& state) { RunLookups(state, false, false); }

void LoadArgs(benchmark::internal::Benchmark* b) {
  for (int load : {50, 70, 75, 90}) b->Arg(load);
  b->ArgName("load_pct")->UseRealTime();
}
BENCHMARK(BM_BigLookupHit)->Apply(LoadArgs)->Threads(1)->Threads(2);
BENCHMARK(BM_BigLookupMiss)->Apply(LoadArgs)->Threads(1)->Threads(2);
BENCHMARK(BM_DefaultLookupHit)->Arg(70)->ArgName("load_pct")->UseRealTime()->Threads(1)->Threads(2);
BENCHMARK(BM_DefaultLookupMiss)->Arg(70)->ArgName("load_pct")->UseRealTime()->Threads(1)->Threads(2);

// Insert of a new cluster into the full default cache: each insert evicts one
// entry (second chance near its home).
void BM_DefaultInsertEvicting(benchmark::State& state) {
  Fixture f(kDefaultEntries, RemapCache::kDefaultMaxLoadFactor);
  uint64_t c = uint64_t{1} << 50;
  for (auto _ : state) {
    f.cache.Insert(c, Remap{c << 16, 0, 0});
    ++c;
  }
  state.SetItemsProcessed(static_cast<int64_t>(state.iterations()));
  state.counters["evictions_per_insert"] =
      static_cast<double>(f.cache.Stats().evictions) / static_cast<double>(state.iterations());
}
BENCHMARK(BM_DefaultInsertEvicting);

// Insert over a cached cluster (the engine refreshing an entry).
void BM_DefaultInsertOverwrite(benchmark::State& state) {
  Fixture f(kDefaultEntries, RemapCache::kDefaultMaxLoadFactor);
  size_t i = 0;
  for (auto _ : state) {
    f.cache.Insert(f.present[i], Remap{f.present[i] << 16, 0, Remap::kWritable});
    if (++i == f.present.size()) i = 0;
  }
  state.SetItemsProcessed(static_cast<int64_t>(state.iterations()));
}
BENCHMARK(BM_DefaultInsertOverwrite);

// Insert then invalidate a cluster in a half-full default cache (what a
// write path that invalidates and re-resolves pays).
void BM_DefaultInsertInvalidate(benchmark::State& state) {
  RemapCache cache(kDefaultEntries);
  for (uint64_t c = 0; c < kDefaultEntries / 2; ++c) cache.Insert(c * 7, Remap{c << 16, 0, 0});
  uint64_t c = uint64_t{1} << 50;
  for (auto _ : state) {
    cache.Insert(c, Remap{c << 16, 0, 0});
    cache.Invalidate(c);
    ++c;
  }
  state.SetItemsProcessed(static_cast<int64_t>(state.iterations()));
}
BENCHMARK(BM_DefaultInsertInvalidate);

// Memory of the default cache, reported once (the time is meaningless).
void BM_DefaultCacheMemory(benchmark::State& state) {
  for (auto _ : state) {
    RemapCache cache(kDefaultEntries);
    benchmark::DoNotOptimize(cache.MemoryBytes());
    state.counters["bytes_total"] = static_cast<double>(cache.MemoryBytes());
    state.counters["bytes_per_entry"] = static_cast<double>(cache.MemoryBytes()) / kDefaultEntries;
  }
}
BENCHMARK(BM_DefaultCacheMemory)->Iterations(1);

}  // namespace
}  // namespace cowtap::cow

BENCHMARK_MAIN();
