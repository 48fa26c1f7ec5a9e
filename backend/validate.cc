#include "backend/validate.h"

#include <fmt/format.h>

#include "base/checked_math.h"

namespace cowtap::backend {
namespace {

std::string OpName(uint8_t op) {
  switch (op) {
    case kOpRead:
      return "READ";
    case kOpWrite:
      return "WRITE";
    case kOpWriteBarrier:
      return "WRITE_BARRIER";
    case kOpFlushDiskcache:
      return "FLUSH_DISKCACHE";
    case kOpDiscard:
      return "DISCARD";
    case kOpIndirect:
      return "INDIRECT";
    default:
      return fmt::format("operation {}", op);
  }
}

std::string OpName(const BlockRequest& r) {
  return r.indirect ? "INDIRECT " + OpName(r.operation) : OpName(r.operation);
}

Status Invalid(const BlockRequest& r, std::string_view what) {
  return Status::InvalidArgument(fmt::format("{} id={}: {}", OpName(r), r.id, what));
}

Status Unsupported(const BlockRequest& r, std::string_view what) {
  return Status::NotSupported(fmt::format("{} id={}: {}", OpName(r), r.id, what));
}

Status CheckLimits(const DeviceLimits& limits) {
  if (!IsPowerOfTwo(limits.sector_size) || limits.sector_size < 512 || limits.sector_size > kPageSize) {
    return Status::Internal(
        fmt::format("device sector size {} is not a power of two in 512..4096", limits.sector_size));
  }
  if (limits.max_indirect_segments > kMaxIndirectSegmentsWire) {
    return Status::Internal(fmt::format("max indirect segments {} exceeds the wire maximum {}",
                                        limits.max_indirect_segments, kMaxIndirectSegmentsWire));
  }
  return Status::Ok();
}

// [sector, sector + count) in device sectors must lie inside the disk;
// returns the byte offset and length.
Status CheckRange(const BlockRequest& r, const DeviceLimits& limits, uint64_t sector, uint64_t count,
                  uint64_t* offset_bytes, uint64_t* length_bytes) {
  uint64_t end_sector;
  if (!CheckedAdd(sector, count, &end_sector) || end_sector > limits.sectors) {
    return Status::OutOfRange(fmt::format("{} id={}: sectors [{}, +{}) are outside the disk of {} sectors", OpName(r),
                                          r.id, sector, count, limits.sectors));
  }
  // end_sector <= sectors and sectors * sector_size is the disk size in
  // bytes, which the device reported as a uint64_t, so these cannot overflow
  // unless sectors itself was absurd: check anyway.
  if (!CheckedMul<uint64_t>(sector, limits.sector_size, offset_bytes) ||
      !CheckedMul<uint64_t>(count, limits.sector_size, length_bytes) ||
      !RangeWithin(*offset_bytes, *length_bytes, UINT64_MAX)) {
    return Status::OutOfRange(fmt::format("{} id={}: sector {} overflows a byte offset", OpName(r), r.id, sector));
  }
  return Status::Ok();
}

Status ValidateDiscard(const Request& request, const DeviceLimits& limits, BlockRequest* out) {
  if (!limits.discard) return Unsupported(*out, "discard was not advertised (feature-discard=0)");
  if (request.discard_flag & ~kDiscardSecure) {
    return Invalid(*out, fmt::format("unknown discard flags 0x{:x}", request.discard_flag));
  }
  out->secure = (request.discard_flag & kDiscardSecure) != 0;
  if (out->secure && !limits.discard_secure) {
    return Unsupported(*out, "secure discard was not advertised (discard-secure=0)");
  }
  if (limits.read_only) return Status::ReadOnly(fmt::format("DISCARD id={}: the device is read-only", out->id));
  out->op = BlockOp::kDiscard;
  out->sector_number = request.sector_number;
  return CheckRange(*out, limits, request.sector_number, request.nr_sectors, &out->offset_bytes, &out->length_bytes);
}

Status ValidateIndirect(const Request& request, const DeviceLimits& limits, BlockRequest* out) {
  out->indirect = true;
  if (limits.max_indirect_segments == 0) {
    return Unsupported(*out, "indirect requests were not advertised (no feature-max-indirect-segments)");
  }
  if (request.indirect_op != kOpRead && request.indirect_op != kOpWrite) {
    return Invalid(*out, fmt::format("indirect_op {} is not READ or WRITE", request.indirect_op));
  }
  if (request.nr_segments == 0 || request.nr_segments > limits.max_indirect_segments) {
    return Invalid(*out,
                   fmt::format("nr_segments {} is outside 1..{}", request.nr_segments, limits.max_indirect_segments));
  }
  out->op = request.indirect_op == kOpRead ? BlockOp::kRead : BlockOp::kWrite;
  if (out->op == BlockOp::kWrite && limits.read_only) {
    return Status::ReadOnly(fmt::format("INDIRECT WRITE id={}: the device is read-only", out->id));
  }
  out->sector_number = request.sector_number;
  out->nr_segments = request.nr_segments;
  out->nr_indirect_pages = static_cast<uint32_t>(DivRoundUp(request.nr_segments, kSegmentsPerIndirectPage));
  out->indirect_grefs = request.indirect_grefs;
  // The start sector alone must already be inside the disk; the full range
  // is checked once the descriptors are read.
  if (request.sector_number >= limits.sectors) {
    return Status::OutOfRange(fmt::format("INDIRECT id={}: start sector {} is outside the disk of {} sectors", out->id,
                                          request.sector_number, limits.sectors));
  }
  return Status::Ok();
}

}  // namespace

Status ValidateRequest(const Request& request, const DeviceLimits& limits, BlockRequest* out) {
  *out = BlockRequest();
  out->id = request.id;
  out->operation = request.operation == kOpIndirect ? request.indirect_op : request.operation;
  COWTAP_RETURN_IF_ERROR(CheckLimits(limits));

  switch (request.operation) {
    case kOpRead:
    case kOpWrite:
      break;
    case kOpWriteBarrier:
      if (!limits.barrier) return Unsupported(*out, "barriers were not advertised (feature-barrier=0)");
      break;
    case kOpFlushDiskcache:
      if (!limits.flush) return Unsupported(*out, "flushes were not advertised (feature-flush-cache=0)");
      break;
    case kOpDiscard:
      return ValidateDiscard(request, limits, out);
    case kOpIndirect:
      return ValidateIndirect(request, limits, out);
    default:
      return Unsupported(*out, "unknown operation");
  }

  const bool flush_kind = request.operation == kOpWriteBarrier || request.operation == kOpFlushDiskcache;
  out->sector_number = request.sector_number;
  if (request.nr_segments == 0) {
    if (!flush_kind) return Invalid(*out, "nr_segments is 0");
    out->op = BlockOp::kFlush;
    return Status::Ok();
  }
  if (request.nr_segments > kMaxDirectSegments) {
    return Invalid(*out, fmt::format("nr_segments {} is outside 1..{}", request.nr_segments, kMaxDirectSegments));
  }
  out->op = request.operation == kOpRead ? BlockOp::kRead : BlockOp::kWrite;
  out->flush_after = flush_kind;
  if (out->op == BlockOp::kWrite && limits.read_only) {
    return Status::ReadOnly(fmt::format("{} id={}: the device is read-only", OpName(request.operation), out->id));
  }
  out->nr_segments = request.nr_segments;
  return ValidateSegments(std::span(request.seg.data(), request.nr_segments), limits, out);
}

Status ValidateSegments(std::span<const Segment> segments, const DeviceLimits& limits, BlockRequest* out) {
  COWTAP_RETURN_IF_ERROR(CheckLimits(limits));
  if (segments.empty() || segments.size() != out->nr_segments) {
    return Invalid(*out, fmt::format("{} segment descriptors for nr_segments {}", segments.size(), out->nr_segments));
  }
  const uint64_t sectors_per_page = kPageSize / limits.sector_size;
  uint64_t total_sectors = 0;
  for (size_t i = 0; i < segments.size(); ++i) {
    const Segment& s = segments[i];
    if (s.first_sect > s.last_sect || s.last_sect >= sectors_per_page) {
      return Invalid(*out, fmt::format("segment {} (gref {}) has first_sect {} last_sect {}; need first <= last < {}",
                                       i, s.gref, s.first_sect, s.last_sect, sectors_per_page));
    }
    // At most 4096 segments of at most 8 sectors: cannot overflow.
    total_sectors += static_cast<uint64_t>(s.last_sect - s.first_sect) + 1;
  }
  COWTAP_RETURN_IF_ERROR(
      CheckRange(*out, limits, out->sector_number, total_sectors, &out->offset_bytes, &out->length_bytes));
  out->segments.assign(segments.begin(), segments.end());
  return Status::Ok();
}

int16_t ResponseStatusFor(const Status& status) {
  if (status.ok()) return kRspOkay;
  if (status.code() == ErrorCode::kNotSupported) return kRspEopnotsupp;
  return kRspError;
}

}  // namespace cowtap::backend
