#include "backend/validate.h"

#include <gtest/gtest.h>

namespace cowtap::backend {
namespace {

DeviceLimits Limits() {
  DeviceLimits l;
  l.sectors = 1 << 20;  // 512 MiB
  l.flush = true;
  l.barrier = true;
  l.discard = true;
  l.discard_secure = false;
  l.max_indirect_segments = 256;
  return l;
}

Request Rw(uint8_t op, uint64_t sector, int nseg) {
  Request r;
  r.operation = op;
  r.id = 0xabc;
  r.sector_number = sector;
  r.nr_segments = static_cast<uint16_t>(nseg);
  for (int i = 0; i < nseg && i < 11; ++i) r.seg[i] = {static_cast<uint32_t>(10 + i), 0, 7};
  return r;
}

Request Discard(uint64_t sector, uint64_t n, uint8_t flag = 0) {
  Request r;
  r.operation = kOpDiscard;
  r.id = 9;
  r.sector_number = sector;
  r.nr_sectors = n;
  r.discard_flag = flag;
  return r;
}

Request Indirect(uint8_t op, uint16_t nseg, uint64_t sector = 0) {
  Request r;
  r.operation = kOpIndirect;
  r.indirect_op = op;
  r.id = 5;
  r.nr_segments = nseg;
  r.sector_number = sector;
  r.indirect_grefs = {1, 2, 3, 4, 5, 6, 7, 8};
  return r;
}

// Runs validation and returns the guest-visible status.
int16_t Answer(const Request& r, const DeviceLimits& l, BlockRequest* out = nullptr) {
  BlockRequest local;
  BlockRequest* o = out ? out : &local;
  Status s = ValidateRequest(r, l, o);
  EXPECT_EQ(o->id, r.id) << "the id must be known even on failure";
  EXPECT_EQ(o->operation, r.operation == kOpIndirect ? r.indirect_op : r.operation);
  return ResponseStatusFor(s);
}

// --- accepted requests ---

TEST(ValidateTest, AcceptsFullDirectWriteAndComputesRange) {
  BlockRequest b;
  ASSERT_EQ(Answer(Rw(kOpWrite, 16, 11), Limits(), &b), kRspOkay);
  EXPECT_EQ(b.op, BlockOp::kWrite);
  EXPECT_FALSE(b.flush_after);
  EXPECT_EQ(b.offset_bytes, 16u * 512);
  EXPECT_EQ(b.length_bytes, 11u * 4096);
  EXPECT_EQ(b.segments.size(), 11u);
}

TEST(ValidateTest, AcceptsPartialSegments) {
  Request r = Rw(kOpRead, 0, 2);
  r.seg[0] = {1, 3, 3};
  r.seg[1] = {2, 0, 4};
  BlockRequest b;
  ASSERT_EQ(Answer(r, Limits(), &b), kRspOkay);
  EXPECT_EQ(b.length_bytes, (1u + 5u) * 512);
}

TEST(ValidateTest, AcceptsRequestEndingExactlyAtDiskEnd) {
  DeviceLimits l = Limits();
  EXPECT_EQ(Answer(Rw(kOpRead, l.sectors - 8, 1), l), kRspOkay);
}

TEST(ValidateTest, FlushWithoutSegmentsIsAFlush) {
  BlockRequest b;
  ASSERT_EQ(Answer(Rw(kOpFlushDiskcache, 0, 0), Limits(), &b), kRspOkay);
  EXPECT_EQ(b.op, BlockOp::kFlush);
  ASSERT_EQ(Answer(Rw(kOpWriteBarrier, 0, 0), Limits(), &b), kRspOkay);
  EXPECT_EQ(b.op, BlockOp::kFlush);
}

TEST(ValidateTest, BarrierWithDataIsAWriteFlushedAfter) {
  BlockRequest b;
  ASSERT_EQ(Answer(Rw(kOpWriteBarrier, 8, 1), Limits(), &b), kRspOkay);
  EXPECT_EQ(b.op, BlockOp::kWrite);
  EXPECT_TRUE(b.flush_after);
}

TEST(ValidateTest, FlushIsAllowedOnReadOnlyDevice) {
  DeviceLimits l = Limits();
  l.read_only = true;
  EXPECT_EQ(Answer(Rw(kOpFlushDiskcache, 0, 0), l), kRspOkay);
  EXPECT_EQ(Answer(Rw(kOpRead, 0, 1), l), kRspOkay);
}

TEST(ValidateTest, AcceptsDiscardAndSecureDiscardWhenAdvertised) {
  DeviceLimits l = Limits();
  l.discard_secure = true;
  BlockRequest b;
  ASSERT_EQ(Answer(Discard(8, 16, kDiscardSecure), l, &b), kRspOkay);
  EXPECT_EQ(b.op, BlockOp::kDiscard);
  EXPECT_TRUE(b.secure);
  EXPECT_EQ(b.offset_bytes, 8u * 512);
  EXPECT_EQ(b.length_bytes, 16u * 512);
}

TEST(ValidateTest, AcceptsIndirectAndLeavesSegmentsToCaller) {
  BlockRequest b;
  ASSERT_EQ(Answer(Indirect(kOpWrite, 256), Limits(), &b), kRspOkay);
  EXPECT_TRUE(b.indirect);
  EXPECT_EQ(b.op, BlockOp::kWrite);
  EXPECT_EQ(b.nr_segments, 256u);
  EXPECT_EQ(b.nr_indirect_pages, 1u);
  std::vector<Segment> segs(256, Segment{7, 0, 7});
  ASSERT_TRUE(ValidateSegments(segs, Limits(), &b).ok());
  EXPECT_EQ(b.length_bytes, 256u * 4096);
}

TEST(ValidateTest, IndirectResponseEchoesIndirectOp) {
  BlockRequest b;
  ASSERT_EQ(Answer(Indirect(kOpWrite, 3), Limits(), &b), kRspOkay);
  EXPECT_EQ(b.operation, kOpWrite);
  DeviceLimits l = Limits();
  l.max_indirect_segments = 0;
  ValidateRequest(Indirect(kOpRead, 3), l, &b).IgnoreError();
  EXPECT_EQ(b.operation, kOpRead) << "rejected indirect requests echo indirect_op too";
}

TEST(ValidateTest, IndirectPageCountRoundsUp) {
  DeviceLimits l = Limits();
  l.max_indirect_segments = kMaxIndirectSegmentsWire;
  BlockRequest b;
  ASSERT_EQ(Answer(Indirect(kOpRead, 513), l, &b), kRspOkay);
  EXPECT_EQ(b.nr_indirect_pages, 2u);
  ASSERT_EQ(Answer(Indirect(kOpRead, 4096), l, &b), kRspOkay);
  EXPECT_EQ(b.nr_indirect_pages, 8u);
}

TEST(ValidateTest, LargeSectorSizeUsesWholePages) {
  DeviceLimits l = Limits();
  l.sector_size = 4096;
  l.sectors = 100;
  Request r = Rw(kOpRead, 99, 1);
  r.seg[0] = {1, 0, 0};
  BlockRequest b;
  ASSERT_EQ(Answer(r, l, &b), kRspOkay);
  EXPECT_EQ(b.offset_bytes, 99u * 4096);
  EXPECT_EQ(b.length_bytes, 4096u);
  r.seg[0] = {1, 0, 1};
  EXPECT_EQ(Answer(r, l), kRspError) << "last_sect 1 is past a 4 KiB page of 4 KiB sectors";
}

// --- one test per rejected condition ---

TEST(ValidateTest, RejectsUnknownOperationWithEopnotsupp) {
  EXPECT_EQ(Answer(Rw(7, 0, 1), Limits()), kRspEopnotsupp);
  EXPECT_EQ(Answer(Rw(255, 0, 1), Limits()), kRspEopnotsupp);
}

TEST(ValidateTest, RejectsReservedOperationWithEopnotsupp) {
  EXPECT_EQ(Answer(Rw(kOpReserved1, 0, 1), Limits()), kRspEopnotsupp);
}

TEST(ValidateTest, RejectsReadWithZeroSegments) { EXPECT_EQ(Answer(Rw(kOpRead, 0, 0), Limits()), kRspError); }

TEST(ValidateTest, RejectsWriteWithZeroSegments) { EXPECT_EQ(Answer(Rw(kOpWrite, 0, 0), Limits()), kRspError); }

TEST(ValidateTest, RejectsTwelveDirectSegments) { EXPECT_EQ(Answer(Rw(kOpRead, 0, 12), Limits()), kRspError); }

TEST(ValidateTest, RejectsFirstSectAfterLastSect) {
  Request r = Rw(kOpRead, 0, 1);
  r.seg[0] = {1, 5, 4};
  EXPECT_EQ(Answer(r, Limits()), kRspError);
}

TEST(ValidateTest, RejectsLastSectPastPage) {
  Request r = Rw(kOpRead, 0, 3);
  r.seg[2] = {1, 0, 8};
  EXPECT_EQ(Answer(r, Limits()), kRspError);
}

TEST(ValidateTest, RejectsRangePastDiskEnd) {
  DeviceLimits l = Limits();
  EXPECT_EQ(Answer(Rw(kOpRead, l.sectors - 7, 1), l), kRspError);
}

TEST(ValidateTest, RejectsStartSectorPastDiskEnd) {
  DeviceLimits l = Limits();
  EXPECT_EQ(Answer(Rw(kOpWrite, l.sectors, 1), l), kRspError);
}

TEST(ValidateTest, RejectsSectorArithmeticOverflow) {
  EXPECT_EQ(Answer(Rw(kOpRead, UINT64_MAX - 3, 1), Limits()), kRspError);
  DeviceLimits huge = Limits();
  huge.sectors = UINT64_MAX;  // a bogus size must not let offsets wrap
  EXPECT_EQ(Answer(Rw(kOpRead, UINT64_MAX / 256, 1), huge), kRspError);
}

TEST(ValidateTest, RejectsWriteOnReadOnlyDevice) {
  DeviceLimits l = Limits();
  l.read_only = true;
  EXPECT_EQ(Answer(Rw(kOpWrite, 0, 1), l), kRspError);
}

TEST(ValidateTest, RejectsBarrierWithDataOnReadOnlyDevice) {
  DeviceLimits l = Limits();
  l.read_only = true;
  EXPECT_EQ(Answer(Rw(kOpWriteBarrier, 0, 1), l), kRspError);
}

TEST(ValidateTest, RejectsIndirectWriteOnReadOnlyDevice) {
  DeviceLimits l = Limits();
  l.read_only = true;
  EXPECT_EQ(Answer(Indirect(kOpWrite, 20), l), kRspError);
}

TEST(ValidateTest, RejectsDiscardOnReadOnlyDevice) {
  DeviceLimits l = Limits();
  l.read_only = true;
  EXPECT_EQ(Answer(Discard(0, 8), l), kRspError);
}

TEST(ValidateTest, RejectsDiscardWhenNotAdvertisedWithEopnotsupp) {
  DeviceLimits l = Limits();
  l.discard = false;
  EXPECT_EQ(Answer(Discard(0, 8), l), kRspEopnotsupp);
}

TEST(ValidateTest, RejectsSecureDiscardWhenNotAdvertisedWithEopnotsupp) {
  EXPECT_EQ(Answer(Discard(0, 8, kDiscardSecure), Limits()), kRspEopnotsupp);
}

TEST(ValidateTest, RejectsDiscardWithUnknownFlags) { EXPECT_EQ(Answer(Discard(0, 8, 0x82), Limits()), kRspError); }

TEST(ValidateTest, RejectsDiscardPastDiskEnd) {
  DeviceLimits l = Limits();
  EXPECT_EQ(Answer(Discard(l.sectors - 1, 2), l), kRspError);
  EXPECT_EQ(Answer(Discard(1, UINT64_MAX), l), kRspError);
}

TEST(ValidateTest, RejectsFlushWhenNotAdvertisedWithEopnotsupp) {
  DeviceLimits l = Limits();
  l.flush = false;
  EXPECT_EQ(Answer(Rw(kOpFlushDiskcache, 0, 0), l), kRspEopnotsupp);
}

TEST(ValidateTest, RejectsBarrierWhenNotAdvertisedWithEopnotsupp) {
  DeviceLimits l = Limits();
  l.barrier = false;
  EXPECT_EQ(Answer(Rw(kOpWriteBarrier, 0, 0), l), kRspEopnotsupp);
}

TEST(ValidateTest, RejectsIndirectWhenNotAdvertisedWithEopnotsupp) {
  DeviceLimits l = Limits();
  l.max_indirect_segments = 0;
  EXPECT_EQ(Answer(Indirect(kOpRead, 20), l), kRspEopnotsupp);
}

TEST(ValidateTest, RejectsIndirectWithNonReadWriteOp) {
  EXPECT_EQ(Answer(Indirect(kOpDiscard, 20), Limits()), kRspError);
  EXPECT_EQ(Answer(Indirect(kOpIndirect, 20), Limits()), kRspError);
  EXPECT_EQ(Answer(Indirect(kOpFlushDiskcache, 20), Limits()), kRspError);
}

TEST(ValidateTest, RejectsIndirectWithZeroSegments) { EXPECT_EQ(Answer(Indirect(kOpRead, 0), Limits()), kRspError); }

TEST(ValidateTest, RejectsIndirectAboveAdvertisedMaximum) {
  EXPECT_EQ(Answer(Indirect(kOpRead, 257), Limits()), kRspError);
}

TEST(ValidateTest, RejectsIndirectStartPastDiskEnd) {
  DeviceLimits l = Limits();
  EXPECT_EQ(Answer(Indirect(kOpRead, 1, l.sectors), l), kRspError);
}

TEST(ValidateTest, RejectsIndirectDescriptorsOutOfRange) {
  DeviceLimits l = Limits();
  BlockRequest b;
  ASSERT_EQ(Answer(Indirect(kOpRead, 3, l.sectors - 16), l, &b), kRspOkay);
  std::vector<Segment> segs(3, Segment{1, 0, 7});
  EXPECT_EQ(ResponseStatusFor(ValidateSegments(segs, l, &b)), kRspError);
}

TEST(ValidateTest, RejectsIndirectDescriptorWithBadSectors) {
  BlockRequest b;
  ASSERT_EQ(Answer(Indirect(kOpRead, 3), Limits(), &b), kRspOkay);
  std::vector<Segment> segs(3, Segment{1, 0, 7});
  segs[1].first_sect = 7;
  segs[1].last_sect = 6;
  EXPECT_EQ(ResponseStatusFor(ValidateSegments(segs, Limits(), &b)), kRspError);
}

TEST(ValidateTest, RejectsDescriptorCountDifferentFromNrSegments) {
  BlockRequest b;
  ASSERT_EQ(Answer(Indirect(kOpRead, 3), Limits(), &b), kRspOkay);
  std::vector<Segment> segs(2, Segment{1, 0, 7});
  EXPECT_EQ(ResponseStatusFor(ValidateSegments(segs, Limits(), &b)), kRspError);
}

TEST(ValidateTest, RejectsEverythingOnBogusDeviceSectorSize) {
  DeviceLimits l = Limits();
  l.sector_size = 1000;
  EXPECT_EQ(Answer(Rw(kOpRead, 0, 1), l), kRspError);
}

TEST(ValidateTest, ResponseStatusMapping) {
  EXPECT_EQ(ResponseStatusFor(Status::Ok()), kRspOkay);
  EXPECT_EQ(ResponseStatusFor(Status::NotSupported("x")), kRspEopnotsupp);
  EXPECT_EQ(ResponseStatusFor(Status::IoError("x")), kRspError);
  EXPECT_EQ(ResponseStatusFor(Status::ReadOnly("x")), kRspError);
  EXPECT_EQ(ResponseStatusFor(Status::Cancelled("x")), kRspError);
}

TEST(ValidateTest, MessagesNameTheFieldAndValue) {
  Request r = Rw(kOpRead, 0, 1);
  r.seg[0] = {1234, 5, 9};
  BlockRequest b;
  Status s = ValidateRequest(r, Limits(), &b);
  ASSERT_FALSE(s.ok());
  EXPECT_NE(s.message().find("gref 1234"), std::string::npos) << s.message();
  EXPECT_NE(s.message().find("last_sect 9"), std::string::npos) << s.message();
  EXPECT_NE(s.message().find("id=2748"), std::string::npos) << s.message();
}

}  // namespace
}  // namespace cowtap::backend
