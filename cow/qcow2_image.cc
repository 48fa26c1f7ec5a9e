// Qcow2Image: opening (header, extensions, snapshot selection, data file,
// backing), metadata write ordering, flush and close. Guest I/O is in
// qcow2_io.cc; creation in qcow2_create.cc.
#include "cow/qcow2_image.h"

#include <algorithm>
#include <cstring>

#include "base/checked_math.h"
#include "base/endian.h"
#include "base/log.h"
#include "cow/qcow2_scan.h"

namespace cowtap::cow {
namespace {

constexpr uint64_t kL2SliceBytes = 4096;
constexpr uint64_t kDefaultL2CacheCap = 32ull << 20;
// The host file is grown ahead of use by a quarter of its size, between
// these bounds: a streaming writer soon reserves 32 MiB at a time, while a
// thin overlay (SAN boot keeps hundreds) reserves about 1 MiB.
constexpr uint64_t kMinGrowStepBytes = 1ull << 20;
constexpr uint64_t kMaxGrowStepBytes = 32ull << 20;

}  // namespace

Result<std::unique_ptr<Qcow2Image>> Qcow2Image::Open(std::unique_ptr<File> file, const std::string& path,
                                                     const OpenOptions& options, const BackingOpener& open_backing) {
  std::unique_ptr<Qcow2Image> img(new Qcow2Image());
  img->path_ = path;
  img->options_ = options;
  COWTAP_ASSIGN_OR_RETURN(uint64_t file_size, file->Size());
  COWTAP_ASSIGN_OR_RETURN(img->h_, ReadQcow2Header(*file, path));
  Qcow2Header& h = img->h_;
  img->cluster_size_ = h.cluster_size();
  img->file_size_ = file_size;
  img->high_water_ = *AlignUp(file_size, h.cluster_size());
  img->prealloc_end_ = img->high_water_;
  img->file_ = std::move(file);
  img->data_ = img->file_.get();

  ImageInfo& info = img->info_;
  info.format = ImageFormat::kQcow2;
  info.path = path;
  info.size_bytes = h.size;
  info.file_size_bytes = file_size;
  info.cluster_size = static_cast<uint32_t>(h.cluster_size());
  info.version = static_cast<int>(h.version);
  info.backing_file = h.backing_file;
  info.refcount_bits = static_cast<int>(h.refcount_bits());
  info.dirty = h.incompatible_features & kQcow2IncompatDirty;
  info.corrupt = h.incompatible_features & kQcow2IncompatCorrupt;
  info.lazy_refcounts = h.compatible_features & kQcow2CompatLazyRefcounts;
  info.extended_l2 = h.extended_l2();
  info.compression_type = h.compression_type == 1 ? "zstd" : "zlib";
  info.data_file = h.data_file;
  info.data_file_raw = h.autoclear_features & kQcow2AutoclearDataFileRaw;
  info.incompatible_features = h.incompatible_features;
  info.compatible_features = h.compatible_features;
  info.autoclear_features = h.autoclear_features;

  bool read_only = options.read_only || !options.snapshot.empty();
  if (info.corrupt && !read_only) {
    read_only = true;
    img->read_only_reason_ = path +
                             ": the image is marked corrupt (incompatible bit 1); it was opened read-only. "
                             "Repair it with `qemu-img check -r all` before writing";
  }
  info.read_only = read_only;

  FileSystem* fs = options.fs ? options.fs : DefaultFileSystem();
  if (h.has_data_file()) {
    if (h.data_file.empty())
      return Status::NotSupported(path + ": the image uses an external data file but does not record its name");
    FileOpenOptions fo;
    fo.writable = !read_only;
    fo.direct = options.direct_io;
    // QEMU 7.2 resolves a relative data-file name against the current
    // working directory, not the image's directory; so do we.
    auto df = fs->Open(h.data_file, fo);
    if (!df.ok()) return df.status().Annotate(path + ": opening external data file " + h.data_file);
    img->data_file_owned_ = std::move(df).value();
    img->data_ = img->data_file_owned_.get();
  }
  if (!h.backing_file.empty()) {
    BackingRef ref{h.backing_file, std::nullopt};
    if (!h.backing_format.empty()) {
      ref.format = ParseFormatName(h.backing_format);
      if (!ref.format)
        return Status::NotSupported(path + ": backing format '" + h.backing_format + "' is not supported");
    }
    COWTAP_ASSIGN_OR_RETURN(img->backing_, open_backing(ref));
    info.backing_path = img->backing_->info().path;
    info.backing_format = ref.format;
  }
  if (h.nb_snapshots > 0) {
    COWTAP_ASSIGN_OR_RETURN(img->snapshots_, ReadQcow2SnapshotTable(*img->file_, h, file_size, path));
  }
  for (const auto& s : img->snapshots_) {
    SnapshotInfo si;
    si.id = s.id;
    si.name = s.name;
    si.size_bytes = s.disk_size ? s.disk_size : h.size;
    si.date_sec = s.date_sec;
    si.date_nsec = s.date_nsec;
    si.vm_state_size = s.vm_state_size;
    info.snapshots.push_back(std::move(si));
  }

  uint64_t l1_offset = h.l1_table_offset;
  uint64_t l1_size = h.l1_size;
  if (!options.snapshot.empty()) {
    auto it = std::find_if(img->snapshots_.begin(), img->snapshots_.end(),
                           [&](const Qcow2Snapshot& s) { return s.id == options.snapshot; });
    if (it == img->snapshots_.end())
      it = std::find_if(img->snapshots_.begin(), img->snapshots_.end(),
                        [&](const Qcow2Snapshot& s) { return s.name == options.snapshot; });
    if (it == img->snapshots_.end())
      return Status::NotFound(path + ": no internal snapshot with id or name '" + options.snapshot + "'");
    l1_offset = it->l1_table_offset;
    l1_size = it->l1_size;
    if (it->disk_size) info.size_bytes = it->disk_size;
    if (Qcow2L1EntriesFor(info.size_bytes, h.cluster_bits, h.extended_l2()) > l1_size)
      return Status::Corrupt(path + ": snapshot '" + options.snapshot + "' has an L1 table too small for its size");
  }
  img->l1_offset_ = l1_offset;
  img->l1_.resize(l1_size);
  if (l1_size) {
    std::vector<uint8_t> raw(l1_size * 8);
    COWTAP_RETURN_IF_ERROR(img->file_->ReadAt(l1_offset, raw));
    for (uint64_t i = 0; i < l1_size; ++i) img->l1_[i] = LoadBe64(&raw[i * 8]);
  }

  // L2 cache: enough slices to map the whole image, capped, unless given.
  uint64_t l2_bytes = options.l2_cache_bytes;
  if (l2_bytes == 0) {
    uint64_t full = uint64_t{h.l1_size} * h.cluster_size();
    l2_bytes = std::clamp<uint64_t>(full, 2 * kL2SliceBytes, kDefaultL2CacheCap);
  }
  uint64_t slice = std::min<uint64_t>(kL2SliceBytes, h.cluster_size());
  Qcow2Image* raw_img = img.get();
  img->l2_cache_ = std::make_unique<Qcow2MetadataCache>(
      img->file_.get(), slice, std::max<uint64_t>(2, l2_bytes / slice),
      [raw_img](uint64_t off, std::span<const uint8_t> b) { return raw_img->WriteL2Slice(off, b); });

  if (!read_only) {
    Qcow2Refcounts::Geometry g{h.cluster_bits, h.refcount_order, h.refcount_table_offset, h.refcount_table_clusters};
    uint64_t rc_bytes = options.refcount_cache_bytes ? options.refcount_cache_bytes : (1ull << 20);
    COWTAP_ASSIGN_OR_RETURN(img->refcounts_, Qcow2Refcounts::Load(img->file_.get(), path, g, rc_bytes));
    if (info.dirty) COWTAP_RETURN_IF_ERROR(img->RebuildRefcounts());
  }
  if (options.remap_cache_entries > 0) img->remap_ = std::make_unique<RemapCache>(options.remap_cache_entries);
  img->closed_ = false;
  return img;
}

Qcow2Image::~Qcow2Image() {
  Status s = Close();
  if (!s.ok()) spdlog::error("{}: closing qcow2 image: {}", path_, s.ToString());
}

Status Qcow2Image::CheckRange(uint64_t offset, uint64_t length) const {
  if (closed_) return Closed();
  if (!RangeWithin(offset, length, info_.size_bytes))
    return Status::OutOfRange(path_ + ": range " + std::to_string(offset) + "+" + std::to_string(length) +
                              " is beyond the image size " + std::to_string(info_.size_bytes));
  return Status::Ok();
}

Status Qcow2Image::CheckWritable() {
  if (!read_only_reason_.empty()) return Status::ReadOnly(read_only_reason_);
  if (info_.read_only) return Status::ReadOnly(path_ + ": image is open read-only");
  return PrepareFirstWrite();
}

Status Qcow2Image::MarkBroken(const Status& cause) {
  fast_writes_ok_ = false;
  if (read_only_reason_.empty())
    read_only_reason_ = path_ + ": metadata found corrupt during I/O (" + cause.message() +
                        "); further writes are refused. Run `qemu-img check -r all`";
  return cause;
}

Status Qcow2Image::WriteHeaderField(uint64_t offset, uint64_t value) {
  uint8_t b[8];
  StoreBe64(b, value);
  COWTAP_RETURN_IF_ERROR(file_->WriteAt(offset, b));
  return file_->Flush();
}

Status Qcow2Image::PrepareFirstWrite() {
  if (first_write_done_) return Status::Ok();
  if (h_.version >= 3) {
    // Bitmaps (bit 0) and unknown autoclear bits: we do not maintain them.
    uint64_t keep = h_.autoclear_features & kQcow2AutoclearDataFileRaw;
    if (keep != h_.autoclear_features) {
      COWTAP_RETURN_IF_ERROR(WriteHeaderField(kQcow2OffAutoclear, keep));
      h_.autoclear_features = keep;
      info_.autoclear_features = keep;
    }
    if (info_.lazy_refcounts && !(h_.incompatible_features & kQcow2IncompatDirty)) {
      uint64_t f = h_.incompatible_features | kQcow2IncompatDirty;
      COWTAP_RETURN_IF_ERROR(WriteHeaderField(kQcow2OffIncompatible, f));
      h_.incompatible_features = f;
      dirty_set_by_us_ = true;
      info_.dirty = true;
    }
  }
  first_write_done_ = true;
  return Status::Ok();
}

Result<std::pair<uint64_t, uint64_t>> Qcow2Image::AllocateClusters(uint64_t max_count) {
  COWTAP_RETURN_IF_ERROR(ReclaimFrees());
  COWTAP_ASSIGN_OR_RETURN(auto got, refcounts_->AllocateRun(max_count));
  refcount_flush_pending_ = true;
  uint64_t end = got.first + got.second * cluster_size_;
  if (end > prealloc_end_) {
    // Grow the file ahead of use in large steps; bytes stay reading as zeros.
    // The size grows too: O_DIRECT writes past EOF are serialized by the
    // file system (ext4, XFS extend i_size synchronously under the inode
    // lock), which would cap allocating writes at queue depth 1. Close()
    // truncates back to the bytes in use.
    uint64_t from = std::max(prealloc_end_, got.first);
    uint64_t step = std::clamp<uint64_t>(file_size_ / 4, kMinGrowStepBytes, kMaxGrowStepBytes);
    step = std::max<uint64_t>(step, end - from);
    Status s = file_->Allocate(from, step, /*keep_size=*/false);
    if (s.code() == ErrorCode::kNoSpace) {
      // Nothing references the run yet: give it back, or every retry of a
      // write on a full disk would leak clusters.
      const uint64_t first = got.first / cluster_size_;
      for (uint64_t i = 0; i < got.second; ++i) refcounts_->Set(first + i, 0).IgnoreError();
      return s;
    }
    prealloc_end_ = from + step;
  }
  file_size_ = std::max(file_size_, end);
  return got;
}

Status Qcow2Image::SatisfyRefcountDependency() {
  if (!refcount_flush_pending_) return Status::Ok();
  if (refcounts_) COWTAP_RETURN_IF_ERROR(refcounts_->FlushDirty());
  if (!(h_.incompatible_features & kQcow2IncompatDirty)) COWTAP_RETURN_IF_ERROR(file_->Flush());
  refcount_flush_pending_ = false;
  return Status::Ok();
}

Status Qcow2Image::WriteL2Slice(uint64_t offset, std::span<const uint8_t> bytes) {
  // A slice may reference clusters whose refcount is still only in memory.
  COWTAP_RETURN_IF_ERROR(SatisfyRefcountDependency());
  return file_->WriteAt(offset, bytes);
}

Status Qcow2Image::WriteL1Entry(uint64_t index) {
  COWTAP_RETURN_IF_ERROR(SatisfyRefcountDependency());
  uint8_t b[8];
  StoreBe64(b, l1_[index]);
  return file_->WriteAt(l1_offset_ + index * 8, b);
}

Status Qcow2Image::FreeClusters(std::vector<uint64_t>* host_clusters) {
  if (host_clusters->empty()) return Status::Ok();
  // Unlink on disk first: the L2 entries that dropped these references must
  // be durable before any refcount decrement can reach the disk.
  COWTAP_RETURN_IF_ERROR(l2_cache_->FlushDirty());
  COWTAP_RETURN_IF_ERROR(file_->Flush());
  // The references are gone and their remap entries invalidated; fast-path
  // I/O that looked them up earlier may still be in flight, so the clusters
  // become free only once that epoch drained (usually at once).
  free_waiting_.insert(free_waiting_.end(), host_clusters->begin(), host_clusters->end());
  host_clusters->clear();
  return ReclaimFrees();
}

Status Qcow2Image::ReclaimFrees() {
  for (int round = 0; round < 2; ++round) {
    if (!free_flipped_.empty()) {
      if (!gate_.Drained(flipped_index_)) {
        if (!flipped_counted_) counters_.deferred_frees.fetch_add(free_flipped_.size(), std::memory_order_relaxed);
        flipped_counted_ = true;
        return Status::Ok();
      }
      COWTAP_RETURN_IF_ERROR(ApplyFrees(&free_flipped_));
    }
    if (free_waiting_.empty()) return Status::Ok();
    flipped_index_ = gate_.Flip();
    flipped_counted_ = false;
    free_flipped_.swap(free_waiting_);
  }
  return Status::Ok();
}

Status Qcow2Image::ApplyFrees(std::vector<uint64_t>* host_clusters) {
  std::sort(host_clusters->begin(), host_clusters->end());
  std::vector<uint64_t> todo;
  todo.swap(*host_clusters);
  for (uint64_t c : todo) {
    COWTAP_RETURN_IF_ERROR(refcounts_->Add(c, -1));
    COWTAP_ASSIGN_OR_RETURN(uint64_t rc, refcounts_->Get(c));
    if (rc == 0) file_->PunchHole(c * cluster_size_, cluster_size_).IgnoreError();
  }
  return Status::Ok();
}

Status Qcow2Image::FlushLocked() {
  if (info_.read_only || !refcounts_) return Status::Ok();
  COWTAP_RETURN_IF_ERROR(ReclaimFrees());
  // Dependency order: refcount blocks, flush, L2 slices, flush.
  COWTAP_RETURN_IF_ERROR(SatisfyRefcountDependency());
  COWTAP_RETURN_IF_ERROR(refcounts_->FlushDirty());
  COWTAP_RETURN_IF_ERROR(l2_cache_->FlushDirty());
  if (data_ != file_.get()) COWTAP_RETURN_IF_ERROR(data_->Flush());
  return file_->Flush();
}

Status Qcow2Image::Flush() {
  std::lock_guard lock(mu_);
  if (closed_) return Closed();
  return FlushLocked();
}

Status Qcow2Image::Close() {
  std::lock_guard lock(mu_);
  if (closed_) return Status::Ok();
  Status s = Status::Ok();
  if (refcounts_) {
    // No I/O runs any more (REQUIRES of Close): every deferred free is safe.
    s = ReclaimFrees();
    if (s.ok()) s = ReclaimFrees();
    if (s.ok() && !(free_waiting_.empty() && free_flipped_.empty()))
      spdlog::warn("{}: closed while I/O was in flight; {} clusters left leaked", path_,
                   free_waiting_.size() + free_flipped_.size());
  }
  if (s.ok()) s = FlushLocked();
  if (s.ok() && dirty_set_by_us_) {
    // Lazy refcounts: every refcount is now on disk, so the image is clean.
    uint64_t f = h_.incompatible_features & ~kQcow2IncompatDirty;
    s = WriteHeaderField(kQcow2OffIncompatible, f);
    if (s.ok()) {
      h_.incompatible_features = f;
      dirty_set_by_us_ = false;
      info_.dirty = false;
    }
  }
  if (s.ok() && !info_.read_only && refcounts_) {
    // Give back the space reserved ahead of use: cut the file at the end of
    // the last cluster in use (truncating also frees blocks reserved past
    // EOF by older versions; a punch would not, file systems clamp it).
    uint64_t used = file_size_;
    used = std::max(used, refcounts_->table_offset() + uint64_t{refcounts_->table_clusters()} * cluster_size_);
    for (uint64_t block : refcounts_->table())
      if (block) used = std::max(used, block + cluster_size_);
    auto size = file_->Size();
    if (size.ok() && (used < *size || prealloc_end_ > *size)) file_->Truncate(std::min(used, *size)).IgnoreError();
  }
  closed_ = true;
  return s;
}

Status Qcow2Image::RebuildRefcounts() {
  // Refcounts of a dirty image may be anything: recompute them from the
  // metadata, then write every difference before the first allocation.
  COWTAP_ASSIGN_OR_RETURN(uint64_t file_size, file_->Size());
  COWTAP_ASSIGN_OR_RETURN(Qcow2RefScan scan,
                          ScanQcow2References(*file_, h_, snapshots_, refcounts_->table(), file_size, path_));
  if (scan.corruptions)
    return Status::Corrupt(path_ + ": the image is dirty and its metadata is damaged (" + scan.messages.front() +
                           "); run `qemu-img check -r all`");
  const uint64_t n = std::max<uint64_t>(scan.refs.size(), DivRoundUp(file_size, cluster_size_));
  // New refcount blocks must not land on referenced clusters whose refcount
  // is still wrong: allocate only past everything referenced.
  refcounts_->set_allocation_floor(std::max<uint64_t>(scan.refs.size(), DivRoundUp(file_size, cluster_size_)));
  for (uint64_t c = 0; c < n; ++c) {
    uint64_t want = c < scan.refs.size() ? scan.refs[c] : 0;
    COWTAP_ASSIGN_OR_RETURN(uint64_t have, refcounts_->Get(c));
    if (have != want) COWTAP_RETURN_IF_ERROR(refcounts_->Set(c, want));
  }
  refcounts_->set_allocation_floor(0);
  COWTAP_RETURN_IF_ERROR(refcounts_->FlushDirty());
  COWTAP_RETURN_IF_ERROR(file_->Flush());
  uint64_t f = h_.incompatible_features & ~kQcow2IncompatDirty;
  COWTAP_RETURN_IF_ERROR(WriteHeaderField(kQcow2OffIncompatible, f));
  h_.incompatible_features = f;
  info_.dirty = false;
  spdlog::info("{}: dirty image: refcounts rebuilt", path_);
  return Status::Ok();
}

Result<std::unique_ptr<Image>> OpenQcow2Image(std::unique_ptr<File> file, const std::string& path,
                                              const OpenOptions& options, const BackingOpener& open_backing) {
  COWTAP_ASSIGN_OR_RETURN(auto img, Qcow2Image::Open(std::move(file), path, options, open_backing));
  return std::unique_ptr<Image>(std::move(img));
}

}  // namespace cowtap::cow
