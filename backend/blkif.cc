#include "backend/blkif.h"

#include <cstring>
#include <string>

#include "base/endian.h"

namespace cowtap::backend {
namespace {

// Byte offsets of the fields that move between ABIs. The x86_64 layout
// follows the public header's natural alignment; the x86_32 layout is what an
// i386 compiler makes of the same structs (8-byte fields 4-byte aligned).
struct Layout {
  size_t request_bytes;
  size_t response_bytes;
  size_t id;             // all request kinds
  size_t sector_number;  // all request kinds
  size_t seg;            // blkif_request
  size_t nr_sectors;     // blkif_request_discard
  size_t indirect_handle;
  size_t indirect_grefs;
};

constexpr Layout kLayout64{112, 16, 8, 16, 24, 24, 24, 28};
constexpr Layout kLayout32{108, 12, 4, 12, 20, 20, 20, 24};

// Offsets common to both: operation 0, nr_segments / flag / indirect_op 1,
// handle 2 (READ/WRITE/DISCARD), indirect nr_segments 2 (16 bit).
// Response: id 0, operation 8, status 10.
constexpr size_t kSegmentSlots = kMaxDirectSegments;

const Layout& LayoutFor(Abi abi) { return abi == Abi::kX86_32 ? kLayout32 : kLayout64; }

static_assert(kLayout64.seg + kSegmentSlots * kSegmentDescriptorSize == kLayout64.request_bytes);
static_assert(kLayout32.seg + kSegmentSlots * kSegmentDescriptorSize == kLayout32.request_bytes);
static_assert(kLayout64.indirect_grefs + 4 * kMaxIndirectPages <= kLayout64.request_bytes);
static_assert(kLayout32.indirect_grefs + 4 * kMaxIndirectPages <= kLayout32.request_bytes);
static_assert(kMaxRequestBytes == kLayout64.request_bytes);

}  // namespace

std::string_view AbiName(Abi abi) { return abi == Abi::kX86_32 ? "x86_32-abi" : "x86_64-abi"; }

Result<Abi> ParseProtocol(std::string_view protocol) {
  if (protocol.empty() || protocol == "x86_64-abi") return Abi::kX86_64;
  if (protocol == "x86_32-abi") return Abi::kX86_32;
  std::string shown(protocol.substr(0, 64));
  return Status::NotSupported("frontend protocol \"" + shown +
                              "\" is not supported (cowtap serves x86_64-abi and x86_32-abi)");
}

size_t RequestBytes(Abi abi) { return LayoutFor(abi).request_bytes; }
size_t ResponseBytes(Abi abi) { return LayoutFor(abi).response_bytes; }
// The slot is the union of request and response; the request is the larger.
size_t RingSlotBytes(Abi abi) { return LayoutFor(abi).request_bytes; }

uint32_t RingCapacity(Abi abi, size_t ring_bytes) {
  if (ring_bytes < kRingHeaderBytes) return 0;
  size_t slots = (ring_bytes - kRingHeaderBytes) / RingSlotBytes(abi);
  if (slots == 0) return 0;
  if (slots > (size_t{1} << 31)) slots = size_t{1} << 31;
  uint32_t pow2 = 1;
  while (static_cast<size_t>(pow2) * 2 <= slots) pow2 *= 2;
  return pow2;
}

Segment DecodeSegment(const uint8_t* p) {
  Segment s;
  s.gref = LoadLe32(p);
  s.first_sect = p[4];
  s.last_sect = p[5];
  return s;
}

void EncodeSegment(const Segment& segment, uint8_t* p) {
  StoreLe32(p, segment.gref);
  p[4] = segment.first_sect;
  p[5] = segment.last_sect;
  p[6] = 0;
  p[7] = 0;
}

Request DecodeRequest(Abi abi, std::span<const uint8_t> slot) {
  const Layout& l = LayoutFor(abi);
  const uint8_t* p = slot.data();
  Request r;
  r.operation = p[0];
  r.id = LoadLe64(p + l.id);
  r.sector_number = LoadLe64(p + l.sector_number);
  switch (r.operation) {
    case kOpDiscard:
      r.discard_flag = p[1];
      r.handle = LoadLe16(p + 2);
      r.nr_sectors = LoadLe64(p + l.nr_sectors);
      break;
    case kOpIndirect:
      r.indirect_op = p[1];
      r.nr_segments = LoadLe16(p + 2);
      r.handle = LoadLe16(p + l.indirect_handle);
      for (size_t i = 0; i < kMaxIndirectPages; ++i) r.indirect_grefs[i] = LoadLe32(p + l.indirect_grefs + 4 * i);
      break;
    default:
      // READ, WRITE, WRITE_BARRIER, FLUSH_DISKCACHE and unknown operations
      // share blkif_request's layout; unknown ones only need id.
      r.nr_segments = p[1];
      r.handle = LoadLe16(p + 2);
      for (size_t i = 0; i < kSegmentSlots; ++i) r.seg[i] = DecodeSegment(p + l.seg + kSegmentDescriptorSize * i);
      break;
  }
  return r;
}

void EncodeRequest(Abi abi, const Request& r, std::span<uint8_t> slot) {
  const Layout& l = LayoutFor(abi);
  uint8_t* p = slot.data();
  std::memset(p, 0, l.request_bytes);
  p[0] = r.operation;
  StoreLe64(p + l.id, r.id);
  StoreLe64(p + l.sector_number, r.sector_number);
  switch (r.operation) {
    case kOpDiscard:
      p[1] = r.discard_flag;
      StoreLe16(p + 2, r.handle);
      StoreLe64(p + l.nr_sectors, r.nr_sectors);
      break;
    case kOpIndirect:
      p[1] = r.indirect_op;
      StoreLe16(p + 2, r.nr_segments);
      StoreLe16(p + l.indirect_handle, r.handle);
      for (size_t i = 0; i < kMaxIndirectPages; ++i) StoreLe32(p + l.indirect_grefs + 4 * i, r.indirect_grefs[i]);
      break;
    default:
      p[1] = static_cast<uint8_t>(r.nr_segments);
      StoreLe16(p + 2, r.handle);
      for (size_t i = 0; i < kSegmentSlots; ++i) EncodeSegment(r.seg[i], p + l.seg + kSegmentDescriptorSize * i);
      break;
  }
}

void EncodeResponse(Abi abi, const Response& response, std::span<uint8_t> out) {
  uint8_t* p = out.data();
  std::memset(p, 0, ResponseBytes(abi));
  StoreLe64(p, response.id);
  p[8] = response.operation;
  StoreLe16(p + 10, static_cast<uint16_t>(response.status));
}

Response DecodeResponse(Abi abi, std::span<const uint8_t> in) {
  const uint8_t* p = in.data();
  Response r;
  r.id = LoadLe64(p);
  r.operation = p[8];
  r.status = static_cast<int16_t>(LoadLe16(p + 10));
  return r;
}

}  // namespace cowtap::backend
