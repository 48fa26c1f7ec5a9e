// The engine-alone peer and the remap-cache microbenchmark of `cowtap bench`.
#include <fmt/format.h>

#include <condition_variable>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <mutex>
#include <vector>

#include "backend/block_device.h"
#include "cow/remap_cache.h"
#include "tools/cli/bench_runners.h"
#include "tools/cli/bench_stats.h"

namespace cowtap::cli::bench {
namespace {

struct FreeDeleter {
  void operator()(void* p) const { std::free(p); }
};

// Completions arrive on any thread (inline from Submit today, from an
// io_uring thread once the engine is asynchronous).
struct Completions {
  std::mutex mu;
  std::condition_variable cv;
  std::vector<std::pair<uint32_t, bool>> done;  // (slot, ok)

  void Push(uint32_t slot, bool ok) {
    std::lock_guard<std::mutex> lock(mu);
    done.emplace_back(slot, ok);
    cv.notify_one();
  }
  void Take(std::vector<std::pair<uint32_t, bool>>* out) {
    std::unique_lock<std::mutex> lock(mu);
    cv.wait(lock, [&] { return !done.empty(); });
    out->swap(done);
  }
};

cow::RemapCacheStats RemapStats(cow::Image& image) {
  cow::RemapCache* cache = image.remap_cache();
  return cache ? cache->Stats() : cow::RemapCacheStats{};
}

}  // namespace

Result<PeerResult> RunEnginePeer(const Workload& w, const std::string& image_path, const EngineRunOptions& options) {
  if (std::string why = ValidateWorkload(w); !why.empty()) return Status::InvalidArgument(why);
  cow::OpenOptions open;
  open.read_only = w.read_percent == 100;
  open.direct_io = options.direct_io;
  open.remap_cache_entries = options.remap_cache_entries;
  COWTAP_ASSIGN_OR_RETURN(std::unique_ptr<cow::Image> opened, cow::OpenImage(image_path, open));
  std::shared_ptr<cow::Image> image(std::move(opened));
  backend::ImageDeviceOptions dev_options;
  dev_options.read_only = open.read_only;
  std::unique_ptr<backend::BlockDevice> device = backend::NewImageBlockDevice(image, dev_options);

  const uint32_t depth = w.queue_depth;
  const size_t slot_bytes = std::max(w.read_block_bytes, w.write_block_bytes);
  void* raw = nullptr;
  if (posix_memalign(&raw, 4096, slot_bytes * depth) != 0) return Status::NoSpace("bench: no memory for buffers");
  std::unique_ptr<void, FreeDeleter> buffers(raw);
  std::memset(raw, 0x5A, slot_bytes * depth);
  std::vector<iovec> iovs(depth);
  std::vector<uint64_t> start_ns(depth);
  std::vector<uint32_t> free_slots;
  for (uint32_t i = 0; i < depth; ++i) free_slots.push_back(depth - 1 - i);

  PeerResult r;
  r.peer = Peer::kEngine;
  const cow::RemapCacheStats remap0 = RemapStats(*image);
  ResetPeakRss();
  const double cpu0 = ProcessCpuSeconds();
  const uint64_t t0 = NowNs();
  const uint64_t deadline = w.time_limit_ms ? t0 + w.time_limit_ms * 1000000 : UINT64_MAX;
  OpPattern pattern(w);
  LatencyHistogram hist;
  Completions completions;
  std::vector<std::pair<uint32_t, bool>> batch;
  std::vector<uint32_t> lengths(depth);
  uint64_t issued = 0, in_flight = 0;
  while (true) {
    device->Plug();
    while (issued < w.ops && !free_slots.empty() && NowNs() < deadline) {
      const PatternOp op = pattern.Next();
      const uint32_t slot = free_slots.back();
      free_slots.pop_back();
      iovs[slot] = MakeIoVec(static_cast<uint8_t*>(raw) + slot * slot_bytes, op.length);
      lengths[slot] = op.length;
      backend::BlockIo io;
      io.kind = op.write ? backend::BlockIoKind::kWrite : backend::BlockIoKind::kRead;
      io.offset_bytes = op.offset;
      io.length_bytes = op.length;
      io.iov = IoVecs(&iovs[slot], 1);
      start_ns[slot] = NowNs();
      ++issued;
      ++in_flight;
      device->Submit(io, [&completions, slot](Status s) { completions.Push(slot, s.ok()); });
    }
    device->Unplug();
    if (in_flight == 0) break;
    batch.clear();
    completions.Take(&batch);
    const uint64_t now = NowNs();
    for (const auto& [slot, ok] : batch) {
      hist.Record(now - start_ns[slot]);
      --in_flight;
      ++r.ops;
      r.bytes += lengths[slot];
      if (!ok) ++r.errors;
      free_slots.push_back(slot);
    }
  }
  if (w.flush_at_end) {
    backend::BlockIo flush;
    flush.kind = backend::BlockIoKind::kFlush;
    device->Submit(flush, [&completions](Status s) { completions.Push(0, s.ok()); });
    batch.clear();
    completions.Take(&batch);
    if (!batch.front().second) ++r.errors;
  }
  r.elapsed_s = static_cast<double>(NowNs() - t0) / 1e9;
  r.cpu_s = ProcessCpuSeconds() - cpu0;
  r.peak_rss_bytes = PeakRssBytes();
  r.has_latency = hist.count() > 0;
  r.p50_us = hist.PercentileUs(50);
  r.p99_us = hist.PercentileUs(99);
  r.ran = true;
  const cow::RemapCacheStats remap1 = RemapStats(*image);
  if (image->remap_cache() != nullptr) {
    const uint64_t lookups = remap1.lookups - remap0.lookups;
    r.has_remap = true;
    r.remap_lookups = lookups;
    r.remap_hit_rate = lookups ? static_cast<double>(remap1.hits - remap0.hits) / static_cast<double>(lookups) : 0;
    r.remap_mean_probe =
        lookups ? static_cast<double>(remap1.probes - remap0.probes) / static_cast<double>(lookups) : 0;
  }
  device.reset();
  COWTAP_RETURN_IF_ERROR(image->Close());
  if (r.errors > 0) r.note = fmt::format("{} requests failed", r.errors);
  return r;
}

RemapMicro MeasureRemapCache(uint64_t entries, uint64_t lookups) {
  RemapMicro m;
  m.entries = entries;
  if (entries == 0 || lookups == 0) return m;
  cow::RemapCache cache(entries);
  for (uint64_t k = 0; k < entries; ++k) cache.Insert(k, cow::Remap{(k + 16) << 16, 0, cow::Remap::kWritable});
  m.memory_bytes = cache.MemoryBytes();
  // Keys in a scrambled order so lookups do not walk the table linearly.
  auto key = [entries](uint64_t i) { return (i * 0x9E3779B97F4A7C15ull >> 7) % entries; };
  volatile uint64_t sink = 0;
  auto timed = [&](uint64_t offset, double* ns, double* probe) {
    const cow::RemapCacheStats s0 = cache.Stats();
    const uint64_t t0 = NowNs();
    for (uint64_t i = 0; i < lookups; ++i) {
      if (auto hit = cache.Lookup(key(i) + offset)) sink = sink + hit->host_offset;
    }
    const uint64_t t1 = NowNs();
    const cow::RemapCacheStats s1 = cache.Stats();
    *ns = static_cast<double>(t1 - t0) / static_cast<double>(lookups);
    const uint64_t n = s1.lookups - s0.lookups;
    *probe = n ? static_cast<double>(s1.probes - s0.probes) / static_cast<double>(n) : 0;
  };
  timed(0, &m.lookup_hit_ns, &m.mean_probe_hit);
  timed(entries * 4, &m.lookup_miss_ns, &m.mean_probe_miss);
  return m;
}

}  // namespace cowtap::cli::bench
