// cowtapd's core under injected faults: the sim hypervisor failing grant
// maps, grant unmaps, event-channel binds and notifies, xenstore reads and
// writes (SimFaults), and the image file failing reads, writes, flushes,
// allocation and writing short (cow::FaultInjectingFileSystem). For each
// fault: the request gets BLKIF_RSP_ERROR, or the VBD goes Closing with an
// `error` key; data already acknowledged is still there; the daemon does
// not fall over; and another VBD runs a verifying cowtap_guest workload
// through all of it.
//
// The faulty VBD is driven by an in-process BlkFront, so the test decides
// exactly which request meets the fault.
#include <gtest/gtest.h>

#include <atomic>
#include <chrono>
#include <cstring>
#include <thread>

#include "cow/fault_file.h"
#include "tests/blkif/guest_process.h"
#include "tests/daemon/daemon_rig.h"
#include "tools/daemon/locking_fs.h"
#include "tools/daemon/toolstack.h"
#include "xen-glue/blkfront.h"
#include "xen-glue/sim.h"

namespace cowtap::daemon_test {
namespace {

using namespace std::chrono_literals;
using xen::BlkOp;
using xen::SimFaultPoint;
using xen::SimFaultRule;

constexpr uint32_t kXvda = 51712;
constexpr xen::DomId kHealthy = 60;
constexpr int16_t kOkay = 0;
constexpr int16_t kError = -1;

// Fails `count` calls concerning the guest `domid`.
SimFaultRule ForDomain(xen::DomId domid, uint64_t count) {
  SimFaultRule rule;
  rule.domid = domid;
  rule.count = count;
  return rule;
}

std::string VbdId(xen::DomId domid) { return std::to_string(domid) + "/" + std::to_string(kXvda); }

// Sector s of generation `tag` holds bytes (s * 7 + tag) & 0xff.
std::vector<uint8_t> Pattern(uint64_t sector, uint32_t sectors, uint8_t tag) {
  std::vector<uint8_t> b(size_t{sectors} * 512);
  for (uint32_t i = 0; i < sectors; ++i) std::memset(b.data() + size_t{i} * 512, ((sector + i) * 7 + tag) & 0xff, 512);
  return b;
}

// The in-process guest of the VBD under fault.
struct Guest {
  std::unique_ptr<xen::SimGuest> sim;
  std::unique_ptr<xen::BlkFront> front;

  static Result<Guest> Attach(DaemonRig& r, xen::DomId domid, xen::BlkfrontOptions options = {}) {
    Guest g;
    COWTAP_ASSIGN_OR_RETURN(g.sim, Domain(r, domid));
    COWTAP_ASSIGN_OR_RETURN(g.front, Front(*g.sim, options));
    return g;
  }
  // The guest domain alone: a test whose handshake is meant to fail keeps it
  // alive, or the backend sees the domain go and moves on from Closing.
  static Result<std::unique_ptr<xen::SimGuest>> Domain(DaemonRig& r, xen::DomId domid) {
    return xen::SimGuest::Connect(r.socket(), {.domid = domid, .ram_pages = 4096, .grant_entries = 4096});
  }
  static Result<std::unique_ptr<xen::BlkFront>> Front(xen::SimGuest& sim, xen::BlkfrontOptions options = {}) {
    options.handshake_timeout_ms = 3000;
    return xen::BlkFront::Attach(sim, kXvda, options);
  }
  int16_t Io(BlkOp op, uint64_t sector, uint32_t n, uint8_t* buf) {
    auto r = xen::ExecuteSync(*front, {.op = op, .sector = sector, .nr_sectors = n, .buffer = buf});
    return r.ok() ? *r : int16_t{-100};
  }
  int16_t Write(uint64_t sector, uint32_t n, uint8_t tag) {
    auto b = Pattern(sector, n, tag);
    return Io(BlkOp::kWrite, sector, n, b.data());
  }
  int16_t Flush() { return Io(BlkOp::kFlush, 0, 0, nullptr); }
  // Reads and compares with the pattern of `tag`.
  ::testing::AssertionResult Holds(uint64_t sector, uint32_t n, uint8_t tag) {
    std::vector<uint8_t> b(size_t{n} * 512, 0xee);
    const int16_t st = Io(BlkOp::kRead, sector, n, b.data());
    if (st != kOkay) return ::testing::AssertionFailure() << "read of sector " << sector << " answered " << st;
    if (b != Pattern(sector, n, tag)) {
      return ::testing::AssertionFailure() << "sectors " << sector << "+" << n << " lost generation " << int{tag};
    }
    return ::testing::AssertionSuccess();
  }
};

// A rig with a healthy VBD (kHealthy) whose cowtap_guest runs a verifying
// random workload for `ms`, started before the faults and checked after.
class SimFaultsTest : public ::testing::Test {
 protected:
  void SetUp() override { ASSERT_NO_FATAL_FAILURE(MakeRig({})); }
  void MakeRig(daemon::DaemonOptions options) {
    auto rig = DaemonRig::Create(options);
    ASSERT_TRUE(rig.ok()) << rig.status().ToString();
    rig_ = std::move(rig).value();
    ASSERT_TRUE(rig_->MakeOverlay("healthy.qcow2").ok());
    ASSERT_TRUE(rig_->MakeOverlay("faulty.qcow2").ok());
    ASSERT_TRUE(rig_->daemon().Attach(XvdaSpec(kHealthy, rig_->Path("healthy.qcow2"))).ok());
  }
  void StartHealthyWorkload(int ms = 4000) {
    auto p = blkif_test::GuestProcess::Start(rig_->GuestArgs(
        kHealthy, kXvda, {"--ops", "0", "--duration-ms", std::to_string(ms), "--initial", "zero", "--qd", "8"}));
    ASSERT_TRUE(p.ok()) << p.status().ToString();
    healthy_.emplace(std::move(p).value());
  }
  void ExpectHealthyPassed() {
    ASSERT_TRUE(healthy_.has_value());
    blkif_test::GuestOutcome o = healthy_->Wait(60s);
    EXPECT_TRUE(o.Passed()) << "the healthy VBD: " << o.Describe() << "\n" << o.output;
    EXPECT_GT(o.InfoInt("ops", 1), 0);
  }
  void TearDown() override {
    if (rig_) rig_->sim().faults().ClearAll();
  }
  xen::SimFaults& faults() { return rig_->sim().faults(); }

  std::unique_ptr<DaemonRig> rig_;
  std::optional<blkif_test::GuestProcess> healthy_;
};

TEST_F(SimFaultsTest, GrantMapFailureAnswersThatRequestErrorAndLosesNothing) {
  DaemonRig& r = *rig_;
  ASSERT_TRUE(r.daemon().Attach(XvdaSpec(41, r.Path("faulty.qcow2"))).ok());
  auto g = Guest::Attach(r, 41, {.persistent_grants = false});
  ASSERT_TRUE(g.ok()) << g.status().ToString();
  ASSERT_NO_FATAL_FAILURE(StartHealthyWorkload());
  ASSERT_EQ(g->Write(0, 64, 1), kOkay);
  ASSERT_EQ(g->Flush(), kOkay);

  faults().Set(SimFaultPoint::kGrantMap, ForDomain(41, xen::kEveryCall));
  EXPECT_EQ(g->Write(0, 8, 2), kError);
  std::vector<uint8_t> buf(4096);
  EXPECT_EQ(g->Io(BlkOp::kRead, 8, 8, buf.data()), kError);
  EXPECT_EQ(g->Flush(), kOkay) << "a flush carries no grants";
  EXPECT_GE(faults().fired(SimFaultPoint::kGrantMap), 2u);
  faults().Clear(SimFaultPoint::kGrantMap);

  EXPECT_TRUE(g->Holds(8, 56, 1)) << "sectors the failed requests did not touch";
  EXPECT_EQ(g->Write(0, 8, 3), kOkay) << "writes resume once maps work";
  EXPECT_TRUE(g->Holds(0, 8, 3));
  auto s = r.daemon().Stats(VbdId(41));
  ASSERT_TRUE(s.ok());
  EXPECT_EQ(s->errors, 2u);
  EXPECT_EQ(s->state, "Connected");
  ExpectHealthyPassed();
}

TEST_F(SimFaultsTest, GrantUnmapFailureLeavesThePagesPinnedAndServingGoesOn) {
  DaemonRig& r = *rig_;
  ASSERT_TRUE(r.daemon().Attach(XvdaSpec(42, r.Path("faulty.qcow2"))).ok());
  auto g = Guest::Attach(r, 42, {.persistent_grants = false});
  ASSERT_TRUE(g.ok()) << g.status().ToString();
  ASSERT_NO_FATAL_FAILURE(StartHealthyWorkload());
  ASSERT_EQ(g->Write(0, 8, 1), kOkay);
  const size_t idle_pins = r.sim().MappedGrantCount(42);  // the ring pages
  ASSERT_GT(idle_pins, 0u);

  // The write's data page (one page) cannot be unmapped: the request was
  // served, so it is still answered OKAY; the page stays pinned for good.
  faults().Set(SimFaultPoint::kGrantUnmap, ForDomain(42, 1));
  EXPECT_EQ(g->Write(8, 8, 1), kOkay);
  EXPECT_EQ(faults().fired(SimFaultPoint::kGrantUnmap), 1u);
  EXPECT_EQ(r.sim().MappedGrantCount(42), idle_pins + 1) << "the hypervisor still counts the leaked page";

  // The ring keeps serving; later unmaps work again.
  for (uint64_t s = 16; s < 64; s += 8) ASSERT_EQ(g->Write(s, 8, 1), kOkay);
  EXPECT_TRUE(g->Holds(0, 64, 1));
  EXPECT_EQ(r.sim().MappedGrantCount(42), idle_pins + 1);
  auto st = r.daemon().Stats(VbdId(42));
  ASSERT_TRUE(st.ok());
  EXPECT_EQ(st->leaked_pages, 1u) << "what `cowtap ctl stats` shows the administrator";

  // Teardown releases everything but the leaked page, and does not crash.
  g->front.reset();
  ASSERT_TRUE(r.daemon().Detach(VbdId(42)).ok());
  EXPECT_TRUE(WaitFor([&] { return r.daemon().Stats(VbdId(42)).status().code() == ErrorCode::kNotFound; }));
  EXPECT_EQ(r.sim().MappedGrantCount(42), 1u);
  ExpectHealthyPassed();
}

TEST_F(SimFaultsTest, EventChannelBindFailureClosesThatVbdWithAnError) {
  DaemonRig& r = *rig_;
  ASSERT_TRUE(r.daemon().Attach(XvdaSpec(43, r.Path("faulty.qcow2"))).ok());
  ASSERT_NO_FATAL_FAILURE(StartHealthyWorkload());
  faults().Set(SimFaultPoint::kEvtchnBind, ForDomain(43, 1));
  auto domain = Guest::Domain(r, 43);
  ASSERT_TRUE(domain.ok()) << domain.status().ToString();
  EXPECT_FALSE(Guest::Front(**domain).ok()) << "the backend refused the connection";
  EXPECT_EQ(faults().fired(SimFaultPoint::kEvtchnBind), 1u);
  EXPECT_TRUE(WaitFor([&] { return r.BackendKey(43, kXvda, "error") != "<absent>"; }));
  EXPECT_NE(r.BackendKey(43, kXvda, "error").find("event-channel bind"), std::string::npos)
      << r.BackendKey(43, kXvda, "error");
  EXPECT_TRUE(WaitFor([&] { return r.BackendKey(43, kXvda, "state") == "5"; }))
      << "the backend stays in Closing while the domain lives; state " << r.BackendKey(43, kXvda, "state");
  EXPECT_EQ(r.sim().MappedGrantCount(43), 0u) << "the ring mapped before the bind failed is released";
  ExpectHealthyPassed();
}

TEST_F(SimFaultsTest, EventChannelNotifyFailureIsRetriedAndNoCompletionIsLost) {
  DaemonRig& r = *rig_;
  ASSERT_TRUE(r.daemon().Attach(XvdaSpec(44, r.Path("faulty.qcow2"))).ok());
  auto g = Guest::Attach(r, 44);
  ASSERT_TRUE(g.ok()) << g.status().ToString();
  ASSERT_NO_FATAL_FAILURE(StartHealthyWorkload());
  ASSERT_EQ(g->Write(0, 8, 1), kOkay);

  // The request waits on the ring of a paused VBD; the guest waits for its
  // event; the backend answers with every kick failing, then they work.
  ASSERT_TRUE(r.daemon().Pause(VbdId(44)).ok());
  auto data = Pattern(8, 8, 2);
  ASSERT_TRUE(g->front->Submit({.op = BlkOp::kWrite, .sector = 8, .nr_sectors = 8, .buffer = data.data()}).ok());
  std::atomic<bool> done{false};
  std::vector<xen::BlkCompletion> completions;
  std::thread waiter([&] {
    const auto until = std::chrono::steady_clock::now() + 20s;
    while (completions.empty() && std::chrono::steady_clock::now() < until) {
      if (!g->front->Poll(&completions, 20000).ok()) break;
    }
    done = true;
  });
  faults().Set(SimFaultPoint::kEvtchnNotify, ForDomain(44, xen::kEveryCall));
  ASSERT_TRUE(r.daemon().Resume(VbdId(44)).ok());
  EXPECT_TRUE(WaitFor([&] { return faults().fired(SimFaultPoint::kEvtchnNotify) >= 3; }))
      << "the failed kick is retried";
  faults().Clear(SimFaultPoint::kEvtchnNotify);
  const auto cleared = std::chrono::steady_clock::now();
  EXPECT_TRUE(WaitFor([&] { return done.load(); }, 10000));
  waiter.join();
  EXPECT_LT(std::chrono::steady_clock::now() - cleared, 2s) << "the retried kick woke the guest";
  ASSERT_EQ(completions.size(), 1u);
  EXPECT_EQ(completions[0].status, kOkay);
  EXPECT_TRUE(g->Holds(0, 8, 1));
  EXPECT_TRUE(g->Holds(8, 8, 2));
  auto st = r.daemon().Stats(VbdId(44));
  ASSERT_TRUE(st.ok());
  EXPECT_GE(st->notify_failures, 1u) << "what `cowtap ctl stats` shows the administrator";
  ExpectHealthyPassed();
}

TEST_F(SimFaultsTest, XenstoreWriteFailureDuringSetupClosesThatVbdWithAnError) {
  DaemonRig& r = *rig_;
  ASSERT_NO_FATAL_FAILURE(StartHealthyWorkload(2000));
  // Only the backend writes feature keys: the toolstack's writes pass.
  faults().Set(SimFaultPoint::kXsWrite, {.path_contains = "/backend/cowtap/45/51712/feature-", .count = 1});
  auto xs = r.daemon().platform().OpenXenStore();
  ASSERT_TRUE(xs.ok());
  daemon::ToolstackDisk disk;
  disk.domid = 45;
  disk.image = r.Path("faulty.qcow2");
  ASSERT_TRUE(daemon::ToolstackWriteDisk(**xs, disk).ok());
  EXPECT_TRUE(WaitFor([&] { return r.BackendKey(45, kXvda, "error") != "<absent>"; }));
  EXPECT_NE(r.BackendKey(45, kXvda, "error").find("injected xenstore write"), std::string::npos)
      << r.BackendKey(45, kXvda, "error");
  EXPECT_TRUE(WaitFor([&] { return r.BackendKey(45, kXvda, "state") == "5"; }))
      << "the backend stays in Closing while the domain lives; state " << r.BackendKey(45, kXvda, "state");
  EXPECT_EQ(faults().fired(SimFaultPoint::kXsWrite), 1u);
  ExpectHealthyPassed();
}

TEST_F(SimFaultsTest, XenstoreReadFailureDuringHandshakeClosesThatVbdWithAnError) {
  DaemonRig& r = *rig_;
  ASSERT_TRUE(r.daemon().Attach(XvdaSpec(46, r.Path("faulty.qcow2"))).ok());
  ASSERT_NO_FATAL_FAILURE(StartHealthyWorkload(2000));
  // The backend reads the frontend's event-channel key while connecting.
  faults().Set(SimFaultPoint::kXsRead,
               {.path_contains = "/local/domain/46/device/vbd/51712/event-channel", .count = 1});
  auto domain = Guest::Domain(r, 46);
  ASSERT_TRUE(domain.ok()) << domain.status().ToString();
  EXPECT_FALSE(Guest::Front(**domain, {.max_queues = 1}).ok());
  EXPECT_EQ(faults().fired(SimFaultPoint::kXsRead), 1u);
  EXPECT_TRUE(WaitFor([&] { return r.BackendKey(46, kXvda, "error") != "<absent>"; }));
  EXPECT_NE(r.BackendKey(46, kXvda, "error").find("injected xenstore read"), std::string::npos)
      << r.BackendKey(46, kXvda, "error");
  EXPECT_TRUE(WaitFor([&] { return r.BackendKey(46, kXvda, "state") == "5"; }))
      << "the backend stays in Closing while the domain lives; state " << r.BackendKey(46, kXvda, "state");
  EXPECT_EQ(r.sim().MappedGrantCount(46), 0u);
  ExpectHealthyPassed();
}

// --- the image file failing under a serving VBD ---

class FileFaultsTest : public SimFaultsTest {
 protected:
  void SetUp() override {
    daemon::DaemonOptions options;
    options.open.fs = &fs_;
    ASSERT_NO_FATAL_FAILURE(MakeRig(options));
    faulty_ = fs_.Target(rig_->Path("faulty.qcow2"));
    ASSERT_TRUE(rig_->daemon().Attach(XvdaSpec(51, rig_->Path("faulty.qcow2"))).ok());
    auto g = Guest::Attach(*rig_, 51);
    ASSERT_TRUE(g.ok()) << g.status().ToString();
    guest_ = std::move(g).value();
    ASSERT_NO_FATAL_FAILURE(StartHealthyWorkload());
    // Acknowledged and flushed before any fault: must survive all of them.
    ASSERT_EQ(guest_.Write(0, 256, 1), kOkay);
    ASSERT_EQ(guest_.Flush(), kOkay);
  }
  void TearDown() override {
    faulty_->ClearFaults();
    guest_.front.reset();
    SimFaultsTest::TearDown();
    rig_.reset();  // the daemon goes before the file system it opened images
                   // with
  }

  cow::FaultInjectingFileSystem fs_{daemon::LockingFileSystem()};
  std::shared_ptr<cow::FaultController> faulty_;
  Guest guest_;
};

TEST_F(FileFaultsTest, EioOnReadWriteAndFlushAnswersErrorAndLosesNothing) {
  faulty_->AddFault({.op = cow::FaultOp::kRead, .trigger = cow::FaultTrigger::kAfterN, .n = 0});
  std::vector<uint8_t> buf(4096);
  EXPECT_EQ(guest_.Io(BlkOp::kRead, 0, 8, buf.data()), kError);
  faulty_->ClearFaults();
  EXPECT_TRUE(guest_.Holds(0, 8, 1));

  faulty_->AddFault({.op = cow::FaultOp::kWrite, .trigger = cow::FaultTrigger::kAfterN, .n = 0});
  EXPECT_EQ(guest_.Write(64, 8, 2), kError);
  faulty_->ClearFaults();
  EXPECT_TRUE(guest_.Holds(0, 64, 1));
  EXPECT_TRUE(guest_.Holds(72, 184, 1));

  faulty_->AddFault({.op = cow::FaultOp::kFlush, .trigger = cow::FaultTrigger::kAfterN, .n = 0});
  EXPECT_EQ(guest_.Flush(), kError);
  faulty_->ClearFaults();
  EXPECT_EQ(guest_.Flush(), kOkay);

  EXPECT_EQ(guest_.Write(64, 8, 3), kOkay) << "writes work again once the file does";
  EXPECT_TRUE(guest_.Holds(64, 8, 3));
  EXPECT_TRUE(guest_.Holds(0, 64, 1));
  EXPECT_GE(faulty_->counters().faults_fired, 3u);
  ExpectHealthyPassed();
}

TEST_F(FileFaultsTest, NoSpaceFailsAllocatingWritesAndWritesResumeWhenSpaceReturns) {
  // A full file system: growing the file and writing both say ENOSPC.
  faulty_->AddFault(
      {.op = cow::FaultOp::kAllocate, .trigger = cow::FaultTrigger::kAfterN, .n = 0, .errno_value = ENOSPC});
  faulty_->AddFault({.op = cow::FaultOp::kWrite, .trigger = cow::FaultTrigger::kAfterN, .n = 0, .errno_value = ENOSPC});
  const uint64_t far = 8 << 11;  // 8 MiB: clusters not allocated yet
  EXPECT_EQ(guest_.Write(far, 8, 2), kError);
  EXPECT_EQ(guest_.Write(far + 4096, 64, 2), kError);
  EXPECT_TRUE(guest_.Holds(0, 256, 1)) << "reads still work and see everything acknowledged";
  faulty_->ClearFaults();

  EXPECT_EQ(guest_.Write(far, 8, 4), kOkay) << "space is back: allocating writes resume";
  EXPECT_EQ(guest_.Write(far + 4096, 64, 4), kOkay);
  EXPECT_EQ(guest_.Flush(), kOkay);
  EXPECT_TRUE(guest_.Holds(far, 8, 4));
  EXPECT_TRUE(guest_.Holds(far + 4096, 64, 4));
  EXPECT_TRUE(guest_.Holds(0, 256, 1));
  auto s = rig_->daemon().Stats(VbdId(51));
  ASSERT_TRUE(s.ok());
  EXPECT_EQ(s->state, "Connected");
  ExpectHealthyPassed();
}

TEST_F(FileFaultsTest, ShortWriteAnswersErrorAndLosesNothing) {
  // Half of a 4 KiB write reaches the file, then EIO.
  faulty_->AddFault({.op = cow::FaultOp::kWrite, .trigger = cow::FaultTrigger::kNth, .n = 1, .partial_bytes = 2048});
  EXPECT_EQ(guest_.Write(128, 8, 2), kError);
  faulty_->ClearFaults();
  EXPECT_TRUE(guest_.Holds(0, 128, 1));
  EXPECT_TRUE(guest_.Holds(136, 120, 1));
  EXPECT_EQ(guest_.Write(128, 8, 3), kOkay);
  EXPECT_TRUE(guest_.Holds(128, 8, 3));
  ExpectHealthyPassed();
}

}  // namespace
}  // namespace cowtap::daemon_test
