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
// Order: Robin Hood. Each slot records its entry's distance from home, and an
// insert that meets an entry closer to its home than the new one takes that
// slot and carries the displaced entry on. Every run is then sorted by home,
// so a miss stops at the first entry closer to home than the probe has come,
// instead of walking to the end of the run (at load 0.75, ~2.5 slots rather
// than ~8.5). Hits cost what linear probing always costs (~2.5 at 0.75, ~1.5
// at 0.5: the total displacement does not depend on the order).
//
// Deletion: backward shift. After emptying a slot, the following entries of
// the run that are away from home move back by one, until an empty slot or an
// entry at its home. That keeps the Robin Hood order and every entry
// reachable, without tombstones that would lengthen later probes.
//
// Eviction: second chance, applied near the new key's home. A hit sets the
// slot's referenced bit; a new entry starts unreferenced, so entries that were
// never looked up again (a sequential scan) go before entries that proved
// useful. The victim is the first unreferenced entry of the kEvictWindow slots
// from the new key's home; if all there are referenced, they lose their bits
// and the first goes. Evicting where the insert lands keeps the occupancy even
// across the table: a single sweeping CLOCK hand empties the slots behind it
// while the slots ahead fill towards 100%, and at a steady 0.75 load a scan
// then made runs thousands of slots long (measured: inserts stalled). The
// global hand (two revolutions at most) remains for a window with no entry.
#include "cow/remap_cache.h"

#include <algorithm>
#include <cmath>
#include <limits>

namespace cowtap::cow {
namespace {

// Largest capacity and slot count accepted; larger requests are clamped (2^31
// entries is already ~100 GiB of table, far beyond any per-VBD budget). The
// slot bound keeps every distance within Slot::distance's 32 bits.
constexpr uint64_t kMaxCapacity = uint64_t{1} << 31;
constexpr double kMaxSlots = 4294967296.0;
constexpr double kDefaultLoadFactor = 0.75;
// Slots examined for a victim near an inserted key's home.
constexpr uint64_t kEvictWindow = 16;

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
  const double wanted = std::min(kMaxSlots, std::ceil(static_cast<double>(capacity_) / max_load_factor));
  // Keep one slot empty at least, so that probes always terminate.
  const uint64_t min_slots = std::max<uint64_t>(static_cast<uint64_t>(wanted), capacity_ + 1);
  const uint64_t slot_count = RoundUpPowerOfTwo(min_slots);
  slots_.assign(slot_count, Slot{});
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
  const uint64_t i = Find(key, &stats_.probes);
  if (i == kNoSlot) {
    ++stats_.misses;
    return std::nullopt;
  }
  Slot& s = slots_[i];
  ++stats_.hits;
  s.referenced = 1;
  return Remap{s.host_offset, s.layer, s.flags};
}

uint64_t RemapCache::Find(uint64_t key, uint64_t* probes) const {
  uint64_t i = Home(key);
  for (uint64_t distance = 0;; ++distance) {
    const Slot& s = slots_[i];
    ++*probes;
    if (s.key == key) return i;
    // An empty slot, or an entry nearer its home than key would be here: in
    // Robin Hood order key would have taken this slot, so it is absent.
    if (s.key == 0 || s.distance < distance) return kNoSlot;
    i = (i + 1) & mask_;
  }
}

void RemapCache::Insert(uint64_t virtual_cluster, const Remap& remap) {
  const uint64_t key = virtual_cluster + 1;
  if (slots_.empty() || key == 0) return;
  uint64_t unused_probes = 0;
  const uint64_t found = Find(key, &unused_probes);
  ++stats_.inserts;
  if (found != kNoSlot) {  // overwrite in place; keep its clock bit
    slots_[found].host_offset = remap.host_offset;
    slots_[found].layer = remap.layer;
    slots_[found].flags = remap.flags;
    return;
  }
  if (stats_.size >= capacity_) EvictNear(Home(key));
  Slot carry{key, remap.host_offset, remap.layer, remap.flags, /*referenced=*/0, /*distance=*/0};
  uint64_t i = Home(key);
  // Terminates: at least one slot is empty (capacity < slot count).
  while (slots_[i].key != 0) {
    if (slots_[i].distance < carry.distance) std::swap(carry, slots_[i]);
    ++carry.distance;
    i = (i + 1) & mask_;
  }
  slots_[i] = carry;
  ++stats_.size;
}

void RemapCache::Invalidate(uint64_t virtual_cluster) {
  const uint64_t key = virtual_cluster + 1;
  if (slots_.empty() || key == 0) return;
  uint64_t unused_probes = 0;
  const uint64_t i = Find(key, &unused_probes);
  if (i == kNoSlot) return;
  EraseSlot(i);
  ++stats_.invalidations;
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
  std::fill(slots_.begin(), slots_.end(), Slot{});
  stats_.size = 0;
  clock_hand_ = 0;
}

RemapCacheStats RemapCache::Stats() const { return stats_; }

uint64_t RemapCache::MemoryBytes() const { return sizeof(*this) + slots_.capacity() * sizeof(Slot); }

void RemapCache::EraseSlot(uint64_t index) {
  uint64_t hole = index;
  uint64_t j = (index + 1) & mask_;
  while (slots_[j].key != 0 && slots_[j].distance > 0) {
    slots_[hole] = slots_[j];
    --slots_[hole].distance;
    hole = j;
    j = (j + 1) & mask_;
  }
  slots_[hole] = Slot{};
  --stats_.size;
}

void RemapCache::EvictNear(uint64_t home) {
  uint64_t first_occupied = kNoSlot;
  for (uint64_t n = 0, i = home; n < kEvictWindow; ++n, i = (i + 1) & mask_) {
    if (slots_[i].key == 0) continue;
    if (slots_[i].referenced == 0) {
      EraseSlot(i);
      ++stats_.evictions;
      return;
    }
    if (first_occupied == kNoSlot) first_occupied = i;
  }
  if (first_occupied == kNoSlot) {
    EvictOne();
    return;
  }
  for (uint64_t n = 0, i = home; n < kEvictWindow; ++n, i = (i + 1) & mask_) slots_[i].referenced = 0;
  EraseSlot(first_occupied);
  ++stats_.evictions;
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
