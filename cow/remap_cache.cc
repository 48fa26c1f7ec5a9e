// RemapCache implementation notes.
//
// Layout: an array of 64-byte, cache-line-aligned buckets. A bucket holds a
// 16-byte header (sequence counter, home metadata, clock bits, the three
// entries' layer and flags) and three keys and host offsets. A key is
// virtual_cluster + 1 so that a zero key is an empty slot; the one cluster
// index that cannot be encoded (UINT64_MAX) is simply never cached. Every
// field is an atomic (see Concurrency for the orderings).
//
// Placement: Home(key) = fastrange(Mix64(key), bucket_count): the finalizer
// spreads the dense, sequential cluster indices a disk produces evenly, the
// multiply-shift maps it to any bucket count (no power-of-two rounding, so
// memory follows the configured capacity). An insert takes the first free
// slot of buckets home, home+1, ... home+kMaxDisplacement; if there is none
// it evicts one entry of that range first. Entries never move afterwards (no
// Robin Hood swaps, no backward shift): a reader can only find a key in the
// one slot it was written to.
//
// Lookup length: each home bucket records how many of the entries homed on
// it live in later buckets ("displaced") and how far the farthest is
// ("max_displacement", reset to 0 when displaced drops to 0). A lookup
// examines buckets home .. home + max_displacement and stops at a hit: a miss
// on a home with nothing displaced reads one cache line. Probe length is
// counted in buckets. Measured on full caches of runs of clusters at random
// places (the unit test MeanProbeLengthAtDefaultLoadIsUnderOneAndAHalf and the
// benchmark), buckets per hit / per miss: load 0.5: 1.09/1.10, 0.7: 1.28/1.43,
// 0.75: 1.38/1.61, 0.9: 1.83/2.64. Hence the default max load factor 0.7, at
// 30.5 bytes per entry (64 / 3 / 0.7).
//
// Concurrency: a seqlock per bucket, written without standalone fences (which
// ThreadSanitizer cannot model). A writer (holding mu_, so writers never race
// each other) makes the counter odd, stores the fields with release, then
// publishes the even counter with release. A reader loads the counter
// (acquire), the fields (acquire), and re-checks the counter, retrying if it
// was odd or changed: if any field it read is a writer's new value, the
// release/acquire pair on that field makes the writer's odd counter visible to
// the re-check, so a mix of old and new never passes. On x86 every one of
// these is a plain move.
// Insert updates the home's header before it writes the slot, erase clears the
// slot before the header: a reader that sees the header but not yet the slot
// misses, which orders it before the insert (or after the erase).
// Clock bits are hints set by readers with an atomic OR outside the seqlock
// (only when not set yet, so a hot line stays shared between cores); a bit
// that lands on a slot just reused only gives that entry a second chance.
// Lookup counters live in per-thread-ish shards (cache-line sized, picked by
// a thread-local index) so that two ring threads do not bounce one line.
//
// Eviction: second chance, applied near the new key's home: the first
// unreferenced entry of kEvictWindowBuckets buckets from home goes; if all
// there are referenced they lose their bits and the first goes. Evicting
// where the insert lands keeps occupancy even across the table (a single
// sweeping hand would empty the slots behind it and overfill those ahead).
// A global clock hand remains for a window holding no entry.
#include "cow/remap_cache.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <thread>

namespace cowtap::cow {

struct alignas(64) RemapCache::Bucket {
  std::atomic<uint32_t> seq;               // odd while a writer changes the bucket
  std::atomic<uint8_t> max_displacement;   // of entries homed here, in buckets
  std::atomic<uint8_t> displaced;          // entries homed here living in later buckets
  std::atomic<uint8_t> referenced;         // bit i: slot i was hit (clock bit)
  std::atomic<uint8_t> flags[kSlotsPerBucket];
  std::atomic<uint16_t> layer[kSlotsPerBucket];
  std::atomic<uint64_t> key[kSlotsPerBucket];  // virtual_cluster + 1; 0 = empty
  std::atomic<uint64_t> host_offset[kSlotsPerBucket];
};

struct alignas(64) RemapCache::CounterShard {
  std::atomic<uint64_t> lookups;
  std::atomic<uint64_t> hits;
  std::atomic<uint64_t> probes;
};

namespace {

static_assert(sizeof(std::atomic<uint64_t>) == 8 && std::atomic<uint64_t>::is_always_lock_free);
static_assert(std::atomic<uint32_t>::is_always_lock_free && std::atomic<uint16_t>::is_always_lock_free &&
              std::atomic<uint8_t>::is_always_lock_free);
// displaced counts at most every slot of the kMaxDisplacement later buckets.
static_assert(RemapCache::kMaxDisplacement * RemapCache::kSlotsPerBucket <= 255);

constexpr uint64_t kMaxCapacity = uint64_t{1} << 31;
constexpr double kMaxBuckets = 2147483648.0;
// Buckets examined for an eviction victim from an inserted key's home.
constexpr uint64_t kEvictWindowBuckets = 4;
constexpr uint32_t kCounterShards = 16;
// Busy-waits on a bucket a writer holds before yielding the CPU instead.
constexpr uint32_t kSpinsBeforeYield = 64;

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

inline void CpuRelax() {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_ia32_pause();
#elif defined(__aarch64__)
  asm volatile("yield");
#endif
}

uint32_t ThreadShard() {
  static std::atomic<uint32_t> next{0};
  thread_local const uint32_t shard = next.fetch_add(1, std::memory_order_relaxed) % kCounterShards;
  return shard;
}

// Writer half of a bucket's seqlock. REQUIRES: the cache's mu_ held (one
// writer at a time), and no other guard alive on the same bucket.
class WriteGuard {
 public:
  explicit WriteGuard(std::atomic<uint32_t>& seq) : seq_(seq), value_(seq.load(std::memory_order_relaxed)) {
    seq_.store(value_ + 1, std::memory_order_relaxed);
  }
  ~WriteGuard() { seq_.store(value_ + 2, std::memory_order_release); }
  WriteGuard(const WriteGuard&) = delete;
  WriteGuard& operator=(const WriteGuard&) = delete;

 private:
  std::atomic<uint32_t>& seq_;
  const uint32_t value_;
};

constexpr auto kRelaxed = std::memory_order_relaxed;
constexpr auto kAcquire = std::memory_order_acquire;
constexpr auto kRelease = std::memory_order_release;

}  // namespace

RemapCache::RemapCache(uint64_t capacity, double max_load_factor)
    : capacity_(std::min(capacity, kMaxCapacity)), shards_(new CounterShard[kCounterShards]()) {
  static_assert(sizeof(Bucket) == 64, "a bucket is one cache line");
  if (!(max_load_factor > 0.0 && max_load_factor <= 1.0)) max_load_factor = kDefaultMaxLoadFactor;
  if (capacity_ == 0) return;
  const double wanted =
      std::ceil(static_cast<double>(capacity_) / (max_load_factor * static_cast<double>(kSlotsPerBucket)));
  const uint64_t at_least = (capacity_ + kSlotsPerBucket - 1) / kSlotsPerBucket;
  bucket_count_ = std::max<uint64_t>(static_cast<uint64_t>(std::min(wanted, kMaxBuckets)), at_least);
  buckets_.reset(new Bucket[bucket_count_]());
}

RemapCache::~RemapCache() = default;

uint64_t RemapCache::HomeBucket(uint64_t key) const {
  return static_cast<uint64_t>((static_cast<unsigned __int128>(Mix64(key)) * bucket_count_) >> 64);
}

std::optional<Remap> RemapCache::Lookup(uint64_t virtual_cluster) {
  CounterShard& counters = shards_[ThreadShard()];
  counters.lookups.fetch_add(1, kRelaxed);
  const uint64_t key = virtual_cluster + 1;
  if (bucket_count_ == 0 || key == 0) return std::nullopt;
  uint64_t b = HomeBucket(key);
  uint64_t last = 0;  // displacement of the last bucket to examine
  for (uint64_t d = 0;; ++d, b = NextBucket(b)) {
    Bucket& bucket = buckets_[b];
    int slot;
    Remap remap;
    uint8_t max_displacement;
    for (uint32_t spins = 0;; ++spins) {
      const uint32_t before = bucket.seq.load(std::memory_order_acquire);
      if (before & 1) {
        // A writer is inside this bucket: a few stores, unless it was
        // preempted there, in which case give it the CPU.
        if (spins < kSpinsBeforeYield) {
          CpuRelax();
        } else {
          std::this_thread::yield();
        }
        continue;
      }
      slot = -1;
      for (int i = 0; i < kSlotsPerBucket; ++i) {
        if (bucket.key[i].load(kAcquire) == key) {
          slot = i;
          break;
        }
      }
      if (slot >= 0) {
        remap.host_offset = bucket.host_offset[slot].load(kAcquire);
        remap.layer = bucket.layer[slot].load(kAcquire);
        remap.flags = bucket.flags[slot].load(kAcquire);
      }
      max_displacement = bucket.max_displacement.load(kAcquire);
      if (bucket.seq.load(kRelaxed) == before) break;
    }
    if (d == 0) last = max_displacement;
    if (slot >= 0) {
      counters.probes.fetch_add(d + 1, kRelaxed);
      counters.hits.fetch_add(1, kRelaxed);
      const uint8_t bit = static_cast<uint8_t>(1u << slot);
      if (!(bucket.referenced.load(kRelaxed) & bit)) bucket.referenced.fetch_or(bit, kRelaxed);
      return remap;
    }
    if (d >= last) {
      counters.probes.fetch_add(d + 1, kRelaxed);
      return std::nullopt;
    }
  }
}

std::optional<RemapCache::Location> RemapCache::FindLocked(uint64_t key) const {
  uint64_t b = HomeBucket(key);
  const uint64_t last = buckets_[b].max_displacement.load(kRelaxed);
  for (uint64_t d = 0; d <= last; ++d, b = NextBucket(b)) {
    for (int i = 0; i < kSlotsPerBucket; ++i) {
      if (buckets_[b].key[i].load(kRelaxed) == key) return Location{b, i};
    }
  }
  return std::nullopt;
}

void RemapCache::Insert(uint64_t virtual_cluster, const Remap& remap) {
  const uint64_t key = virtual_cluster + 1;
  if (bucket_count_ == 0 || key == 0) return;
  std::lock_guard lock(mu_);
  inserts_.fetch_add(1, kRelaxed);
  if (const std::optional<Location> found = FindLocked(key)) {  // overwrite in place; keep its clock bit
    Bucket& bucket = buckets_[found->bucket];
    WriteGuard guard(bucket.seq);
    bucket.host_offset[found->slot].store(remap.host_offset, kRelease);
    bucket.layer[found->slot].store(remap.layer, kRelease);
    bucket.flags[found->slot].store(remap.flags, kRelease);
    return;
  }
  if (size_.load(kRelaxed) >= capacity_ && !EvictInWindowLocked(HomeBucket(key), kEvictWindowBuckets)) {
    EvictOneLocked();
  }
  PlaceLocked(key, remap);
}

void RemapCache::PlaceLocked(uint64_t key, const Remap& remap) {
  const uint64_t home = HomeBucket(key);
  const uint64_t span = std::min(kMaxDisplacement + 1, bucket_count_);
  for (int attempt = 0; attempt < 2; ++attempt) {
    uint64_t b = home;
    for (uint64_t d = 0; d < span; ++d, b = NextBucket(b)) {
      Bucket& bucket = buckets_[b];
      for (int i = 0; i < kSlotsPerBucket; ++i) {
        if (bucket.key[i].load(kRelaxed) != 0) continue;
        if (d > 0) {
          Bucket& h = buckets_[home];
          WriteGuard guard(h.seq);
          h.displaced.store(static_cast<uint8_t>(h.displaced.load(kRelaxed) + 1), kRelease);
          if (d > h.max_displacement.load(kRelaxed)) h.max_displacement.store(static_cast<uint8_t>(d), kRelease);
        }
        {
          WriteGuard guard(bucket.seq);
          bucket.referenced.fetch_and(static_cast<uint8_t>(~(1u << i)), kRelaxed);
          bucket.host_offset[i].store(remap.host_offset, kRelease);
          bucket.layer[i].store(remap.layer, kRelease);
          bucket.flags[i].store(remap.flags, kRelease);
          bucket.key[i].store(key, kRelease);
        }
        size_.fetch_add(1, kRelaxed);
        return;
      }
    }
    // Every slot within reach is taken: free one there. The range holds
    // span * kSlotsPerBucket >= 3 entries, so the second pass finds a slot.
    EvictInWindowLocked(home, span);
  }
}

void RemapCache::EraseLocked(Location loc) {
  Bucket& bucket = buckets_[loc.bucket];
  const uint64_t key = bucket.key[loc.slot].load(kRelaxed);
  {
    WriteGuard guard(bucket.seq);
    bucket.key[loc.slot].store(0, kRelease);
  }
  const uint64_t home = HomeBucket(key);
  if (home != loc.bucket) {
    Bucket& h = buckets_[home];
    WriteGuard guard(h.seq);
    const uint8_t displaced = static_cast<uint8_t>(h.displaced.load(kRelaxed) - 1);
    h.displaced.store(displaced, kRelease);
    if (displaced == 0) h.max_displacement.store(0, kRelease);
  }
  size_.fetch_sub(1, kRelaxed);
}

bool RemapCache::EvictInWindowLocked(uint64_t first_bucket, uint64_t buckets) {
  buckets = std::min(buckets, bucket_count_);
  std::optional<Location> first_occupied;
  uint64_t b = first_bucket;
  for (uint64_t n = 0; n < buckets; ++n, b = NextBucket(b)) {
    const uint8_t referenced = buckets_[b].referenced.load(kRelaxed);
    for (int i = 0; i < kSlotsPerBucket; ++i) {
      if (buckets_[b].key[i].load(kRelaxed) == 0) continue;
      if (!(referenced & (1u << i))) {
        EraseLocked(Location{b, i});
        evictions_.fetch_add(1, kRelaxed);
        return true;
      }
      if (!first_occupied) first_occupied = Location{b, i};
    }
  }
  if (!first_occupied) return false;
  b = first_bucket;
  for (uint64_t n = 0; n < buckets; ++n, b = NextBucket(b)) buckets_[b].referenced.store(0, kRelaxed);
  EraseLocked(*first_occupied);
  evictions_.fetch_add(1, kRelaxed);
  return true;
}

void RemapCache::EvictOneLocked() {
  // Two revolutions suffice: the first clears every referenced bit it passes.
  const uint64_t slots = bucket_count_ * kSlotsPerBucket;
  for (uint64_t step = 0; step < 2 * slots + 1; ++step) {
    const Location loc{clock_hand_ / kSlotsPerBucket, static_cast<int>(clock_hand_ % kSlotsPerBucket)};
    Bucket& bucket = buckets_[loc.bucket];
    clock_hand_ = clock_hand_ + 1 == slots ? 0 : clock_hand_ + 1;
    if (bucket.key[loc.slot].load(kRelaxed) == 0) continue;
    const uint8_t bit = static_cast<uint8_t>(1u << loc.slot);
    if (!(bucket.referenced.load(kRelaxed) & bit)) {
      EraseLocked(loc);
      evictions_.fetch_add(1, kRelaxed);
      return;
    }
    bucket.referenced.fetch_and(static_cast<uint8_t>(~bit), kRelaxed);
  }
}

void RemapCache::InvalidateLocked(uint64_t key) {
  if (const std::optional<Location> found = FindLocked(key)) {
    EraseLocked(*found);
    invalidations_.fetch_add(1, kRelaxed);
  }
}

void RemapCache::Invalidate(uint64_t virtual_cluster) {
  const uint64_t key = virtual_cluster + 1;
  if (bucket_count_ == 0 || key == 0) return;
  std::lock_guard lock(mu_);
  InvalidateLocked(key);
}

void RemapCache::InvalidateRange(uint64_t first_cluster, uint64_t count) {
  if (bucket_count_ == 0 || count == 0) return;
  std::lock_guard lock(mu_);
  if (size_.load(kRelaxed) == 0) return;
  // Saturate the end: a range reaching past UINT64_MAX covers everything above first.
  const uint64_t last = count - 1 > std::numeric_limits<uint64_t>::max() - first_cluster
                            ? std::numeric_limits<uint64_t>::max()
                            : first_cluster + (count - 1);
  const uint64_t slots = bucket_count_ * kSlotsPerBucket;
  if (count <= slots) {
    for (uint64_t c = first_cluster;; ++c) {
      if (c != std::numeric_limits<uint64_t>::max()) InvalidateLocked(c + 1);
      if (c == last) break;
    }
    return;
  }
  // Sweep the table instead; entries never move, so one pass sees each once.
  for (uint64_t b = 0; b < bucket_count_; ++b) {
    for (int i = 0; i < kSlotsPerBucket; ++i) {
      const uint64_t key = buckets_[b].key[i].load(kRelaxed);
      if (key != 0 && key - 1 >= first_cluster && key - 1 <= last) {
        EraseLocked(Location{b, i});
        invalidations_.fetch_add(1, kRelaxed);
      }
    }
  }
}

void RemapCache::Clear() {
  std::lock_guard lock(mu_);
  for (uint64_t b = 0; b < bucket_count_; ++b) {
    Bucket& bucket = buckets_[b];
    WriteGuard guard(bucket.seq);
    for (int i = 0; i < kSlotsPerBucket; ++i) bucket.key[i].store(0, kRelease);
    bucket.displaced.store(0, kRelease);
    bucket.max_displacement.store(0, kRelease);
    bucket.referenced.store(0, kRelaxed);
  }
  size_.store(0, kRelaxed);
  clock_hand_ = 0;
}

RemapCacheStats RemapCache::Stats() const {
  RemapCacheStats s;
  s.capacity = capacity_;
  s.size = size_.load(kRelaxed);
  for (uint32_t i = 0; i < kCounterShards; ++i) {
    s.hits += shards_[i].hits.load(kRelaxed);
    s.probes += shards_[i].probes.load(kRelaxed);
    s.lookups += shards_[i].lookups.load(kRelaxed);
  }
  s.misses = s.lookups >= s.hits ? s.lookups - s.hits : 0;
  s.inserts = inserts_.load(kRelaxed);
  s.evictions = evictions_.load(kRelaxed);
  s.invalidations = invalidations_.load(kRelaxed);
  return s;
}

uint64_t RemapCache::MemoryBytes() const {
  return sizeof(*this) + bucket_count_ * sizeof(Bucket) + kCounterShards * sizeof(CounterShard);
}

}  // namespace cowtap::cow
