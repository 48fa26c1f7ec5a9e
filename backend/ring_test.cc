#include "backend/ring.h"

#include <gtest/gtest.h>

#include <cstdlib>
#include <memory>
#include <thread>

#include "base/endian.h"
#include "xen-glue/blkfront_ring.h"

namespace cowtap::backend {
namespace {

using xen::BlkifAbi;
using xen::BlkifRequest;
using xen::BlkifResponse;
using xen::FrontRing;

// A page-aligned buffer standing in for the shared ring pages.
struct SharedPages {
  explicit SharedPages(size_t pages) : bytes(pages * kPageSize) {
    mem = static_cast<uint8_t*>(std::aligned_alloc(kPageSize, bytes));
    std::memset(mem, 0xa5, bytes);  // garbage: the front must initialise
  }
  ~SharedPages() { std::free(mem); }
  uint8_t* mem;
  size_t bytes;
};

BlkifAbi FrontAbi(Abi abi) { return abi == Abi::kX86_32 ? BlkifAbi::kX86_32 : BlkifAbi::kX86_64; }

BlkifRequest ReadReq(uint64_t id, uint64_t sector) {
  BlkifRequest r;
  r.operation = xen::kBlkifOpRead;
  r.id = id;
  r.sector_number = sector;
  r.nr_segments = 1;
  r.seg[0] = {static_cast<uint32_t>(id + 100), 0, 7};
  return r;
}

class RingTest : public ::testing::TestWithParam<std::tuple<Abi, uint32_t>> {
 protected:
  Abi abi() const { return std::get<0>(GetParam()); }
  uint32_t pages() const { return std::get<1>(GetParam()); }
};

TEST_P(RingTest, RequestsFlowAndResponsesComeBack) {
  SharedPages shm(pages());
  FrontRing front(shm.mem, pages(), FrontAbi(abi()));
  BackRing back(shm.mem, shm.bytes, abi());
  ASSERT_EQ(back.capacity(), front.size());
  ASSERT_EQ(back.capacity(), 32u * pages());

  // Several laps around the ring so indices wrap the slot array.
  uint64_t next_id = 1;
  for (int lap = 0; lap < 5; ++lap) {
    const uint32_t n = back.capacity();
    for (uint32_t i = 0; i < n; ++i) front.QueueRequest(ReadReq(next_id + i, i * 8));
    front.PushRequestsAndCheckNotify();
    ASSERT_TRUE(back.Refresh().ok());
    for (uint32_t i = 0; i < n; ++i) {
      ASSERT_TRUE(back.HasRequest());
      Request r = back.TakeRequest();
      EXPECT_EQ(r.id, next_id + i);
      EXPECT_EQ(r.sector_number, i * 8u);
      EXPECT_EQ(r.seg[0].gref, next_id + i + 100);
      back.PushResponse({r.id, r.operation, kRspOkay});
    }
    EXPECT_FALSE(back.HasRequest());
    back.PublishResponses();
    for (uint32_t i = 0; i < n; ++i) {
      BlkifResponse rsp;
      auto got = front.TakeResponse(&rsp);
      ASSERT_TRUE(got.ok() && *got);
      EXPECT_EQ(rsp.id, next_id + i);
      EXPECT_EQ(rsp.status, 0);
    }
    next_id += n;
  }
}

TEST_P(RingTest, NoMoreThanCapacityInFlight) {
  SharedPages shm(pages());
  FrontRing front(shm.mem, pages(), FrontAbi(abi()));
  BackRing back(shm.mem, shm.bytes, abi());
  for (uint32_t i = 0; i < back.capacity(); ++i) front.QueueRequest(ReadReq(i, 0));
  front.PushRequestsAndCheckNotify();
  ASSERT_TRUE(back.Refresh().ok());
  for (uint32_t i = 0; i < back.capacity(); ++i) back.TakeRequest();
  EXPECT_EQ(back.InFlight(), back.capacity());
  EXPECT_FALSE(back.HasRequest());
  // A guest that publishes one more than fits breaks the ring.
  front.ForceReqProd(back.capacity() + 1);
  EXPECT_EQ(back.Refresh().code(), ErrorCode::kCorrupt);
}

INSTANTIATE_TEST_SUITE_P(AbisAndOrders, RingTest,
                         ::testing::Combine(::testing::Values(Abi::kX86_64, Abi::kX86_32),
                                            ::testing::Values(1u, 2u, 16u)));

TEST(BackRingTest, ProducerRacingPastTheRingIsCorrupt) {
  SharedPages shm(1);
  FrontRing front(shm.mem, 1, BlkifAbi::kX86_64);
  BackRing back(shm.mem, shm.bytes, Abi::kX86_64);
  front.ForceReqProd(33);
  Status s = back.Refresh();
  EXPECT_EQ(s.code(), ErrorCode::kCorrupt);
  EXPECT_NE(s.message().find("33"), std::string::npos) << s.message();
  EXPECT_FALSE(back.HasRequest()) << "a rejected snapshot must not expose requests";
  front.ForceReqProd(0xffffffffu);  // "behind" the consumer
  EXPECT_EQ(back.Refresh().code(), ErrorCode::kCorrupt);
  front.ForceReqProd(32);  // a full ring is legal
  EXPECT_TRUE(back.Refresh().ok());
}

TEST(BackRingTest, NotifiesOnlyWhenTheFrontendAsked) {
  SharedPages shm(1);
  FrontRing front(shm.mem, 1, BlkifAbi::kX86_64);
  BackRing back(shm.mem, shm.bytes, Abi::kX86_64);
  for (int i = 0; i < 4; ++i) front.QueueRequest(ReadReq(i, 0));
  front.PushRequestsAndCheckNotify();
  ASSERT_TRUE(back.Refresh().ok());
  for (int i = 0; i < 4; ++i) back.TakeRequest();
  // rsp_event starts at 1 (FRONT_RING_INIT): the first response notifies.
  back.PushResponse({0, 0, 0});
  EXPECT_TRUE(back.PublishResponses());
  // The front has not re-armed rsp_event: no kick for more responses.
  back.PushResponse({1, 0, 0});
  EXPECT_FALSE(back.PublishResponses());
  // Nothing new: nothing to publish, no kick.
  EXPECT_FALSE(back.PublishResponses());
  // The front drains and re-arms; the next response notifies again.
  BlkifResponse rsp;
  while (*front.TakeResponse(&rsp)) {
  }
  EXPECT_FALSE(front.FinalCheckForResponses());
  back.PushResponse({2, 0, 0});
  back.PushResponse({3, 0, 0});
  EXPECT_TRUE(back.PublishResponses());
}

TEST(BackRingTest, FinalCheckArmsRequestEvent) {
  SharedPages shm(1);
  FrontRing front(shm.mem, 1, BlkifAbi::kX86_64);
  BackRing back(shm.mem, shm.bytes, Abi::kX86_64);
  auto more = back.FinalCheckForRequests();
  ASSERT_TRUE(more.ok());
  EXPECT_FALSE(*more);
  front.QueueRequest(ReadReq(1, 0));
  EXPECT_TRUE(front.PushRequestsAndCheckNotify()) << "backend re-armed req_event: the front must kick";
  more = back.FinalCheckForRequests();
  ASSERT_TRUE(more.ok());
  EXPECT_TRUE(*more) << "a request published before sleeping must be seen";
  back.TakeRequest();
  // Not re-armed since: a further push need not notify.
  front.QueueRequest(ReadReq(2, 0));
  EXPECT_FALSE(front.PushRequestsAndCheckNotify());
}

TEST(BackRingTest, IndicesWrapAround2To32) {
  SharedPages shm(1);
  std::memset(shm.mem, 0, kPageSize);
  const uint32_t start = 0xfffffff0u;
  // A ring whose indices are about to wrap (as after 4 billion requests).
  StoreLe32(shm.mem + 8, start);       // rsp_prod
  StoreLe32(shm.mem + 12, start + 1);  // rsp_event
  BackRing back(shm.mem, kPageSize, Abi::kX86_64);
  for (uint32_t i = 0; i < 32; ++i) {
    Request r;
    r.operation = kOpRead;
    r.id = i;
    r.nr_segments = 1;
    EncodeRequest(Abi::kX86_64, r, std::span(shm.mem + 64 + ((start + i) & 31) * 112, 112));
  }
  StoreLe32(shm.mem, start + 32);  // req_prod wraps past 0
  ASSERT_TRUE(back.Refresh().ok());
  for (uint32_t i = 0; i < 32; ++i) {
    ASSERT_TRUE(back.HasRequest());
    EXPECT_EQ(back.TakeRequest().id, i);
    back.PushResponse({i, kOpRead, 0});
  }
  EXPECT_FALSE(back.HasRequest());
  EXPECT_TRUE(back.PublishResponses());
  EXPECT_EQ(LoadLe32(shm.mem + 8), start + 32);
}

TEST(BackRingTest, SlotIsCopiedOnceAgainstAMutatingGuest) {
  SharedPages shm(1);
  FrontRing front(shm.mem, 1, BlkifAbi::kX86_64);
  BackRing back(shm.mem, shm.bytes, Abi::kX86_64);
  front.QueueRequest(ReadReq(7, 0));
  front.PushRequestsAndCheckNotify();
  ASSERT_TRUE(back.Refresh().ok());
  Request r = back.TakeRequest();
  // The guest rewrites the slot afterwards; our copy must not change.
  std::memset(shm.mem + 64, 0xff, 112);
  EXPECT_EQ(r.id, 7u);
  EXPECT_EQ(r.nr_segments, 1);
}

TEST(BackRingTest, ConcurrentFrontAndBackLoseNothing) {
  SharedPages shm(1);
  FrontRing front(shm.mem, 1, BlkifAbi::kX86_64);
  BackRing back(shm.mem, shm.bytes, Abi::kX86_64);
  constexpr uint64_t kTotal = 200000;
  std::thread backend([&] {
    uint64_t expect = 0;
    while (expect < kTotal) {
      if (!back.Refresh().ok()) std::abort();
      while (back.HasRequest()) {
        Request r = back.TakeRequest();
        if (r.id != expect++) std::abort();
        back.PushResponse({r.id, r.operation, 0});
      }
      back.PublishResponses();
    }
  });
  uint64_t sent = 0, received = 0;
  while (received < kTotal) {
    while (sent < kTotal && front.FreeSlots() > 0) front.QueueRequest(ReadReq(sent++, 0));
    front.PushRequestsAndCheckNotify();
    BlkifResponse rsp;
    while (true) {
      auto got = front.TakeResponse(&rsp);
      ASSERT_TRUE(got.ok());
      if (!*got) break;
      ASSERT_EQ(rsp.id, received++);
    }
  }
  backend.join();
}

}  // namespace
}  // namespace cowtap::backend
