#include "xen-glue/blkfront_ring.h"

#include <xen/xen.h>
#include <xen/grant_table.h>
#include <xen/io/blkif.h>

#include <algorithm>
#include <atomic>
#include <cstddef>
#include <cstring>

#include "base/endian.h"

namespace cowtap::xen {
namespace {

// Byte offsets of one request layout. The 64-bit ABI is the native layout of
// blkif.h's structs (asserted below); the 32-bit ABI packs 8-byte members at
// 4-byte alignment.
struct Layout {
  size_t slot_bytes;
  size_t rw_id, rw_sector, rw_seg;
  size_t discard_id, discard_sector, discard_nr_sectors;
  size_t indirect_id, indirect_sector, indirect_handle, indirect_grefs;
  size_t rsp_status;
};

constexpr Layout kLayout64 = {112, 8, 16, 24, 8, 16, 24, 8, 16, 24, 28, 10};
constexpr Layout kLayout32 = {108, 4, 12, 20, 4, 12, 20, 4, 12, 20, 24, 10};

static_assert(sizeof(blkif_request) == kLayout64.slot_bytes);
static_assert(sizeof(blkif_sring_entry) == kLayout64.slot_bytes);
static_assert(offsetof(blkif_request, id) == kLayout64.rw_id);
static_assert(offsetof(blkif_request, sector_number) == kLayout64.rw_sector);
static_assert(offsetof(blkif_request, seg) == kLayout64.rw_seg);
static_assert(sizeof(blkif_request_segment) == 8);
static_assert(offsetof(blkif_request_discard, id) == kLayout64.discard_id);
static_assert(offsetof(blkif_request_discard, sector_number) == kLayout64.discard_sector);
static_assert(offsetof(blkif_request_discard, nr_sectors) == kLayout64.discard_nr_sectors);
static_assert(offsetof(blkif_request_indirect, id) == kLayout64.indirect_id);
static_assert(offsetof(blkif_request_indirect, sector_number) == kLayout64.indirect_sector);
static_assert(offsetof(blkif_request_indirect, handle) == kLayout64.indirect_handle);
static_assert(offsetof(blkif_request_indirect, indirect_grefs) == kLayout64.indirect_grefs);
static_assert(offsetof(blkif_response, status) == kLayout64.rsp_status);
static_assert(offsetof(blkif_sring, ring) == kBlkifRingHeaderBytes);
static_assert(BLKIF_MAX_SEGMENTS_PER_REQUEST == kBlkifMaxDirectSegments);
static_assert(BLKIF_MAX_INDIRECT_PAGES_PER_REQUEST == kBlkifMaxIndirectPages);
static_assert(BLKIF_OP_INDIRECT == kBlkifOpIndirect && BLKIF_OP_DISCARD == kBlkifOpDiscard &&
              BLKIF_OP_FLUSH_DISKCACHE == kBlkifOpFlushDiskcache &&
              BLKIF_OP_WRITE_BARRIER == kBlkifOpWriteBarrier);
static_assert(BLKIF_RSP_EOPNOTSUPP == kBlkifRspEopnotsupp && BLKIF_RSP_ERROR == kBlkifRspError);

const Layout& LayoutFor(BlkifAbi abi) { return abi == BlkifAbi::kX86_32 ? kLayout32 : kLayout64; }

// Shared header offsets (struct blkif_sring).
constexpr size_t kReqProd = 0;
constexpr size_t kReqEvent = 4;
constexpr size_t kRspProd = 8;
constexpr size_t kRspEvent = 12;

uint32_t RoundDownPow2(uint32_t v) {
  if (v == 0) return 0;
  return uint32_t{1} << (31 - __builtin_clz(v));
}

}  // namespace

std::string_view BlkifAbiName(BlkifAbi abi) {
  return abi == BlkifAbi::kX86_32 ? "x86_32-abi" : "x86_64-abi";
}

size_t BlkifSlotBytes(BlkifAbi abi) { return LayoutFor(abi).slot_bytes; }

uint32_t BlkifRingEntries(BlkifAbi abi, uint32_t ring_pages) {
  const size_t bytes = size_t{ring_pages} * kBlkifPageBytes;
  if (bytes <= kBlkifRingHeaderBytes) return 0;
  return RoundDownPow2(static_cast<uint32_t>((bytes - kBlkifRingHeaderBytes) / BlkifSlotBytes(abi)));
}

void EncodeBlkifRequest(BlkifAbi abi, const BlkifRequest& req, uint8_t* slot) {
  const Layout& l = LayoutFor(abi);
  std::memset(slot, 0, l.slot_bytes);
  slot[0] = req.operation;
  switch (req.operation) {
    case kBlkifOpDiscard:
      slot[1] = req.discard_flag;
      StoreLe16(slot + 2, req.handle);
      StoreLe64(slot + l.discard_id, req.id);
      StoreLe64(slot + l.discard_sector, req.sector_number);
      StoreLe64(slot + l.discard_nr_sectors, req.nr_sectors);
      return;
    case kBlkifOpIndirect: {
      slot[1] = req.indirect_op;
      StoreLe16(slot + 2, req.nr_segments);
      StoreLe64(slot + l.indirect_id, req.id);
      StoreLe64(slot + l.indirect_sector, req.sector_number);
      StoreLe16(slot + l.indirect_handle, req.handle);
      const uint32_t pages = std::min(req.nr_indirect_pages, kBlkifMaxIndirectPages);
      for (uint32_t i = 0; i < pages; ++i) StoreLe32(slot + l.indirect_grefs + 4 * i, req.indirect_grefs[i]);
      return;
    }
    default: {
      slot[1] = static_cast<uint8_t>(req.nr_segments);
      StoreLe16(slot + 2, req.handle);
      StoreLe64(slot + l.rw_id, req.id);
      StoreLe64(slot + l.rw_sector, req.sector_number);
      const uint32_t n = std::min<uint32_t>(req.nr_segments, kBlkifMaxDirectSegments);
      for (uint32_t i = 0; i < n; ++i) {
        uint8_t* s = slot + l.rw_seg + 8 * i;
        StoreLe32(s, req.seg[i].gref);
        s[4] = req.seg[i].first_sect;
        s[5] = req.seg[i].last_sect;
      }
      return;
    }
  }
}

BlkifRequest DecodeBlkifRequest(BlkifAbi abi, const uint8_t* slot) {
  const Layout& l = LayoutFor(abi);
  BlkifRequest req;
  req.operation = slot[0];
  switch (req.operation) {
    case kBlkifOpDiscard:
      req.discard_flag = slot[1];
      req.handle = LoadLe16(slot + 2);
      req.id = LoadLe64(slot + l.discard_id);
      req.sector_number = LoadLe64(slot + l.discard_sector);
      req.nr_sectors = LoadLe64(slot + l.discard_nr_sectors);
      break;
    case kBlkifOpIndirect:
      req.indirect_op = slot[1];
      req.nr_segments = LoadLe16(slot + 2);
      req.id = LoadLe64(slot + l.indirect_id);
      req.sector_number = LoadLe64(slot + l.indirect_sector);
      req.handle = LoadLe16(slot + l.indirect_handle);
      req.nr_indirect_pages = kBlkifMaxIndirectPages;
      for (uint32_t i = 0; i < kBlkifMaxIndirectPages; ++i) {
        req.indirect_grefs[i] = LoadLe32(slot + l.indirect_grefs + 4 * i);
      }
      break;
    default:
      req.nr_segments = slot[1];
      req.handle = LoadLe16(slot + 2);
      req.id = LoadLe64(slot + l.rw_id);
      req.sector_number = LoadLe64(slot + l.rw_sector);
      for (uint32_t i = 0; i < std::min<uint32_t>(req.nr_segments, kBlkifMaxDirectSegments); ++i) {
        const uint8_t* s = slot + l.rw_seg + 8 * i;
        req.seg[i] = {LoadLe32(s), s[4], s[5]};
      }
      break;
  }
  return req;
}

BlkifResponse DecodeBlkifResponse(BlkifAbi abi, const uint8_t* slot) {
  BlkifResponse rsp;
  rsp.id = LoadLe64(slot);
  rsp.operation = slot[8];
  rsp.status = static_cast<int16_t>(LoadLe16(slot + LayoutFor(abi).rsp_status));
  return rsp;
}

void EncodeBlkifResponse(BlkifAbi abi, const BlkifResponse& rsp, uint8_t* slot) {
  StoreLe64(slot, rsp.id);
  slot[8] = rsp.operation;
  slot[9] = 0;
  StoreLe16(slot + LayoutFor(abi).rsp_status, static_cast<uint16_t>(rsp.status));
}

void EncodeIndirectSegment(uint8_t* page, uint32_t index, const BlkifSegment& seg) {
  uint8_t* s = page + 8 * (index % kBlkifSegmentsPerIndirectPage);
  StoreLe32(s, seg.gref);
  s[4] = seg.first_sect;
  s[5] = seg.last_sect;
  s[6] = 0;
  s[7] = 0;
}

namespace {
std::vector<uint8_t*> ContiguousPages(void* shared, uint32_t ring_pages) {
  std::vector<uint8_t*> pages;
  for (uint32_t i = 0; i < ring_pages; ++i) pages.push_back(static_cast<uint8_t*>(shared) + i * kBlkifPageBytes);
  return pages;
}
}  // namespace

FrontRing::FrontRing(void* shared, uint32_t ring_pages, BlkifAbi abi)
    : FrontRing(ContiguousPages(shared, ring_pages), abi) {}

FrontRing::FrontRing(std::span<uint8_t* const> pages, BlkifAbi abi)
    : pages_(pages.begin(), pages.end()),
      abi_(abi),
      slot_bytes_(BlkifSlotBytes(abi)),
      size_(BlkifRingEntries(abi, static_cast<uint32_t>(pages.size()))) {
  std::memset(pages_[0], 0, kBlkifRingHeaderBytes);
  std::atomic_ref<uint32_t>(*SharedIndex(kReqEvent)).store(1, std::memory_order_relaxed);
  std::atomic_ref<uint32_t>(*SharedIndex(kRspEvent)).store(1, std::memory_order_relaxed);
  std::atomic_thread_fence(std::memory_order_seq_cst);
}

uint32_t* FrontRing::SharedIndex(size_t byte_offset) const {
  return reinterpret_cast<uint32_t*>(pages_[0] + byte_offset);
}

size_t FrontRing::SlotOffset(uint32_t index) const {
  return kBlkifRingHeaderBytes + size_t{index & (size_ - 1)} * slot_bytes_;
}

void FrontRing::CopyToRing(size_t offset, const uint8_t* src, size_t len) {
  while (len > 0) {
    const size_t in_page = offset % kBlkifPageBytes;
    const size_t n = std::min(len, kBlkifPageBytes - in_page);
    std::memcpy(pages_[offset / kBlkifPageBytes] + in_page, src, n);
    offset += n;
    src += n;
    len -= n;
  }
}

void FrontRing::CopyFromRing(size_t offset, uint8_t* dst, size_t len) const {
  while (len > 0) {
    const size_t in_page = offset % kBlkifPageBytes;
    const size_t n = std::min(len, kBlkifPageBytes - in_page);
    std::memcpy(dst, pages_[offset / kBlkifPageBytes] + in_page, n);
    offset += n;
    dst += n;
    len -= n;
  }
}

void FrontRing::QueueRequest(const BlkifRequest& req) {
  uint8_t slot[kLayout64.slot_bytes];
  EncodeBlkifRequest(abi_, req, slot);
  CopyToRing(SlotOffset(req_prod_pvt_), slot, slot_bytes_);
  ++req_prod_pvt_;
}

void FrontRing::QueueRawSlot(std::span<const uint8_t> bytes) {
  uint8_t slot[kLayout64.slot_bytes] = {};
  std::memcpy(slot, bytes.data(), std::min(bytes.size(), slot_bytes_));
  CopyToRing(SlotOffset(req_prod_pvt_), slot, slot_bytes_);
  ++req_prod_pvt_;
}

bool FrontRing::PushRequestsAndCheckNotify() {
  std::atomic_ref<uint32_t> req_prod(*SharedIndex(kReqProd));
  std::atomic_ref<uint32_t> req_event(*SharedIndex(kReqEvent));
  const uint32_t old_prod = req_prod.load(std::memory_order_relaxed);
  const uint32_t new_prod = req_prod_pvt_;
  // Backend sees the requests before the new producer index (wmb).
  std::atomic_thread_fence(std::memory_order_release);
  req_prod.store(new_prod, std::memory_order_relaxed);
  // Backend sees the new producer index before we read req_event (mb).
  std::atomic_thread_fence(std::memory_order_seq_cst);
  const uint32_t event = req_event.load(std::memory_order_relaxed);
  return static_cast<uint32_t>(new_prod - event) < static_cast<uint32_t>(new_prod - old_prod);
}

Result<bool> FrontRing::TakeResponse(BlkifResponse* out) {
  const uint32_t rsp_prod = std::atomic_ref<uint32_t>(*SharedIndex(kRspProd)).load(std::memory_order_relaxed);
  // Read the responses only after seeing the producer index (rmb).
  std::atomic_thread_fence(std::memory_order_acquire);
  if (rsp_prod == rsp_cons_) return false;
  if (static_cast<uint32_t>(rsp_prod - rsp_cons_) > static_cast<uint32_t>(req_prod_pvt_ - rsp_cons_)) {
    return Status::Corrupt("blkif ring: backend rsp_prod " + std::to_string(rsp_prod) +
                           " is ahead of the requests issued (rsp_cons " + std::to_string(rsp_cons_) +
                           ", req_prod " + std::to_string(req_prod_pvt_) + "); the backend is broken");
  }
  uint8_t slot[kLayout64.slot_bytes];
  CopyFromRing(SlotOffset(rsp_cons_), slot, slot_bytes_);
  *out = DecodeBlkifResponse(abi_, slot);
  ++rsp_cons_;
  return true;
}

bool FrontRing::FinalCheckForResponses() {
  std::atomic_ref<uint32_t> rsp_prod(*SharedIndex(kRspProd));
  std::atomic_ref<uint32_t> rsp_event(*SharedIndex(kRspEvent));
  if (rsp_prod.load(std::memory_order_acquire) != rsp_cons_) return true;
  rsp_event.store(rsp_cons_ + 1, std::memory_order_relaxed);
  std::atomic_thread_fence(std::memory_order_seq_cst);
  return rsp_prod.load(std::memory_order_acquire) != rsp_cons_;
}

void FrontRing::ForceReqProd(uint32_t value) {
  std::atomic_thread_fence(std::memory_order_release);
  std::atomic_ref<uint32_t>(*SharedIndex(kReqProd)).store(value, std::memory_order_relaxed);
  std::atomic_thread_fence(std::memory_order_seq_cst);
}

}  // namespace cowtap::xen
