// Qcow2Refcounts: the two-level refcount structure of one qcow2 image (the
// in-memory refcount table plus a write-back cache of refcount blocks) and
// the cluster allocator built on it.
//
// Ordering contract: this class never flushes on its own except where the
// format requires it for its own structures (a new refcount block is written
// and flushed before the table entry pointing to it; a grown table and its
// blocks are written and flushed before the header points to it). Callers
// order refcount updates against L2 updates: FlushDirty() + File::Flush()
// before writing an L2 entry that uses a newly allocated cluster, and an
// L2 unlink made durable before calling Add(cluster, -1).
//
// Thread-safety: none; the owning image serializes access.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "base/status.h"
#include "cow/file.h"
#include "cow/qcow2_cache.h"

namespace cowtap::cow {

class Qcow2Refcounts {
 public:
  struct Geometry {
    uint32_t cluster_bits = 16;
    uint32_t refcount_order = 4;
    uint64_t table_offset = 0;
    uint32_t table_clusters = 0;
  };

  // Reads and validates the refcount table (entries aligned, below 2^56 and
  // inside the file). cache_bytes bounds the block cache (at least 4 blocks).
  static Result<std::unique_ptr<Qcow2Refcounts>> Load(File* file, const std::string& path, const Geometry& geometry,
                                                      uint64_t cache_bytes);

  // Refcount of a host cluster (0 where no block covers it).
  Result<uint64_t> Get(uint64_t cluster_index);
  // Sets / adjusts a refcount, allocating refcount blocks (and growing the
  // table) as needed. Add fails with kOutOfRange if the result would not fit
  // refcount_bits, kCorrupt if it would drop below zero.
  Status Set(uint64_t cluster_index, uint64_t value);
  Status Add(uint64_t cluster_index, int64_t delta);
  // Allocates `count` contiguous free clusters (refcount 0 -> 1) and returns
  // the byte offset of the first; kInternal if no run that long was found
  // (meant for count 1; use AllocateRun for data). Never returns clusters
  // below the floor.
  Result<uint64_t> Allocate(uint64_t count);
  // Allocates between 1 and max_count contiguous free clusters (refcount
  // 0 -> 1); returns the byte offset of the first and how many.
  Result<std::pair<uint64_t, uint64_t>> AllocateRun(uint64_t max_count);
  // Writes dirty refcount blocks (without flushing the file).
  Status FlushDirty() { return cache_.FlushDirty(); }
  bool HasDirty() const { return cache_.HasDirty(); }

  // Allocations start at or above this cluster (used while rebuilding).
  void set_allocation_floor(uint64_t cluster_index) { floor_ = cluster_index; }
  uint64_t table_offset() const { return geometry_.table_offset; }
  uint32_t table_clusters() const { return geometry_.table_clusters; }
  const std::vector<uint64_t>& table() const { return table_; }
  uint64_t block_entries() const { return block_entries_; }
  uint64_t cluster_size() const { return 1ull << geometry_.cluster_bits; }
  uint64_t MemoryBytes() const { return cache_.MemoryBytes() + table_.size() * 8; }

 private:
  Qcow2Refcounts(File* file, std::string path, const Geometry& geometry, uint64_t cache_entries);
  Status EnsureBlock(uint64_t block_index, uint64_t preferred_cluster);
  Status GrowTable(uint64_t block_index);
  // The header cluster and the refcount table's clusters: never handed out,
  // whatever the refcounts say (a hostile image can claim them free).
  bool HoldsOwnMetadata(uint64_t cluster_index) const;
  Status MetadataClaimedFree(uint64_t cluster_index) const;
  Result<uint8_t*> Block(uint64_t block_index);

  File* file_;
  std::string path_;
  Geometry geometry_;
  uint64_t block_entries_;
  std::vector<uint64_t> table_;
  Qcow2MetadataCache cache_;
  uint64_t free_hint_ = 0;
  uint64_t floor_ = 0;
};

}  // namespace cowtap::cow
