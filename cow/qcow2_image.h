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
// Thread-safety: every public method takes mu_ (one lock per image). The
// lookup (LookupCluster) and the allocating slow path are separate functions
// so that a lock-free remap-cache fast path can be put in front later.
#pragma once

#include <memory>
#include <mutex>
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

class Qcow2Image final : public Image {
 public:
  static Result<std::unique_ptr<Qcow2Image>> Open(std::unique_ptr<File> file, const std::string& path,
                                                  const OpenOptions& options, const BackingOpener& open_backing);
  ~Qcow2Image() override;

  const ImageInfo& info() const override { return info_; }
  Status Read(uint64_t offset, IoVecs iov) override;
  Status Write(uint64_t offset, IoVecs iov) override;
  Status WriteZeroes(uint64_t offset, uint64_t length, bool may_unmap) override;
  Status Discard(uint64_t offset, uint64_t length) override;
  Status Flush() override;
  Result<std::vector<Extent>> Map(uint64_t offset, uint64_t length) override;
  Status Close() override;
  std::shared_ptr<Image> backing() const override { return backing_; }
  RemapCache* remap_cache() override { return remap_.get(); }
  std::optional<Remap> LookupRemap(uint64_t virtual_cluster) override {
    std::lock_guard lock(mu_);
    return remap_ ? remap_->Lookup(virtual_cluster) : std::nullopt;
  }

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

  std::mutex mu_;
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
  bool closed_ = true;  // until Open() completes: a half-opened image is never flushed
  std::string read_only_reason_;
  // The last decompressed cluster (compressed clusters are read whole).
  uint64_t decompressed_raw_ = 0;
  std::vector<uint8_t> decompressed_;
};

}  // namespace cowtap::cow
