// RemapCache: what an image has learnt of its own layout, kept where a lookup
// costs tens of nanoseconds. Maps a virtual cluster index to where that
// cluster's bytes live: a host offset in this layer's file (in-place writable
// when the cluster is owned by the top layer alone), a host offset in a
// backing layer's file (read-only), or "reads as zeros".
//
// A bounded hash table of 64-byte buckets (one cache line, three entries
// each), probed linearly bucket by bucket, with a fixed capacity chosen at
// construction. An entry never moves once placed, and it is placed at most
// kMaxDisplacement buckets from its home, so a lookup reads at most
// 1 + kMaxDisplacement cache lines whatever keys a guest chooses. When full,
// inserting evicts an entry (clock / second-chance); so does inserting where
// every slot within reach of the key's home is taken (with random keys at the
// default load, about 1 insert in 5000 while filling the cache). Engines
// insert what they resolve on the L2 path and must invalidate before any
// change that makes an entry stale (discard, CoW, snapshot, zeroing,
// reallocation).
//
// Probe length: Stats().probes counts BUCKETS (cache lines) examined by
// lookups, the unit that costs; at the default max load factor (0.7) a full
// cache averages 1.28 per hit and 1.43 per miss (see remap_cache.cc).
//
// Thread-safety: every method may be called concurrently from any number of
// threads. Lookup takes no lock (a sequence counter per bucket lets it read a
// consistent bucket while a writer changes it, retrying if one did); Insert,
// Invalidate, InvalidateRange and Clear serialize on one internal mutex
// (mutations come from the engine's slow path, which is serialized anyway).
// Ordering contract: once Invalidate(c) (or InvalidateRange/Clear covering c)
// has returned, a Lookup(c) that starts afterwards (happens-after the return)
// misses, unless c was inserted again in between. A Lookup concurrent with a
// mutation of the same cluster returns either the old or the new state, never
// a mix of two entries. Stats() sums relaxed counters and may be momentarily
// inconsistent while other threads run (e.g. a lookup counted, its probes not
// yet); it is exact once they stop.
#pragma once

#include <atomic>
#include <cstdint>
#include <memory>
#include <mutex>
#include <optional>

namespace cowtap::cow {

struct Remap {
  enum Flags : uint8_t {
    kWritable = 1 << 0,  // top layer, refcount 1, not compressed: write in place
    kZero = 1 << 1,      // reads as zeros; host_offset meaningless
    kBacking = 1 << 2,   // lives in a backing layer (layer > 0): read-only
  };
  uint64_t host_offset = 0;  // byte offset in the layer's file
  uint16_t layer = 0;        // 0 = this image, 1 = its backing, ...
  uint8_t flags = 0;
};

struct RemapCacheStats {
  uint64_t capacity = 0;
  uint64_t size = 0;
  uint64_t lookups = 0;
  uint64_t hits = 0;
  uint64_t misses = 0;
  uint64_t inserts = 0;
  uint64_t evictions = 0;
  uint64_t invalidations = 0;
  uint64_t probes = 0;  // buckets (64-byte cache lines) examined by all lookups
  double mean_probe_length() const { return lookups ? double(probes) / double(lookups) : 0.0; }
  double hit_rate() const { return lookups ? double(hits) / double(lookups) : 0.0; }
};

class RemapCache {
 public:
  static constexpr double kDefaultMaxLoadFactor = 0.7;
  static constexpr int kSlotsPerBucket = 3;
  // Farthest (in buckets) an entry is placed from its home bucket.
  static constexpr uint64_t kMaxDisplacement = 16;

  // Capacity in entries, at most max_load_factor of the slot count (buckets
  // of kSlotsPerBucket slots). A max_load_factor outside (0, 1] means the
  // default. capacity 0 makes a cache that never hits. Capacities above 2^31
  // entries are clamped.
  explicit RemapCache(uint64_t capacity, double max_load_factor = kDefaultMaxLoadFactor);
  RemapCache(const RemapCache&) = delete;
  RemapCache& operator=(const RemapCache&) = delete;
  ~RemapCache();

  // The entry for virtual_cluster, if cached; marks it recently used.
  // Lock-free; never blocks on a writer for longer than one bucket update.
  std::optional<Remap> Lookup(uint64_t virtual_cluster);
  // Caches (or overwrites) the entry for virtual_cluster, evicting another
  // entry when the cache is full. virtual_cluster UINT64_MAX is never cached.
  void Insert(uint64_t virtual_cluster, const Remap& remap);
  // Drops the entry for virtual_cluster, if any (see the ordering contract).
  void Invalidate(uint64_t virtual_cluster);
  // Drops the entries of [first_cluster, first_cluster + count); a range
  // reaching past UINT64_MAX covers everything from first_cluster up.
  void InvalidateRange(uint64_t first_cluster, uint64_t count);
  // Drops every entry; the counters are kept.
  void Clear();
  RemapCacheStats Stats() const;
  // Bytes of memory the cache uses (for per-VBD memory reports).
  uint64_t MemoryBytes() const;
  // Buckets (64-byte cache lines) of the table; 0 when capacity is 0.
  uint64_t bucket_count() const { return bucket_count_; }

 private:
  struct Bucket;
  struct CounterShard;
  struct Location {
    uint64_t bucket;
    int slot;
  };

  uint64_t HomeBucket(uint64_t key) const;
  uint64_t NextBucket(uint64_t b) const { return b + 1 == bucket_count_ ? 0 : b + 1; }
  // Writer side; REQUIRES: mu_ held.
  std::optional<Location> FindLocked(uint64_t key) const;
  void EraseLocked(Location loc);
  void PlaceLocked(uint64_t key, const Remap& remap);
  bool EvictInWindowLocked(uint64_t first_bucket, uint64_t buckets);
  void EvictOneLocked();
  void InvalidateLocked(uint64_t key);

  const uint64_t capacity_;
  uint64_t bucket_count_ = 0;
  std::unique_ptr<Bucket[]> buckets_;
  std::unique_ptr<CounterShard[]> shards_;

  std::mutex mu_;                // serializes mutations
  uint64_t clock_hand_ = 0;      // GUARDED_BY(mu_); a slot index
  std::atomic<uint64_t> size_{0};  // written under mu_, read racily
  std::atomic<uint64_t> inserts_{0};
  std::atomic<uint64_t> evictions_{0};
  std::atomic<uint64_t> invalidations_{0};
};

}  // namespace cowtap::cow
