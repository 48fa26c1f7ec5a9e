#include "dm/table_executor.h"

#include <algorithm>

#include <fmt/format.h>

#include "base/checked_math.h"

namespace cowtap::dm {

template <typename Fn>
Status TableExecutor::ForEachPiece(uint64_t offset, uint64_t length, Fn fn) {
  const uint64_t size_bytes = table_.size_sectors() * kSectorSize;
  if (offset % kSectorSize != 0 || length % kSectorSize != 0 || !RangeWithin(offset, length, size_bytes)) {
    return Status::OutOfRange(fmt::format("dm executor: request {}+{} is not whole sectors inside {} bytes", offset,
                                          length, size_bytes));
  }
  uint64_t done = 0;
  while (done < length) {
    const uint64_t sector = (offset + done) / kSectorSize;
    const DmSegment& seg = table_.SegmentAt(sector);
    const uint64_t n = std::min(length - done, (seg.end_sector() - sector) * kSectorSize);
    COWTAP_RETURN_IF_ERROR(fn(seg, sector - seg.start_sector, done, n));
    done += n;
  }
  return Status::Ok();
}

Status TableExecutor::Read(uint64_t offset, std::span<uint8_t> buf) {
  return ForEachPiece(offset, buf.size(), [&](const DmSegment& seg, uint64_t sector_in_seg, uint64_t at, uint64_t n) {
    std::span<uint8_t> piece = buf.subspan(at, n);
    if (seg.kind == DmSegment::Kind::kLinear) {
      stats_.linear_bytes += n;
      return file_.ReadAt((seg.target_sector + sector_in_seg) * kSectorSize, piece);
    }
    stats_.miss_bytes += n;
    iovec v{piece.data(), piece.size()};
    return miss_.Read(offset + at, IoVecs(&v, 1));
  });
}

Status TableExecutor::Write(uint64_t offset, std::span<const uint8_t> data) {
  return ForEachPiece(offset, data.size(), [&](const DmSegment& seg, uint64_t sector_in_seg, uint64_t at, uint64_t n) {
    std::span<const uint8_t> piece = data.subspan(at, n);
    if (seg.kind == DmSegment::Kind::kLinear) {
      stats_.linear_bytes += n;
      return file_.WriteAt((seg.target_sector + sector_in_seg) * kSectorSize, piece);
    }
    stats_.miss_bytes += n;
    iovec v{const_cast<uint8_t*>(piece.data()), piece.size()};
    return miss_.Write(offset + at, IoVecs(&v, 1));
  });
}

}  // namespace cowtap::dm
