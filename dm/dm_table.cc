#include "dm/dm_table.h"

#include <algorithm>

#include <fmt/format.h>

#include "base/checked_math.h"

namespace cowtap::dm {

DmTable DmTable::AllMiss(uint64_t size_sectors) {
  DmTable t;
  t.size_sectors_ = size_sectors;
  if (size_sectors > 0) t.segments_.push_back({0, size_sectors, DmSegment::Kind::kMiss, 0});
  return t;
}

Result<DmTable> DmTable::Make(uint64_t size_sectors, std::vector<DmSegment> segments) {
  DmTable t;
  t.size_sectors_ = size_sectors;
  uint64_t next = 0;
  for (size_t i = 0; i < segments.size(); ++i) {
    const DmSegment& s = segments[i];
    if (s.sector_count == 0) return Status::InvalidArgument(fmt::format("dm table: segment {} is empty", i));
    if (s.start_sector != next) {
      return Status::InvalidArgument(
          fmt::format("dm table: segment {} starts at sector {}, expected {} (gap or overlap)", i, s.start_sector, next));
    }
    auto end = AddU64(s.start_sector, s.sector_count);
    if (!end || *end > size_sectors) {
      return Status::InvalidArgument(
          fmt::format("dm table: segment {} ({}+{}) passes the device's end ({} sectors)", i, s.start_sector,
                      s.sector_count, size_sectors));
    }
    if (s.kind == DmSegment::Kind::kMiss && s.target_sector != s.start_sector) {
      return Status::InvalidArgument(fmt::format("dm table: miss segment {} is not an identity mapping", i));
    }
    if (s.kind == DmSegment::Kind::kLinear && !AddU64(s.target_sector, s.sector_count)) {
      return Status::InvalidArgument(fmt::format("dm table: linear segment {} target wraps around", i));
    }
    next = *end;
    if (!t.segments_.empty()) {
      DmSegment& p = t.segments_.back();
      bool continues = p.kind == s.kind &&
                       (s.kind == DmSegment::Kind::kMiss || p.target_sector + p.sector_count == s.target_sector);
      if (continues) {
        p.sector_count += s.sector_count;
        continue;
      }
    }
    t.segments_.push_back(s);
  }
  if (next != size_sectors) {
    return Status::InvalidArgument(
        fmt::format("dm table: segments end at sector {}, device has {} sectors", next, size_sectors));
  }
  return t;
}

const DmSegment& DmTable::SegmentAt(uint64_t sector) const {
  auto it = std::upper_bound(segments_.begin(), segments_.end(), sector,
                             [](uint64_t s, const DmSegment& seg) { return s < seg.start_sector; });
  return *(it - 1);
}

uint64_t DmTable::linear_sectors() const {
  uint64_t n = 0;
  for (const auto& s : segments_) {
    if (s.kind == DmSegment::Kind::kLinear) n += s.sector_count;
  }
  return n;
}

size_t DmTable::linear_segment_count() const {
  return std::count_if(segments_.begin(), segments_.end(),
                       [](const DmSegment& s) { return s.kind == DmSegment::Kind::kLinear; });
}

DmTable DmTable::WithMiss(uint64_t first_sector, uint64_t sector_count) const {
  return WithMissRanges({{first_sector, sector_count}});
}

DmTable DmTable::WithMissRanges(std::vector<std::pair<uint64_t, uint64_t>> ranges) const {
  // As [lo, hi) within the device, sorted and merged.
  std::vector<std::pair<uint64_t, uint64_t>> iv;
  iv.reserve(ranges.size());
  for (const auto& [first, count] : ranges) {
    const uint64_t lo = std::min(first, size_sectors_);
    const uint64_t hi = std::min(AddU64(first, count).value_or(UINT64_MAX), size_sectors_);
    if (lo < hi) iv.emplace_back(lo, hi);
  }
  if (iv.empty()) return *this;
  std::sort(iv.begin(), iv.end());
  size_t n = 0;
  for (size_t i = 1; i < iv.size(); ++i) {
    if (iv[i].first <= iv[n].second) {
      iv[n].second = std::max(iv[n].second, iv[i].second);
    } else {
      iv[++n] = iv[i];
    }
  }
  iv.resize(n + 1);

  std::vector<DmSegment> out;
  out.reserve(segments_.size() + 2 * iv.size());
  size_t k = 0;  // first interval that may overlap the current segment
  for (const auto& s : segments_) {
    if (s.kind == DmSegment::Kind::kMiss) {
      out.push_back(s);
      continue;
    }
    // A linear segment: its parts inside intervals go miss.
    const uint64_t end = s.end_sector();
    uint64_t pos = s.start_sector;
    while (k < iv.size() && iv[k].second <= pos) ++k;
    while (pos < end) {
      if (k >= iv.size() || iv[k].first >= end) {
        out.push_back({pos, end - pos, DmSegment::Kind::kLinear, s.target_sector + (pos - s.start_sector)});
        break;
      }
      const auto [lo, hi] = iv[k];
      if (lo > pos) {
        out.push_back({pos, lo - pos, DmSegment::Kind::kLinear, s.target_sector + (pos - s.start_sector)});
        pos = lo;
      }
      const uint64_t mhi = std::min(hi, end);
      out.push_back({pos, mhi - pos, DmSegment::Kind::kMiss, pos});
      pos = mhi;
      if (hi <= end) ++k;  // used up; else it runs on into the next segment
    }
  }
  auto r = Make(size_sectors_, std::move(out));
  return r.ok() ? std::move(r).value() : AllMiss(size_sectors_);  // cannot fail: built from a valid table
}

std::string DmTable::TargetParams(const DmSegment& seg, const DmDevices& devices) {
  if (seg.kind == DmSegment::Kind::kLinear) return fmt::format("{} {}", devices.linear_device, seg.target_sector);
  return fmt::format("{} {}", devices.miss_device, seg.start_sector);
}

std::string DmTable::ToText(const DmDevices& devices) const {
  std::string out;
  for (const auto& s : segments_) {
    out += fmt::format("{} {} linear {}\n", s.start_sector, s.sector_count, TargetParams(s, devices));
  }
  return out;
}

}  // namespace cowtap::dm
