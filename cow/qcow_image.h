// QcowImage: qcow version 1 behind cow::Image (read, write, copy-up, discard,
// map). Internal to cow/: callers use OpenImage / CreateImage. The methods
// are split over qcow_image.cc (open, read, map, metadata cache) and
// qcow_write.cc (allocation, write, discard, flush ordering).
//
// Design notes.
// - Allocation only appends (v1 has no refcounts, so a host cluster is never
//   reused); a host offset, once handed out, keeps meaning the same guest
//   cluster until the image is closed. That is what lets reads do their data
//   I/O outside the metadata lock.
// - Crash ordering. L2 tables are write-back: an allocating write writes the
//   new cluster (copy-up from the backing chain merged with the guest data,
//   one write) and only updates the cached L2 table. Flush() then (1) flushes
//   the file, so every new cluster is durable, (2) writes the dirty L2 tables,
//   (3) flushes again, (4) writes the L1 entries of new L2 tables, (5)
//   flushes. So an L2 entry never reaches the disk before its data, nor an L1
//   entry before its table: a crash can at worst leak clusters appended since
//   the last flush, never make a cluster read zeros instead of backing data
//   (QEMU's v1 driver writes the L2 entry first). Evicting a dirty table runs
//   the same sequence.
// - Discard and write-zeroes: v1 has no zero flag. Without backing data under
//   a cluster, unallocating it (L2 entry 0) reads as zeros; over backing data
//   the cluster gets real zeros so the backing bytes never reappear.
// - Metadata found invalid while running (an L2 entry out of the file, say)
//   fails that request with kCorrupt and stops all further writes.
// - Lookups go through the RemapCache first (when enabled), then the L2
//   cache; what the L2 path resolves is published to the RemapCache, and
//   SetEntryLocked invalidates a cluster's remap before changing its entry.
//
// Thread-safety: all methods may be called concurrently. mu_ guards the L1
// table, the L2 cache and the allocation pointer; writes, discards and
// flushes hold it throughout, reads only to look up mappings.
#pragma once

#include <atomic>
#include <memory>
#include <mutex>
#include <set>
#include <vector>

#include "cow/image.h"
#include "cow/qcow_format.h"
#include "cow/qcow_l2_cache.h"
#include "cow/remap_cache.h"

namespace cowtap::cow {

inline constexpr uint64_t kQcowDefaultL2CacheBytes = 4ull << 20;
inline constexpr uint64_t kQcowGrowStepBytes = 1ull << 20;
inline constexpr uint64_t kQcowMaxRunBytes = 1ull << 20;  // largest merged allocating write

class QcowImage final : public Image {
 public:
  QcowImage(std::unique_ptr<File> file, ImageInfo info, const QcowHeader& header, std::vector<uint64_t> l1,
            std::shared_ptr<Image> backing, uint64_t file_size, uint64_t cache_tables, uint64_t remap_entries)
      : file_(std::move(file)),
        info_(std::move(info)),
        h_(header),
        cluster_size_(header.cluster_size()),
        backing_(std::move(backing)),
        l1_(std::move(l1)),
        cache_(cache_tables),
        file_end_(file_size),
        reserved_end_(file_size),
        remap_(remap_entries ? std::make_unique<RemapCache>(remap_entries) : nullptr) {}

  ~QcowImage() override;

  const ImageInfo& info() const override { return info_; }
  std::shared_ptr<Image> backing() const override { return backing_; }
  // Top-layer clusters this image resolved: host offsets of allocated,
  // uncompressed clusters (kWritable) and clusters that read as zeros with
  // nothing below them (kZero). Entries are invalidated before the mapping
  // changes. Not synchronized: use it only while no request is in flight.
  RemapCache* remap_cache() override { return remap_.get(); }
  std::optional<Remap> LookupRemap(uint64_t virtual_cluster) override {
    std::lock_guard lock(mu_);
    return remap_ ? remap_->Lookup(virtual_cluster) : std::nullopt;
  }

  Status Read(uint64_t offset, IoVecs iov) override;
  Status Write(uint64_t offset, IoVecs iov) override;
  Status WriteZeroes(uint64_t offset, uint64_t length, bool may_unmap) override {
    return Zero(offset, length, may_unmap, /*partial=*/true);
  }
  Status Discard(uint64_t offset, uint64_t length) override {
    return Zero(offset, length, /*may_unmap=*/true, /*partial=*/false);
  }
  Status Flush() override {
    if (closed_) return Closed();
    if (info_.read_only) return Status::Ok();
    std::lock_guard lock(mu_);
    return FlushLocked();
  }
  Result<std::vector<Extent>> Map(uint64_t offset, uint64_t length) override;
  Status Close() override {
    if (closed_.exchange(true)) return Status::Ok();
    if (info_.read_only) return Status::Ok();
    std::lock_guard lock(mu_);
    return FlushLocked();
  }

 private:
  Status Closed() const { return Status::Cancelled(info_.path + ": image is closed"); }
  Status CheckRange(uint64_t offset, uint64_t length, bool write) const;

  // The mapping of guest cluster ci (validated).
  Result<QcowCluster> LookupLocked(uint64_t ci);
  Result<std::vector<uint64_t>*> LoadL2Locked(uint64_t l2_offset);
  // Makes room for one more table, writing back metadata if the victim is dirty.
  Status EvictIfFullLocked();
  // Points guest cluster ci at entry (0 unallocates), allocating its L2
  // table if needed. The change stays in the cache until FlushLocked.
  Status SetEntryLocked(uint64_t ci, uint64_t entry);
  // Reserves bytes at the end of the file, cluster aligned.
  Result<uint64_t> AllocateLocked(uint64_t bytes);
  Status FlushLocked();
  Status WriteLocked(uint64_t offset, IoVecs iov);
  Status MarkCorrupt(const Status& s);
  Status CorruptRefusal() const {
    return Status::Corrupt(info_.path + ": image metadata was found corrupt; writes are refused (reopen read-only)");
  }

  // Fills buf with guest bytes [guest, guest + buf.size()) as this layer's
  // backing chain has them (zeros past its end).
  Status ReadBacking(uint64_t guest, std::span<uint8_t> buf);
  Status ReadBackingIov(uint64_t guest, IoVecs iov);
  // The full guest cluster ci as it reads now, for copy-up.
  Status ReadClusterForCopy(uint64_t ci, const QcowCluster& c, std::span<uint8_t> buf);
  Status Zero(uint64_t offset, uint64_t length, bool may_unmap, bool partial);
  // Writes one new zero-filled cluster for ci.
  Status AllocateZeroClusterLocked(uint64_t ci);

  std::unique_ptr<File> file_;
  ImageInfo info_;
  const QcowHeader h_;
  const uint64_t cluster_size_;
  std::shared_ptr<Image> backing_;
  std::atomic<bool> closed_{false};

  std::mutex mu_;
  std::vector<uint64_t> l1_;       // GUARDED_BY(mu_), host order
  std::set<uint64_t> l1_dirty_;    // GUARDED_BY(mu_), indices of new L2 tables
  QcowL2Cache cache_;              // GUARDED_BY(mu_)
  uint64_t file_end_;              // GUARDED_BY(mu_), end of everything allocated
  uint64_t reserved_end_;          // GUARDED_BY(mu_), end of space fallocated ahead
  bool corrupt_ = false;           // GUARDED_BY(mu_)
  std::unique_ptr<RemapCache> remap_;  // GUARDED_BY(mu_); null when disabled
};

}  // namespace cowtap::cow
