// Vbd features a daemon relies on: a backend directory of another type
// (qdisk, cowtap), waiting for a frontend domain that is not up yet, giving
// up on one that never comes, Pause/Resume with a live frontend, and stats
// that add up over reconnects.
#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <unistd.h>

#include <chrono>
#include <functional>
#include <numeric>
#include <thread>

#include "backend/mem_block_device.h"
#include "backend/vbd.h"
#include "xen-glue/blkfront.h"
#include "xen-glue/sim.h"

namespace cowtap::backend {
namespace {

using namespace std::chrono_literals;

constexpr xen::DomId kGuest = 6;
constexpr uint32_t kDevid = 51728;

class VbdLifecycleTest : public ::testing::Test {
 protected:
  void SetUp() override {
    std::string name = ::testing::UnitTest::GetInstance()->current_test_info()->name();
    auto hv = xen::SimHypervisor::Start("/tmp/cowtap-vbdlc-" + std::to_string(getpid()) + "-" + name + ".sock");
    ASSERT_TRUE(hv.ok()) << hv.status().ToString();
    hv_ = std::move(hv).value();
    platform_ = hv_->NewPlatform();
    xs_ = std::move(platform_->OpenXenStore()).value();
    device_ = std::make_shared<MemBlockDevice>(MemBlockDeviceOptions{.size_bytes = 4 << 20});
  }
  void TearDown() override {
    front_.reset();
    vbd_.reset();
    guest_.reset();
    xs_.reset();
    platform_.reset();
    hv_.reset();
  }

  void ConnectGuest() {
    auto guest =
        xen::SimGuest::Connect(hv_->socket_path(), {.domid = kGuest, .ram_pages = 2048, .grant_entries = 4096});
    ASSERT_TRUE(guest.ok()) << guest.status().ToString();
    guest_ = std::move(guest).value();
  }

  // The toolstack's directories, moved under backend/<type> when type is
  // not "vbd" (as libxl does for backendtype=qdisk).
  void AddVbd(const std::string& type) {
    xen::SimVbdConfig cfg;
    cfg.frontend_domid = kGuest;
    cfg.devid = kDevid;
    cfg.params = "mem";
    ASSERT_TRUE(xen::ToolstackAddVbd(*xs_, cfg).ok());
    if (type == "vbd") return;
    const std::string from = xen::XsBackendDir(xen::kDom0, "vbd", kGuest, kDevid);
    const std::string to = xen::XsBackendDir(xen::kDom0, type, kGuest, kDevid);
    auto keys = xs_->Directory(from);
    ASSERT_TRUE(keys.ok());
    const xen::XsPermission perms[] = {{xen::kDom0, xen::XsAccess::kNone}, {kGuest, xen::XsAccess::kRead}};
    ASSERT_TRUE(xs_->Mkdir(to).ok());
    ASSERT_TRUE(xs_->SetPermissions(to, perms).ok());
    for (const auto& k : *keys) ASSERT_TRUE(xs_->Write(xen::XsJoin(to, k), *xs_->Read(xen::XsJoin(from, k))).ok());
    ASSERT_TRUE(xs_->Remove(from).ok());
    ASSERT_TRUE(xs_->Write(xen::XsJoin(xen::XsFrontendDir(kGuest, "vbd", kDevid), "backend"), to).ok());
  }

  void AttachVbd(VbdOptions options = {}) {
    options.frontend_domid = kGuest;
    options.devid = kDevid;
    auto vbd = Vbd::Attach(*platform_, options, device_);
    ASSERT_TRUE(vbd.ok()) << vbd.status().ToString();
    vbd_ = std::move(vbd).value();
  }

  void AttachFront() {
    auto front = xen::BlkFront::Attach(*guest_, kDevid, {.handshake_timeout_ms = 5000});
    ASSERT_TRUE(front.ok()) << front.status().ToString();
    front_ = std::move(front).value();
  }

  bool WaitFor(const std::function<bool()>& cond, std::chrono::milliseconds timeout = 5s) {
    const auto deadline = std::chrono::steady_clock::now() + timeout;
    while (std::chrono::steady_clock::now() < deadline) {
      if (cond()) return true;
      std::this_thread::sleep_for(5ms);
    }
    return cond();
  }

  int16_t Io(xen::BlkOp op, uint64_t sector, uint32_t n, uint8_t* buf) {
    auto r = xen::ExecuteSync(*front_, {.op = op, .sector = sector, .nr_sectors = n, .buffer = buf});
    EXPECT_TRUE(r.ok()) << r.status().ToString();
    return r.ok() ? *r : -99;
  }

  std::unique_ptr<xen::SimHypervisor> hv_;
  std::unique_ptr<xen::XenPlatform> platform_;
  std::unique_ptr<xen::XenStore> xs_;
  std::unique_ptr<xen::SimGuest> guest_;
  std::shared_ptr<MemBlockDevice> device_;
  std::unique_ptr<Vbd> vbd_;
  std::unique_ptr<xen::BlkFront> front_;
};

TEST_F(VbdLifecycleTest, ServesABackendDirectoryOfAnotherType) {
  ASSERT_NO_FATAL_FAILURE(ConnectGuest());
  ASSERT_NO_FATAL_FAILURE(AddVbd("qdisk"));
  ASSERT_NO_FATAL_FAILURE(AttachVbd({.backend_type = "qdisk"}));
  EXPECT_EQ(vbd_->backend_path(), xen::XsBackendDir(xen::kDom0, "qdisk", kGuest, kDevid));
  ASSERT_NO_FATAL_FAILURE(AttachFront());
  std::vector<uint8_t> out(4096, 0x5a), in(4096);
  EXPECT_EQ(Io(xen::BlkOp::kWrite, 8, 8, out.data()), 0);
  EXPECT_EQ(Io(xen::BlkOp::kRead, 8, 8, in.data()), 0);
  EXPECT_EQ(in, out);
  EXPECT_EQ(*xs_->Read(xen::XsJoin(vbd_->backend_path(), "state")), "4");
}

TEST_F(VbdLifecycleTest, BadBackendTypeIsRefused) {
  auto vbd = Vbd::Attach(*platform_, {.frontend_domid = kGuest, .devid = kDevid, .backend_type = "a/b"}, device_);
  EXPECT_EQ(vbd.status().code(), ErrorCode::kInvalidArgument);
}

TEST_F(VbdLifecycleTest, WaitsForAFrontendDomainThatIsNotUpYet) {
  ASSERT_NO_FATAL_FAILURE(AddVbd("vbd"));
  ASSERT_NO_FATAL_FAILURE(AttachVbd({.domain_wait = 10s}));
  std::this_thread::sleep_for(300ms);
  EXPECT_EQ(vbd_->state(), XenbusState::kInitWait) << "a domain not up yet is not a dead one";
  EXPECT_FALSE(vbd_->domain_gone());
  ASSERT_NO_FATAL_FAILURE(ConnectGuest());
  ASSERT_NO_FATAL_FAILURE(AttachFront());
  EXPECT_TRUE(WaitFor([&] { return vbd_->state() == XenbusState::kConnected; }));
  std::vector<uint8_t> buf(4096, 1);
  EXPECT_EQ(Io(xen::BlkOp::kWrite, 0, 8, buf.data()), 0);
}

TEST_F(VbdLifecycleTest, GivesUpOnADomainThatNeverComes) {
  ASSERT_NO_FATAL_FAILURE(AddVbd("vbd"));
  ASSERT_NO_FATAL_FAILURE(AttachVbd({.domain_wait = 200ms}));
  EXPECT_TRUE(WaitFor([&] { return vbd_->domain_gone(); }, 3s));
  EXPECT_EQ(vbd_->state(), XenbusState::kClosed);
}

TEST_F(VbdLifecycleTest, PauseHoldsRequestsAndFlushesResumeServesThem) {
  ASSERT_NO_FATAL_FAILURE(ConnectGuest());
  ASSERT_NO_FATAL_FAILURE(AddVbd("vbd"));
  ASSERT_NO_FATAL_FAILURE(AttachVbd());
  ASSERT_NO_FATAL_FAILURE(AttachFront());
  std::vector<uint8_t> out(4096, 0x42), in(4096);
  EXPECT_EQ(Io(xen::BlkOp::kWrite, 16, 8, out.data()), 0);
  ASSERT_TRUE(vbd_->Pause().ok());
  EXPECT_TRUE(vbd_->paused());
  auto durable = device_->DurableContents();
  EXPECT_TRUE(std::equal(out.begin(), out.end(), durable.begin() + 16 * 512)) << "Pause flushes the device";
  ASSERT_TRUE(
      front_->Submit({.op = xen::BlkOp::kRead, .sector = 16, .nr_sectors = 8, .buffer = in.data(), .cookie = 77}).ok());
  std::vector<xen::BlkCompletion> done;
  auto polled = front_->Poll(&done, 200);
  ASSERT_TRUE(polled.ok()) << polled.status().ToString();
  EXPECT_TRUE(done.empty()) << "a paused VBD answered a request";
  vbd_->Resume();
  EXPECT_FALSE(vbd_->paused());
  for (int i = 0; i < 100 && done.empty(); ++i) ASSERT_TRUE(front_->Poll(&done, 50).ok());
  ASSERT_EQ(done.size(), 1u);
  EXPECT_EQ(done[0].status, 0);
  EXPECT_EQ(in, out);
}

TEST_F(VbdLifecycleTest, StatsAddUpOverReconnectsAndCarryTheHistogram) {
  ASSERT_NO_FATAL_FAILURE(ConnectGuest());
  ASSERT_NO_FATAL_FAILURE(AddVbd("vbd"));
  ASSERT_NO_FATAL_FAILURE(AttachVbd());
  ASSERT_NO_FATAL_FAILURE(AttachFront());
  std::vector<uint8_t> buf(4096, 3);
  for (int i = 0; i < 5; ++i) EXPECT_EQ(Io(xen::BlkOp::kWrite, i * 8, 8, buf.data()), 0);
  ASSERT_TRUE(front_->Disconnect().ok());
  EXPECT_TRUE(WaitFor([&] { return vbd_->state() == XenbusState::kClosed; }));
  EXPECT_EQ(vbd_->stats().writes, 5u) << "counters survive the rings being stopped";
  ASSERT_TRUE(front_->Reconnect().ok());
  EXPECT_TRUE(WaitFor([&] { return vbd_->state() == XenbusState::kConnected; }));
  for (int i = 0; i < 3; ++i) EXPECT_EQ(Io(xen::BlkOp::kRead, i * 8, 8, buf.data()), 0);
  VbdStats s = vbd_->stats();
  EXPECT_EQ(s.writes, 5u);
  EXPECT_EQ(s.reads, 3u);
  EXPECT_EQ(s.in_flight, 0u);
  const uint64_t answered = std::accumulate(s.latency_us_log2.begin(), s.latency_us_log2.end(), uint64_t{0});
  EXPECT_EQ(answered, s.requests);
  EXPECT_GE(answered, 8u);
}

TEST_F(VbdLifecycleTest, PauseWhileDisconnectedPausesTheNextConnection) {
  ASSERT_NO_FATAL_FAILURE(ConnectGuest());
  ASSERT_NO_FATAL_FAILURE(AddVbd("vbd"));
  ASSERT_NO_FATAL_FAILURE(AttachVbd());
  ASSERT_TRUE(vbd_->Pause().ok());
  ASSERT_NO_FATAL_FAILURE(AttachFront());  // the handshake itself is not paused
  std::vector<uint8_t> in(4096);
  ASSERT_TRUE(
      front_->Submit({.op = xen::BlkOp::kRead, .sector = 0, .nr_sectors = 8, .buffer = in.data(), .cookie = 5}).ok());
  std::vector<xen::BlkCompletion> done;
  ASSERT_TRUE(front_->Poll(&done, 200).ok());
  EXPECT_TRUE(done.empty());
  vbd_->Resume();
  for (int i = 0; i < 100 && done.empty(); ++i) ASSERT_TRUE(front_->Poll(&done, 50).ok());
  EXPECT_EQ(done.size(), 1u);
}

}  // namespace
}  // namespace cowtap::backend
