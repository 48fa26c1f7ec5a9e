// Qcow2Image::Map(): qemu-img map semantics (data / zero / depth / host
// offset), resolving unallocated ranges through the backing chain and
// merging neighbours with the same attributes.
#include <algorithm>

#include "cow/qcow2_image.h"

namespace cowtap::cow {

Result<std::vector<Extent>> Qcow2Image::Map(uint64_t offset, uint64_t length) {
  std::lock_guard lock(mu_);
  COWTAP_RETURN_IF_ERROR(CheckRange(offset, length));
  std::vector<Extent> out;
  COWTAP_RETURN_IF_ERROR(MapLayer(offset, length, &out));
  return out;
}

Status Qcow2Image::MapLayer(uint64_t offset, uint64_t length, std::vector<Extent>* out) {
  auto push = [&](Extent e) {
    if (e.length == 0) return;
    if (!out->empty()) {
      Extent& b = out->back();
      bool host_ok = b.host_offset.has_value() == e.host_offset.has_value() &&
                     (!e.host_offset || *b.host_offset + b.length == *e.host_offset);
      if (b.offset + b.length == e.offset && b.data == e.data && b.zero == e.zero && b.compressed == e.compressed &&
          b.depth == e.depth && b.file == e.file && host_ok) {
        b.length += e.length;
        return;
      }
    }
    out->push_back(std::move(e));
  };
  auto backing = [&](uint64_t g, uint64_t n) -> Status {
    uint64_t avail = backing_ && g < backing_->size_bytes() ? std::min(n, backing_->size_bytes() - g) : 0;
    if (avail) {
      COWTAP_ASSIGN_OR_RETURN(auto below, backing_->Map(g, avail));
      for (auto& e : below) {
        ++e.depth;
        push(std::move(e));
      }
    }
    if (avail < n) push(Extent{g + avail, n - avail, false, true, false, 0, std::nullopt, ""});
    return Status::Ok();
  };
  const std::string& data_path = data_ != file_.get() ? h_.data_file : path_;
  const uint64_t end = offset + length;
  uint64_t g = offset;
  while (g < end) {
    const uint64_t vc = g / cluster_size_, in = g % cluster_size_;
    const uint64_t n = std::min(cluster_size_ - in, end - g);
    COWTAP_ASSIGN_OR_RETURN(ClusterRef ref, LookupCluster(vc));
    const uint64_t host = ref.entry.raw & kQcow2OffsetMask;
    switch (ref.type) {
      case Qcow2ClusterType::kCompressed:
        push(Extent{g, n, true, false, true, 0, std::nullopt, path_});
        break;
      case Qcow2ClusterType::kZeroAlloc:
        // No host offset: the preallocated cluster holds stale bytes.
        push(Extent{g, n, false, true, false, 0, std::nullopt, ""});
        break;
      default:
        if (!h_.extended_l2()) {
          if (ref.type == Qcow2ClusterType::kZeroPlain) {
            push(Extent{g, n, false, true, false, 0, std::nullopt, ""});
          } else if (ref.type == Qcow2ClusterType::kUnallocated) {
            COWTAP_RETURN_IF_ERROR(backing(g, n));
          } else {
            push(Extent{g, n, true, false, false, 0, host + in, data_path});
          }
          break;
        }
        {
          const uint64_t sc = cluster_size_ / 32;
          const uint32_t alloc = Qcow2SubAllocMask(ref.entry.bitmap), zero = Qcow2SubZeroMask(ref.entry.bitmap);
          for (uint64_t p = in; p < in + n;) {
            uint64_t i = p / sc, q = std::min(in + n, (i + 1) * sc);
            if (ref.type == Qcow2ClusterType::kNormal && (alloc >> i & 1))
              push(Extent{vc * cluster_size_ + p, q - p, true, false, false, 0, host + p, data_path});
            else if (zero >> i & 1)
              push(Extent{vc * cluster_size_ + p, q - p, false, true, false, 0, std::nullopt, ""});
            else
              COWTAP_RETURN_IF_ERROR(backing(vc * cluster_size_ + p, q - p));
            p = q;
          }
        }
    }
    g += n;
  }
  return Status::Ok();
}

}  // namespace cowtap::cow
