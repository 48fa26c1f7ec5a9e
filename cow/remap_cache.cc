// RemapCache implementation notes.
//
// Layout: one flat array of 24-byte slots, a power of two long, always with
// at least one empty slot (capacity < slot count), so every probe sequence
// ends at an empty slot. A slot's key is virtual_cluster + 1 so that an
// all-zero slot is empty; the one cluster index that cannot be encoded
// (UINT64_MAX) is simply never cached.
//
// Probing: linear from Home(key) = Mix64(key) & mask_. Linear probing keeps a
// lookup on one or two cache lines; the finalizer spreads the dense, sequential
// cluster indices a disk produces evenly over the table.
//
// Deletion: backward shift. After emptying slot `hole`, each following entry
// of the run moves back into the hole unless its home lies cyclically in
// (hole, j], i.e. unless moving it would put it before its home. This keeps
// the invariant that every entry is reachable from its home with no empty slot
// in between, without tombstones that would lengthen later probes.
//
// Eviction: CLOCK (second chance). A hit sets the slot's referenced bit; a new
// entry starts unreferenced, so entries that were never looked up again (a
// sequential scan) go before entries that proved useful. The hand sweeps the
// slot array; a sweep clears the bits it passes, so eviction finishes within
// two revolutions.
#include "cow/remap_cache.h"

#include <algorithm>
#include <cmath>
#include <limits>

namespace cowtap::cow {
namespace {

// Largest capacity accepted; larger requests are clamped (2^32 entries is
// already ~100 GiB of table, far beyond any per-VBD budget).
constexpr uint64_t kMaxCapacity = uint64_t{1} << 32;
constexpr double kDefaultLoadFactor = 0.75;

// A 64-bit multiply-xorshift finalizer (the constants of MurmurHash3's fmix64):
// every input bit affects every output bit.
inline uint64_t Mix64(uint64_t x) {
  x ^= x >> 33;
  x *= 0xff51afd7ed558ccdULL;
  x ^= x >> 33;
  x *= 0xc4ceb9fe1a85ec53ULL;
  x ^= x >> 33;
  return x;
}

uint64_t RoundUpPowerOfTwo(uint64_t v) {
  uint64_t p = 1;
  while (p < v) p <<= 1;
  return p;
}

}  // namespace

RemapCache::RemapCache(uint64_t capacity, double max_load_factor) {
  capacity_ = std::min(capacity, kMaxCapacity);
  if (!(max_load_factor > 0.0 && max_load_factor <= 1.0)) max_load_factor = kDefaultLoadFactor;
  stats_.capacity = capacity_;
  if (capacity_ == 0) return;
  const double wanted = std::ceil(static_cast<double>(capacity_) / max_load_factor);
  // Keep one slot empty at least, so that probes always terminate.
  const uint64_t min_slots = std::max<uint64_t>(static_cast<uint64_t>(wanted), capacity_ + 1);
  const uint64_t slot_count = RoundUpPowerOfTwo(min_slots);
  slots_.assign(slot_count, Slot{0, 0, 0, 0, 0});
  mask_ = slot_count - 1;
}

uint64_t RemapCache::Home(uint64_t key) const { return Mix64(key) & mask_; }

std::optional<Remap> RemapCache::Lookup(uint64_t virtual_cluster) {
  ++stats_.lookups;
  const uint64_t key = virtual_cluster + 1;
  if (slots_.empty() || key == 0) {
    ++stats_.misses;
    return std::nullopt;
  }
  uint64_t i = Home(key);
  uint64_t probes = 0;
  for (;;) {
    Slot& s = slots_[i];
    ++probes;
    if (s.key == key) {
      stats_.probes += probes;
      ++stats_.hits;
      s.referenced = 1;
      return Remap{s.host_offset, s.layer, s.flags};
    }
    if (s.key == 0) {
      stats_.probes += probes;
      ++stats_.misses;
      return std::nullopt;
    }
    i = (i + 1) & mask_;
  }
}

void RemapCache::Insert(uint64_t virtual_cluster, const Remap& remap) {
  const uint64_t key = virtual_cluster + 1;
  if (slots_.empty() || key == 0) return;
  uint64_t i = Home(key);
  while (slots_[i].key != 0) {
    if (slots_[i].key == key) {  // overwrite in place; keep its clock bit
      slots_[i].host_offset = remap.host_offset;
      slots_[i].layer = remap.layer;
      slots_[i].flags = remap.flags;
      ++stats_.inserts;
      return;
    }
    i = (i + 1) & mask_;
  }
  if (stats_.size >= capacity_) {
    EvictOne();
    // The eviction's backward shift may have moved entries; find the first
    // empty slot of the key's run again.
    i = Home(key);
    while (slots_[i].key != 0) i = (i + 1) & mask_;
  }
  slots_[i] = Slot{key, remap.host_offset, remap.layer, remap.flags, 0};
  ++stats_.size;
  ++stats_.inserts;
}

void RemapCache::Invalidate(uint64_t virtual_cluster) {
  const uint64_t key = virtual_cluster + 1;
  if (slots_.empty() || key == 0) return;
  uint64_t i = Home(key);
  while (slots_[i].key != 0) {
    if (slots_[i].key == key) {
      EraseSlot(i);
      ++stats_.invalidations;
      return;
    }
    i = (i + 1) & mask_;
  }
}

void RemapCache::InvalidateRange(uint64_t first_cluster, uint64_t count) {
  if (slots_.empty() || count == 0 || stats_.size == 0) return;
  // Saturate the end: a range reaching past UINT64_MAX covers everything above first.
  const uint64_t last = count - 1 > std::numeric_limits<uint64_t>::max() - first_cluster
                            ? std::numeric_limits<uint64_t>::max()
                            : first_cluster + (count - 1);
  if (count <= slots_.size()) {
    for (uint64_t c = first_cluster;; ++c) {
      Invalidate(c);
      if (c == last) break;
    }
    return;
  }
  // Sweep the table instead. Start just after an empty slot, so no run wraps
  // across the start: a backward shift then only moves entries into the slot
  // being examined (re-examined by the inner loop) or into slots not yet
  // reached, never an unexamined entry into an examined slot.
  uint64_t start = 0;
  while (slots_[start].key != 0) ++start;  // one empty slot always exists
  for (uint64_t n = 0; n < slots_.size(); ++n) {
    const uint64_t i = (start + 1 + n) & mask_;
    while (slots_[i].key != 0 && slots_[i].key - 1 >= first_cluster && slots_[i].key - 1 <= last) {
      EraseSlot(i);
      ++stats_.invalidations;
    }
  }
}

void RemapCache::Clear() {
  std::fill(slots_.begin(), slots_.end(), Slot{0, 0, 0, 0, 0});
  stats_.size = 0;
  clock_hand_ = 0;
}

RemapCacheStats RemapCache::Stats() const { return stats_; }

uint64_t RemapCache::MemoryBytes() const { return sizeof(*this) + slots_.capacity() * sizeof(Slot); }

void RemapCache::EraseSlot(uint64_t index) {
  uint64_t hole = index;
  uint64_t j = (index + 1) & mask_;
  while (slots_[j].key != 0) {
    const uint64_t home = Home(slots_[j].key);
    // Distance from home to j versus from hole to j, both cyclic: the entry
    // may move back to the hole only if the hole is not before its home.
    if (((j - home) & mask_) >= ((j - hole) & mask_)) {
      slots_[hole] = slots_[j];
      hole = j;
    }
    j = (j + 1) & mask_;
  }
  slots_[hole] = Slot{0, 0, 0, 0, 0};
  --stats_.size;
}

void RemapCache::EvictOne() {
  // Two revolutions suffice: the first clears every referenced bit it passes.
  const uint64_t limit = 2 * slots_.size() + 1;
  for (uint64_t step = 0; step < limit; ++step) {
    Slot& s = slots_[clock_hand_];
    if (s.key != 0) {
      if (s.referenced == 0) {
        // The hand stays: the backward shift may move an unexamined entry here.
        EraseSlot(clock_hand_);
        ++stats_.evictions;
        return;
      }
      s.referenced = 0;
    }
    clock_hand_ = (clock_hand_ + 1) & mask_;
  }
}

}  // namespace cowtap::cow
