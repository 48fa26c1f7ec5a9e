// Qcow2Image: the qcow2 v2/v3 engine behind cow::Image (read, write with
// copy-on-write over a backing chain, discard, write-zeroes, map).
//
// Layout of the engine: qcow2_format.* holds the pure codecs, qcow2_cache.*
// the L2-slice / refcount-block caches, qcow2_refcount.* refcounts and the
// allocator; this class owns the per-image state, qcow2_image.cc opens,
// flushes and closes, qcow2_io.cc serves guest I/O.
//
// Crash ordering (see docs/qcow-format-notes.md section 3): refcount
// increments are written and flushed before any L2 slice or L1 entry that
// references the new cluster (unless lazy refcounts are on, in which case
// the dirty bit is set first); an L2 unlink is written and flushed before the
// refcount decrement; a new L2 table is written and flushed before the L1
// entry pointing to it. Guest data is durable only after Flush().
//
// Concurrency (qcow2_async.cc): guest reads and writes are asynchronous.
//   * Fast path: a request whose clusters all hit the remap cache (reads: any
//     readable remap; writes: in-place writable) goes to the data file as one
//     scatter-gather I/O per contiguous host extent without taking mu_.
//   * Slow path: mu_ is held only to resolve clusters (LookupCluster), fill
//     the remap cache and reserve clusters for allocating writes; data I/O
//     (including the write of an allocation, copy-on-write head/tail merged
//     with the guest data) runs after mu_ is released. The head/tail are
//     still read under mu_ (synchronously). Subcluster (extended L2) and
//     external-data-file images allocate synchronously under mu_; their
//     fast path works as for others. A reserved allocation is recorded in inflight_
//     until its data is written and its L2 entries are linked; writes to a
//     cluster in flight wait for it (no double allocation), discard and
//     write-zeroes wait for in-flight allocations in their range.
//   * Links are batched: completed allocation writes queue up and whichever
//     completion takes mu_ links them all (one round). A write completes only
//     after its link is in the L2 cache, so Flush() (refcounts, flush, L2
//     slices, flush) covers it; data of an allocation is written before its
//     L2 entry can reach the disk.
//   * Frees are deferred behind an epoch gate: every I/O that uses host
//     offsets outside mu_ holds an epoch from before its lookup until its
//     completion; a freed cluster's remap entry is invalidated, the epoch
//     flipped, and the refcount is decremented only once the older epoch
//     drained, so no cluster is reused while I/O to it may be in flight.
//   * Completions are never called with mu_ held; file I/O is never submitted
//     with mu_ held (a file may complete inline).
//
// Thread-safety: every public method is thread-safe. mu_ guards the
// metadata; the remap cache is internally synchronized (lock-free lookups)
// and changed only under mu_.
#pragma once

#include <atomic>
#include <condition_variable>
#include <list>
#include <memory>
#include <mutex>
#include <unordered_map>
#include <optional>
#include <string>
#include <vector>

#include "cow/compress.h"
#include "cow/formats.h"
#include "cow/qcow2_cache.h"
#include "cow/qcow2_format.h"
#include "cow/qcow2_refcount.h"
#include "cow/remap_cache.h"

namespace cowtap::cow {

// An epoch gate in the style of SRCU: readers Enter() before looking up a
// host offset and Exit() when their I/O completed; the owner flips the epoch
// and later asks whether every reader of the older epoch has left.
// Thread-safety: Enter/Exit from any thread without locks; Flip and Drained
// serialized by the owner, and Flip only once the previous flip drained.
class Qcow2EpochGate {
 public:
  // Returns the index to pass to Exit.
  int Enter() {
    while (true) {
      const uint64_t e = epoch_.load();
      const int i = static_cast<int>(e & 1);
      active_[i].fetch_add(1);
      if (epoch_.load() == e) return i;
      active_[i].fetch_sub(1);  // a flip raced us: join the new epoch
    }
  }
  void Exit(int index) { active_[index].fetch_sub(1); }
  // Starts a new epoch; returns the index of the old one.
  int Flip() { return static_cast<int>(epoch_.fetch_add(1) & 1); }
  // True once every reader that entered the epoch `index` before the flip
  // has left.
  bool Drained(int index) const { return active_[index].load() == 0; }

 private:
  std::atomic<uint64_t> epoch_{0};
  std::atomic<int64_t> active_[2] = {0, 0};
};

class Qcow2Image final : public Image {
 public:
  static Result<std::unique_ptr<Qcow2Image>> Open(std::unique_ptr<File> file, const std::string& path,
                                                  const OpenOptions& options, const BackingOpener& open_backing);
  ~Qcow2Image() override;

  const ImageInfo& info() const override { return info_; }
  Status Read(uint64_t offset, IoVecs iov) override;
  Status Write(uint64_t offset, IoVecs iov) override;
  void SubmitRead(uint64_t offset, IoVecs iov, ImageCompletion done) override;
  void SubmitWrite(uint64_t offset, IoVecs iov, ImageCompletion done) override;
  ImageIoStats io_stats() const override;
  Status WriteZeroes(uint64_t offset, uint64_t length, bool may_unmap) override;
  Status Discard(uint64_t offset, uint64_t length) override;
  Status Flush() override;
  Result<std::vector<Extent>> Map(uint64_t offset, uint64_t length) override;
  Status Close() override;
  std::shared_ptr<Image> backing() const override { return backing_; }
  RemapCache* remap_cache() override { return remap_.get(); }
  std::optional<Remap> LookupRemap(uint64_t virtual_cluster) override { return RemapLookup(virtual_cluster); }

  // For tests and tools: the parsed header and the refcount structure (null
  // when opened read-only).
  const Qcow2Header& header() const { return h_; }
  Qcow2Refcounts* refcounts() { return refcounts_.get(); }
  uint64_t l2_cache_bytes() const { return l2_cache_ ? l2_cache_->max_entries() * l2_cache_->entry_bytes() : 0; }

 private:
  // Where one guest cluster's L2 entry lives (after LookupCluster).
  struct ClusterRef {
    uint64_t vcluster = 0;
    bool has_l2 = false;
    uint64_t slice_offset = 0;  // byte offset of the cached slice
    uint64_t index = 0;         // entry index within the slice
    uint64_t entry_offset = 0;  // byte offset of the entry in the file
    Qcow2L2Entry entry;
    Qcow2ClusterType type = Qcow2ClusterType::kUnallocated;
  };

  struct AsyncOp;
  struct PendingAlloc;
  // One piece of a planned read or write: host bytes of data_, guest bytes
  // of the backing chain, or zeros; pos is the offset in the request.
  struct Piece {
    enum Kind : uint8_t { kHost, kBacking, kZero } kind = kHost;
    uint64_t at = 0;
    uint64_t pos = 0;
    uint64_t length = 0;
  };
  // Appends p, merging it into the last piece when both are contiguous.
  static void AddPiece(std::vector<Piece>* plan, const Piece& p);

  Qcow2Image() = default;
  Status Closed() const { return Status::Cancelled(path_ + ": image is closed"); }
  Status CheckRange(uint64_t offset, uint64_t length) const;
  Status CheckWritable();
  Status PrepareFirstWrite();
  Status MarkBroken(const Status& cause);

  // --- lookup (qcow2_io.cc) ---
  Result<ClusterRef> LookupCluster(uint64_t vcluster);
  // Like LookupCluster but makes sure a writable (COPIED) L2 table exists.
  Result<ClusterRef> LookupClusterForWrite(uint64_t vcluster);
  Status SetL2Entry(const ClusterRef& ref, uint64_t raw, uint64_t bitmap);
  Status ReadLocked(uint64_t offset, IoVecs iov);
  // Publishes what LookupCluster found for vc in the remap cache (whole-
  // cluster states only). REQUIRES: mu_.
  void PublishRemap(const ClusterRef& ref);
  // Metadata read-ahead after a remap-cache miss on `ref`: when the reader
  // seems to move forward (the cluster before is cached, or `ref` starts an
  // L2 slice), publishes the clusters after it whose entries are in the same
  // L2 slice (already loaded, so nothing is read), up to about 8 MiB of guest
  // data, exactly as PublishRemap(LookupCluster(c)) would: from the current
  // L2 state under mu_, so every later change invalidates them as it does any
  // entry. A sequential reader then stays on the fast path. REQUIRES: mu_.
  void ReadAheadRemaps(const ClusterRef& ref);
  Status ReadCluster(const ClusterRef& ref, uint64_t in_offset, IoVecs iov);
  Status ReadBacking(uint64_t offset, IoVecs iov);
  Status ReadHost(uint64_t host_offset, IoVecs iov, const ClusterRef& ref);
  Status ReadCompressed(const ClusterRef& ref, uint64_t in_offset, IoVecs iov);
  Status WriteLocked(uint64_t offset, IoVecs iov);
  // Writes a prefix of iov (at least its first cluster) into newly
  // allocated clusters; returns the bytes consumed.
  Result<uint64_t> WriteClusterRun(uint64_t offset, IoVecs iov, uint64_t clusters);
  Status WriteExtended(uint64_t offset, IoVecs iov);
  Status ZeroLocked(uint64_t offset, uint64_t length, bool unmap, bool discard);
  Status MapLayer(uint64_t offset, uint64_t length, std::vector<Extent>* out);

  // --- asynchronous I/O (qcow2_async.cc) ---
  // Plans a request from the remap cache alone; false on any miss (or, for
  // writes, any cluster that is not in-place writable).
  bool PlanFromRemap(uint64_t offset, uint64_t length, bool write, std::vector<Piece>* plan);
  // REQUIRES: mu_. Resolves a read; compressed and subcluster pieces are
  // read synchronously into iov.
  Status PlanReadLocked(uint64_t offset, IoVecs iov, std::vector<Piece>* plan);
  void StartSlowRead(const std::shared_ptr<AsyncOp>& op);
  void StartSlowWrite(const std::shared_ptr<AsyncOp>& op);
  // REQUIRES: mu_. Plans a write: in-place pieces and reserved allocations.
  Status PlanWriteLocked(const std::shared_ptr<AsyncOp>& op, std::vector<Piece>* plan,
                         std::vector<std::shared_ptr<PendingAlloc>>* allocs);
  // REQUIRES: mu_. Reserves 1..k clusters from the cluster of guest offset
  // g for a prefix of data (copy-up head/tail read now), appends the
  // reservation to allocs and registers it in inflight_; returns the bytes
  // of data it covers.
  Result<uint64_t> ReserveRun(const std::shared_ptr<AsyncOp>& op, uint64_t g, IoVecs data, uint64_t k,
                              std::vector<std::shared_ptr<PendingAlloc>>* allocs);
  // REQUIRES: mu_. Undoes a reservation that will not be linked (its
  // clusters are free again) and drops it from inflight_.
  void GiveBack(PendingAlloc& a);
  void DropInflight(PendingAlloc& a);
  Status LinkAlloc(PendingAlloc& a);
  void OnAllocWritten(const std::shared_ptr<PendingAlloc>& a, Status status);
  // Links every queued allocation in one round under mu_.
  void LinkQueued();
  // Submits the planned pieces of op (no locks held).
  void RunPlan(const std::shared_ptr<AsyncOp>& op, const std::vector<Piece>& plan, bool write);
  // REQUIRES: mu_ held by lock. Waits until no allocation is in flight on
  // guest bytes [offset, offset + length).
  void WaitForAllocations(std::unique_lock<std::mutex>& lock, uint64_t offset, uint64_t length);
  // REQUIRES: mu_. Applies deferred frees whose epoch drained; flips the
  // epoch for newer ones. Never blocks.
  Status ReclaimFrees();
  Status ApplyFrees(std::vector<uint64_t>* host_clusters);

  // The remap cache is thread-safe (lock-free lookups). Inserts happen
  // under mu_ only, so that they agree with the L2 tables.
  std::optional<Remap> RemapLookup(uint64_t vcluster) {
    return remap_ ? remap_->Lookup(vcluster) : std::nullopt;
  }
  void RemapInsert(uint64_t vcluster, const Remap& remap) {
    if (remap_) remap_->Insert(vcluster, remap);
  }

  // --- metadata (qcow2_image.cc) ---
  // Allocates 1..max_count contiguous clusters: (byte offset, count).
  Result<std::pair<uint64_t, uint64_t>> AllocateClusters(uint64_t max_count);
  Status SatisfyRefcountDependency();
  Status WriteL2Slice(uint64_t offset, std::span<const uint8_t> bytes);
  Status WriteL1Entry(uint64_t index);
  Status FreeClusters(std::vector<uint64_t>* host_clusters);
  Status FlushLocked();
  Status WriteHeaderField(uint64_t offset, uint64_t value);
  Status RebuildRefcounts();
  bool IsFresh(uint64_t host_offset) const { return host_offset >= high_water_; }
  void InvalidateRemap(uint64_t vcluster) {
    if (remap_) remap_->Invalidate(vcluster);
  }
  void InvalidateRemapRange(uint64_t first, uint64_t count) {
    if (remap_) remap_->InvalidateRange(first, count);
  }

  std::mutex mu_;
  Qcow2EpochGate gate_;
  // Allocations reserved and not yet linked or given back, by vcluster.
  std::unordered_map<uint64_t, std::shared_ptr<PendingAlloc>> inflight_;  // GUARDED_BY(mu_)
  std::condition_variable inflight_cv_;  // an allocation left inflight_
  std::mutex link_mu_;
  std::vector<std::shared_ptr<PendingAlloc>> link_queue_;  // GUARDED_BY(link_mu_)
  // Unlinked clusters waiting for the epoch flip, and those waiting for the
  // flipped epoch (flipped_index_) to drain. GUARDED_BY(mu_).
  std::vector<uint64_t> free_waiting_;
  std::vector<uint64_t> free_flipped_;
  int flipped_index_ = 0;
  bool flipped_counted_ = false;
  // Set once the first write prepared the header and while no corruption was
  // found: fast-path writes need no engine checks.
  std::atomic<bool> fast_writes_ok_{false};
  struct Counters {
    std::atomic<uint64_t> fast_reads{0}, fast_writes{0}, slow_reads{0}, slow_writes{0}, allocations{0},
        allocating_writes{0}, link_rounds{0}, links{0}, alloc_waits{0}, deferred_frees{0};
  } counters_;
  std::string path_;
  std::unique_ptr<File> file_;
  std::unique_ptr<File> data_file_owned_;
  File* data_ = nullptr;  // guest data: file_ or the external data file
  Qcow2Header h_;
  ImageInfo info_;
  OpenOptions options_;
  std::shared_ptr<Image> backing_;
  std::vector<Qcow2Snapshot> snapshots_;
  std::vector<uint64_t> l1_;  // raw L1 entries of the layer being served
  uint64_t l1_offset_ = 0;
  uint64_t cluster_size_ = 0;
  uint64_t file_size_ = 0;   // bytes of the image file known to exist or be allocated
  uint64_t high_water_ = 0;  // image-file bytes at or past this were never written: read as zeros
  uint64_t prealloc_end_ = 0;
  std::unique_ptr<Qcow2MetadataCache> l2_cache_;
  std::unique_ptr<Qcow2Refcounts> refcounts_;
  std::unique_ptr<RemapCache> remap_;
  bool refcount_flush_pending_ = false;
  bool first_write_done_ = false;
  bool dirty_set_by_us_ = false;
  std::atomic<bool> closed_{true};  // until Open() completes: a half-opened image is never flushed
  std::string read_only_reason_;
  // The last decompressed cluster (compressed clusters are read whole).
  uint64_t decompressed_raw_ = 0;
  std::vector<uint8_t> decompressed_;
};

}  // namespace cowtap::cow
