// The blkif wire format (Xen's io/blkif.h), decoded into private,
// ABI-independent structs and encoded back.
//
// A guest speaks one of two layouts, chosen by the frontend's `protocol`
// xenstore key: "x86_64-abi" (the native layout of the public header, 112-byte
// requests, 16-byte responses) and "x86_32-abi" (an i386 guest: 64-bit fields
// are only 4-byte aligned, so `id` sits at offset 4, requests are 108 bytes
// and responses 12). Everything after decoding works on Request and Response,
// which have no layout of their own.
//
// Decoding never fails and never trusts anything: it copies fields out of a
// caller-owned private copy of the ring slot; checking them is validate.h's
// job. All functions are pure; thread-safe.
#pragma once

#include <array>
#include <cstddef>
#include <cstdint>
#include <span>
#include <string_view>

#include "base/status.h"

namespace cowtap::backend {

// Wire constants, as io/blkif.h spells them.
inline constexpr uint8_t kOpRead = 0;
inline constexpr uint8_t kOpWrite = 1;
inline constexpr uint8_t kOpWriteBarrier = 2;
inline constexpr uint8_t kOpFlushDiskcache = 3;
inline constexpr uint8_t kOpReserved1 = 4;
inline constexpr uint8_t kOpDiscard = 5;
inline constexpr uint8_t kOpIndirect = 6;

inline constexpr int16_t kRspOkay = 0;
inline constexpr int16_t kRspError = -1;
inline constexpr int16_t kRspEopnotsupp = -2;

inline constexpr uint8_t kDiscardSecure = 1;  // BLKIF_DISCARD_SECURE

inline constexpr uint32_t kMaxDirectSegments = 11;   // BLKIF_MAX_SEGMENTS_PER_REQUEST
inline constexpr uint32_t kMaxIndirectPages = 8;     // BLKIF_MAX_INDIRECT_PAGES_PER_REQUEST
inline constexpr size_t kPageSize = 4096;            // Xen grants are 4 KiB pages
inline constexpr size_t kSegmentDescriptorSize = 8;  // sizeof(blkif_request_segment)
inline constexpr uint32_t kSegmentsPerIndirectPage = kPageSize / kSegmentDescriptorSize;  // 512
// The most segments an indirect request can describe at all.
inline constexpr uint32_t kMaxIndirectSegmentsWire = kMaxIndirectPages * kSegmentsPerIndirectPage;

// Bytes of the shared ring page before the first slot (req_prod, req_event,
// rsp_prod, rsp_event, 48 bytes of padding).
inline constexpr size_t kRingHeaderBytes = 64;

// The slot size of the largest ABI; a buffer this big holds any request.
inline constexpr size_t kMaxRequestBytes = 112;

enum class Abi : uint8_t { kX86_64, kX86_32 };

std::string_view AbiName(Abi abi);  // "x86_64-abi" / "x86_32-abi"
// Maps the frontend's `protocol` value to an ABI. An empty string (key
// absent) means the backend's native ABI, x86_64. Anything else (e.g.
// "arm-abi", or garbage) is kNotSupported, naming the value.
Result<Abi> ParseProtocol(std::string_view protocol);

size_t RequestBytes(Abi abi);   // 112 or 108
size_t ResponseBytes(Abi abi);  // 16 or 12
size_t RingSlotBytes(Abi abi);  // sizeof(union blkif_sring_entry): 112 or 108
// Slots in a shared ring of ring_bytes: as many as fit after the header,
// rounded down to a power of two (io/ring.h's __RING_SIZE). 32 for one page
// in either ABI. 0 if ring_bytes is smaller than header + one slot.
uint32_t RingCapacity(Abi abi, size_t ring_bytes);

struct Segment {
  uint32_t gref = 0;
  uint8_t first_sect = 0;  // first sector in the page (inclusive)
  uint8_t last_sect = 0;   // last sector in the page (inclusive)
};

// One request, as the guest wrote it (nothing checked). Which fields carry
// meaning depends on `operation`; the others are zero.
struct Request {
  uint8_t operation = 0;
  uint64_t id = 0;  // echoed in the response
  uint16_t handle = 0;
  uint64_t sector_number = 0;
  // READ, WRITE, WRITE_BARRIER, FLUSH_DISKCACHE: nr_segments as written (may
  // exceed 11; only the first 11 descriptors exist in the slot).
  // INDIRECT: the 16-bit nr_segments of blkif_request_indirect.
  uint16_t nr_segments = 0;
  std::array<Segment, kMaxDirectSegments> seg{};
  // DISCARD.
  uint8_t discard_flag = 0;
  uint64_t nr_sectors = 0;
  // INDIRECT.
  uint8_t indirect_op = 0;
  std::array<uint32_t, kMaxIndirectPages> indirect_grefs{};
};

struct Response {
  uint64_t id = 0;
  uint8_t operation = 0;
  int16_t status = kRspOkay;
};

// Decodes the request in slot. REQUIRES: slot.size() >= RequestBytes(abi);
// the caller has already copied the slot out of shared memory.
Request DecodeRequest(Abi abi, std::span<const uint8_t> slot);
// Encodes a request (for frontends and tests). Unused bytes are zeroed.
// REQUIRES: slot.size() >= RequestBytes(abi).
void EncodeRequest(Abi abi, const Request& request, std::span<uint8_t> slot);

// REQUIRES: out.size() >= ResponseBytes(abi). Padding bytes are zeroed.
void EncodeResponse(Abi abi, const Response& response, std::span<uint8_t> out);
// REQUIRES: in.size() >= ResponseBytes(abi).
Response DecodeResponse(Abi abi, std::span<const uint8_t> in);

// One blkif_request_segment (8 bytes, identical in both ABIs), as found in
// indirect descriptor pages. REQUIRES: 8 readable bytes at p.
Segment DecodeSegment(const uint8_t* p);
void EncodeSegment(const Segment& segment, uint8_t* p);

}  // namespace cowtap::backend
