// Qcow2Image guest I/O: cluster lookup (remap cache, then L1 -> L2 slice),
// reads through every cluster state, allocating writes with merged
// copy-on-write. Discard / write-zeroes are in qcow2_zero.cc, Map() in
// qcow2_map.cc.
#include <algorithm>
#include <cstring>

#include "base/checked_math.h"
#include "base/endian.h"
#include "cow/qcow2_image.h"

namespace cowtap::cow {
namespace {

std::string Hex(uint64_t v) {
  char buf[24];
  snprintf(buf, sizeof(buf), "0x%llx", static_cast<unsigned long long>(v));
  return buf;
}

bool AllZero(const std::vector<uint8_t>& b) {
  return std::all_of(b.begin(), b.end(), [](uint8_t x) { return x == 0; });
}

std::vector<iovec> Slice(IoVecs iov, uint64_t offset, uint64_t length) {
  std::vector<iovec> out;
  SliceIoVecs(iov, offset, length, &out);
  return out;
}

// Coalesces pieces of a request that are contiguous in the host file into
// one vectored I/O (bounded so that preadv/pwritev stay under IOV_MAX).
class HostRun {
 public:
  HostRun(File* file, bool write) : file_(file), write_(write) {}
  Status Add(uint64_t host, IoVecs iov, uint64_t length) {
    if (length_ && (host_ + length_ != host || iov_.size() + iov.size() > 512)) COWTAP_RETURN_IF_ERROR(Flush());
    if (!length_) host_ = host;
    iov_.insert(iov_.end(), iov.begin(), iov.end());
    length_ += length;
    return Status::Ok();
  }
  Status Flush() {
    if (!length_) return Status::Ok();
    Status s = write_ ? file_->WritevAt(host_, iov_) : file_->ReadvAt(host_, iov_);
    iov_.clear();
    length_ = 0;
    return s;
  }

 private:
  File* file_;
  bool write_;
  uint64_t host_ = 0;
  uint64_t length_ = 0;
  std::vector<iovec> iov_;
};

uint32_t SubMask(uint64_t first, uint64_t end) {
  uint64_t m = (end >= 32 ? ~0ull : (1ull << end) - 1) & ~((1ull << first) - 1);
  return static_cast<uint32_t>(m);
}

}  // namespace

Result<Qcow2Image::ClusterRef> Qcow2Image::LookupCluster(uint64_t vcluster) {
  ClusterRef r;
  r.vcluster = vcluster;
  const uint64_t l1i = vcluster / h_.l2_entries();
  if (l1i >= l1_.size()) return r;
  COWTAP_ASSIGN_OR_RETURN(uint64_t l2off, DecodeQcow2L1Entry(l1_[l1i], h_, l1_offset_ + l1i * 8, path_));
  if (l2off == 0) return r;
  if (!RangeWithin(l2off, cluster_size_, file_size_))
    return Status::Corrupt(path_ + ": L2 table at offset " + Hex(l2off) + " (L1 index " + std::to_string(l1i) +
                           ") lies beyond the end of the file; run `qemu-img check`");
  const uint64_t eb = h_.l2_entry_bytes();
  const uint64_t byte = (vcluster % h_.l2_entries()) * eb;
  const uint64_t slice = l2_cache_->entry_bytes();
  r.has_l2 = true;
  r.slice_offset = l2off + byte / slice * slice;
  r.index = (byte % slice) / eb;
  r.entry_offset = l2off + byte;
  COWTAP_ASSIGN_OR_RETURN(uint8_t * p, l2_cache_->Get(r.slice_offset));
  r.entry.raw = LoadBe64(p + r.index * eb);
  if (eb == 16) r.entry.bitmap = LoadBe64(p + r.index * eb + 8);
  const bool data_file = data_ != file_.get();
  COWTAP_ASSIGN_OR_RETURN(r.type, ClassifyQcow2L2Entry(r.entry, h_, data_file, r.entry_offset, path_));
  if (r.type == Qcow2ClusterType::kCompressed) {
    auto d = DecodeQcow2Compressed(r.entry.raw, h_.cluster_bits);
    if (d.host_offset >= file_size_)
      return Status::Corrupt(path_ + ": compressed cluster at " + Hex(d.host_offset) + " (L2 entry at " +
                             Hex(r.entry_offset) + ") lies beyond the end of the file");
  } else if ((r.type == Qcow2ClusterType::kNormal || r.type == Qcow2ClusterType::kZeroAlloc) && !data_file) {
    uint64_t host = r.entry.raw & kQcow2OffsetMask;
    if (host >= file_size_)
      return Status::Corrupt(path_ + ": data cluster at " + Hex(host) + " (L2 entry at " + Hex(r.entry_offset) +
                             ") lies beyond the end of the file; run `qemu-img check`");
    if (host == 0) return Status::Corrupt(path_ + ": L2 entry at " + Hex(r.entry_offset) + " points at the header");
  }
  return r;
}

Status Qcow2Image::SetL2Entry(const ClusterRef& ref, uint64_t raw, uint64_t bitmap) {
  COWTAP_ASSIGN_OR_RETURN(uint8_t * p, l2_cache_->Get(ref.slice_offset));
  const uint64_t eb = h_.l2_entry_bytes();
  StoreBe64(p + ref.index * eb, raw);
  if (eb == 16) StoreBe64(p + ref.index * eb + 8, bitmap);
  l2_cache_->MarkDirty(ref.slice_offset);
  InvalidateRemap(ref.vcluster);
  return Status::Ok();
}

Result<Qcow2Image::ClusterRef> Qcow2Image::LookupClusterForWrite(uint64_t vcluster) {
  const uint64_t l1i = vcluster / h_.l2_entries();
  if (l1i >= l1_.size()) return Status::Internal(path_ + ": cluster beyond the L1 table");
  COWTAP_ASSIGN_OR_RETURN(uint64_t old, DecodeQcow2L1Entry(l1_[l1i], h_, l1_offset_ + l1i * 8, path_));
  if (old != 0 && (l1_[l1i] & kQcow2Copied)) return LookupCluster(vcluster);
  // A new L2 table, or a private copy of one shared with a snapshot.
  std::vector<uint8_t> table(cluster_size_, 0);
  if (old != 0) {
    if (!RangeWithin(old, cluster_size_, file_size_))
      return Status::Corrupt(path_ + ": L2 table at " + Hex(old) + " lies beyond the end of the file");
    COWTAP_RETURN_IF_ERROR(l2_cache_->FlushDirty());
    COWTAP_RETURN_IF_ERROR(file_->ReadAt(old, table));
  }
  COWTAP_ASSIGN_OR_RETURN(auto alloc, AllocateClusters(1));
  const uint64_t off = alloc.first;
  high_water_ = std::max(high_water_, off + cluster_size_);
  for (uint64_t s = 0; s < cluster_size_; s += l2_cache_->entry_bytes()) l2_cache_->Drop(off + s);
  COWTAP_RETURN_IF_ERROR(file_->WriteAt(off, table));
  // The table (and its refcount) must be durable before the L1 entry.
  COWTAP_RETURN_IF_ERROR(SatisfyRefcountDependency());
  COWTAP_RETURN_IF_ERROR(file_->Flush());
  l1_[l1i] = off | kQcow2Copied;
  COWTAP_RETURN_IF_ERROR(WriteL1Entry(l1i));
  InvalidateRemapRange(l1i * h_.l2_entries(), h_.l2_entries());
  if (old != 0) {
    std::vector<uint64_t> free_list{old / cluster_size_};
    COWTAP_RETURN_IF_ERROR(FreeClusters(&free_list));
  }
  return LookupCluster(vcluster);
}

Status Qcow2Image::ReadLocked(uint64_t offset, IoVecs iov) {
  const uint64_t total = TotalLength(iov);
  HostRun run(data_, /*write=*/false);
  uint64_t pos = 0;
  while (pos < total) {
    const uint64_t g = offset + pos;
    const uint64_t vc = g / cluster_size_, in = g % cluster_size_;
    const uint64_t n = std::min(cluster_size_ - in, total - pos);
    std::vector<iovec> sub = Slice(iov, pos, n);
    pos += n;
    if (remap_) {
      if (auto m = RemapLookup(vc)) {
        if (m->flags & Remap::kZero) {
          ZeroIoVecs(sub, 0, n);
        } else if (m->flags & Remap::kBacking) {
          COWTAP_RETURN_IF_ERROR(ReadBacking(g, sub));
        } else {
          COWTAP_RETURN_IF_ERROR(run.Add(m->host_offset + in, sub, n));
        }
        continue;
      }
    }
    COWTAP_ASSIGN_OR_RETURN(ClusterRef ref, LookupCluster(vc));
    if (ref.type == Qcow2ClusterType::kNormal && !h_.extended_l2()) {
      COWTAP_RETURN_IF_ERROR(run.Add((ref.entry.raw & kQcow2OffsetMask) + in, sub, n));
    } else {
      COWTAP_RETURN_IF_ERROR(ReadCluster(ref, in, sub));
    }
    PublishRemap(ref);
  }
  return run.Flush();
}

void Qcow2Image::ReadAheadRemaps(const ClusterRef& ref) {
  if (!remap_ || !ref.has_l2) return;
  const uint64_t vc = ref.vcluster;
  if (vc > 0 && ref.index > 0 && !RemapLookup(vc - 1)) return;
  // The rest of the slice, at most about kReadAheadBytes of guest data.
  constexpr uint64_t kReadAheadBytes = 8ull << 20;
  const uint64_t slice_entries = l2_cache_->entry_bytes() / h_.l2_entry_bytes();
  const uint64_t window = std::clamp<uint64_t>(kReadAheadBytes / cluster_size_, 16, 512);
  const uint64_t clusters = DivRoundUp(info_.size_bytes, cluster_size_);
  if (clusters == 0) return;
  const uint64_t last = std::min({vc + (slice_entries - 1 - ref.index), vc + window, clusters - 1});
  for (uint64_t c = vc + 1; c <= last; ++c) {
    // Same L2 slice: the lookup reads no metadata. A neighbour that does
    // not resolve is left to the read that needs it (and reports it).
    Result<ClusterRef> next = LookupCluster(c);
    if (!next.ok()) return;
    PublishRemap(*next);
  }
}

void Qcow2Image::PublishRemap(const ClusterRef& ref) {
  if (!remap_) return;
  const uint64_t vc = ref.vcluster;
  // Publish whole-cluster states only.
  const bool ext = h_.extended_l2();
  const uint32_t alloc = Qcow2SubAllocMask(ref.entry.bitmap), zero = Qcow2SubZeroMask(ref.entry.bitmap);
  if (ref.type == Qcow2ClusterType::kZeroPlain || ref.type == Qcow2ClusterType::kZeroAlloc) {
    if (!ext || zero == 0xffffffffu) RemapInsert(vc, Remap{0, 0, Remap::kZero});
  } else if (ref.type == Qcow2ClusterType::kUnallocated &&
             (!backing_ || vc * cluster_size_ >= backing_->size_bytes())) {
    if (!ext || zero == 0) RemapInsert(vc, Remap{0, 0, Remap::kZero});
  } else if (ref.type == Qcow2ClusterType::kUnallocated && !ext &&
             (vc + 1) * cluster_size_ <= backing_->size_bytes()) {
    // Resolved through the chain: a raw backing file maps 1:1; a backing
    // image with its own remap cache (same cluster size) says where.
    if (backing_->info().format == ImageFormat::kRaw) {
      RemapInsert(vc, Remap{vc * cluster_size_, 1, Remap::kBacking});
    } else if (backing_->info().cluster_size == cluster_size_) {
      // Under the backing layer's own lock: a base may serve many overlays.
      if (auto m = backing_->LookupRemap(vc); m && m->layer < 0xfffe) {
        uint8_t flags = (m->flags & Remap::kZero) ? Remap::kZero : Remap::kBacking;
        RemapInsert(vc, Remap{m->host_offset, static_cast<uint16_t>(m->layer + 1), flags});
      }
    }
  } else if (ref.type == Qcow2ClusterType::kNormal && data_ == file_.get() && (!ext || alloc == 0xffffffffu)) {
    uint8_t flags = (ref.entry.raw & kQcow2Copied) ? Remap::kWritable : 0;
    RemapInsert(vc, Remap{ref.entry.raw & kQcow2OffsetMask, 0, flags});
  }
}

Status Qcow2Image::ReadBacking(uint64_t offset, IoVecs iov) {
  const uint64_t n = TotalLength(iov);
  uint64_t avail = 0;
  if (backing_ && offset < backing_->size_bytes()) avail = std::min(n, backing_->size_bytes() - offset);
  if (avail) {
    std::vector<iovec> head = Slice(iov, 0, avail);
    COWTAP_RETURN_IF_ERROR(backing_->Read(offset, head));
  }
  if (avail < n) ZeroIoVecs(iov, avail, n - avail);
  return Status::Ok();
}

Status Qcow2Image::ReadCompressed(const ClusterRef& ref, uint64_t in, IoVecs iov) {
  if (decompressed_.size() != cluster_size_ || decompressed_raw_ != ref.entry.raw) {
    auto d = DecodeQcow2Compressed(ref.entry.raw, h_.cluster_bits);
    std::vector<uint8_t> input(d.max_length);
    COWTAP_RETURN_IF_ERROR(file_->ReadAt(d.host_offset, input));
    decompressed_.assign(cluster_size_, 0);
    decompressed_raw_ = 0;
    COWTAP_RETURN_IF_ERROR(DecompressCluster(static_cast<CompressionType>(h_.compression_type), input, decompressed_,
                                             path_ + ": compressed cluster at " + Hex(d.host_offset)));
    decompressed_raw_ = ref.entry.raw;
  }
  CopyToIoVecs(iov, 0, decompressed_.data() + in, TotalLength(iov));
  return Status::Ok();
}

Status Qcow2Image::ReadCluster(const ClusterRef& ref, uint64_t in, IoVecs iov) {
  const uint64_t n = TotalLength(iov);
  const uint64_t g = ref.vcluster * cluster_size_ + in;
  switch (ref.type) {
    case Qcow2ClusterType::kCompressed:
      return ReadCompressed(ref, in, iov);
    case Qcow2ClusterType::kZeroAlloc:
      ZeroIoVecs(iov, 0, n);
      return Status::Ok();
    case Qcow2ClusterType::kUnallocated:
    case Qcow2ClusterType::kZeroPlain:
    case Qcow2ClusterType::kNormal:
      break;
  }
  if (!h_.extended_l2()) {
    if (ref.type == Qcow2ClusterType::kZeroPlain) {
      ZeroIoVecs(iov, 0, n);
      return Status::Ok();
    }
    if (ref.type == Qcow2ClusterType::kUnallocated) return ReadBacking(g, iov);
    return data_->ReadvAt((ref.entry.raw & kQcow2OffsetMask) + in, iov);
  }
  // Extended L2: each subcluster is allocated, zero, or reads the backing.
  const uint64_t sc = cluster_size_ / 32;
  const uint32_t alloc = Qcow2SubAllocMask(ref.entry.bitmap), zero = Qcow2SubZeroMask(ref.entry.bitmap);
  const bool has_host = ref.type == Qcow2ClusterType::kNormal;
  auto state = [&](uint64_t i) { return (has_host && (alloc >> i & 1)) ? 1 : (zero >> i & 1) ? 2 : 0; };
  uint64_t pos = 0;
  while (pos < n) {
    uint64_t i = (in + pos) / sc;
    int st = state(i);
    uint64_t end = std::min(n, (i + 1) * sc - in);
    while (end < n && state((in + end) / sc) == st) end = std::min(n, ((in + end) / sc + 1) * sc - in);
    std::vector<iovec> sub = Slice(iov, pos, end - pos);
    if (st == 1) {
      COWTAP_RETURN_IF_ERROR(data_->ReadvAt((ref.entry.raw & kQcow2OffsetMask) + in + pos, sub));
    } else if (st == 2) {
      ZeroIoVecs(sub, 0, end - pos);
    } else {
      COWTAP_RETURN_IF_ERROR(ReadBacking(g + pos, sub));
    }
    pos = end;
  }
  return Status::Ok();
}

Status Qcow2Image::WriteLocked(uint64_t offset, IoVecs iov) {
  const uint64_t total = TotalLength(iov);
  const bool data_file = data_ != file_.get();
  uint64_t pos = 0;
  auto in_place = [&](const ClusterRef& r) {
    return r.type == Qcow2ClusterType::kNormal && (data_file || (r.entry.raw & kQcow2Copied));
  };
  HostRun run(data_, /*write=*/true);
  while (pos < total) {
    const uint64_t g = offset + pos;
    const uint64_t vc = g / cluster_size_, in = g % cluster_size_;
    uint64_t n = std::min(cluster_size_ - in, total - pos);
    std::optional<uint64_t> host;
    if (auto m = RemapLookup(vc); m && (m->flags & Remap::kWritable)) host = m->host_offset;
    if (!host) {
      COWTAP_ASSIGN_OR_RETURN(ClusterRef ref, LookupCluster(vc));
      if (in_place(ref)) host = ref.entry.raw & kQcow2OffsetMask;
    }
    if (host) {
      std::vector<iovec> sub = Slice(iov, pos, n);
      COWTAP_RETURN_IF_ERROR(run.Add(*host + in, sub, n));
      pos += n;
      continue;
    }
    // A run of clusters that all need allocation: one contiguous allocation
    // and one write.
    uint64_t k = 1;
    while (pos + n < total && k < 256) {
      uint64_t next = std::min(cluster_size_, total - pos - n);
      COWTAP_ASSIGN_OR_RETURN(ClusterRef r2, LookupCluster(vc + k));
      if (in_place(r2)) break;
      n += next;
      ++k;
    }
    COWTAP_ASSIGN_OR_RETURN(uint64_t done, WriteClusterRun(g, Slice(iov, pos, n), k));
    pos += done;
  }
  return run.Flush();
}

Result<uint64_t> Qcow2Image::WriteClusterRun(uint64_t g, IoVecs data_in, uint64_t k) {
  const uint64_t vc = g / cluster_size_;
  const uint64_t start = vc * cluster_size_;
  const bool data_file = data_ != file_.get();
  std::vector<ClusterRef> refs;
  for (uint64_t i = 0; i < k; ++i) {
    COWTAP_ASSIGN_OR_RETURN(ClusterRef r, LookupClusterForWrite(vc + i));
    refs.push_back(r);
  }
  uint64_t host;
  bool fresh = false;
  if (data_file) {
    host = start;
  } else if (refs[0].type == Qcow2ClusterType::kZeroAlloc && (refs[0].entry.raw & kQcow2Copied)) {
    host = refs[0].entry.raw & kQcow2OffsetMask;  // preallocated zero cluster: reuse it
    k = 1;
  } else {
    COWTAP_ASSIGN_OR_RETURN(auto got, AllocateClusters(k));
    host = got.first;
    k = got.second;
    fresh = IsFresh(host);
    high_water_ = std::max(high_water_, host + k * cluster_size_);
  }
  const uint64_t run_end = start + k * cluster_size_;
  const uint64_t len = std::min<uint64_t>(TotalLength(data_in), run_end - g);
  std::vector<iovec> data = Slice(data_in, 0, len);
  const uint64_t end = g + len;
  // Copy-on-write areas: what the guest sees there now.
  std::vector<uint8_t> head(g - start), tail(run_end - end);
  if (!head.empty()) COWTAP_RETURN_IF_ERROR(ReadLocked(start, std::vector<iovec>{MakeIoVec(head.data(), head.size())}));
  if (!tail.empty()) {
    uint64_t avail = end < info_.size_bytes ? std::min<uint64_t>(tail.size(), info_.size_bytes - end) : 0;
    if (avail) COWTAP_RETURN_IF_ERROR(ReadLocked(end, std::vector<iovec>{MakeIoVec(tail.data(), avail)}));
  }
  // Skip zero COW areas on a cluster that already reads as zeros.
  const bool skip_head = fresh && AllZero(head), skip_tail = fresh && AllZero(tail);
  std::vector<iovec> io;
  if (!skip_head && !head.empty()) io.push_back(MakeIoVec(head.data(), head.size()));
  io.insert(io.end(), data.begin(), data.end());
  if (!skip_tail && !tail.empty()) io.push_back(MakeIoVec(tail.data(), tail.size()));
  COWTAP_RETURN_IF_ERROR(data_->WritevAt(host + (skip_head ? head.size() : 0), io));
  std::vector<uint64_t> to_free;
  for (uint64_t i = 0; i < k; ++i) {
    const ClusterRef& r = refs[i];
    if (!data_file) {
      if (r.type == Qcow2ClusterType::kCompressed) {
        auto d = DecodeQcow2Compressed(r.entry.raw, h_.cluster_bits);
        for (uint64_t c = d.host_offset / cluster_size_; c <= (d.host_offset + d.max_length - 1) / cluster_size_; ++c)
          to_free.push_back(c);
      } else if ((r.type == Qcow2ClusterType::kNormal || r.type == Qcow2ClusterType::kZeroAlloc) &&
                 (r.entry.raw & kQcow2OffsetMask) != host + i * cluster_size_) {
        to_free.push_back((r.entry.raw & kQcow2OffsetMask) / cluster_size_);
      }
    }
    COWTAP_RETURN_IF_ERROR(SetL2Entry(r, (host + i * cluster_size_) | kQcow2Copied, 0));
  }
  COWTAP_RETURN_IF_ERROR(FreeClusters(&to_free));
  return len;
}

Status Qcow2Image::WriteExtended(uint64_t offset, IoVecs iov) {
  const uint64_t total = TotalLength(iov);
  const uint64_t sc = cluster_size_ / 32;
  const bool data_file = data_ != file_.get();
  uint64_t pos = 0;
  while (pos < total) {
    const uint64_t g = offset + pos;
    const uint64_t vc = g / cluster_size_, in = g % cluster_size_;
    const uint64_t n = std::min(cluster_size_ - in, total - pos);
    std::vector<iovec> sub = Slice(iov, pos, n);
    pos += n;
    const uint64_t start = vc * cluster_size_;
    COWTAP_ASSIGN_OR_RETURN(ClusterRef ref, LookupCluster(vc));
    const bool has_host = ref.type == Qcow2ClusterType::kNormal;
    const bool whole =
        ref.type == Qcow2ClusterType::kCompressed || (has_host && !data_file && !(ref.entry.raw & kQcow2Copied));
    // Region written: the touched subclusters, or the whole cluster when a
    // shared or compressed cluster is copied.
    uint64_t s0 = whole ? 0 : in / sc, s1 = whole ? 32 : DivRoundUp(in + n, sc);
    uint64_t rs = start + s0 * sc, re = start + s1 * sc;
    std::vector<uint8_t> head(g - rs), tail(re - (g + n));
    if (!head.empty()) COWTAP_RETURN_IF_ERROR(ReadLocked(rs, std::vector<iovec>{MakeIoVec(head.data(), head.size())}));
    if (!tail.empty()) {
      uint64_t e = g + n;
      uint64_t avail = e < info_.size_bytes ? std::min<uint64_t>(tail.size(), info_.size_bytes - e) : 0;
      if (avail) COWTAP_RETURN_IF_ERROR(ReadLocked(e, std::vector<iovec>{MakeIoVec(tail.data(), avail)}));
    }
    COWTAP_ASSIGN_OR_RETURN(ref, LookupClusterForWrite(vc));
    uint64_t host = ref.entry.raw & kQcow2OffsetMask;
    uint64_t bitmap = ref.entry.bitmap;
    std::vector<uint64_t> to_free;
    bool fresh = false;
    if (whole || !has_host) {
      if (has_host && !data_file) to_free.push_back(host / cluster_size_);
      if (ref.type == Qcow2ClusterType::kCompressed) {
        auto d = DecodeQcow2Compressed(ref.entry.raw, h_.cluster_bits);
        for (uint64_t c = d.host_offset / cluster_size_; c <= (d.host_offset + d.max_length - 1) / cluster_size_; ++c)
          to_free.push_back(c);
      }
      if (data_file) {
        host = start;
      } else {
        COWTAP_ASSIGN_OR_RETURN(auto got, AllocateClusters(1));
        host = got.first;
        fresh = IsFresh(host);
        high_water_ = std::max(high_water_, host + cluster_size_);
      }
      if (whole) bitmap = 0;
    }
    const bool skip_head = fresh && AllZero(head), skip_tail = fresh && AllZero(tail);
    std::vector<iovec> io;
    if (!skip_head && !head.empty()) io.push_back(MakeIoVec(head.data(), head.size()));
    io.insert(io.end(), sub.begin(), sub.end());
    if (!skip_tail && !tail.empty()) io.push_back(MakeIoVec(tail.data(), tail.size()));
    COWTAP_RETURN_IF_ERROR(data_->WritevAt(host + s0 * sc + (skip_head ? head.size() : 0), io));
    uint32_t mask = SubMask(s0, s1);
    uint64_t new_bitmap = (uint64_t{Qcow2SubZeroMask(bitmap) & ~mask} << 32) | (Qcow2SubAllocMask(bitmap) | mask);
    uint64_t new_raw = host | kQcow2Copied;
    if (new_raw != ref.entry.raw || new_bitmap != ref.entry.bitmap)
      COWTAP_RETURN_IF_ERROR(SetL2Entry(ref, new_raw, new_bitmap));
    COWTAP_RETURN_IF_ERROR(FreeClusters(&to_free));
  }
  return Status::Ok();
}

}  // namespace cowtap::cow
