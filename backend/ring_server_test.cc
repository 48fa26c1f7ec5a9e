// RingServer over the sim hypervisor, with the test acting as a crude
// frontend through the sim guest API (same process, real shared pages).
#include "backend/ring_server.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <poll.h>
#include <unistd.h>

#include <chrono>
#include <cstring>
#include <map>
#include <thread>

#include "backend/mem_block_device.h"
#include "xen-glue/blkfront_ring.h"
#include "xen-glue/sim.h"

namespace cowtap::backend {
namespace {

using namespace std::chrono_literals;
using xen::BlkifRequest;
using xen::BlkifResponse;
using xen::GrantRef;

constexpr xen::DomId kGuest = 7;

std::string SocketPath() {
  std::string name = ::testing::UnitTest::GetInstance()->current_test_info()->name();
  for (char& c : name) {
    if (c == '/') c = '_';
  }
  return "/tmp/cowtap-ringsrv-" + std::to_string(getpid()) + "-" + name + ".sock";
}

// The guest side of one ring: pages granted to dom0, an unbound port, a
// FrontRing, and helpers to queue requests and collect responses.
class TestFront {
 public:
  TestFront(xen::SimGuest& guest, Abi abi, uint32_t ring_pages) : guest_(guest), abi_(abi) {
    std::vector<uint8_t*> pages;
    for (uint32_t i = 0; i < ring_pages; ++i) {
      uint32_t page = *guest_.AllocPage();
      pages.push_back(guest_.Page(page));
      refs_.push_back(*guest_.GrantAccess(page, xen::kDom0, false));
    }
    ring_ =
        std::make_unique<xen::FrontRing>(pages, abi == Abi::kX86_32 ? xen::BlkifAbi::kX86_32 : xen::BlkifAbi::kX86_64);
    evtchn_ = std::move(guest_.OpenEventChannel()).value();
    port_ = *evtchn_->BindUnbound(xen::kDom0);
  }

  RingConfig Config(const DeviceLimits& limits, bool persistent = false) const {
    RingConfig c;
    c.frontend_domid = guest_.domid();
    c.name = "test ring";
    c.abi = abi_;
    c.ring_refs = refs_;
    c.remote_port = port_;
    c.persistent = persistent;
    c.limits = limits;
    return c;
  }

  // A data page granted to dom0; returns (page index, ref).
  std::pair<uint32_t, GrantRef> DataPage(bool readonly = false) {
    uint32_t page = *guest_.AllocPage();
    return {page, *guest_.GrantAccess(page, xen::kDom0, readonly)};
  }
  uint8_t* Page(uint32_t index) { return guest_.Page(index); }

  void Queue(const BlkifRequest& r) { ring_->QueueRequest(r); }
  void Push() {
    if (ring_->PushRequestsAndCheckNotify()) {
      ASSERT_TRUE(evtchn_->Notify(port_).ok());
      ++kicks_sent_;
    }
  }
  void Kick() { ASSERT_TRUE(evtchn_->Notify(port_).ok()); }
  // Collects responses until n arrived (or timeout), keyed by id.
  std::map<uint64_t, BlkifResponse> Wait(size_t n, std::chrono::milliseconds timeout = 5s) {
    std::map<uint64_t, BlkifResponse> got;
    const auto deadline = std::chrono::steady_clock::now() + timeout;
    while (got.size() < n && std::chrono::steady_clock::now() < deadline) {
      BlkifResponse rsp;
      while (true) {
        auto r = ring_->TakeResponse(&rsp);
        EXPECT_TRUE(r.ok()) << r.status().ToString();
        if (!r.ok() || !*r) break;
        EXPECT_EQ(got.count(rsp.id), 0u) << "id " << rsp.id << " answered twice";
        got[rsp.id] = rsp;
      }
      if (got.size() >= n) break;
      if (ring_->FinalCheckForResponses()) continue;
      pollfd p{evtchn_->fd(), POLLIN, 0};
      if (::poll(&p, 1, 20) == 1) {
        while (auto port = *evtchn_->Pending()) EXPECT_TRUE(evtchn_->Unmask(*port).ok());
      }
    }
    return got;
  }
  xen::FrontRing& ring() { return *ring_; }

 private:
  xen::SimGuest& guest_;
  Abi abi_;
  std::vector<GrantRef> refs_;
  std::unique_ptr<xen::FrontRing> ring_;
  std::unique_ptr<xen::EventChannel> evtchn_;
  xen::EvtchnPort port_ = 0;
  int kicks_sent_ = 0;
};

BlkifRequest Rw(uint8_t op, uint64_t id, uint64_t sector, std::vector<GrantRef> refs) {
  BlkifRequest r;
  r.operation = op;
  r.id = id;
  r.sector_number = sector;
  r.nr_segments = static_cast<uint16_t>(refs.size());
  for (size_t i = 0; i < refs.size(); ++i) r.seg[i] = {refs[i], 0, 7};
  return r;
}

DeviceLimits Limits(uint64_t sectors) {
  DeviceLimits l;
  l.sectors = sectors;
  l.flush = l.barrier = l.discard = true;
  l.max_indirect_segments = 256;
  return l;
}

class RingServerTest : public ::testing::Test {
 protected:
  void SetUp() override {
    auto hv = xen::SimHypervisor::Start(SocketPath());
    ASSERT_TRUE(hv.ok()) << hv.status().ToString();
    hv_ = std::move(hv).value();
    platform_ = hv_->NewPlatform();
    auto guest =
        xen::SimGuest::Connect(hv_->socket_path(), {.domid = kGuest, .ram_pages = 2048, .grant_entries = 4096});
    ASSERT_TRUE(guest.ok()) << guest.status().ToString();
    guest_ = std::move(guest).value();
  }
  void TearDown() override {
    servers_.clear();
    guest_.reset();
    platform_.reset();
    hv_.reset();
  }

  RingServer* StartServer(const RingConfig& config, std::shared_ptr<BlockDevice> device) {
    auto s = RingServer::Start(*platform_, config, std::move(device));
    EXPECT_TRUE(s.ok()) << s.status().ToString();
    if (!s.ok()) return nullptr;
    servers_.push_back(std::move(s).value());
    return servers_.back().get();
  }

  std::unique_ptr<xen::SimHypervisor> hv_;
  std::unique_ptr<xen::XenPlatform> platform_;
  std::unique_ptr<xen::SimGuest> guest_;
  std::vector<std::unique_ptr<RingServer>> servers_;
};

class RingServerAbiTest : public RingServerTest, public ::testing::WithParamInterface<std::tuple<Abi, uint32_t>> {};

TEST_P(RingServerAbiTest, WritesAndReadsThroughGuestPages) {
  const auto [abi, ring_pages] = GetParam();
  auto dev = std::make_shared<MemBlockDevice>(MemBlockDeviceOptions{.size_bytes = 1 << 20});
  TestFront front(*guest_, abi, ring_pages);
  RingServer* server = StartServer(front.Config(Limits(2048)), dev);
  ASSERT_NE(server, nullptr);
  EXPECT_EQ(server->capacity(), 32u * ring_pages);

  // 40 writes of 3 pages each (more than one page ring holds: indices lap).
  std::vector<std::pair<uint32_t, GrantRef>> pages;
  for (int i = 0; i < 3; ++i) pages.push_back(front.DataPage());
  for (uint64_t w = 0; w < 40; ++w) {
    for (int i = 0; i < 3; ++i) std::memset(front.Page(pages[i].first), static_cast<int>(w * 3 + i), 4096);
    front.Queue(Rw(kOpWrite, 1000 + w, w * 24, {pages[0].second, pages[1].second, pages[2].second}));
    front.Push();
    auto got = front.Wait(1);
    ASSERT_EQ(got.size(), 1u);
    EXPECT_EQ(got[1000 + w].status, kRspOkay);
    EXPECT_EQ(got[1000 + w].operation, kOpWrite);
  }
  auto contents = dev->Contents();
  for (uint64_t w = 0; w < 40; ++w) {
    for (int i = 0; i < 3; ++i) EXPECT_EQ(contents[w * 24 * 512 + i * 4096 + 17], static_cast<uint8_t>(w * 3 + i));
  }
  // Read one back into a fresh page, partially (sectors 2..5 of the page).
  auto dst = front.DataPage();
  BlkifRequest r = Rw(kOpRead, 5, 7 * 24 + 8 + 2, {dst.second});
  r.seg[0] = {dst.second, 2, 5};
  front.Queue(r);
  front.Push();
  auto got = front.Wait(1);
  ASSERT_EQ(got.size(), 1u);
  EXPECT_EQ(got[5].status, kRspOkay);
  EXPECT_EQ(front.Page(dst.first)[2 * 512], static_cast<uint8_t>(7 * 3 + 1));
  EXPECT_EQ(front.Page(dst.first)[0], 0) << "sectors outside first..last are not touched";
  EXPECT_EQ(server->stats().writes.load(), 40u);
  EXPECT_EQ(server->stats().bytes_written.load(), 40u * 3 * 4096);
  EXPECT_EQ(server->stats().reads.load(), 1u);
}

INSTANTIATE_TEST_SUITE_P(AbisAndRingPages, RingServerAbiTest,
                         ::testing::Combine(::testing::Values(Abi::kX86_64, Abi::kX86_32), ::testing::Values(1u, 4u)));

TEST_F(RingServerTest, BatchOfRequestsNeedsFewNotifications) {
  auto dev = std::make_shared<MemBlockDevice>();
  TestFront front(*guest_, Abi::kX86_64, 1);
  RingServer* server = StartServer(front.Config(Limits(2048)), dev);
  auto page = front.DataPage();
  for (int round = 0; round < 10; ++round) {
    for (uint64_t i = 0; i < 32; ++i) front.Queue(Rw(kOpRead, round * 100 + i, i * 8, {page.second}));
    front.Push();
    auto got = front.Wait(32);
    ASSERT_EQ(got.size(), 32u);
  }
  EXPECT_EQ(server->stats().reads.load(), 320u);
  // One kick per published batch at most, and batches hold many requests.
  EXPECT_LE(server->stats().notifications.load(), 320u / 2);
  EXPECT_GT(server->stats().max_batch.load(), 1u);
}

TEST_F(RingServerTest, BadRequestsAreAnsweredAndTheRingGoesOn) {
  auto dev = std::make_shared<MemBlockDevice>();
  TestFront front(*guest_, Abi::kX86_64, 1);
  RingServer* server = StartServer(front.Config(Limits(2048)), dev);
  auto page = front.DataPage();
  BlkifRequest unknown = Rw(9, 1, 0, {page.second});
  front.Queue(unknown);
  front.Queue(Rw(kOpRead, 2, 2048, {page.second}));               // past the end
  front.Queue(Rw(kOpRead, 3, 0, {guest_->grant_entries() + 5}));  // bogus gref
  BlkifRequest bad_sect = Rw(kOpRead, 4, 0, {page.second});
  bad_sect.seg[0].first_sect = 6;
  bad_sect.seg[0].last_sect = 2;
  front.Queue(bad_sect);
  front.Queue(Rw(kOpRead, 5, 0, {page.second}));
  front.Push();
  auto got = front.Wait(5);
  ASSERT_EQ(got.size(), 5u);
  EXPECT_EQ(got[1].status, kRspEopnotsupp);
  EXPECT_EQ(got[1].operation, 9);
  EXPECT_EQ(got[2].status, kRspError);
  EXPECT_EQ(got[3].status, kRspError);
  EXPECT_EQ(got[4].status, kRspError);
  EXPECT_EQ(got[5].status, kRspOkay);
  EXPECT_FALSE(server->halted());
  EXPECT_EQ(server->stats().errors.load(), 3u);
  EXPECT_EQ(server->stats().eopnotsupp.load(), 1u);
}

TEST_F(RingServerTest, DeviceErrorBecomesErrorResponse) {
  auto dev = std::make_shared<MemBlockDevice>();
  TestFront front(*guest_, Abi::kX86_64, 1);
  StartServer(front.Config(Limits(2048)), dev);
  auto page = front.DataPage();
  dev->FailNext(BlockIoKind::kWrite, Status::NoSpace("host disk full"));
  dev->FailNext(BlockIoKind::kDiscard, Status::NotSupported("no discard here"));
  front.Queue(Rw(kOpWrite, 1, 0, {page.second}));
  BlkifRequest d;
  d.operation = kOpDiscard;
  d.id = 2;
  d.nr_sectors = 8;
  front.Queue(d);
  front.Push();
  auto got = front.Wait(2);
  ASSERT_EQ(got.size(), 2u);
  EXPECT_EQ(got[1].status, kRspError);
  EXPECT_EQ(got[2].status, kRspEopnotsupp);
}

TEST_F(RingServerTest, FlushWaitsForEarlierWritesAndLaterOnesWaitForIt) {
  auto dev = std::make_shared<MemBlockDevice>(MemBlockDeviceOptions{.defer_completions = true});
  TestFront front(*guest_, Abi::kX86_64, 1);
  StartServer(front.Config(Limits(2048)), dev);
  auto page = front.DataPage();
  std::memset(front.Page(page.first), 0x5a, 4096);
  front.Queue(Rw(kOpWrite, 1, 0, {page.second}));
  front.Queue(Rw(kOpWrite, 2, 8, {page.second}));
  front.Queue(Rw(kOpFlushDiskcache, 3, 0, {}));
  front.Queue(Rw(kOpWrite, 4, 16, {page.second}));
  front.Push();
  // Only the two writes before the flush may be in the device.
  for (int i = 0; i < 200 && dev->PendingCount() < 2; ++i) std::this_thread::sleep_for(5ms);
  std::this_thread::sleep_for(20ms);
  EXPECT_EQ(dev->PendingCount(), 2u);
  // Complete them out of order; the flush follows, then the last write.
  EXPECT_EQ(dev->CompletePending(SIZE_MAX, /*reverse=*/true), 2u);
  for (int i = 0; i < 200 && dev->PendingCount() < 1; ++i) std::this_thread::sleep_for(5ms);
  std::this_thread::sleep_for(20ms);
  ASSERT_EQ(dev->PendingCount(), 1u) << "the flush runs alone";
  dev->CompletePending();
  for (int i = 0; i < 200 && dev->PendingCount() < 1; ++i) std::this_thread::sleep_for(5ms);
  dev->CompletePending();
  auto got = front.Wait(4);
  ASSERT_EQ(got.size(), 4u);
  for (auto& [id, rsp] : got) EXPECT_EQ(rsp.status, kRspOkay) << id;
  auto log = dev->log();
  ASSERT_EQ(log.size(), 4u);
  EXPECT_EQ(log[2].kind, BlockIoKind::kFlush);
  EXPECT_EQ(log[3].kind, BlockIoKind::kWrite);
  EXPECT_EQ(log[3].offset_bytes, 16u * 512);
  auto durable = dev->DurableContents();
  EXPECT_EQ(durable[0], 0x5a);
  EXPECT_EQ(durable[8 * 512], 0x5a);
}

TEST_F(RingServerTest, BarrierWithDataIsDurableWhenAnswered) {
  auto dev = std::make_shared<MemBlockDevice>();
  TestFront front(*guest_, Abi::kX86_32, 1);
  StartServer(front.Config(Limits(2048)), dev);
  auto page = front.DataPage();
  std::memset(front.Page(page.first), 0x77, 4096);
  front.Queue(Rw(kOpWrite, 1, 0, {page.second}));
  front.Queue(Rw(kOpWriteBarrier, 2, 8, {page.second}));
  front.Push();
  auto got = front.Wait(2);
  ASSERT_EQ(got.size(), 2u);
  EXPECT_EQ(got[2].status, kRspOkay);
  EXPECT_EQ(got[2].operation, kOpWriteBarrier);
  auto durable = dev->DurableContents();
  EXPECT_EQ(durable[0], 0x77) << "the earlier write is durable with the barrier";
  EXPECT_EQ(durable[8 * 512 + 4095], 0x77);
}

TEST_F(RingServerTest, AsyncCompletionsInAnyOrderAnswerEachIdOnce) {
  auto dev = std::make_shared<MemBlockDevice>(MemBlockDeviceOptions{.defer_completions = true});
  TestFront front(*guest_, Abi::kX86_64, 1);
  StartServer(front.Config(Limits(2048)), dev);
  auto page = front.DataPage();
  for (uint64_t i = 0; i < 16; ++i) front.Queue(Rw(kOpRead, i, i * 8, {page.second}));
  front.Push();
  for (int i = 0; i < 200 && dev->PendingCount() < 16; ++i) std::this_thread::sleep_for(5ms);
  ASSERT_EQ(dev->PendingCount(), 16u);
  std::thread completer([&] { dev->CompletePending(SIZE_MAX, /*reverse=*/true); });
  completer.join();
  auto got = front.Wait(16);
  EXPECT_EQ(got.size(), 16u);
}

TEST_F(RingServerTest, IndirectRequestCarriesManySegments) {
  auto dev = std::make_shared<MemBlockDevice>();
  TestFront front(*guest_, Abi::kX86_64, 1);
  StartServer(front.Config(Limits(8192)), dev);
  auto desc = front.DataPage(/*readonly=*/true);
  std::vector<std::pair<uint32_t, GrantRef>> data;
  for (int i = 0; i < 40; ++i) {
    data.push_back(front.DataPage());
    std::memset(front.Page(data.back().first), i + 1, 4096);
    xen::EncodeIndirectSegment(front.Page(desc.first), i, {data.back().second, 0, 7});
  }
  BlkifRequest r;
  r.operation = kOpIndirect;
  r.indirect_op = kOpWrite;
  r.id = 99;
  r.sector_number = 64;
  r.nr_segments = 40;
  r.nr_indirect_pages = 1;
  r.indirect_grefs[0] = desc.second;
  front.Queue(r);
  front.Push();
  auto got = front.Wait(1);
  ASSERT_EQ(got.size(), 1u);
  EXPECT_EQ(got[99].status, kRspOkay);
  EXPECT_EQ(got[99].operation, kOpWrite) << "indirect responses echo indirect_op";
  auto contents = dev->Contents();
  for (int i = 0; i < 40; ++i) EXPECT_EQ(contents[64 * 512 + i * 4096 + 100], i + 1);

  // A descriptor with last_sect 8 fails the whole request.
  xen::EncodeIndirectSegment(front.Page(desc.first), 39, {data.back().second, 0, 8});
  r.id = 100;
  front.Queue(r);
  front.Push();
  got = front.Wait(1);
  EXPECT_EQ(got[100].status, kRspError);
}

TEST_F(RingServerTest, PersistentGrantsAreReusedAndBounded) {
  auto dev = std::make_shared<MemBlockDevice>();
  TestFront front(*guest_, Abi::kX86_64, 1);
  RingConfig config = front.Config(Limits(2048), /*persistent=*/true);
  config.max_persistent_grants = 4;
  RingServer* server = StartServer(config, dev);
  std::vector<GrantRef> refs;
  for (int i = 0; i < 3; ++i) refs.push_back(front.DataPage().second);
  for (uint64_t i = 0; i < 20; ++i) {
    front.Queue(Rw(i % 2 ? kOpRead : kOpWrite, i, 0, refs));
    front.Push();
    ASSERT_EQ(front.Wait(1).size(), 1u);
  }
  EXPECT_EQ(server->stats().grant_maps.load(), 1u) << "mapped once, reused 19 times";
  EXPECT_EQ(server->stats().persistent_hits.load(), 19u * 3);
  // Eight more distinct refs overflow the bound of 4.
  std::vector<GrantRef> more;
  for (int i = 0; i < 8; ++i) more.push_back(front.DataPage().second);
  front.Queue(Rw(kOpRead, 50, 0, {more.begin(), more.begin() + 8}));
  front.Push();
  ASSERT_EQ(front.Wait(1)[50].status, kRspOkay);
  EXPECT_GT(server->stats().persistent_evictions.load(), 0u);
  EXPECT_LE(hv_->MappedGrantCount(kGuest), 1u + 4u + 8u) << "ring + LRU + pages of the last batch";
}

TEST_F(RingServerTest, ProducerRacingPastRingHaltsOnlyThatRing) {
  auto dev = std::make_shared<MemBlockDevice>();
  TestFront bad(*guest_, Abi::kX86_64, 1);
  TestFront good(*guest_, Abi::kX86_64, 1);
  RingServer* bad_server = StartServer(bad.Config(Limits(2048)), dev);
  RingServer* good_server = StartServer(good.Config(Limits(2048)), dev);
  auto page = good.DataPage();
  bad.ring().ForceReqProd(1000);
  bad.Kick();  // ForceReqProd publishes without the notify rule
  for (int i = 0; i < 400 && !bad_server->halted(); ++i) std::this_thread::sleep_for(5ms);
  EXPECT_TRUE(bad_server->halted());
  EXPECT_THAT(bad_server->halt_reason(), ::testing::HasSubstr("req_prod"));
  good.Queue(Rw(kOpRead, 7, 0, {page.second}));
  good.Push();
  auto got = good.Wait(1);
  ASSERT_EQ(got.size(), 1u);
  EXPECT_EQ(got[7].status, kRspOkay);
  EXPECT_FALSE(good_server->halted());
}

TEST_F(RingServerTest, StopReleasesEveryGrantAndPort) {
  auto dev = std::make_shared<MemBlockDevice>();
  TestFront front(*guest_, Abi::kX86_64, 4);
  const size_t ports_before = hv_->OpenPortCount(kGuest);
  RingServer* server = StartServer(front.Config(Limits(2048), /*persistent=*/true), dev);
  auto page = front.DataPage();
  front.Queue(Rw(kOpWrite, 1, 0, {page.second}));
  front.Push();
  ASSERT_EQ(front.Wait(1).size(), 1u);
  EXPECT_EQ(hv_->MappedGrantCount(kGuest), 5u) << "4 ring pages + 1 persistent";
  EXPECT_EQ(server->mapped_pages(), 5u);
  server->Stop();
  EXPECT_EQ(hv_->MappedGrantCount(kGuest), 0u);
  EXPECT_EQ(server->mapped_pages(), 0u);
  EXPECT_EQ(hv_->OpenPortCount(kGuest), ports_before) << "our end is closed, the guest's port stays allocated";
}

TEST_F(RingServerTest, StopAnswersInFlightRequests) {
  auto dev = std::make_shared<MemBlockDevice>(MemBlockDeviceOptions{.defer_completions = true});
  TestFront front(*guest_, Abi::kX86_64, 1);
  RingServer* server = StartServer(front.Config(Limits(2048)), dev);
  auto page = front.DataPage();
  for (uint64_t i = 0; i < 3; ++i) front.Queue(Rw(kOpRead, i, 0, {page.second}));
  front.Push();
  for (int i = 0; i < 200 && dev->PendingCount() < 3; ++i) std::this_thread::sleep_for(5ms);
  std::thread completer([&] {
    std::this_thread::sleep_for(50ms);
    dev->CompletePending();
  });
  server->Stop();  // waits for the device
  completer.join();
  auto got = front.Wait(3, 1s);
  EXPECT_EQ(got.size(), 3u);
  EXPECT_EQ(hv_->MappedGrantCount(kGuest), 0u);
}

TEST_F(RingServerTest, ResizeChangesTheAcceptedRange) {
  auto dev = std::make_shared<MemBlockDevice>();
  TestFront front(*guest_, Abi::kX86_64, 1);
  RingServer* server = StartServer(front.Config(Limits(2048)), dev);
  auto page = front.DataPage();
  server->UpdateSectors(1024);
  front.Queue(Rw(kOpRead, 1, 1024, {page.second}));
  front.Push();
  EXPECT_EQ(front.Wait(1)[1].status, kRspError);
  server->UpdateSectors(2048);
  front.Queue(Rw(kOpRead, 2, 1024, {page.second}));
  front.Push();
  EXPECT_EQ(front.Wait(1)[2].status, kRspOkay);
}

TEST_F(RingServerTest, StartFailsCleanlyOnBadRingRef) {
  TestFront front(*guest_, Abi::kX86_64, 1);
  RingConfig config = front.Config(Limits(2048));
  config.ring_refs = {guest_->grant_entries() + 1};
  auto s = RingServer::Start(*platform_, config, std::make_shared<MemBlockDevice>());
  EXPECT_FALSE(s.ok());
  config.ring_refs = {1, 2, 3};
  s = RingServer::Start(*platform_, config, std::make_shared<MemBlockDevice>());
  EXPECT_EQ(s.status().code(), ErrorCode::kInvalidArgument);
  EXPECT_EQ(hv_->MappedGrantCount(kGuest), 0u);
}

}  // namespace
}  // namespace cowtap::backend

namespace cowtap::backend {
namespace {

TEST(LatencyBucketTest, BucketIsTheBitWidthOfTheMicroseconds) {
  EXPECT_EQ(LatencyBucket(0), 0u);
  EXPECT_EQ(LatencyBucket(1), 1u);
  EXPECT_EQ(LatencyBucket(3), 2u);
  EXPECT_EQ(LatencyBucket(4), 3u);
  EXPECT_EQ(LatencyBucket(1023), 10u);
  EXPECT_EQ(LatencyBucket(1024), 11u);
  EXPECT_EQ(LatencyBucket(UINT64_MAX), kLatencyBuckets - 1) << "the last bucket is open-ended";
}

uint64_t HistogramTotal(const RingStats& s) {
  uint64_t n = 0;
  for (const auto& b : s.latency_us_log2) n += b.load();
  return n;
}

TEST_F(RingServerTest, InFlightGaugeAndLatencyHistogramFollowRequests) {
  auto dev = std::make_shared<MemBlockDevice>(MemBlockDeviceOptions{.defer_completions = true});
  TestFront front(*guest_, Abi::kX86_64, 1);
  RingServer* server = StartServer(front.Config(Limits(2048)), dev);
  auto page = front.DataPage();
  for (uint64_t i = 0; i < 4; ++i) front.Queue(Rw(kOpRead, i, i * 8, {page.second}));
  front.Push();
  for (int i = 0; i < 400 && dev->PendingCount() < 4; ++i) std::this_thread::sleep_for(5ms);
  EXPECT_EQ(server->stats().in_flight.load(), 4u);
  EXPECT_EQ(HistogramTotal(server->stats()), 0u);
  std::this_thread::sleep_for(20ms);  // service time of at least 20 ms
  dev->CompletePending();
  EXPECT_EQ(front.Wait(4).size(), 4u);
  EXPECT_EQ(server->stats().in_flight.load(), 0u);
  EXPECT_EQ(HistogramTotal(server->stats()), 4u);
  uint64_t at_least_16ms = 0;
  for (size_t i = LatencyBucket(16000); i < kLatencyBuckets; ++i) at_least_16ms += server->stats().latency_us_log2[i];
  EXPECT_EQ(at_least_16ms, 4u) << "each request waited 20 ms in the device";
}

TEST_F(RingServerTest, PauseWaitsForInFlightTakesNothingAndResumeServesTheBacklog) {
  auto dev = std::make_shared<MemBlockDevice>(MemBlockDeviceOptions{.defer_completions = true});
  TestFront front(*guest_, Abi::kX86_64, 1);
  RingServer* server = StartServer(front.Config(Limits(2048)), dev);
  auto page = front.DataPage();
  for (uint64_t i = 0; i < 3; ++i) front.Queue(Rw(kOpWrite, i, i * 8, {page.second}));
  front.Push();
  for (int i = 0; i < 400 && dev->PendingCount() < 3; ++i) std::this_thread::sleep_for(5ms);
  ASSERT_EQ(dev->PendingCount(), 3u);
  std::atomic<bool> paused{false};
  std::thread pauser([&] {
    server->Pause();
    paused = true;
  });
  std::this_thread::sleep_for(50ms);
  EXPECT_FALSE(paused.load()) << "Pause returned with requests still in flight";
  dev->CompletePending();
  pauser.join();
  EXPECT_TRUE(server->paused());
  EXPECT_EQ(front.Wait(3).size(), 3u);
  // Requests queued while paused stay on the ring.
  for (uint64_t i = 10; i < 15; ++i) front.Queue(Rw(kOpRead, i, 0, {page.second}));
  front.Push();
  std::this_thread::sleep_for(50ms);
  EXPECT_EQ(dev->PendingCount(), 0u);
  EXPECT_EQ(server->stats().requests.load(), 3u);
  server->Resume();
  for (int i = 0; i < 400 && dev->PendingCount() < 5; ++i) std::this_thread::sleep_for(5ms);
  EXPECT_EQ(dev->PendingCount(), 5u);
  dev->CompletePending();
  auto got = front.Wait(5);
  EXPECT_EQ(got.size(), 5u);
  for (const auto& [id, rsp] : got) EXPECT_EQ(rsp.status, kRspOkay) << id;
}

TEST_F(RingServerTest, StartPausedServesNothingUntilResumed) {
  auto dev = std::make_shared<MemBlockDevice>();
  TestFront front(*guest_, Abi::kX86_64, 1);
  auto page = front.DataPage();
  front.Queue(Rw(kOpRead, 1, 0, {page.second}));
  front.Push();
  RingConfig config = front.Config(Limits(2048));
  config.start_paused = true;
  RingServer* server = StartServer(config, dev);
  ASSERT_NE(server, nullptr);
  EXPECT_TRUE(front.Wait(1, 100ms).empty());
  server->Pause();  // already paused and idle: returns at once
  server->Resume();
  EXPECT_EQ(front.Wait(1).size(), 1u);
}

TEST_F(RingServerTest, PauseAfterStopReturns) {
  auto dev = std::make_shared<MemBlockDevice>();
  TestFront front(*guest_, Abi::kX86_64, 1);
  RingServer* server = StartServer(front.Config(Limits(2048)), dev);
  server->Stop();
  server->Pause();
  server->Resume();
  EXPECT_EQ(hv_->MappedGrantCount(kGuest), 0u);
}

}  // namespace
}  // namespace cowtap::backend
