// libFuzzer target: decode + validate arbitrary ring slots in both ABIs.
//
// Input: the first 112 bytes are the ring slot (shorter inputs are zero
// padded); the next bytes, when present, pick the device limits (size,
// sector size, read-only, advertised features), and whatever follows feeds
// indirect segment descriptors. Checks the invariants the ring server relies
// on: validation never crashes, always echoes id and operation, and an
// accepted request lies inside the disk and carries as many segments as it
// says. Violations abort (libFuzzer reports them).
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <vector>

#include "backend/blkif.h"
#include "backend/validate.h"
#include "base/checked_math.h"
#include "base/endian.h"

namespace cowtap::backend {
namespace {

void Require(bool condition) {
  if (!condition) std::abort();
}

DeviceLimits LimitsFrom(const uint8_t* p, size_t n) {
  DeviceLimits l;
  l.sectors = 1 << 21;
  l.flush = l.barrier = l.discard = true;
  l.max_indirect_segments = 256;
  if (n >= 10) {
    const uint8_t flags = p[0];
    l.read_only = flags & 1;
    l.flush = flags & 2;
    l.barrier = flags & 4;
    l.discard = flags & 8;
    l.discard_secure = flags & 16;
    l.sector_size = (flags & 32) ? 4096 : 512;
    l.max_indirect_segments = (flags & 64) ? 0 : (LoadLe16(p + 1) % (kMaxIndirectSegmentsWire + 1));
    l.sectors = LoadLe64(p + 2);
  }
  return l;
}

void CheckOne(Abi abi, const uint8_t* slot, const DeviceLimits& limits, const uint8_t* extra, size_t extra_len) {
  Request request = DecodeRequest(abi, std::span(slot, RequestBytes(abi)));

  // Re-encoding and decoding again is stable.
  uint8_t again[kMaxRequestBytes] = {};
  EncodeRequest(abi, request, again);
  Request twice = DecodeRequest(abi, std::span(again, RequestBytes(abi)));
  Require(twice.id == request.id && twice.operation == request.operation &&
          twice.sector_number == request.sector_number && twice.nr_segments == request.nr_segments);

  BlockRequest out;
  Status s = ValidateRequest(request, limits, &out);
  Require(out.id == request.id &&
          out.operation == (request.operation == kOpIndirect ? request.indirect_op : request.operation));
  const int16_t rsp = ResponseStatusFor(s);
  Require(rsp == kRspOkay || rsp == kRspError || rsp == kRspEopnotsupp);
  if (!s.ok()) return;

  if (out.indirect) {
    Require(out.nr_segments >= 1 && out.nr_segments <= limits.max_indirect_segments);
    Require(out.nr_indirect_pages >= 1 && out.nr_indirect_pages <= kMaxIndirectPages);
    std::vector<Segment> segs(out.nr_segments);
    for (size_t i = 0; i < segs.size(); ++i) {
      uint8_t d[8] = {};
      if (extra_len >= 8) std::memcpy(d, extra + (8 * i) % (extra_len - 7), 8);
      segs[i] = DecodeSegment(d);
    }
    s = ValidateSegments(segs, limits, &out);
    if (!s.ok()) return;
  }
  if (out.op == BlockOp::kWrite || out.op == BlockOp::kDiscard) Require(!limits.read_only);
  if (out.op == BlockOp::kRead || out.op == BlockOp::kWrite) {
    Require(out.segments.size() == out.nr_segments && !out.segments.empty());
    Require(out.length_bytes > 0 && out.length_bytes <= uint64_t{kMaxIndirectSegmentsWire} * kPageSize);
  }
  if (out.op != BlockOp::kFlush) {
    Require(RangeWithin(out.offset_bytes, out.length_bytes, UINT64_MAX));
    Require((out.offset_bytes + out.length_bytes) / limits.sector_size <= limits.sectors);
  }
}

}  // namespace
}  // namespace cowtap::backend

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  using namespace cowtap::backend;
  uint8_t slot[kMaxRequestBytes] = {};
  std::memcpy(slot, data, size < sizeof(slot) ? size : sizeof(slot));
  const uint8_t* rest = size > sizeof(slot) ? data + sizeof(slot) : nullptr;
  const size_t rest_len = size > sizeof(slot) ? size - sizeof(slot) : 0;
  const DeviceLimits limits = LimitsFrom(rest, rest_len);
  const uint8_t* extra = rest_len > 10 ? rest + 10 : nullptr;
  const size_t extra_len = rest_len > 10 ? rest_len - 10 : 0;
  CheckOne(Abi::kX86_64, slot, limits, extra, extra_len);
  CheckOne(Abi::kX86_32, slot, limits, extra, extra_len);
  return 0;
}
