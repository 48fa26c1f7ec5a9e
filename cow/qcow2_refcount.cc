// Refcount lookups, updates and cluster allocation. New refcount blocks are
// self-describing (they count their own cluster); a grown table is placed at
// the end of the file together with the blocks needed to cover itself.
#include "cow/qcow2_refcount.h"

#include <algorithm>

#include "base/checked_math.h"
#include "base/endian.h"
#include "cow/qcow2_format.h"

namespace cowtap::cow {
namespace {

// How far past the end of the file (or the allocation hint) the search for
// a free cluster goes through clusters said to be in use before it calls
// the refcounts corrupt. Real images have at most a crash's worth of leaked
// clusters there.
constexpr uint64_t kMaxInUseBeyondEof = uint64_t{1} << 16;

}  // namespace

Qcow2Refcounts::Qcow2Refcounts(File* file, std::string path, const Geometry& geometry, uint64_t cache_entries)
    : file_(file),
      path_(std::move(path)),
      geometry_(geometry),
      block_entries_((1ull << geometry.cluster_bits) * 8 >> geometry.refcount_order),
      cache_(file, 1ull << geometry.cluster_bits, cache_entries,
             [file](uint64_t off, std::span<const uint8_t> b) { return file->WriteAt(off, b); }) {}

Result<std::unique_ptr<Qcow2Refcounts>> Qcow2Refcounts::Load(File* file, const std::string& path, const Geometry& g,
                                                             uint64_t cache_bytes) {
  const uint64_t cs = 1ull << g.cluster_bits;
  uint64_t entries = std::max<uint64_t>(4, cache_bytes / cs);
  std::unique_ptr<Qcow2Refcounts> r(new Qcow2Refcounts(file, path, g, entries));
  COWTAP_ASSIGN_OR_RETURN(uint64_t file_size, file->Size());
  std::vector<uint8_t> raw(uint64_t{g.table_clusters} * cs);
  COWTAP_RETURN_IF_ERROR(file->ReadAt(g.table_offset, raw));
  r->table_.resize(raw.size() / 8);
  for (size_t i = 0; i < r->table_.size(); ++i) {
    uint64_t e = LoadBe64(&raw[i * 8]);
    uint64_t at = g.table_offset + i * 8;
    if (e != 0 && ((e & (cs - 1)) != 0 || e >= kQcow2MaxHostOffset || e >= file_size))
      return Status::Corrupt(path + ": refcount table entry " + std::to_string(i) + " at offset " + std::to_string(at) +
                             " points to " + std::to_string(e) +
                             ", which is misaligned or beyond the end of the file; run `qemu-img check -r all`");
    r->table_[i] = e;
  }
  return r;
}

Result<uint8_t*> Qcow2Refcounts::Block(uint64_t block_index) { return cache_.Get(table_[block_index]); }

Result<uint64_t> Qcow2Refcounts::Get(uint64_t cluster_index) {
  uint64_t bi = cluster_index / block_entries_;
  if (bi >= table_.size() || table_[bi] == 0) return uint64_t{0};
  COWTAP_ASSIGN_OR_RETURN(uint8_t * b, Block(bi));
  return GetQcow2Refcount({b, cluster_size()}, cluster_index % block_entries_, geometry_.refcount_order);
}

Status Qcow2Refcounts::Set(uint64_t cluster_index, uint64_t value) {
  if (value > Qcow2MaxRefcount(geometry_.refcount_order))
    return Status::OutOfRange(path_ + ": refcount " + std::to_string(value) + " of cluster " +
                              std::to_string(cluster_index) + " does not fit in " +
                              std::to_string(1u << geometry_.refcount_order) + "-bit refcounts");
  uint64_t bi = cluster_index / block_entries_;
  if (bi >= table_.size() || table_[bi] == 0) {
    if (value == 0) return Status::Ok();
    // Put the new block on a cluster of its own range other than the one
    // being set, at or above the allocation floor.
    uint64_t first = bi * block_entries_;
    uint64_t pick = std::max(first, floor_);
    if (pick == cluster_index) ++pick;
    if (pick >= first + block_entries_)
      return Status::NotSupported(path_ + ": cannot place a refcount block for cluster " +
                                  std::to_string(cluster_index) + "; run `qemu-img check -r all`");
    COWTAP_RETURN_IF_ERROR(EnsureBlock(bi, pick));
  }
  COWTAP_ASSIGN_OR_RETURN(uint8_t * b, Block(bi));
  SetQcow2Refcount({b, cluster_size()}, cluster_index % block_entries_, geometry_.refcount_order, value);
  cache_.MarkDirty(table_[bi]);
  if (value == 0 && cluster_index < free_hint_) free_hint_ = cluster_index;
  return Status::Ok();
}

Status Qcow2Refcounts::Add(uint64_t cluster_index, int64_t delta) {
  COWTAP_ASSIGN_OR_RETURN(uint64_t cur, Get(cluster_index));
  if (delta < 0 && cur < static_cast<uint64_t>(-delta))
    return Status::Corrupt(path_ + ": refcount of cluster at offset " +
                           std::to_string(cluster_index << geometry_.cluster_bits) +
                           " would drop below zero; run `qemu-img check -r all`");
  uint64_t next = cur + static_cast<uint64_t>(delta);
  if (delta > 0 && (next < cur || next > Qcow2MaxRefcount(geometry_.refcount_order)))
    return Status::OutOfRange(path_ + ": refcount overflow for cluster at offset " +
                              std::to_string(cluster_index << geometry_.cluster_bits) +
                              " (refcount_bits=" + std::to_string(1u << geometry_.refcount_order) + ")");
  return Set(cluster_index, next);
}

Result<std::pair<uint64_t, uint64_t>> Qcow2Refcounts::AllocateRun(uint64_t max_count) {
  const uint64_t max_cluster = kQcow2MaxHostOffset >> geometry_.cluster_bits;
  if (max_count == 0) return Status::Internal("AllocateRun(0)");
  auto covered = [&](uint64_t c) {
    uint64_t bi = c / block_entries_;
    return bi < table_.size() && table_[bi] != 0;
  };
  // Every cluster in use lies inside the file, except the few a crash
  // leaked between an allocation's refcount update and its first write. A
  // search that runs far past the end of the file through clusters said to
  // be in use is following refcounts a hostile or broken image made up: it
  // stops there, instead of walking up to 2^56 bytes' worth of them.
  COWTAP_ASSIGN_OR_RETURN(uint64_t file_size, file_->Size());
  const uint64_t file_clusters = DivRoundUp(file_size, cluster_size());
  while (true) {
    const uint64_t start = std::max(free_hint_, floor_);
    const uint64_t scan_limit = std::max(start, file_clusters) + kMaxInUseBeyondEof;
    uint64_t c = start;
    while (true) {
      if (c >= max_cluster) return Status::NoSpace(path_ + ": no free cluster below 2^56 bytes (image is full)");
      if (c >= scan_limit)
        return Status::Corrupt(path_ + ": refcounts claim every cluster up to offset " +
                               std::to_string(c << geometry_.cluster_bits) + " in use, far past the end of the file (" +
                               std::to_string(file_size) + " bytes); run `qemu-img check -r all` on it");
      COWTAP_ASSIGN_OR_RETURN(uint64_t rc, Get(c));
      if (rc == 0) break;
      ++c;
    }
    if (HoldsOwnMetadata(c)) return MetadataClaimedFree(c);
    if (!covered(c)) {
      // The block takes cluster c itself (it describes its own range).
      COWTAP_RETURN_IF_ERROR(EnsureBlock(c / block_entries_, c));
      continue;
    }
    uint64_t run = 1;
    // A run stops where refcount blocks are missing: new blocks would land
    // inside it, so contiguity there is not worth the extra metadata writes.
    while (run < max_count && c + run < max_cluster && covered(c + run)) {
      COWTAP_ASSIGN_OR_RETURN(uint64_t rc, Get(c + run));
      if (rc != 0 || HoldsOwnMetadata(c + run)) break;
      ++run;
    }
    for (uint64_t i = 0; i < run; ++i) COWTAP_RETURN_IF_ERROR(Set(c + i, 1));
    // Every cluster in [start, c) was just seen in use: the next search may
    // begin after this run (the hint moves back down when a cluster is freed).
    if (start == free_hint_) free_hint_ = c + run;
    return std::make_pair(c << geometry_.cluster_bits, run);
  }
}

Result<uint64_t> Qcow2Refcounts::Allocate(uint64_t count) {
  COWTAP_ASSIGN_OR_RETURN(auto got, AllocateRun(count));
  if (got.second == count) return got.first;
  const uint64_t first = got.first >> geometry_.cluster_bits;
  for (uint64_t i = 0; i < got.second; ++i) COWTAP_RETURN_IF_ERROR(Set(first + i, 0));
  return Status::Internal(path_ + ": no contiguous run of " + std::to_string(count) + " clusters; use AllocateRun");
}

Status Qcow2Refcounts::EnsureBlock(uint64_t block_index, uint64_t preferred_cluster) {
  if (block_index >= table_.size()) COWTAP_RETURN_IF_ERROR(GrowTable(block_index));
  if (table_[block_index] != 0) return Status::Ok();
  // Place the block inside the range it describes, so it counts itself.
  uint64_t first = block_index * block_entries_;
  uint64_t cluster = preferred_cluster;
  if (cluster < first || cluster >= first + block_entries_) cluster = first;
  if (HoldsOwnMetadata(cluster)) return MetadataClaimedFree(cluster);
  const uint64_t off = cluster << geometry_.cluster_bits;
  if (off >= kQcow2MaxHostOffset) return Status::NoSpace(path_ + ": refcount block would lie beyond 2^56 bytes");
  cache_.Drop(off);
  COWTAP_ASSIGN_OR_RETURN(uint8_t * b, cache_.GetZeroed(off));
  SetQcow2Refcount({b, cluster_size()}, cluster - first, geometry_.refcount_order, 1);
  COWTAP_RETURN_IF_ERROR(file_->WriteAt(off, {b, cluster_size()}));
  // The block must be on disk before the table entry that points to it.
  COWTAP_RETURN_IF_ERROR(file_->Flush());
  uint8_t be[8];
  StoreBe64(be, off);
  COWTAP_RETURN_IF_ERROR(file_->WriteAt(geometry_.table_offset + block_index * 8, be));
  table_[block_index] = off;
  return Status::Ok();
}

bool Qcow2Refcounts::HoldsOwnMetadata(uint64_t cluster_index) const {
  if (cluster_index == 0) return true;  // the header
  const uint64_t table_first = geometry_.table_offset >> geometry_.cluster_bits;
  return cluster_index >= table_first && cluster_index - table_first < geometry_.table_clusters;
}

Status Qcow2Refcounts::MetadataClaimedFree(uint64_t cluster_index) const {
  return Status::Corrupt(path_ + ": the cluster at offset " + std::to_string(cluster_index << geometry_.cluster_bits) +
                         " holds the image header or refcount table, yet its refcount is 0; the refcounts are "
                         "corrupt: run `qemu-img check -r all` on the image");
}

Status Qcow2Refcounts::GrowTable(uint64_t block_index) {
  const uint64_t cs = cluster_size();
  const uint64_t old_entries = table_.size();
  COWTAP_ASSIGN_OR_RETURN(uint64_t file_size, file_->Size());
  uint64_t start = std::max(DivRoundUp(file_size, cs), floor_);
  uint64_t new_entries = std::max(block_index + 1, old_entries + old_entries / 2 + 1);
  uint64_t table_clusters = 0;
  std::vector<uint64_t> new_blocks;  // block indices that get a new block
  while (true) {
    table_clusters = DivRoundUp(new_entries * 8, cs);
    if (table_clusters * cs > kQcow2MaxRefcountTableBytes)
      return Status::NoSpace(path_ + ": the refcount table would exceed 8 MiB (image too large for cluster size " +
                             std::to_string(cs) + ")");
    new_entries = table_clusters * cs / 8;
    // Blocks needed to cover the table and the blocks themselves.
    uint64_t k = 0;
    while (true) {
      new_blocks.clear();
      uint64_t end = start + table_clusters + k;
      for (uint64_t bi = start / block_entries_; bi <= (end - 1) / block_entries_; ++bi)
        if (bi >= old_entries || table_[bi] == 0) new_blocks.push_back(bi);
      if (new_blocks.size() == k) break;
      k = new_blocks.size();
    }
    if (!new_blocks.empty() && new_blocks.back() >= new_entries) {
      new_entries = new_blocks.back() + 1;
      continue;
    }
    // The chosen area must be free where existing blocks describe it.
    bool busy = false;
    for (uint64_t c = start; c < start + table_clusters + k && !busy; ++c) {
      COWTAP_ASSIGN_OR_RETURN(uint64_t rc, Get(c));
      if (rc != 0) {
        start = c + 1;
        busy = true;
      }
    }
    if (!busy) break;
  }
  const uint64_t k = new_blocks.size();
  std::vector<uint64_t> table = table_;
  table.resize(new_entries, 0);
  std::vector<std::vector<uint8_t>> blocks(k, std::vector<uint8_t>(cs, 0));
  for (uint64_t j = 0; j < k; ++j) table[new_blocks[j]] = (start + table_clusters + j) * cs;
  for (uint64_t c = start; c < start + table_clusters + k; ++c) {
    uint64_t bi = c / block_entries_;
    auto it = std::find(new_blocks.begin(), new_blocks.end(), bi);
    if (it != new_blocks.end()) {
      SetQcow2Refcount(blocks[it - new_blocks.begin()], c % block_entries_, geometry_.refcount_order, 1);
    } else {
      COWTAP_ASSIGN_OR_RETURN(uint8_t * b, Block(bi));
      SetQcow2Refcount({b, cs}, c % block_entries_, geometry_.refcount_order, 1);
      cache_.MarkDirty(table_[bi]);
    }
  }
  for (uint64_t j = 0; j < k; ++j) {
    cache_.Drop(table[new_blocks[j]]);
    COWTAP_RETURN_IF_ERROR(file_->WriteAt(table[new_blocks[j]], blocks[j]));
  }
  std::vector<uint8_t> raw(table_clusters * cs, 0);
  for (uint64_t i = 0; i < table.size(); ++i) StoreBe64(&raw[i * 8], table[i]);
  COWTAP_RETURN_IF_ERROR(file_->WriteAt(start * cs, raw));
  COWTAP_RETURN_IF_ERROR(cache_.FlushDirty());
  // New table and blocks durable before the header points to them.
  COWTAP_RETURN_IF_ERROR(file_->Flush());
  uint8_t hdr[12];
  StoreBe64(hdr, start * cs);
  StoreBe32(hdr + 8, static_cast<uint32_t>(table_clusters));
  COWTAP_RETURN_IF_ERROR(file_->WriteAt(kQcow2OffRefcountTable, hdr));
  COWTAP_RETURN_IF_ERROR(file_->Flush());
  const uint64_t old_offset = geometry_.table_offset;
  const uint64_t old_clusters = geometry_.table_clusters;
  table_ = std::move(table);
  geometry_.table_offset = start * cs;
  geometry_.table_clusters = static_cast<uint32_t>(table_clusters);
  for (uint64_t i = 0; i < old_clusters; ++i) COWTAP_RETURN_IF_ERROR(Add(old_offset / cs + i, -1));
  return Status::Ok();
}

}  // namespace cowtap::cow
