// cowtapd's core serving many guests: 64 VBDs at once with data verified by
// the guests, attach/detach cycles that leak nothing, pause/resume under
// load, stats. The daemon runs in this process on the simulated platform;
// each guest is a cowtap_guest process.
#include <gtest/gtest.h>

#include <chrono>
#include <numeric>
#include <thread>

#include "tests/blkif/guest_process.h"
#include "tests/daemon/daemon_rig.h"

namespace cowtap::daemon_test {
namespace {

using blkif_test::GuestOutcome;
using blkif_test::GuestProcess;
using daemon::VbdStatsSnapshot;
using namespace std::chrono_literals;

constexpr uint32_t kXvda = 51712;

TEST(DaemonE2eTest, SixtyFourVbdsServeConcurrentlyWithVerifiedData) {
  auto rig = DaemonRig::Create();
  ASSERT_TRUE(rig.ok()) << rig.status().ToString();
  DaemonRig& r = **rig;
  constexpr uint32_t kVbds = 64;
  for (uint32_t d = 1; d <= kVbds; ++d) {
    const std::string name = "guest" + std::to_string(d) + ".qcow2";
    ASSERT_TRUE(r.MakeOverlay(name).ok());
    Status s = r.daemon().Attach(XvdaSpec(d, r.Path(name), "qcow2"));
    ASSERT_TRUE(s.ok()) << d << ": " << s.ToString();
  }
  EXPECT_EQ(r.daemon().List().size(), kVbds);
  std::vector<GuestProcess> guests;
  for (uint32_t d = 1; d <= kVbds; ++d) {
    auto g = GuestProcess::Start(r.GuestArgs(d, kXvda,
                                             {"--queues", "1", "--ops", "150", "--qd", "4", "--initial", "zero",
                                              "--region-sectors", "8192", "--seed", std::to_string(d)}));
    ASSERT_TRUE(g.ok()) << g.status().ToString();
    guests.push_back(std::move(g).value());
  }
  // While they run, every VBD is connected or getting there.
  EXPECT_TRUE(WaitFor(
      [&] {
        auto list = r.daemon().List();
        return std::count_if(list.begin(), list.end(), [](const auto& s) { return s.writes > 0; }) >= 8;
      },
      30000));
  int passed = 0;
  for (auto& g : guests) {
    GuestOutcome o = g.Wait(50s);
    EXPECT_TRUE(o.Passed()) << o.Describe() << "\n" << o.output;
    passed += o.Passed();
  }
  EXPECT_EQ(passed, static_cast<int>(kVbds));
  // Each guest's exit is its domain's death: every VBD detaches and lets go.
  EXPECT_TRUE(WaitFor([&] { return r.daemon().vbd_count() == 0; }, 10000)) << r.daemon().vbd_count();
  for (uint32_t d = 1; d <= kVbds; ++d) EXPECT_EQ(r.sim().MappedGrantCount(d), 0u) << d;
  if (HaveQemuImg()) {
    for (uint32_t d : {1u, 32u, 64u}) {
      std::string out;
      EXPECT_EQ(RunShell("qemu-img check " + r.Path("guest" + std::to_string(d) + ".qcow2"), &out), 0) << out;
    }
  }
}

TEST(DaemonE2eTest, AttachDetachCyclesLeakNoFdsGrantsOrMemory) {
  auto rig = DaemonRig::Create();
  ASSERT_TRUE(rig.ok()) << rig.status().ToString();
  DaemonRig& r = **rig;
  ASSERT_TRUE(r.MakeOverlay("g.qcow2").ok());
  size_t fds_after_first = 0, rss_after_first = 0;
  constexpr int kCycles = 6;
  for (int i = 0; i < kCycles; ++i) {
    // A guest that comes, does I/O and goes (its death detaches the VBD).
    ASSERT_TRUE(r.daemon().Attach(XvdaSpec(5, r.Path("g.qcow2"), "qcow2")).ok());
    GuestOutcome o =
        blkif_test::RunGuest(r.GuestArgs(5, kXvda, {"--ops", "100", "--qd", "8", "--seed", std::to_string(i)}), 30s);
    ASSERT_TRUE(o.Passed()) << o.Describe() << "\n" << o.output;
    ASSERT_TRUE(WaitFor([&] { return r.daemon().vbd_count() == 0; })) << "cycle " << i;
    EXPECT_EQ(r.sim().MappedGrantCount(5), 0u);
    // A VBD attached and detached through the control interface.
    Status attached = r.daemon().Attach(XvdaSpec(6, r.Path("g.qcow2"), "qcow2"));
    ASSERT_TRUE(attached.ok()) << "cycle " << i << ": " << attached.ToString();
    ASSERT_TRUE(r.daemon().Detach("6/51712").ok());
    EXPECT_EQ(r.BackendKey(6, kXvda, "state"), "<absent>") << "detach removes the toolstack's directories";
    EXPECT_EQ(r.daemon().Stats("6/51712").status().code(), ErrorCode::kNotFound);
    if (i == 1) {
      fds_after_first = OpenFdCount();
      rss_after_first = RssKib();
    }
  }
  EXPECT_LE(OpenFdCount(), fds_after_first) << "file descriptors leak per attach/detach cycle";
  EXPECT_LE(RssKib(), rss_after_first + 32 * 1024) << "memory grows per attach/detach cycle";
}

uint64_t Ops(const VbdStatsSnapshot& s) { return s.reads + s.writes + s.flushes + s.discards + s.errors; }

TEST(DaemonE2eTest, PauseResumeUnderLoad) {
  auto rig = DaemonRig::Create();
  ASSERT_TRUE(rig.ok()) << rig.status().ToString();
  DaemonRig& r = **rig;
  ASSERT_TRUE(r.MakeOverlay("p.qcow2").ok());
  ASSERT_TRUE(r.daemon().Attach(XvdaSpec(7, r.Path("p.qcow2"), "qcow2")).ok());
  auto g = GuestProcess::Start(r.GuestArgs(
      7, kXvda, {"--ops", "0", "--duration-ms", "6000", "--qd", "16", "--initial", "zero", "--flush-every", "50"}));
  ASSERT_TRUE(g.ok());
  ASSERT_TRUE(WaitFor(
      [&] {
        auto s = r.daemon().Stats("7/51712");
        return s.ok() && s->writes > 20;
      },
      10000));
  for (int i = 0; i < 4; ++i) {
    ASSERT_TRUE(r.daemon().Pause("7/51712").ok());
    auto before = r.daemon().Stats("7/51712");
    ASSERT_TRUE(before.ok());
    EXPECT_EQ(before->state, "paused");
    EXPECT_TRUE(before->paused);
    EXPECT_EQ(before->queue_depth, 0u) << "Pause returned with I/O in flight";
    std::this_thread::sleep_for(150ms);
    auto after = r.daemon().Stats("7/51712");
    EXPECT_EQ(Ops(*after), Ops(*before)) << "a paused VBD served requests";
    ASSERT_TRUE(r.daemon().Resume("7/51712").ok());
    std::this_thread::sleep_for(100ms);
    auto resumed = r.daemon().Stats("7/51712");
    if (!resumed.ok()) {
      GuestOutcome early = g->Wait(5s);
      FAIL() << "the guest left while paused/resumed: " << early.Describe() << "\n" << early.output;
    }
    EXPECT_GT(Ops(*resumed), Ops(*after)) << "Resume did not serve again";
    EXPECT_EQ(resumed->state, "Connected");
  }
  GuestOutcome o = g->Wait(30s);
  EXPECT_TRUE(o.Passed()) << o.Describe() << "\n" << o.output;
}

TEST(DaemonE2eTest, StatsCarryHistogramRemapCacheAndIdentity) {
  auto rig = DaemonRig::Create();
  ASSERT_TRUE(rig.ok()) << rig.status().ToString();
  DaemonRig& r = **rig;
  ASSERT_TRUE(r.MakeOverlay("s.qcow2").ok());
  ASSERT_TRUE(r.daemon().Attach(XvdaSpec(8, r.Path("s.qcow2"), "qcow2")).ok());
  auto g = GuestProcess::Start(
      r.GuestArgs(8, kXvda, {"--ops", "0", "--duration-ms", "1500", "--qd", "4", "--initial", "zero"}));
  ASSERT_TRUE(g.ok());
  Result<VbdStatsSnapshot> s = Status::NotFound("not yet");
  EXPECT_TRUE(WaitFor(
      [&] {
        s = r.daemon().Stats("8/51712");
        return s.ok() && s->reads > 10 && s->writes > 10;
      },
      10000));
  GuestOutcome o = g->Wait(30s);
  EXPECT_TRUE(o.Passed()) << o.output;
  ASSERT_TRUE(s.ok()) << s.status().ToString();
  EXPECT_EQ(s->id, "8/51712");
  EXPECT_EQ(s->image, r.Path("s.qcow2"));
  EXPECT_EQ(s->format, "qcow2");
  EXPECT_GT(s->reads, 0u);
  EXPECT_GT(s->writes, 0u);
  EXPECT_GT(s->bytes_written, 0u);
  ASSERT_EQ(s->latency_us_log2.size(), backend::kLatencyBuckets);
  const uint64_t answered = std::accumulate(s->latency_us_log2.begin(), s->latency_us_log2.end(), uint64_t{0});
  EXPECT_GE(answered, s->reads + s->writes);
  EXPECT_GT(s->remap_lookups, 0u);
  EXPECT_GT(s->fast_path_ios + s->slow_path_ios, 0u) << "the engine's I/O counters reach the stats";
  EXPECT_GT(s->memory_bytes, 0u);
  EXPECT_EQ(r.daemon().Stats("9/51712").status().code(), ErrorCode::kNotFound);
  EXPECT_EQ(r.daemon().Stats("nonsense").status().code(), ErrorCode::kInvalidArgument);
  EXPECT_EQ(r.daemon().Pause("9/51712").code(), ErrorCode::kNotFound);
  EXPECT_TRUE(r.daemon().SetLogLevel("debug").ok());
  EXPECT_EQ(r.daemon().SetLogLevel("loud").code(), ErrorCode::kInvalidArgument);
  EXPECT_TRUE(r.daemon().SetLogLevel("warn").ok());
}

}  // namespace
}  // namespace cowtap::daemon_test
