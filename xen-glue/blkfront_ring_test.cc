#include "xen-glue/blkfront_ring.h"

#include <gtest/gtest.h>

#include <cstring>
#include <vector>

#include "base/endian.h"

namespace cowtap::xen {
namespace {

TEST(BlkifCodecTest, SlotSizesMatchBothAbis) {
  EXPECT_EQ(BlkifSlotBytes(BlkifAbi::kX86_64), 112u);
  EXPECT_EQ(BlkifSlotBytes(BlkifAbi::kX86_32), 108u);
  EXPECT_EQ(BlkifRingEntries(BlkifAbi::kX86_64, 1), 32u);
  EXPECT_EQ(BlkifRingEntries(BlkifAbi::kX86_32, 1), 32u);
  EXPECT_EQ(BlkifRingEntries(BlkifAbi::kX86_64, 2), 64u);
  EXPECT_EQ(BlkifRingEntries(BlkifAbi::kX86_64, 16), 512u);
  EXPECT_EQ(BlkifAbiName(BlkifAbi::kX86_32), "x86_32-abi");
  EXPECT_EQ(BlkifAbiName(BlkifAbi::kX86_64), "x86_64-abi");
}

BlkifRequest SampleRw() {
  BlkifRequest req;
  req.operation = kBlkifOpWrite;
  req.nr_segments = 3;
  req.handle = 0x1234;
  req.id = 0x0102030405060708ull;
  req.sector_number = 0x1122334455667788ull;
  for (int i = 0; i < 3; ++i) req.seg[i] = {100u + i, uint8_t(i), 7};
  return req;
}

TEST(BlkifCodecTest, X86_32PacksIdAtOffsetFour) {
  uint8_t slot[112];
  EncodeBlkifRequest(BlkifAbi::kX86_32, SampleRw(), slot);
  EXPECT_EQ(slot[0], kBlkifOpWrite);
  EXPECT_EQ(slot[1], 3);
  EXPECT_EQ(LoadLe16(slot + 2), 0x1234);
  EXPECT_EQ(LoadLe64(slot + 4), 0x0102030405060708ull);
  EXPECT_EQ(LoadLe64(slot + 12), 0x1122334455667788ull);
  EXPECT_EQ(LoadLe32(slot + 20 + 8), 101u);
  EXPECT_EQ(slot[20 + 8 + 4], 1);
  EXPECT_EQ(slot[20 + 8 + 5], 7);
}

TEST(BlkifCodecTest, X86_64AlignsIdAtOffsetEight) {
  uint8_t slot[112];
  EncodeBlkifRequest(BlkifAbi::kX86_64, SampleRw(), slot);
  EXPECT_EQ(LoadLe32(slot + 4), 0u);  // padding
  EXPECT_EQ(LoadLe64(slot + 8), 0x0102030405060708ull);
  EXPECT_EQ(LoadLe64(slot + 16), 0x1122334455667788ull);
  EXPECT_EQ(LoadLe32(slot + 24 + 16), 102u);
}

TEST(BlkifCodecTest, RoundTripsEveryOpInBothAbis) {
  for (BlkifAbi abi : {BlkifAbi::kX86_64, BlkifAbi::kX86_32}) {
    uint8_t slot[112];
    BlkifRequest rw = SampleRw();
    EncodeBlkifRequest(abi, rw, slot);
    BlkifRequest back = DecodeBlkifRequest(abi, slot);
    EXPECT_EQ(back.id, rw.id);
    EXPECT_EQ(back.sector_number, rw.sector_number);
    EXPECT_EQ(back.nr_segments, 3);
    EXPECT_EQ(back.seg[2].gref, 102u);

    BlkifRequest discard;
    discard.operation = kBlkifOpDiscard;
    discard.discard_flag = kBlkifDiscardSecure;
    discard.id = 77;
    discard.sector_number = 4096;
    discard.nr_sectors = 1ull << 40;
    EncodeBlkifRequest(abi, discard, slot);
    back = DecodeBlkifRequest(abi, slot);
    EXPECT_EQ(back.discard_flag, kBlkifDiscardSecure);
    EXPECT_EQ(back.id, 77u);
    EXPECT_EQ(back.sector_number, 4096u);
    EXPECT_EQ(back.nr_sectors, 1ull << 40);

    BlkifRequest ind;
    ind.operation = kBlkifOpIndirect;
    ind.indirect_op = kBlkifOpRead;
    ind.nr_segments = 300;
    ind.id = 9;
    ind.sector_number = 12;
    ind.handle = 51712;
    ind.nr_indirect_pages = 2;
    ind.indirect_grefs[0] = 5;
    ind.indirect_grefs[1] = 6;
    EncodeBlkifRequest(abi, ind, slot);
    back = DecodeBlkifRequest(abi, slot);
    EXPECT_EQ(back.indirect_op, kBlkifOpRead);
    EXPECT_EQ(back.nr_segments, 300);
    EXPECT_EQ(back.id, 9u);
    EXPECT_EQ(back.handle, 51712);
    EXPECT_EQ(back.indirect_grefs[1], 6u);
    EXPECT_EQ(back.indirect_grefs[2], 0u);

    BlkifResponse rsp{0xdeadbeefcafeull, kBlkifOpIndirect, kBlkifRspEopnotsupp};
    EncodeBlkifResponse(abi, rsp, slot);
    BlkifResponse r = DecodeBlkifResponse(abi, slot);
    EXPECT_EQ(r.id, rsp.id);
    EXPECT_EQ(r.operation, kBlkifOpIndirect);
    EXPECT_EQ(r.status, kBlkifRspEopnotsupp);
  }
}

TEST(BlkifCodecTest, IndirectSegmentsAreEightBytesEach) {
  std::vector<uint8_t> page(kBlkifPageBytes, 0xff);
  EncodeIndirectSegment(page.data(), 511, {42, 1, 6});
  EXPECT_EQ(LoadLe32(page.data() + 511 * 8), 42u);
  EXPECT_EQ(page[511 * 8 + 4], 1);
  EXPECT_EQ(page[511 * 8 + 5], 6);
  EXPECT_EQ(page[511 * 8 + 6], 0);
  EXPECT_EQ(page[510 * 8 + 7], 0xff);
}

class FrontRingTest : public ::testing::Test {
 protected:
  std::vector<uint8_t> mem_ = std::vector<uint8_t>(2 * kBlkifPageBytes, 0xAA);
  uint32_t Shared(size_t off) { return LoadLe32(mem_.data() + off); }
  void SetShared(size_t off, uint32_t v) { StoreLe32(mem_.data() + off, v); }
};

TEST_F(FrontRingTest, InitialisesHeaderLikeSharedRingInit) {
  FrontRing ring(mem_.data(), 2, BlkifAbi::kX86_64);
  EXPECT_EQ(ring.size(), 64u);
  EXPECT_EQ(ring.FreeSlots(), 64u);
  EXPECT_EQ(Shared(0), 0u);  // req_prod
  EXPECT_EQ(Shared(4), 1u);  // req_event
  EXPECT_EQ(Shared(8), 0u);  // rsp_prod
  EXPECT_EQ(Shared(12), 1u);  // rsp_event
}

TEST_F(FrontRingTest, PushNotifiesOnlyWhenBackendAskedForIt) {
  FrontRing ring(mem_.data(), 1, BlkifAbi::kX86_64);
  ring.QueueRequest(SampleRw());
  EXPECT_TRUE(ring.PushRequestsAndCheckNotify());  // req_event 1 crossed
  EXPECT_EQ(Shared(0), 1u);
  // Backend is busy: it set req_event far ahead.
  SetShared(4, 10);
  ring.QueueRequest(SampleRw());
  EXPECT_FALSE(ring.PushRequestsAndCheckNotify());
  EXPECT_EQ(Shared(0), 2u);
  EXPECT_EQ(ring.InFlight(), 2u);
  EXPECT_EQ(ring.FreeSlots(), 30u);
}

TEST_F(FrontRingTest, TakesResponsesInOrderAndRearmsEvent) {
  FrontRing ring(mem_.data(), 1, BlkifAbi::kX86_32);
  for (int i = 0; i < 2; ++i) ring.QueueRequest(SampleRw());
  (void)ring.PushRequestsAndCheckNotify();
  BlkifResponse rsp;
  auto none = ring.TakeResponse(&rsp);
  ASSERT_TRUE(none.ok());
  EXPECT_FALSE(*none);
  for (uint64_t i = 0; i < 2; ++i) {
    EncodeBlkifResponse(BlkifAbi::kX86_32, {i + 1, kBlkifOpWrite, kBlkifRspOkay},
                        mem_.data() + kBlkifRingHeaderBytes + i * 108);
  }
  SetShared(8, 2);
  for (uint64_t i = 0; i < 2; ++i) {
    auto got = ring.TakeResponse(&rsp);
    ASSERT_TRUE(got.ok());
    ASSERT_TRUE(*got);
    EXPECT_EQ(rsp.id, i + 1);
  }
  EXPECT_FALSE(ring.FinalCheckForResponses());
  EXPECT_EQ(Shared(12), 3u);
  EXPECT_EQ(ring.FreeSlots(), 32u);
}

TEST_F(FrontRingTest, RejectsBackendProducingMoreResponsesThanRequests) {
  FrontRing ring(mem_.data(), 1, BlkifAbi::kX86_64);
  ring.QueueRequest(SampleRw());
  (void)ring.PushRequestsAndCheckNotify();
  SetShared(8, 5);
  BlkifResponse rsp;
  auto got = ring.TakeResponse(&rsp);
  EXPECT_FALSE(got.ok());
  EXPECT_EQ(got.status().code(), ErrorCode::kCorrupt);
  EXPECT_EQ(ring.rsp_cons(), 0u);
}

TEST_F(FrontRingTest, ForceReqProdPublishesARacingIndex) {
  FrontRing ring(mem_.data(), 1, BlkifAbi::kX86_64);
  ring.ForceReqProd(ring.rsp_cons() + ring.size() + 5);
  EXPECT_EQ(Shared(0), 37u);
}

TEST(FrontRingPagesTest, SlotStraddlingTwoScatteredPagesIsSplitAcrossThem) {
  // x86_32 slots are 108 bytes: slot 37 spans bytes 4060..4167 of the ring.
  std::vector<uint8_t> a(kBlkifPageBytes, 0), b(kBlkifPageBytes, 0);
  uint8_t* pages[2] = {a.data(), b.data()};
  FrontRing ring(std::span<uint8_t* const>(pages, 2), BlkifAbi::kX86_32);
  ASSERT_EQ(ring.size(), 64u);
  BlkifRequest req = SampleRw();
  for (uint32_t i = 0; i < 38; ++i) {
    req.id = i;
    ring.QueueRequest(req);
  }
  std::vector<uint8_t> joined(a);
  joined.insert(joined.end(), b.begin(), b.end());
  BlkifRequest back = DecodeBlkifRequest(BlkifAbi::kX86_32, joined.data() + 64 + 37 * 108);
  EXPECT_EQ(back.id, 37u);
  EXPECT_EQ(back.sector_number, req.sector_number);
  EXPECT_EQ(back.seg[2].gref, 102u);
  // A response in the straddling slot is gathered from both pages.
  EncodeBlkifResponse(BlkifAbi::kX86_32, {37, kBlkifOpWrite, kBlkifRspError}, joined.data() + 64 + 37 * 108);
  std::memcpy(a.data() + 64, joined.data() + 64, kBlkifPageBytes - 64);
  std::memcpy(b.data(), joined.data() + kBlkifPageBytes, kBlkifPageBytes);
  (void)ring.PushRequestsAndCheckNotify();
  for (uint32_t i = 0; i < 37; ++i) {
    EncodeBlkifResponse(BlkifAbi::kX86_32, {i, kBlkifOpWrite, kBlkifRspOkay}, joined.data() + 64 + i * 108);
  }
  std::memcpy(a.data() + 64, joined.data() + 64, kBlkifPageBytes - 64);
  StoreLe32(a.data() + 8, 38);
  BlkifResponse rsp;
  for (uint32_t i = 0; i < 38; ++i) {
    auto got = ring.TakeResponse(&rsp);
    ASSERT_TRUE(got.ok() && *got);
    EXPECT_EQ(rsp.id, i);
  }
  EXPECT_EQ(rsp.status, kBlkifRspError);
}

}  // namespace
}  // namespace cowtap::xen
