// Qcow2Image discard and write-zeroes. v3 images use the zero flag (zero
// plain: unmapped; zero alloc: the host cluster kept) as QEMU 7.2 does; v2
// images have no zero flag, so zeroes are written (or clusters unmapped where
// nothing below could show through). Clusters are freed only after the L2
// unlink is durable (FreeClusters).
#include <algorithm>
#include <vector>

#include "base/checked_math.h"
#include "cow/qcow2_image.h"

namespace cowtap::cow {
namespace {

std::vector<uint64_t> HostClustersOf(const Qcow2Header& h, uint64_t raw, Qcow2ClusterType type) {
  const uint64_t cs = h.cluster_size();
  if (type == Qcow2ClusterType::kCompressed) {
    auto d = DecodeQcow2Compressed(raw, h.cluster_bits);
    std::vector<uint64_t> out;
    for (uint64_t c = d.host_offset / cs; c <= (d.host_offset + d.max_length - 1) / cs; ++c) out.push_back(c);
    return out;
  }
  if (type == Qcow2ClusterType::kNormal || type == Qcow2ClusterType::kZeroAlloc) return {(raw & kQcow2OffsetMask) / cs};
  return {};
}

}  // namespace

Status Qcow2Image::WriteZeroes(uint64_t offset, uint64_t length, bool may_unmap) {
  std::unique_lock lock(mu_);
  COWTAP_RETURN_IF_ERROR(CheckRange(offset, length));
  COWTAP_RETURN_IF_ERROR(CheckWritable());
  // Allocations in flight in the range link first (their clusters are not
  // in the L2 tables yet, and must not be allocated twice).
  WaitForAllocations(lock, offset, length);
  Status s = ZeroLocked(offset, length, may_unmap, /*discard=*/false);
  if (s.code() == ErrorCode::kCorrupt) return MarkBroken(s);
  return s;
}

Status Qcow2Image::Discard(uint64_t offset, uint64_t length) {
  std::unique_lock lock(mu_);
  COWTAP_RETURN_IF_ERROR(CheckRange(offset, length));
  COWTAP_RETURN_IF_ERROR(CheckWritable());
  WaitForAllocations(lock, offset, length);
  if (h_.version < 3 && backing_)
    return Status::NotSupported(path_ +
                                ": discard is not supported on a qcow2 version 2 image with a backing file "
                                "(v2 has no zero clusters, so backing data would reappear); upgrade with "
                                "`qemu-img amend -o compat=1.1`");
  Status s = ZeroLocked(offset, length, /*unmap=*/true, /*discard=*/true);
  if (s.code() == ErrorCode::kCorrupt) return MarkBroken(s);
  return s;
}

Status Qcow2Image::ZeroLocked(uint64_t offset, uint64_t length, bool unmap, bool discard) {
  const bool data_file = data_ != file_.get();
  const bool v3 = h_.version >= 3;
  const bool ext = h_.extended_l2();
  const uint64_t end = offset + length;
  const uint64_t sc = cluster_size_ / 32;
  std::vector<uint8_t> zeros;
  auto write_zeros = [&](uint64_t g, uint64_t n) -> Status {
    if (zeros.size() < n) zeros.assign(n, 0);
    std::vector<iovec> io{MakeIoVec(zeros.data(), n)};
    return ext ? WriteExtended(g, io) : WriteLocked(g, io);
  };
  std::vector<uint64_t> to_free;
  uint64_t g = offset;
  while (g < end) {
    const uint64_t vc = g / cluster_size_, in = g % cluster_size_;
    const uint64_t n = std::min(cluster_size_ - in, end - g);
    // The last cluster of an image whose size is not cluster aligned counts
    // as whole when the range runs to the end of the image.
    const bool whole = in == 0 && (n == cluster_size_ || g + n == info_.size_bytes);
    g += n;
    COWTAP_ASSIGN_OR_RETURN(ClusterRef ref, LookupCluster(vc));
    const uint64_t cstart = vc * cluster_size_;
    const bool below_visible = backing_ && cstart < backing_->size_bytes();
    if (ext) {
      // Whole subclusters become zero (allocation bits cleared); partial
      // subclusters get real zeros.
      uint64_t s0 = DivRoundUp(in, sc), s1 = (in + n) / sc;
      if (in + n == cluster_size_ || cstart + in + n == info_.size_bytes) s1 = 32;
      bool shared = ref.type == Qcow2ClusterType::kCompressed ||
                    (ref.type == Qcow2ClusterType::kNormal && !data_file && !(ref.entry.raw & kQcow2Copied));
      if (s0 >= s1 || (shared && !whole)) {
        if (!discard) COWTAP_RETURN_IF_ERROR(write_zeros(cstart + in, n));
        continue;
      }
      if (s0 * sc > in && !discard) COWTAP_RETURN_IF_ERROR(write_zeros(cstart + in, s0 * sc - in));
      if (s1 < 32 && s1 * sc < in + n && !discard)
        COWTAP_RETURN_IF_ERROR(write_zeros(cstart + s1 * sc, in + n - s1 * sc));
      COWTAP_ASSIGN_OR_RETURN(ref, LookupClusterForWrite(vc));
      uint32_t mask = static_cast<uint32_t>(((s1 >= 32 ? ~0ull : (1ull << s1) - 1)) & ~((1ull << s0) - 1));
      uint64_t raw = ref.entry.raw, bitmap = ref.entry.bitmap;
      uint32_t alloc = Qcow2SubAllocMask(bitmap) & ~mask, zero = Qcow2SubZeroMask(bitmap) | mask;
      if (ref.type == Qcow2ClusterType::kCompressed || (whole && (unmap || shared))) {
        if (!data_file)
          for (uint64_t c : HostClustersOf(h_, raw, ref.type)) to_free.push_back(c);
        raw = 0;
        alloc = 0;
      }
      if (data_file && h_.autoclear_features & kQcow2AutoclearDataFileRaw)
        COWTAP_RETURN_IF_ERROR(data_->PunchHole(cstart + s0 * sc, (s1 - s0) * sc));
      COWTAP_RETURN_IF_ERROR(SetL2Entry(ref, raw, (uint64_t{zero} << 32) | alloc));
      continue;
    }
    if (!whole) {
      // Partial cluster: nothing to do if it already reads as zeros.
      if (ref.type == Qcow2ClusterType::kZeroPlain || ref.type == Qcow2ClusterType::kZeroAlloc) continue;
      if (ref.type == Qcow2ClusterType::kUnallocated && !below_visible) {
        if (v3 && !discard) {
          COWTAP_ASSIGN_OR_RETURN(ref, LookupClusterForWrite(vc));
          COWTAP_RETURN_IF_ERROR(SetL2Entry(ref, kQcow2ZeroFlag, 0));
        }
        continue;
      }
      if (!discard) COWTAP_RETURN_IF_ERROR(write_zeros(cstart + in, n));
      continue;
    }
    if (!v3) {
      // v2: unmap only where nothing shows through from below.
      if (!below_visible && (unmap || discard) && !data_file) {
        if (ref.type == Qcow2ClusterType::kUnallocated) continue;
        COWTAP_ASSIGN_OR_RETURN(ref, LookupClusterForWrite(vc));
        for (uint64_t c : HostClustersOf(h_, ref.entry.raw, ref.type)) to_free.push_back(c);
        COWTAP_RETURN_IF_ERROR(SetL2Entry(ref, 0, 0));
      } else if (!discard) {
        COWTAP_RETURN_IF_ERROR(write_zeros(cstart, n));
      }
      continue;
    }
    // v3, whole cluster.
    const bool copied = (ref.entry.raw & kQcow2Copied) != 0;
    if (ref.type == Qcow2ClusterType::kZeroPlain) continue;
    if (ref.type == Qcow2ClusterType::kZeroAlloc && !(unmap || discard)) continue;
    COWTAP_ASSIGN_OR_RETURN(ref, LookupClusterForWrite(vc));
    uint64_t raw = kQcow2ZeroFlag;
    if (data_file) {
      if (h_.autoclear_features & kQcow2AutoclearDataFileRaw)
        COWTAP_RETURN_IF_ERROR(data_->PunchHole(cstart, cluster_size_));
    } else if (!(unmap || discard) && copied &&
               (ref.type == Qcow2ClusterType::kNormal || ref.type == Qcow2ClusterType::kZeroAlloc)) {
      raw = (ref.entry.raw & kQcow2OffsetMask) | kQcow2Copied | kQcow2ZeroFlag;  // zero alloc: keep the cluster
    } else {
      for (uint64_t c : HostClustersOf(h_, ref.entry.raw, ref.type)) to_free.push_back(c);
    }
    COWTAP_RETURN_IF_ERROR(SetL2Entry(ref, raw, 0));
  }
  return FreeClusters(&to_free);
}

}  // namespace cowtap::cow
