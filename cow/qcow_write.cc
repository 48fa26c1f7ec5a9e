// QcowImage: the write path. Allocation appends; the crash ordering (data,
// then L2 tables, then L1 entries, each behind a flush) is in FlushLocked.
#include <spdlog/spdlog.h>

#include "base/checked_math.h"
#include "base/endian.h"
#include "cow/qcow_image.h"

namespace cowtap::cow {

Result<uint64_t> QcowImage::AllocateLocked(uint64_t bytes) {
  auto start = AlignUp(file_end_, cluster_size_);
  uint64_t end;
  if (!start || !CheckedAdd(*start, bytes, &end) || end >= kQcowCompressedFlag)
    return Status::NoSpace(info_.path + ": qcow file cannot grow past " + std::to_string(file_end_) + " bytes");
  if (end > reserved_end_) {
    // Grow ahead in large steps so appended clusters stay contiguous on disk.
    const uint64_t step = std::max(kQcowGrowStepBytes, end - reserved_end_);
    Status s = file_->Allocate(reserved_end_, step, /*keep_size=*/true);
    if (s.code() == ErrorCode::kNoSpace) return s.Annotate(info_.path + ": growing the qcow file");
    reserved_end_ = s.ok() ? reserved_end_ + step : end;
  }
  file_end_ = end;
  return *start;
}

Status QcowImage::SetEntryLocked(uint64_t ci, uint64_t entry) {
  if (remap_) remap_->Invalidate(ci);
  const uint64_t l1_index = ci >> h_.l2_bits;
  if (l1_[l1_index] == 0) {
    if (entry == 0) return Status::Ok();
    COWTAP_ASSIGN_OR_RETURN(uint64_t table_offset, AllocateLocked(h_.l2_table_bytes()));
    COWTAP_RETURN_IF_ERROR(EvictIfFullLocked());
    cache_.Insert(table_offset, std::vector<uint64_t>(h_.l2_entries(), 0), /*dirty=*/true);
    l1_[l1_index] = table_offset;
    l1_dirty_.insert(l1_index);
  }
  const uint64_t table_offset = l1_[l1_index];
  COWTAP_ASSIGN_OR_RETURN(auto* table, LoadL2Locked(table_offset));
  (*table)[ci & (h_.l2_entries() - 1)] = entry;
  cache_.SetDirty(table_offset, true);
  return Status::Ok();
}

Status QcowImage::FlushLocked() {
  const std::vector<uint64_t> dirty = cache_.DirtyOffsets();
  if (dirty.empty() && l1_dirty_.empty()) return file_->Flush();
  // (1) Data first: every cluster a dirty entry points at is durable.
  COWTAP_RETURN_IF_ERROR(file_->Flush());
  // (2) The L2 tables.
  std::vector<uint8_t> raw(h_.l2_table_bytes());
  for (uint64_t offset : dirty) {
    const std::vector<uint64_t>* t = cache_.Find(offset);
    for (uint64_t i = 0; i < t->size(); ++i) StoreBe64(raw.data() + i * 8, (*t)[i]);
    COWTAP_RETURN_IF_ERROR(file_->WriteAt(offset, raw));
    cache_.SetDirty(offset, false);
  }
  // (3, 4) The tables are durable before any L1 entry points at them.
  if (!l1_dirty_.empty()) {
    COWTAP_RETURN_IF_ERROR(file_->Flush());
    while (!l1_dirty_.empty()) {
      const uint64_t index = *l1_dirty_.begin();
      uint8_t be[8];
      StoreBe64(be, l1_[index]);
      COWTAP_RETURN_IF_ERROR(file_->WriteAt(h_.l1_table_offset + index * 8, be));
      l1_dirty_.erase(l1_dirty_.begin());
    }
  }
  return file_->Flush();
}


Status QcowImage::Write(uint64_t offset, IoVecs iov) {
  COWTAP_RETURN_IF_ERROR(CheckRange(offset, TotalLength(iov), true));
  std::lock_guard lock(mu_);
  return WriteLocked(offset, iov);
}

Status QcowImage::WriteLocked(uint64_t offset, IoVecs iov) {
  if (corrupt_) return CorruptRefusal();
  const uint64_t total = TotalLength(iov);
  // Consecutive guest clusters that need new host clusters are appended
  // back to back, so they are built in one buffer and written in one I/O,
  // then linked into their L2 tables (which may append tables after them).
  uint64_t run_host = 0;
  uint64_t run_first_ci = 0;
  std::vector<uint8_t> run;
  auto write_run = [&]() -> Status {
    if (run.empty()) return Status::Ok();
    Status s = file_->WriteAt(run_host, run);
    const uint64_t count = run.size() / cluster_size_;
    run.clear();
    COWTAP_RETURN_IF_ERROR(s);
    for (uint64_t i = 0; i < count; ++i)
      COWTAP_RETURN_IF_ERROR(SetEntryLocked(run_first_ci + i, run_host + i * cluster_size_));
    return Status::Ok();
  };
  std::vector<iovec> part;
  uint64_t pos = 0;
  while (pos < total) {
    const uint64_t guest = offset + pos;
    const uint64_t ci = guest / cluster_size_;
    const uint64_t in = guest % cluster_size_;
    const uint64_t n = std::min(cluster_size_ - in, total - pos);
    COWTAP_ASSIGN_OR_RETURN(QcowCluster c, LookupLocked(ci));
    if (c.kind == QcowCluster::kNormal) {
      part.clear();
      SliceIoVecs(iov, pos, n, &part);
      COWTAP_RETURN_IF_ERROR(file_->WritevAt(c.host_offset + in, part));
      pos += n;
      continue;
    }
    const uint64_t run_clusters = run.size() / cluster_size_;
    if (!run.empty() && (run_first_ci + run_clusters != ci || run.size() + cluster_size_ > kQcowMaxRunBytes))
      COWTAP_RETURN_IF_ERROR(write_run());
    COWTAP_ASSIGN_OR_RETURN(uint64_t host, AllocateLocked(cluster_size_));
    if (!run.empty() && host != run_host + run.size()) COWTAP_RETURN_IF_ERROR(write_run());
    if (run.empty()) {
      run_host = host;
      run_first_ci = ci;
    }
    const uint64_t at = run.size();
    run.resize(at + cluster_size_);
    std::span<uint8_t> cluster(run.data() + at, cluster_size_);
    // Copy-up: the bytes of the cluster the guest does not overwrite come
    // from what the cluster reads as now (backing chain or compressed data).
    if (n != cluster_size_) COWTAP_RETURN_IF_ERROR(ReadClusterForCopy(ci, c, cluster));
    CopyFromIoVecs(iov, pos, cluster.data() + in, n);
    pos += n;
  }
  return write_run();
}

Status QcowImage::AllocateZeroClusterLocked(uint64_t ci) {
  COWTAP_ASSIGN_OR_RETURN(uint64_t host, AllocateLocked(cluster_size_));
  const std::vector<uint8_t> zeros(cluster_size_, 0);
  COWTAP_RETURN_IF_ERROR(file_->WriteAt(host, zeros));
  return SetEntryLocked(ci, host);
}

Status QcowImage::Zero(uint64_t offset, uint64_t length, bool may_unmap, bool partial) {
  COWTAP_RETURN_IF_ERROR(CheckRange(offset, length, true));
  std::lock_guard lock(mu_);
  if (corrupt_) return CorruptRefusal();
  const uint64_t backing_size = backing_ ? backing_->size_bytes() : 0;
  const uint64_t l1_span = h_.l1_entry_span();
  uint64_t pos = 0;
  while (pos < length) {
    const uint64_t guest = offset + pos;
    const uint64_t ci = guest / cluster_size_;
    const uint64_t in = guest % cluster_size_;
    const uint64_t n = std::min(cluster_size_ - in, length - pos);
    // No L2 table and nothing below: the whole table's span already reads
    // as zeros.
    if (l1_[ci >> h_.l2_bits] == 0 && guest >= backing_size) {
      pos = std::min(length, (guest / l1_span + 1) * l1_span - offset);
      continue;
    }
    const bool full = in == 0 && (n == cluster_size_ || guest + n == info_.size_bytes);
    if (!full) {
      if (partial) {
        const std::vector<uint8_t> zeros(n, 0);
        iovec v = MakeIoVec(zeros.data(), n);
        COWTAP_RETURN_IF_ERROR(WriteLocked(guest, IoVecs(&v, 1)));
      }
      pos += n;
      continue;
    }
    COWTAP_ASSIGN_OR_RETURN(QcowCluster c, LookupLocked(ci));
    const bool backing_data = guest < backing_size;
    const bool keep = !may_unmap || backing_data;
    switch (c.kind) {
      case QcowCluster::kNormal:
        if (keep) {
          const std::vector<uint8_t> zeros(cluster_size_, 0);
          COWTAP_RETURN_IF_ERROR(file_->WriteAt(c.host_offset, zeros));
        } else {
          COWTAP_RETURN_IF_ERROR(SetEntryLocked(ci, 0));
          // Returning the space is best effort: the cluster is unreachable
          // once the table is written, and reads zeros even if it is not.
          file_->PunchHole(c.host_offset, cluster_size_).IgnoreError();
        }
        break;
      case QcowCluster::kCompressed:
        COWTAP_RETURN_IF_ERROR(keep ? AllocateZeroClusterLocked(ci) : SetEntryLocked(ci, 0));
        break;
      case QcowCluster::kUnallocated:
        if (backing_data) COWTAP_RETURN_IF_ERROR(AllocateZeroClusterLocked(ci));
        break;
    }
    pos += n;
  }
  return Status::Ok();
}

}  // namespace cowtap::cow
