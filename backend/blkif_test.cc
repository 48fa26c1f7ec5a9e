#include "backend/blkif.h"

#include <gtest/gtest.h>

#include <array>
#include <cstring>

#include "base/endian.h"

extern "C" {
#include <xen/io/blkif.h>
}

namespace cowtap::backend {
namespace {

// The native layout is the public header's struct; check our offsets against
// the compiler's view of it.
static_assert(sizeof(blkif_request_t) == 112);
static_assert(sizeof(blkif_response_t) == 16);
static_assert(sizeof(union blkif_sring_entry) == 112);

TEST(BlkifTest, SizesPerAbi) {
  EXPECT_EQ(RequestBytes(Abi::kX86_64), 112u);
  EXPECT_EQ(RequestBytes(Abi::kX86_32), 108u);
  EXPECT_EQ(ResponseBytes(Abi::kX86_64), 16u);
  EXPECT_EQ(ResponseBytes(Abi::kX86_32), 12u);
}

TEST(BlkifTest, RingCapacityMatchesRingH) {
  // __CONST_RING_SIZE(blkif, 4096) on x86_64.
  EXPECT_EQ(RingCapacity(Abi::kX86_64, 4096), __CONST_RING_SIZE(blkif, 4096));
  EXPECT_EQ(RingCapacity(Abi::kX86_64, 4096 << 4), __CONST_RING_SIZE(blkif, 4096 << 4));
  EXPECT_EQ(RingCapacity(Abi::kX86_32, 4096), 32u);        // 4032 / 108 = 37 -> 32
  EXPECT_EQ(RingCapacity(Abi::kX86_32, 4096 << 4), 512u);  // 65472 / 108 = 606 -> 512
  EXPECT_EQ(RingCapacity(Abi::kX86_64, 63), 0u);
  EXPECT_EQ(RingCapacity(Abi::kX86_64, 64 + 111), 0u);
  EXPECT_EQ(RingCapacity(Abi::kX86_64, 64 + 112), 1u);
}

TEST(BlkifTest, ParseProtocol) {
  EXPECT_EQ(*ParseProtocol(""), Abi::kX86_64);
  EXPECT_EQ(*ParseProtocol("x86_64-abi"), Abi::kX86_64);
  EXPECT_EQ(*ParseProtocol("x86_32-abi"), Abi::kX86_32);
  auto arm = ParseProtocol("arm-abi");
  ASSERT_FALSE(arm.ok());
  EXPECT_EQ(arm.status().code(), ErrorCode::kNotSupported);
  EXPECT_NE(arm.status().message().find("arm-abi"), std::string::npos);
}

TEST(BlkifTest, DecodesNativeReadWrittenThroughPublicHeader) {
  std::array<uint8_t, 112> slot{};
  blkif_request_t req{};
  req.operation = BLKIF_OP_WRITE;
  req.nr_segments = 3;
  req.handle = 0x5157;
  req.id = 0x1122334455667788ull;
  req.sector_number = 0xabcdef012345ull;
  for (int i = 0; i < 3; ++i) {
    req.seg[i].gref = 100 + i;
    req.seg[i].first_sect = static_cast<uint8_t>(i);
    req.seg[i].last_sect = 7;
  }
  std::memcpy(slot.data(), &req, sizeof(req));
  Request r = DecodeRequest(Abi::kX86_64, slot);
  EXPECT_EQ(r.operation, kOpWrite);
  EXPECT_EQ(r.nr_segments, 3);
  EXPECT_EQ(r.handle, 0x5157);
  EXPECT_EQ(r.id, 0x1122334455667788ull);
  EXPECT_EQ(r.sector_number, 0xabcdef012345ull);
  EXPECT_EQ(r.seg[2].gref, 102u);
  EXPECT_EQ(r.seg[2].first_sect, 2);
  EXPECT_EQ(r.seg[2].last_sect, 7);
}

TEST(BlkifTest, DecodesNativeDiscardAndIndirectThroughPublicHeader) {
  std::array<uint8_t, 112> slot{};
  blkif_request_discard_t d{};
  d.operation = BLKIF_OP_DISCARD;
  d.flag = BLKIF_DISCARD_SECURE;
  d.id = 77;
  d.sector_number = 4096;
  d.nr_sectors = 8192;
  std::memcpy(slot.data(), &d, sizeof(d));
  Request r = DecodeRequest(Abi::kX86_64, slot);
  EXPECT_EQ(r.operation, kOpDiscard);
  EXPECT_EQ(r.discard_flag, kDiscardSecure);
  EXPECT_EQ(r.id, 77u);
  EXPECT_EQ(r.sector_number, 4096u);
  EXPECT_EQ(r.nr_sectors, 8192u);

  slot.fill(0);
  blkif_request_indirect_t in{};
  in.operation = BLKIF_OP_INDIRECT;
  in.indirect_op = BLKIF_OP_READ;
  in.nr_segments = 700;
  in.id = 0xdeadbeefcafeull;
  in.sector_number = 12;
  in.handle = 3;
  in.indirect_grefs[0] = 9;
  in.indirect_grefs[1] = 10;
  std::memcpy(slot.data(), &in, sizeof(in));
  r = DecodeRequest(Abi::kX86_64, slot);
  EXPECT_EQ(r.operation, kOpIndirect);
  EXPECT_EQ(r.indirect_op, kOpRead);
  EXPECT_EQ(r.nr_segments, 700);
  EXPECT_EQ(r.id, 0xdeadbeefcafeull);
  EXPECT_EQ(r.sector_number, 12u);
  EXPECT_EQ(r.handle, 3);
  EXPECT_EQ(r.indirect_grefs[0], 9u);
  EXPECT_EQ(r.indirect_grefs[1], 10u);
}

// The i386 layout, written byte by byte as an i386 blkfront would lay it out.
TEST(BlkifTest, DecodesX86_32ReadWithIdAtOffset4) {
  std::array<uint8_t, 112> slot{};
  slot[0] = kOpRead;
  slot[1] = 2;
  StoreLe16(&slot[2], 0x0102);
  StoreLe64(&slot[4], 0x0a0b0c0d0e0f1011ull);
  StoreLe64(&slot[12], 999);
  StoreLe32(&slot[20], 55);
  slot[24] = 1;
  slot[25] = 6;
  StoreLe32(&slot[28], 56);
  slot[32] = 0;
  slot[33] = 7;
  Request r = DecodeRequest(Abi::kX86_32, std::span(slot.data(), 108));
  EXPECT_EQ(r.operation, kOpRead);
  EXPECT_EQ(r.nr_segments, 2);
  EXPECT_EQ(r.handle, 0x0102);
  EXPECT_EQ(r.id, 0x0a0b0c0d0e0f1011ull);
  EXPECT_EQ(r.sector_number, 999u);
  EXPECT_EQ(r.seg[0].gref, 55u);
  EXPECT_EQ(r.seg[0].first_sect, 1);
  EXPECT_EQ(r.seg[0].last_sect, 6);
  EXPECT_EQ(r.seg[1].gref, 56u);
  EXPECT_EQ(r.seg[1].last_sect, 7);
}

TEST(BlkifTest, DecodesX86_32DiscardAndIndirect) {
  std::array<uint8_t, 112> slot{};
  slot[0] = kOpDiscard;
  slot[1] = kDiscardSecure;
  StoreLe64(&slot[4], 5);
  StoreLe64(&slot[12], 100);
  StoreLe64(&slot[20], 200);
  Request r = DecodeRequest(Abi::kX86_32, slot);
  EXPECT_EQ(r.id, 5u);
  EXPECT_EQ(r.sector_number, 100u);
  EXPECT_EQ(r.nr_sectors, 200u);
  EXPECT_EQ(r.discard_flag, kDiscardSecure);

  slot.fill(0);
  slot[0] = kOpIndirect;
  slot[1] = kOpWrite;
  StoreLe16(&slot[2], 1024);
  StoreLe64(&slot[4], 6);
  StoreLe64(&slot[12], 300);
  StoreLe16(&slot[20], 7);
  for (int i = 0; i < 8; ++i) StoreLe32(&slot[24 + 4 * i], 1000 + i);
  r = DecodeRequest(Abi::kX86_32, slot);
  EXPECT_EQ(r.indirect_op, kOpWrite);
  EXPECT_EQ(r.nr_segments, 1024);
  EXPECT_EQ(r.id, 6u);
  EXPECT_EQ(r.sector_number, 300u);
  EXPECT_EQ(r.handle, 7);
  EXPECT_EQ(r.indirect_grefs[7], 1007u);
}

TEST(BlkifTest, EncodeDecodeRoundTripsBothAbis) {
  for (Abi abi : {Abi::kX86_64, Abi::kX86_32}) {
    Request in;
    in.operation = kOpWriteBarrier;
    in.nr_segments = 11;
    in.id = 0xfffffffffffffff0ull;
    in.sector_number = 1;
    for (uint32_t i = 0; i < 11; ++i) in.seg[i] = {i * 3 + 1, 1, 2};
    std::array<uint8_t, 112> slot{};
    EncodeRequest(abi, in, slot);
    Request out = DecodeRequest(abi, slot);
    EXPECT_EQ(out.id, in.id);
    EXPECT_EQ(out.nr_segments, 11);
    EXPECT_EQ(out.seg[10].gref, 31u);
    // Nothing written past the ABI's request size.
    if (abi == Abi::kX86_32) {
      EXPECT_EQ(slot[108], 0);
    }
  }
}

TEST(BlkifTest, ResponseEncodingPerAbi) {
  std::array<uint8_t, 16> out;
  out.fill(0xee);
  EncodeResponse(Abi::kX86_64, {0x0102030405060708ull, kOpDiscard, kRspEopnotsupp}, out);
  blkif_response_t native;
  std::memcpy(&native, out.data(), sizeof(native));
  EXPECT_EQ(native.id, 0x0102030405060708ull);
  EXPECT_EQ(native.operation, BLKIF_OP_DISCARD);
  EXPECT_EQ(native.status, BLKIF_RSP_EOPNOTSUPP);

  out.fill(0xee);
  EncodeResponse(Abi::kX86_32, {42, kOpRead, kRspError}, out);
  EXPECT_EQ(LoadLe64(&out[0]), 42u);
  EXPECT_EQ(out[8], kOpRead);
  EXPECT_EQ(static_cast<int16_t>(LoadLe16(&out[10])), -1);
  EXPECT_EQ(out[12], 0xee) << "an x86_32 response is 12 bytes and must not touch byte 12";
  Response back = DecodeResponse(Abi::kX86_32, out);
  EXPECT_EQ(back.id, 42u);
  EXPECT_EQ(back.status, kRspError);
}

TEST(BlkifTest, UnknownOperationStillYieldsId) {
  std::array<uint8_t, 112> slot{};
  slot[0] = 200;
  StoreLe64(&slot[8], 31337);
  EXPECT_EQ(DecodeRequest(Abi::kX86_64, slot).id, 31337u);
  StoreLe64(&slot[4], 4242);
  EXPECT_EQ(DecodeRequest(Abi::kX86_32, slot).id, 4242u);
}

}  // namespace
}  // namespace cowtap::backend
