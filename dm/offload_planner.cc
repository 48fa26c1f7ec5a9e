#include "dm/offload_planner.h"

#include <algorithm>

#include <fmt/format.h>

#include "base/checked_math.h"

namespace cowtap::dm {

Result<OffloadPlanner> OffloadPlanner::Make(const PlannerOptions& o) {
  if (o.disk_size_bytes % kSectorSize != 0) {
    return Status::InvalidArgument(fmt::format("offload: disk size {} is not a multiple of 512", o.disk_size_bytes));
  }
  if (!IsPowerOfTwo(o.cluster_size) || o.cluster_size < kSectorSize) {
    return Status::InvalidArgument(fmt::format("offload: cluster size {} is not a power of two >= 512", o.cluster_size));
  }
  if (o.max_segments == 0) return Status::InvalidArgument("offload: max_segments must be at least 1");
  return OffloadPlanner(o);
}

Result<PlannerOptions> OffloadPlanner::OptionsFor(const cow::Image& image, size_t max_segments) {
  const cow::ImageInfo& info = image.info();
  if (info.format == cow::ImageFormat::kRaw) {
    return Status::NotSupported(fmt::format("offload: {} is raw (serve it with a loop device directly)", info.path));
  }
  if (!info.data_file.empty()) {
    return Status::NotSupported(fmt::format("offload: {} keeps its data in external file {}", info.path, info.data_file));
  }
  if (info.read_only) return Status::NotSupported(fmt::format("offload: {} is open read-only", info.path));
  return PlannerOptions{info.size_bytes, info.cluster_size, max_segments};
}

uint64_t OffloadPlanner::cluster_count() const {
  return DivRoundUp(options_.disk_size_bytes, options_.cluster_size);
}

namespace {

struct Run {
  uint64_t first_cluster;
  uint64_t clusters;
  uint64_t host_offset;
};

}  // namespace

Result<DmTable> OffloadPlanner::Plan(std::vector<WritableCluster> clusters) const {
  const uint64_t cs = options_.cluster_size;
  const uint64_t ncl = cluster_count();
  std::sort(clusters.begin(), clusters.end(),
            [](const WritableCluster& a, const WritableCluster& b) { return a.virtual_cluster < b.virtual_cluster; });
  std::vector<Run> runs;
  for (size_t i = 0; i < clusters.size(); ++i) {
    const WritableCluster& c = clusters[i];
    if (c.virtual_cluster >= ncl) {
      return Status::InvalidArgument(
          fmt::format("offload: cluster {} is past the disk's end ({} clusters)", c.virtual_cluster, ncl));
    }
    if (c.host_offset % cs != 0 || !AddU64(c.host_offset, cs)) {
      return Status::InvalidArgument(
          fmt::format("offload: cluster {} has host offset {:#x}, not a valid cluster", c.virtual_cluster, c.host_offset));
    }
    if (i > 0 && clusters[i - 1].virtual_cluster == c.virtual_cluster) {
      if (clusters[i - 1].host_offset != c.host_offset) {
        return Status::InvalidArgument(
            fmt::format("offload: cluster {} given twice with different host offsets", c.virtual_cluster));
      }
      continue;
    }
    if (!runs.empty()) {
      Run& r = runs.back();
      if (r.first_cluster + r.clusters == c.virtual_cluster && r.host_offset + r.clusters * cs == c.host_offset) {
        ++r.clusters;
        continue;
      }
    }
    runs.push_back({c.virtual_cluster, 1, c.host_offset});
  }

  // k linear runs give at most 2k + 1 segments; keep the longest that fit.
  const size_t max_runs = (options_.max_segments - 1) / 2;
  if (runs.size() > max_runs) {
    std::vector<Run> by_len = runs;
    std::stable_sort(by_len.begin(), by_len.end(), [](const Run& a, const Run& b) { return a.clusters > b.clusters; });
    by_len.resize(max_runs);
    std::sort(by_len.begin(), by_len.end(),
              [](const Run& a, const Run& b) { return a.first_cluster < b.first_cluster; });
    runs = std::move(by_len);
  }

  const uint64_t size_sectors = options_.disk_size_bytes / kSectorSize;
  const uint64_t spc = cs / kSectorSize;
  std::vector<DmSegment> segs;
  segs.reserve(runs.size() * 2 + 1);
  uint64_t next = 0;
  for (const Run& r : runs) {
    const uint64_t start = r.first_cluster * spc;  // < size_sectors: cluster < ncl
    const uint64_t end = std::min(size_sectors, (r.first_cluster + r.clusters) * spc);
    if (start > next) segs.push_back({next, start - next, DmSegment::Kind::kMiss, next});
    segs.push_back({start, end - start, DmSegment::Kind::kLinear, r.host_offset / kSectorSize});
    next = end;
  }
  if (next < size_sectors) segs.push_back({next, size_sectors - next, DmSegment::Kind::kMiss, next});
  return DmTable::Make(size_sectors, std::move(segs));
}

std::vector<WritableCluster> CollectWritableClusters(cow::Image& image) {
  std::vector<WritableCluster> out;
  const uint32_t cs = image.info().cluster_size;
  if (cs == 0) return out;
  const uint64_t n = DivRoundUp(image.size_bytes(), cs);
  for (uint64_t vc = 0; vc < n; ++vc) {
    auto m = image.LookupRemap(vc);
    if (m && m->layer == 0 && (m->flags & cow::Remap::kWritable) && !(m->flags & (cow::Remap::kZero | cow::Remap::kBacking))) {
      out.push_back({vc, m->host_offset});
    }
  }
  return out;
}

Result<uint64_t> PrimeRemapCache(cow::Image& image, uint64_t max_clusters) {
  const uint64_t cs = image.info().cluster_size;
  if (cs == 0) return uint64_t{0};
  COWTAP_ASSIGN_OR_RETURN(std::vector<cow::Extent> extents, image.Map(0, image.size_bytes()));
  uint64_t primed = 0;
  uint8_t sector[kSectorSize];
  iovec v{sector, sizeof(sector)};
  for (const cow::Extent& e : extents) {
    if (e.depth != 0 || !e.data || e.zero || e.compressed || !e.host_offset) continue;
    const uint64_t end = std::min(AddU64(e.offset, e.length).value_or(UINT64_MAX), image.size_bytes());
    for (uint64_t c = e.offset / cs; c * cs < end && primed < max_clusters; ++c) {
      COWTAP_RETURN_IF_ERROR(image.Read(c * cs, {&v, 1}));
      ++primed;
    }
    if (primed >= max_clusters) break;
  }
  return primed;
}

}  // namespace cowtap::dm
