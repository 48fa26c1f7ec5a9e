// The guest (frontend) side of one blkif shared ring: encoding requests into
// ring slots in either request ABI (x86_64-abi or x86_32-abi, as the
// `protocol` xenstore key names them), decoding responses, and the producer /
// consumer index discipline of xen/io/ring.h seen from the front.
//
// Layouts follow /usr/include/xen/io/blkif.h: the 64-bit layout is the native
// struct blkif_request (checked by static_assert in the .cc); the 32-bit layout
// is the same struct as an i386 compiler lays it out (8-byte members 4-byte
// aligned, so `id` sits at offset 4 and a request is 108 bytes). Both are
// written byte by byte at explicit offsets, little-endian.
//
// The shared page is memory the backend (another process) reads and writes
// concurrently: the indices are accessed through std::atomic_ref with the
// barriers ring.h prescribes (wmb before publishing req_prod, mb before reading
// rsp_event / req_event). Response slots are copied out once before use.
//
// Thread-safety: a FrontRing is used by one thread at a time. The codec
// functions are pure and thread-safe.
#pragma once

#include <cstddef>
#include <cstdint>
#include <span>
#include <string_view>
#include <vector>

#include "base/status.h"

namespace cowtap::xen {

enum class BlkifAbi : uint8_t { kX86_64, kX86_32 };

// "x86_64-abi" / "x86_32-abi".
std::string_view BlkifAbiName(BlkifAbi abi);

inline constexpr size_t kBlkifPageBytes = 4096;
inline constexpr size_t kBlkifRingHeaderBytes = 64;  // req_prod..rsp_event + pad
inline constexpr uint32_t kBlkifMaxDirectSegments = 11;
inline constexpr uint32_t kBlkifMaxIndirectPages = 8;
inline constexpr uint32_t kBlkifSegmentsPerIndirectPage = 512;  // 8-byte descriptors
inline constexpr uint32_t kBlkifSectorsPerPage = 8;              // 512-byte sectors

// Ring opcodes and statuses (values from blkif.h).
inline constexpr uint8_t kBlkifOpRead = 0;
inline constexpr uint8_t kBlkifOpWrite = 1;
inline constexpr uint8_t kBlkifOpWriteBarrier = 2;
inline constexpr uint8_t kBlkifOpFlushDiskcache = 3;
inline constexpr uint8_t kBlkifOpDiscard = 5;
inline constexpr uint8_t kBlkifOpIndirect = 6;
inline constexpr uint8_t kBlkifDiscardSecure = 1;
inline constexpr int16_t kBlkifRspOkay = 0;
inline constexpr int16_t kBlkifRspError = -1;
inline constexpr int16_t kBlkifRspEopnotsupp = -2;

// Bytes of one ring slot (the union of request and response).
size_t BlkifSlotBytes(BlkifAbi abi);
// Slots in a ring of ring_pages pages: as many as fit, rounded down to a
// power of two (32 per page for both ABIs).
uint32_t BlkifRingEntries(BlkifAbi abi, uint32_t ring_pages);

struct BlkifSegment {
  uint32_t gref = 0;
  uint8_t first_sect = 0;
  uint8_t last_sect = 0;
};

// An ABI-independent request as the frontend means it. Which fields are
// encoded depends on operation: READ/WRITE/WRITE_BARRIER/FLUSH use
// nr_segments + seg; DISCARD uses discard_flag + nr_sectors; INDIRECT uses
// indirect_op + nr_segments + indirect_grefs (nr_indirect_pages of them).
// Other operation values are encoded like READ (for misbehaviour tests).
struct BlkifRequest {
  uint8_t operation = kBlkifOpRead;
  uint16_t nr_segments = 0;  // direct: 0..11 (truncated to 8 bits on the wire)
  uint16_t handle = 0;
  uint64_t id = 0;
  uint64_t sector_number = 0;
  BlkifSegment seg[kBlkifMaxDirectSegments] = {};
  uint8_t discard_flag = 0;
  uint64_t nr_sectors = 0;
  uint8_t indirect_op = kBlkifOpRead;
  uint32_t nr_indirect_pages = 0;
  uint32_t indirect_grefs[kBlkifMaxIndirectPages] = {};
};

struct BlkifResponse {
  uint64_t id = 0;
  uint8_t operation = 0;
  int16_t status = 0;
};

// Writes req into slot (BlkifSlotBytes(abi) bytes; bytes the request does not
// use are zeroed). REQUIRES: slot has BlkifSlotBytes(abi) bytes.
void EncodeBlkifRequest(BlkifAbi abi, const BlkifRequest& req, uint8_t* slot);
// Reads a response out of slot (copied once).
BlkifResponse DecodeBlkifResponse(BlkifAbi abi, const uint8_t* slot);
// The reverse pair, used by tests that play the backend.
BlkifRequest DecodeBlkifRequest(BlkifAbi abi, const uint8_t* slot);
void EncodeBlkifResponse(BlkifAbi abi, const BlkifResponse& rsp, uint8_t* slot);
// Writes segment descriptor `index` (0..511) of an indirect page.
void EncodeIndirectSegment(uint8_t* page, uint32_t index, const BlkifSegment& seg);

class FrontRing {
 public:
  // Takes over the ring's pages (the guest's view of the pages it will grant,
  // in ring-ref order; they need not be contiguous here, the backend maps
  // them contiguously) and initialises the shared header (indices 0, events
  // 1) as SHARED_RING_INIT + FRONT_RING_INIT do. Not owning.
  FrontRing(std::span<uint8_t* const> pages, BlkifAbi abi);
  // The same over ring_pages contiguous pages at shared.
  FrontRing(void* shared, uint32_t ring_pages, BlkifAbi abi);
  FrontRing(const FrontRing&) = delete;
  FrontRing& operator=(const FrontRing&) = delete;

  BlkifAbi abi() const { return abi_; }
  uint32_t size() const { return size_; }
  // Slots a new request may use now (size - (req_prod_pvt - rsp_cons)).
  uint32_t FreeSlots() const { return size_ - (req_prod_pvt_ - rsp_cons_); }
  // Encodes req at the private producer index and advances it.
  // REQUIRES: FreeSlots() > 0.
  void QueueRequest(const BlkifRequest& req);
  // Writes raw bytes (up to a slot) at the private producer index and
  // advances it (misbehaviour: garbage requests). REQUIRES: FreeSlots() > 0.
  void QueueRawSlot(std::span<const uint8_t> bytes);
  // Publishes queued requests (wmb, then req_prod) and says whether the
  // backend asked to be notified (RING_PUSH_REQUESTS_AND_CHECK_NOTIFY).
  bool PushRequestsAndCheckNotify();
  // Copies out the next response if one is published, advancing rsp_cons.
  // Fails with kCorrupt when rsp_prod runs ahead of what was requested (a
  // broken backend), leaving the ring untouched.
  Result<bool> TakeResponse(BlkifResponse* out);
  // After draining: re-arms rsp_event and says whether more responses
  // arrived meanwhile (RING_FINAL_CHECK_FOR_RESPONSES).
  bool FinalCheckForResponses();
  // Requests pushed and not yet answered.
  uint32_t InFlight() const { return req_prod_pvt_ - rsp_cons_; }

  // Misbehaviour: publishes req_prod = value directly (no wmb discipline
  // beyond a release store), e.g. rsp_cons + size + k to race past the ring.
  void ForceReqProd(uint32_t value);
  uint32_t rsp_cons() const { return rsp_cons_; }

 private:
  // Byte offset of a slot from the start of the ring; slots may straddle
  // two pages, so they are copied in and out in page-sized pieces.
  size_t SlotOffset(uint32_t index) const;
  void CopyToRing(size_t offset, const uint8_t* src, size_t len);
  void CopyFromRing(size_t offset, uint8_t* dst, size_t len) const;
  uint32_t* SharedIndex(size_t byte_offset) const;

  std::vector<uint8_t*> pages_;
  const BlkifAbi abi_;
  const size_t slot_bytes_;
  const uint32_t size_;
  uint32_t req_prod_pvt_ = 0;
  uint32_t rsp_cons_ = 0;
};

}  // namespace cowtap::xen
