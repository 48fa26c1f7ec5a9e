// Vbd over the sim hypervisor: the xenbus handshake with the sim BlkFront
// (a xen-blkfront-like guest), teardown, reconnect, guest death, resize,
// and a crude frontend that writes malformed keys.
#include "backend/vbd.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <unistd.h>

#include <chrono>
#include <cstring>
#include <thread>

#include "backend/mem_block_device.h"
#include "cow/image.h"
#include "xen-glue/blkfront.h"
#include "xen-glue/sim.h"

namespace cowtap::backend {
namespace {

using namespace std::chrono_literals;

constexpr xen::DomId kGuest = 4;
constexpr uint32_t kDevid = 51712;

std::string SocketPath() {
  std::string name = ::testing::UnitTest::GetInstance()->current_test_info()->name();
  for (char& c : name) {
    if (c == '/') c = '_';
  }
  return "/tmp/cowtap-vbd-" + std::to_string(getpid()) + "-" + name + ".sock";
}

class VbdTest : public ::testing::Test {
 protected:
  void SetUp() override {
    auto hv = xen::SimHypervisor::Start(SocketPath());
    ASSERT_TRUE(hv.ok()) << hv.status().ToString();
    hv_ = std::move(hv).value();
    platform_ = hv_->NewPlatform();
    xs_ = std::move(platform_->OpenXenStore()).value();
    auto guest =
        xen::SimGuest::Connect(hv_->socket_path(), {.domid = kGuest, .ram_pages = 4096, .grant_entries = 8192});
    ASSERT_TRUE(guest.ok()) << guest.status().ToString();
    guest_ = std::move(guest).value();
    device_ = std::make_shared<MemBlockDevice>(MemBlockDeviceOptions{.size_bytes = 8 << 20});
  }
  void TearDown() override {
    front_.reset();
    vbd_.reset();
    guest_.reset();
    xs_.reset();
    platform_.reset();
    hv_.reset();
  }

  void AddVbd(bool writable = true, std::string device_type = "disk") {
    xen::SimVbdConfig cfg;
    cfg.frontend_domid = kGuest;
    cfg.devid = kDevid;
    cfg.params = "mem";
    cfg.writable = writable;
    cfg.device_type = device_type;
    ASSERT_TRUE(xen::ToolstackAddVbd(*xs_, cfg).ok());
  }

  void AttachVbd(VbdOptions options = {}) {
    options.frontend_domid = kGuest;
    options.devid = kDevid;
    auto vbd = Vbd::Attach(*platform_, options, device_);
    ASSERT_TRUE(vbd.ok()) << vbd.status().ToString();
    vbd_ = std::move(vbd).value();
  }

  void AttachFront(xen::BlkfrontOptions options = {}) {
    options.handshake_timeout_ms = 5000;
    auto front = xen::BlkFront::Attach(*guest_, kDevid, options);
    ASSERT_TRUE(front.ok()) << front.status().ToString();
    front_ = std::move(front).value();
  }

  std::string Be(const std::string& key) {
    auto v = xs_->Read(xen::XsJoin(xen::XsBackendDir(xen::kDom0, "vbd", kGuest, kDevid), key));
    return v.ok() ? *v : "<absent>";
  }
  std::string FeDir() { return xen::XsFrontendDir(kGuest, "vbd", kDevid); }

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

TEST_F(VbdTest, PublishesFeaturesAndWaitsInInitWait) {
  ASSERT_NO_FATAL_FAILURE(AddVbd());
  ASSERT_NO_FATAL_FAILURE(AttachVbd());
  EXPECT_EQ(Be("state"), "2");
  EXPECT_EQ(Be("feature-flush-cache"), "1");
  EXPECT_EQ(Be("feature-barrier"), "1");
  EXPECT_EQ(Be("feature-discard"), "1");
  EXPECT_EQ(Be("discard-granularity"), "512");
  EXPECT_EQ(Be("discard-alignment"), "0");
  EXPECT_EQ(Be("discard-secure"), "0");
  EXPECT_EQ(Be("feature-persistent"), "1");
  EXPECT_EQ(Be("feature-max-indirect-segments"), "256");
  EXPECT_EQ(Be("max-ring-page-order"), "4");
  EXPECT_EQ(Be("max-ring-pages"), "16");
  EXPECT_EQ(Be("multi-queue-max-queues"), "4");
  EXPECT_EQ(vbd_->state(), XenbusState::kInitWait);
}

TEST_F(VbdTest, AttachFailsWithoutBackendDirectory) {
  auto vbd = Vbd::Attach(*platform_, {.frontend_domid = kGuest, .devid = kDevid}, device_);
  ASSERT_FALSE(vbd.ok());
  EXPECT_THAT(vbd.status().message(), ::testing::HasSubstr("frontend"));
}

TEST_F(VbdTest, HandshakeConnectsAndServesData) {
  ASSERT_NO_FATAL_FAILURE(AddVbd());
  ASSERT_NO_FATAL_FAILURE(AttachVbd());
  ASSERT_NO_FATAL_FAILURE(AttachFront());
  EXPECT_EQ(Be("state"), "4");
  EXPECT_EQ(Be("sectors"), std::to_string((8 << 20) / 512));
  EXPECT_EQ(Be("info"), "0");
  EXPECT_EQ(Be("sector-size"), "512");
  EXPECT_EQ(Be("physical-sector-size"), "512");
  const auto& d = front_->device();
  EXPECT_EQ(d.sectors, (8u << 20) / 512);
  EXPECT_EQ(d.num_queues, 4u);
  EXPECT_EQ(d.ring_page_order, 4u);
  EXPECT_TRUE(d.persistent);
  EXPECT_EQ(d.indirect_segments, 256u);
  EXPECT_TRUE(d.flush && d.barrier && d.discard);

  std::vector<uint8_t> out(64 * 1024), in(64 * 1024);
  for (size_t i = 0; i < out.size(); ++i) out[i] = static_cast<uint8_t>(i * 7 + 3);
  EXPECT_EQ(Io(xen::BlkOp::kWrite, 100, 128, out.data()), 0);
  EXPECT_EQ(Io(xen::BlkOp::kFlush, 0, 0, nullptr), 0);
  EXPECT_EQ(Io(xen::BlkOp::kRead, 100, 128, in.data()), 0);
  EXPECT_EQ(in, out);
  auto durable = device_->DurableContents();
  EXPECT_TRUE(std::equal(out.begin(), out.end(), durable.begin() + 100 * 512));
  EXPECT_EQ(Io(xen::BlkOp::kDiscard, 100, 8, nullptr), 0);
  EXPECT_EQ(Io(xen::BlkOp::kRead, 100, 8, in.data()), 0);
  EXPECT_EQ(in[0], 0);
  VbdStats s = vbd_->stats();
  EXPECT_EQ(s.queues, 4u);
  EXPECT_GE(s.writes, 1u);
  EXPECT_GE(s.reads, 2u);
  EXPECT_EQ(s.errors, 0u);
}

TEST_F(VbdTest, X86_32SinglePageLegacyFrontend) {
  ASSERT_NO_FATAL_FAILURE(AddVbd());
  ASSERT_NO_FATAL_FAILURE(AttachVbd());
  AttachFront({.abi = xen::BlkifAbi::kX86_32,
               .max_ring_page_order = 0,
               .max_queues = 1,
               .persistent_grants = false,
               .max_indirect_segments = 0});
  EXPECT_EQ(front_->device().ring_page_order, 0u);
  std::vector<uint8_t> out(4096, 0x3c), in(4096);
  EXPECT_EQ(Io(xen::BlkOp::kWrite, 8, 8, out.data()), 0);
  EXPECT_EQ(Io(xen::BlkOp::kRead, 8, 8, in.data()), 0);
  EXPECT_EQ(in, out);
}

TEST_F(VbdTest, ReadOnlyModeAdvertisesAndRefusesWrites) {
  ASSERT_NO_FATAL_FAILURE(AddVbd(/*writable=*/false));
  ASSERT_NO_FATAL_FAILURE(AttachVbd());
  ASSERT_NO_FATAL_FAILURE(AttachFront());
  EXPECT_EQ(Be("info"), "4");
  EXPECT_EQ(Be("feature-discard"), "0");
  EXPECT_TRUE(front_->device().read_only);
}

TEST_F(VbdTest, CdromIsReadOnlyAndFlagged) {
  ASSERT_NO_FATAL_FAILURE(AddVbd(/*writable=*/true, "cdrom"));
  ASSERT_NO_FATAL_FAILURE(AttachVbd());
  ASSERT_NO_FATAL_FAILURE(AttachFront());
  EXPECT_EQ(Be("info"), "5");
}

TEST_F(VbdTest, CloseReleasesEverythingAndReconnectServesAgain) {
  ASSERT_NO_FATAL_FAILURE(AddVbd());
  ASSERT_NO_FATAL_FAILURE(AttachVbd());
  ASSERT_NO_FATAL_FAILURE(AttachFront());
  std::vector<uint8_t> buf(4096, 0x11);
  EXPECT_EQ(Io(xen::BlkOp::kWrite, 0, 8, buf.data()), 0);
  EXPECT_GT(hv_->MappedGrantCount(kGuest), 0u);
  ASSERT_TRUE(front_->Disconnect().ok());
  EXPECT_TRUE(WaitFor([&] { return vbd_->state() == XenbusState::kClosed && Be("state") == "6"; }));
  EXPECT_EQ(hv_->MappedGrantCount(kGuest), 0u);
  EXPECT_EQ(front_->leaked_grants(), 0u);

  ASSERT_TRUE(front_->Reconnect().ok());
  EXPECT_TRUE(WaitFor([&] { return vbd_->state() == XenbusState::kConnected; }));
  std::vector<uint8_t> in(4096);
  EXPECT_EQ(Io(xen::BlkOp::kRead, 0, 8, in.data()), 0);
  EXPECT_EQ(in, buf);
}

TEST_F(VbdTest, ReconnectFasterThanTheWatchIsServed) {
  ASSERT_NO_FATAL_FAILURE(AddVbd());
  ASSERT_NO_FATAL_FAILURE(AttachVbd());
  ASSERT_NO_FATAL_FAILURE(AttachFront());
  ASSERT_TRUE(front_->Disconnect().ok());
  EXPECT_TRUE(WaitFor([&] { return vbd_->state() == XenbusState::kClosed; }));
  // Frontend goes Initialising -> Initialised in one go, as a crude
  // frontend that does not wait for InitWait would (the events coalesce).
  front_.reset();
  ASSERT_NO_FATAL_FAILURE(AttachFront({.wait_for_initwait = false}));
  EXPECT_TRUE(WaitFor([&] { return vbd_->state() == XenbusState::kConnected; }));
  std::vector<uint8_t> buf(4096, 0x19), in(4096);
  EXPECT_EQ(Io(xen::BlkOp::kWrite, 0, 8, buf.data()), 0);
  EXPECT_EQ(Io(xen::BlkOp::kRead, 0, 8, in.data()), 0);
  EXPECT_EQ(in, buf);
}

TEST_F(VbdTest, GuestDeathTearsDown) {
  ASSERT_NO_FATAL_FAILURE(AddVbd());
  ASSERT_NO_FATAL_FAILURE(AttachVbd());
  ASSERT_NO_FATAL_FAILURE(AttachFront());
  std::vector<uint8_t> buf(4096, 0x22);
  EXPECT_EQ(Io(xen::BlkOp::kWrite, 0, 8, buf.data()), 0);
  ASSERT_TRUE(hv_->DestroyDomain(kGuest).ok());
  EXPECT_TRUE(WaitFor([&] { return vbd_->state() == XenbusState::kClosed; }));
  EXPECT_EQ(hv_->MappedGrantCount(kGuest), 0u);
  EXPECT_EQ(vbd_->stats().queues, 0u);
}

TEST_F(VbdTest, ResizeWhileConnectedUpdatesSectors) {
  ASSERT_NO_FATAL_FAILURE(AddVbd());
  ASSERT_NO_FATAL_FAILURE(AttachVbd());
  ASSERT_NO_FATAL_FAILURE(AttachFront());
  device_->Resize(16 << 20);
  vbd_->Resize();
  EXPECT_TRUE(WaitFor([&] { return Be("sectors") == std::to_string((16 << 20) / 512); }));
  auto sectors = front_->RefreshSectors();
  ASSERT_TRUE(sectors.ok());
  EXPECT_EQ(*sectors, (16u << 20) / 512);
  std::vector<uint8_t> buf(4096, 0x44);
  EXPECT_EQ(Io(xen::BlkOp::kWrite, (12 << 20) / 512, 8, buf.data()), 0) << "beyond the old end";
}

TEST_F(VbdTest, GarbageSlotsAreAnsweredAndTheQueueKeepsServing) {
  ASSERT_NO_FATAL_FAILURE(AddVbd());
  ASSERT_NO_FATAL_FAILURE(AttachVbd());
  ASSERT_NO_FATAL_FAILURE(AttachFront({.max_queues = 1}));
  ASSERT_TRUE(front_->InjectGarbage(0, 20, 1234).ok());
  EXPECT_TRUE(WaitFor([&] { return vbd_->stats().requests >= 20; }));
  VbdStats s = vbd_->stats();
  EXPECT_EQ(s.errors + s.eopnotsupp, 20u) << "every garbage slot answered with an error";
  EXPECT_EQ(s.halted_queues, 0u);
  std::vector<uint8_t> out(4096, 0x66), in(4096);
  EXPECT_EQ(Io(xen::BlkOp::kWrite, 16, 8, out.data()), 0);
  EXPECT_EQ(Io(xen::BlkOp::kRead, 16, 8, in.data()), 0);
  EXPECT_EQ(in, out);
  EXPECT_EQ(front_->stats().unexpected_responses, 20u);
}

TEST_F(VbdTest, NotificationFloodIsHarmless) {
  ASSERT_NO_FATAL_FAILURE(AddVbd());
  ASSERT_NO_FATAL_FAILURE(AttachVbd());
  ASSERT_NO_FATAL_FAILURE(AttachFront({.max_queues = 1}));
  ASSERT_TRUE(front_->NotifyFlood(0, 5000).ok());
  std::vector<uint8_t> buf(4096, 0x12);
  EXPECT_EQ(Io(xen::BlkOp::kWrite, 0, 8, buf.data()), 0);
  EXPECT_EQ(vbd_->stats().errors, 0u);
}

TEST_F(VbdTest, RacingReqProdHaltsOneQueueAndTeardownStillReleasesAll) {
  ASSERT_NO_FATAL_FAILURE(AddVbd());
  ASSERT_NO_FATAL_FAILURE(AttachVbd());
  ASSERT_NO_FATAL_FAILURE(AttachFront({.max_queues = 2}));
  ASSERT_EQ(front_->device().num_queues, 2u);
  ASSERT_TRUE(front_->RaceReqProd(1, 7).ok());
  EXPECT_TRUE(WaitFor([&] { return vbd_->stats().halted_queues == 1; }));
  EXPECT_EQ(vbd_->state(), XenbusState::kConnected) << "a broken ring does not take the VBD down";
  ASSERT_TRUE(hv_->DestroyDomain(kGuest).ok());
  EXPECT_TRUE(WaitFor([&] { return vbd_->state() == XenbusState::kClosed; }));
  EXPECT_EQ(hv_->MappedGrantCount(kGuest), 0u);
}

TEST_F(VbdTest, GrantRevokedBeforePushFailsOnlyThatRequest) {
  ASSERT_NO_FATAL_FAILURE(AddVbd());
  ASSERT_NO_FATAL_FAILURE(AttachVbd());
  ASSERT_NO_FATAL_FAILURE(AttachFront({.max_queues = 1, .persistent_grants = false}));
  std::vector<uint8_t> buf(4096, 0x31);
  ASSERT_TRUE(front_
                  ->SubmitThenRevoke(
                      {.op = xen::BlkOp::kWrite, .sector = 0, .nr_sectors = 8, .buffer = buf.data(), .cookie = 77},
                      /*before_push=*/true)
                  .ok());
  std::vector<xen::BlkCompletion> done;
  for (int i = 0; i < 100 && done.empty(); ++i) ASSERT_TRUE(front_->Poll(&done, 50).ok());
  ASSERT_EQ(done.size(), 1u);
  EXPECT_EQ(done[0].cookie, 77u);
  EXPECT_EQ(done[0].status, -1);
  std::vector<uint8_t> in(4096);
  EXPECT_EQ(Io(xen::BlkOp::kRead, 0, 8, in.data()), 0);
}

// discard-enable=0 from the toolstack is not only advertised but enforced:
// a guest that sends DISCARD anyway gets EOPNOTSUPP and nothing is discarded.
TEST_F(VbdTest, DiscardDisabledByToolstackIsRefusedEvenIfSent) {
  ASSERT_NO_FATAL_FAILURE(AddVbd());
  ASSERT_TRUE(xs_->Write(xen::XsJoin(xen::XsBackendDir(xen::kDom0, "vbd", kGuest, kDevid), "discard-enable"), "0")
                  .ok());
  ASSERT_NO_FATAL_FAILURE(AttachVbd());
  ASSERT_NO_FATAL_FAILURE(AttachFront({.max_queues = 1}));
  EXPECT_EQ(Be("feature-discard"), "0");
  std::vector<uint8_t> buf(4096, 0x42);
  ASSERT_EQ(Io(xen::BlkOp::kWrite, 0, 8, buf.data()), 0);
  xen::BlkifRequest req;
  req.operation = xen::kBlkifOpDiscard;
  req.id = 91;
  req.sector_number = 0;
  req.nr_sectors = 8;
  ASSERT_TRUE(front_->SubmitRaw(0, req, 91).ok());
  std::vector<xen::BlkCompletion> done;
  for (int i = 0; i < 100 && done.empty(); ++i) ASSERT_TRUE(front_->Poll(&done, 50).ok());
  ASSERT_EQ(done.size(), 1u);
  EXPECT_EQ(done[0].cookie, 91u);
  EXPECT_EQ(done[0].status, -2);
  std::vector<uint8_t> in(4096);
  EXPECT_EQ(Io(xen::BlkOp::kRead, 0, 8, in.data()), 0);
  EXPECT_EQ(in, buf);
}

// The whole stack: guest -> ring -> Vbd -> image adapter -> qcow2 overlay
// over a raw base the guest must never modify.
TEST_F(VbdTest, ServesQcow2OverlayOverReadOnlyBase) {
  auto fs = cow::NewMemFileSystem();
  auto open_options = [&](std::optional<cow::ImageFormat> format, bool read_only) {
    cow::OpenOptions o;
    o.format = format;
    o.read_only = read_only;
    o.fs = fs.get();
    return o;
  };
  cow::CreateOptions base_opts;
  base_opts.format = cow::ImageFormat::kRaw;
  base_opts.size_bytes = 4 << 20;
  base_opts.fs = fs.get();
  ASSERT_TRUE(cow::CreateImage("base.raw", base_opts).ok());
  std::vector<uint8_t> pattern(1 << 20);
  for (size_t i = 0; i < pattern.size(); ++i) pattern[i] = static_cast<uint8_t>(i / 512 + 1);
  {
    auto base = cow::OpenImage("base.raw", open_options(cow::ImageFormat::kRaw, false));
    ASSERT_TRUE(base.ok()) << base.status().ToString();
    iovec iov[] = {MakeIoVec(pattern.data(), pattern.size())};
    ASSERT_TRUE((*base)->Write(0, iov).ok());
    ASSERT_TRUE((*base)->Close().ok());
  }
  cow::CreateOptions overlay_opts;
  overlay_opts.format = cow::ImageFormat::kQcow2;
  overlay_opts.backing_file = "base.raw";
  overlay_opts.backing_format = cow::ImageFormat::kRaw;
  overlay_opts.fs = fs.get();
  ASSERT_TRUE(cow::CreateImage("overlay.qcow2", overlay_opts).ok());
  auto overlay = cow::OpenImage("overlay.qcow2", open_options(std::nullopt, false));
  ASSERT_TRUE(overlay.ok()) << overlay.status().ToString();
  std::shared_ptr<cow::Image> image = std::move(overlay).value();

  ASSERT_NO_FATAL_FAILURE(AddVbd());
  VbdOptions options;
  options.frontend_domid = kGuest;
  options.devid = kDevid;
  auto vbd = Vbd::Attach(*platform_, options, NewImageBlockDevice(image));
  ASSERT_TRUE(vbd.ok()) << vbd.status().ToString();
  vbd_ = std::move(vbd).value();
  ASSERT_NO_FATAL_FAILURE(AttachFront());
  EXPECT_EQ(Be("sectors"), std::to_string((4 << 20) / 512));
  EXPECT_EQ(Be("physical-sector-size"), "4096");
  EXPECT_EQ(Be("discard-granularity"), "65536");

  std::vector<uint8_t> in(64 * 1024);
  ASSERT_EQ(Io(xen::BlkOp::kRead, 0, 128, in.data()), 0);
  EXPECT_TRUE(std::equal(in.begin(), in.end(), pattern.begin())) << "reads fall through to the base";
  std::vector<uint8_t> out(8 * 512, 0xee);
  ASSERT_EQ(Io(xen::BlkOp::kWrite, 3, 8, out.data()), 0);  // unaligned: copy-up around it
  ASSERT_EQ(Io(xen::BlkOp::kFlush, 0, 0, nullptr), 0);
  ASSERT_EQ(Io(xen::BlkOp::kRead, 0, 128, in.data()), 0);
  std::vector<uint8_t> expect(pattern.begin(), pattern.begin() + in.size());
  std::fill(expect.begin() + 3 * 512, expect.begin() + 11 * 512, 0xee);
  EXPECT_EQ(in, expect);

  ASSERT_TRUE(front_->Disconnect().ok());
  vbd_.reset();
  auto base = cow::OpenImage("base.raw", open_options(cow::ImageFormat::kRaw, true));
  ASSERT_TRUE(base.ok());
  std::vector<uint8_t> base_now(64 * 1024);
  iovec iov[] = {MakeIoVec(base_now.data(), base_now.size())};
  ASSERT_TRUE((*base)->Read(0, iov).ok());
  EXPECT_TRUE(std::equal(base_now.begin(), base_now.end(), pattern.begin())) << "the base is never written";
}

// A crude frontend: writes its keys by hand through the guest's xenstore.
class CrudeFrontendTest : public VbdTest {
 protected:
  void Publish(const std::vector<std::pair<std::string, std::string>>& keys) {
    auto store = std::move(guest_->OpenXenStore()).value();
    for (const auto& [k, v] : keys) ASSERT_TRUE(store->Write(xen::XsJoin(FeDir(), k), v).ok()) << k;
    ASSERT_TRUE(store->Write(xen::XsJoin(FeDir(), "state"), "3").ok());
  }
  void ExpectClosingWith(const std::string& text) {
    // The Vbd's own state moves just before the store key is written.
    EXPECT_TRUE(WaitFor([&] { return vbd_->state() == XenbusState::kClosing && Be("state") == "5"; }));
    EXPECT_THAT(Be("error"), ::testing::HasSubstr(text));
    EXPECT_THAT(vbd_->last_error(), ::testing::HasSubstr(text));
    EXPECT_EQ(hv_->MappedGrantCount(kGuest), 0u);
  }
};

TEST_F(CrudeFrontendTest, NonNumericRingRefClosesTheVbd) {
  ASSERT_NO_FATAL_FAILURE(AddVbd());
  ASSERT_NO_FATAL_FAILURE(AttachVbd());
  Publish({{"ring-ref", "12abc"}, {"event-channel", "5"}});
  ExpectClosingWith("ring-ref");
}

TEST_F(CrudeFrontendTest, MissingEventChannelClosesTheVbd) {
  ASSERT_NO_FATAL_FAILURE(AddVbd());
  ASSERT_NO_FATAL_FAILURE(AttachVbd());
  Publish({{"ring-ref", "8"}});
  ExpectClosingWith("event-channel");
}

TEST_F(CrudeFrontendTest, RingOrderAboveOfferClosesTheVbd) {
  ASSERT_NO_FATAL_FAILURE(AddVbd());
  ASSERT_NO_FATAL_FAILURE(AttachVbd());
  Publish({{"ring-page-order", "5"}, {"ring-ref0", "8"}, {"event-channel", "5"}});
  ExpectClosingWith("ring-page-order");
}

TEST_F(CrudeFrontendTest, TooManyQueuesClosesTheVbd) {
  ASSERT_NO_FATAL_FAILURE(AddVbd());
  ASSERT_NO_FATAL_FAILURE(AttachVbd());
  Publish({{"multi-queue-num-queues", "5"}});
  ExpectClosingWith("multi-queue-num-queues");
}

TEST_F(CrudeFrontendTest, UnknownProtocolClosesTheVbd) {
  ASSERT_NO_FATAL_FAILURE(AddVbd());
  ASSERT_NO_FATAL_FAILURE(AttachVbd());
  Publish({{"protocol", "arm-abi"}, {"ring-ref", "8"}, {"event-channel", "5"}});
  ExpectClosingWith("arm-abi");
}

TEST_F(CrudeFrontendTest, UngrantedRingRefClosesTheVbd) {
  ASSERT_NO_FATAL_FAILURE(AddVbd());
  ASSERT_NO_FATAL_FAILURE(AttachVbd());
  Publish({{"ring-ref", "4000"}, {"event-channel", "5"}});
  ExpectClosingWith("queue 0");
}

TEST_F(CrudeFrontendTest, GarbageStateIsAnErrorNotACrash) {
  ASSERT_NO_FATAL_FAILURE(AddVbd());
  ASSERT_NO_FATAL_FAILURE(AttachVbd());
  auto store = std::move(guest_->OpenXenStore()).value();
  ASSERT_TRUE(store->Write(xen::XsJoin(FeDir(), "state"), "-1").ok());
  ExpectClosingWith("state");
}

}  // namespace
}  // namespace cowtap::backend
