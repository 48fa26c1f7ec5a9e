// RemapCache: what an image has learnt of its own layout, kept where a lookup
// costs tens of nanoseconds. Maps a virtual cluster index to where that
// cluster's bytes live: a host offset in this layer's file (in-place writable
// when the cluster is owned by the top layer alone), a host offset in a
// backing layer's file (read-only), or "reads as zeros".
//
// A bounded open-addressing hash table (linear probing in Robin Hood order, backward-shift
// deletion, no tombstones) with a fixed capacity chosen at construction.
// When full, inserting evicts an entry (clock / second-chance). Engines insert
// what they resolve on the L2 path and must invalidate before any change that
// makes an entry stale (discard, CoW, snapshot, zeroing, reallocation).
//
// Thread-safety: not internally synchronized; the owning image serializes
// access (its metadata lock). Stats() may be read racily for reporting.
#pragma once

#include <cstdint>
#include <optional>
#include <vector>

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
  uint64_t probes = 0;  // slots examined by all lookups
  double mean_probe_length() const { return lookups ? double(probes) / double(lookups) : 0.0; }
  double hit_rate() const { return lookups ? double(hits) / double(lookups) : 0.0; }
};

class RemapCache {
 public:
  // Capacity in entries, at most max_load_factor of the slot count (rounded
  // up to a power of two). capacity 0 makes a cache that never hits.
  explicit RemapCache(uint64_t capacity, double max_load_factor = 0.75);
  RemapCache(const RemapCache&) = delete;
  RemapCache& operator=(const RemapCache&) = delete;

  std::optional<Remap> Lookup(uint64_t virtual_cluster);
  void Insert(uint64_t virtual_cluster, const Remap& remap);
  void Invalidate(uint64_t virtual_cluster);
  void InvalidateRange(uint64_t first_cluster, uint64_t count);
  void Clear();
  RemapCacheStats Stats() const;
  // Bytes of memory the table uses (for per-VBD memory reports).
  uint64_t MemoryBytes() const;

 private:
  struct Slot {
    uint64_t key;  // virtual_cluster + 1; 0 = empty
    uint64_t host_offset;
    uint16_t layer;
    uint8_t flags;
    uint8_t referenced;  // clock bit for eviction
    uint32_t distance;   // slots from the key's home (Robin Hood order)
  };
  static constexpr uint64_t kNoSlot = ~uint64_t{0};
  uint64_t Home(uint64_t key) const;
  // The slot holding key, or kNoSlot; adds the slots examined to *probes.
  uint64_t Find(uint64_t key, uint64_t* probes) const;
  void EraseSlot(uint64_t index);
  void EvictNear(uint64_t home);
  void EvictOne();

  std::vector<Slot> slots_;
  uint64_t mask_ = 0;
  uint64_t capacity_ = 0;
  uint64_t clock_hand_ = 0;
  RemapCacheStats stats_;
};

}  // namespace cowtap::cow
