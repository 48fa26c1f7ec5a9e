#include "dm/offload_controller.h"

#include <gtest/gtest.h>

#include <atomic>
#include <set>
#include <thread>

namespace cowtap::dm {
namespace {

using namespace std::chrono_literals;
using K = DmSegment::Kind;
constexpr uint32_t kCluster = 65536;
constexpr uint64_t kSpc = kCluster / 512;

TEST(ReloadSchedulerTest, CountBoundDelayBoundAndRateBound) {
  ReloadScheduler s({/*min_interval=*/100ms, /*max_delay=*/1s, /*max_pending=*/10});
  const Clock::time_point t0{};
  EXPECT_FALSE(s.ShouldReload(t0));  // nothing pending
  s.NoteChanges(t0, 3);
  EXPECT_FALSE(s.ShouldReload(t0 + 500ms));  // few, young
  EXPECT_TRUE(s.ShouldReload(t0 + 1s));      // oldest waited max_delay
  s.NoteChanges(t0 + 500ms, 7);
  EXPECT_TRUE(s.ShouldReload(t0 + 500ms));  // count reached
  s.NoteReloaded(t0 + 500ms);
  EXPECT_EQ(s.pending(), 0u);
  s.NoteChanges(t0 + 510ms, 50);
  EXPECT_FALSE(s.ShouldReload(t0 + 550ms));  // rate bound: too soon after the last reload
  EXPECT_TRUE(s.ShouldReload(t0 + 600ms));
  s.NoteChanges(t0 + 600ms, 0);  // zero changes change nothing
  EXPECT_EQ(s.pending(), 50u);
  s.NoteChanges(t0, UINT64_MAX);  // saturates
  EXPECT_EQ(s.pending(), UINT64_MAX);
}

class ControllerTest : public ::testing::Test {
 protected:
  ControllerTest()
      : planner_(*OffloadPlanner::Make({16 * kCluster, kCluster, 4096})),
        ctl_(
            dm_, "cowtap-1", devs_, planner_, [this] { return known_; },
            {/*min_interval=*/100ms, /*max_delay=*/1s, /*max_pending=*/4}, [this] { return now_; }) {}

  FakeDeviceMapper dm_;
  DmDevices devs_{"/dev/loop7", "/dev/nbd2"};
  OffloadPlanner planner_;
  std::vector<WritableCluster> known_;
  Clock::time_point now_{};
  OffloadController ctl_;
};

TEST_F(ControllerTest, StartsAllMissThenReloadsWhatIsKnown) {
  ASSERT_TRUE(ctl_.Start().ok());
  EXPECT_EQ(*dm_.LiveTable("cowtap-1"), DmTable::AllMiss(16 * kSpc));
  EXPECT_EQ(ctl_.Start().code(), ErrorCode::kBusy);
  known_ = {{2, 20 * kCluster}, {3, 21 * kCluster}};
  auto r = ctl_.ReloadNow();
  ASSERT_TRUE(r.ok());
  EXPECT_TRUE(*r);
  DmTable live = *dm_.LiveTable("cowtap-1");
  EXPECT_EQ(live, ctl_.live_table());
  EXPECT_EQ(live.linear_sectors(), 2 * kSpc);
  EXPECT_EQ(live.SegmentAt(2 * kSpc), (DmSegment{2 * kSpc, 2 * kSpc, K::kLinear, 20 * kSpc}));
  // Same knowledge: no reload.
  r = ctl_.ReloadNow();
  ASSERT_TRUE(r.ok());
  EXPECT_FALSE(*r);
  EXPECT_EQ(dm_.reloads(), 2u);
  // The calls were load, suspend, resume each time.
  auto calls = dm_.calls();
  ASSERT_EQ(calls.size(), 7u);
  EXPECT_EQ(calls[0].kind, FakeDeviceMapper::Call::kCreate);
  EXPECT_EQ(calls[4].kind, FakeDeviceMapper::Call::kLoad);
  EXPECT_EQ(calls[4].table_text,
            "0 256 linear /dev/nbd2 0\n256 256 linear /dev/loop7 2560\n512 1536 linear /dev/nbd2 512\n");
  EXPECT_EQ(calls[5].kind, FakeDeviceMapper::Call::kSuspend);
  EXPECT_EQ(calls[6].kind, FakeDeviceMapper::Call::kResume);
  ASSERT_TRUE(ctl_.Stop().ok());
  EXPECT_FALSE(dm_.LiveTable("cowtap-1").has_value());
}

TEST_F(ControllerTest, NoteChangesReloadsInBatches) {
  ASSERT_TRUE(ctl_.Start().ok());  // counts as a reload at now_ = 0
  known_ = {{1, 10 * kCluster}};
  now_ += 200ms;
  EXPECT_FALSE(*ctl_.NoteChanges(1));
  EXPECT_FALSE(*ctl_.NoteChanges(2));
  EXPECT_EQ(dm_.reloads(), 1u);
  EXPECT_TRUE(*ctl_.NoteChanges(1));  // the 4th change
  EXPECT_EQ(dm_.reloads(), 2u);
  EXPECT_EQ(dm_.LiveTable("cowtap-1")->linear_sectors(), kSpc);
  // Right after: rate bound holds it back, the delay bound lets it through.
  known_.push_back({2, 11 * kCluster});
  EXPECT_FALSE(*ctl_.NoteChanges(10));
  now_ += 2s;
  EXPECT_TRUE(*ctl_.NoteChanges(1));
  EXPECT_EQ(dm_.LiveTable("cowtap-1")->linear_sectors(), 2 * kSpc);
}

TEST_F(ControllerTest, RevokeIsLiveBeforeItReturnsAndIgnoresTheRateBound) {
  ASSERT_TRUE(ctl_.Start().ok());
  known_ = {{4, 40 * kCluster}, {5, 41 * kCluster}, {6, 42 * kCluster}};
  ASSERT_TRUE(ctl_.ReloadNow().ok());
  const uint64_t before = dm_.reloads();
  ASSERT_TRUE(ctl_.RevokeBeforeReuse(5, 1).ok());  // same instant as the reload
  EXPECT_EQ(dm_.reloads(), before + 1);
  DmTable live = *dm_.LiveTable("cowtap-1");
  EXPECT_EQ(live.SegmentAt(5 * kSpc).kind, K::kMiss);
  EXPECT_EQ(live.SegmentAt(4 * kSpc).kind, K::kLinear);
  EXPECT_EQ(live.SegmentAt(6 * kSpc), (DmSegment{6 * kSpc, kSpc, K::kLinear, 42 * kSpc}));
  // Already miss: no reload.
  ASSERT_TRUE(ctl_.RevokeBeforeReuse(5, 1).ok());
  ASSERT_TRUE(ctl_.RevokeBeforeReuse(10, 3).ok());
  EXPECT_EQ(dm_.reloads(), before + 1);
  EXPECT_EQ(ctl_.stats().revokes, 3u);
  EXPECT_EQ(ctl_.stats().revokes_without_reload, 2u);
  // Huge ranges do not overflow.
  ASSERT_TRUE(ctl_.RevokeBeforeReuse(0, UINT64_MAX).ok());
  EXPECT_EQ(*dm_.LiveTable("cowtap-1"), DmTable::AllMiss(16 * kSpc));
}

TEST_F(ControllerTest, FailedReloadKeepsTheOldTableAndReportsIt) {
  ASSERT_TRUE(ctl_.Start().ok());
  known_ = {{4, 40 * kCluster}};
  ASSERT_TRUE(ctl_.ReloadNow().ok());
  dm_.FailNext(FakeDeviceMapper::Call::kSuspend);
  Status s = ctl_.RevokeBeforeReuse(4, 1);
  EXPECT_EQ(s.code(), ErrorCode::kIoError);  // the engine must not reuse the cluster
  EXPECT_EQ(ctl_.live_table().SegmentAt(4 * kSpc).kind, K::kLinear);
  // The device is not left suspended.
  auto st = dm_.GetStatus("cowtap-1");
  ASSERT_TRUE(st.ok());
  EXPECT_FALSE(st->suspended);
  // Retried, it goes through.
  ASSERT_TRUE(ctl_.RevokeBeforeReuse(4, 1).ok());
  EXPECT_EQ(dm_.LiveTable("cowtap-1")->linear_sectors(), 0u);
}

TEST_F(ControllerTest, AfterAFailedResumeARevokeNeverTrustsItsOwnTable) {
  ASSERT_TRUE(ctl_.Start().ok());
  known_ = {{4, 40 * kCluster}};
  dm_.FailNext(FakeDeviceMapper::Call::kResume);
  // The first resume fails, the retry swaps the table in: the kernel runs
  // cluster 4 linear although the reload reported an error.
  EXPECT_FALSE(ctl_.ReloadNow().ok());
  EXPECT_EQ(dm_.LiveTable("cowtap-1")->SegmentAt(4 * kSpc).kind, K::kLinear);
  EXPECT_EQ(ctl_.live_table().SegmentAt(4 * kSpc).kind, K::kMiss);
  // The controller's table says 4 is miss already, but the revoke reloads.
  ASSERT_TRUE(ctl_.RevokeBeforeReuse(4, 1).ok());
  EXPECT_EQ(dm_.LiveTable("cowtap-1")->SegmentAt(4 * kSpc).kind, K::kMiss);
  EXPECT_EQ(ctl_.stats().revokes_without_reload, 0u);
}

TEST_F(ControllerTest, RoutingTablesHoldEveryTableTheKernelMayRunAndTheGateHasTheLastWord) {
  // The gate keeps cluster 5 miss whatever the planner says.
  ctl_.SetGate([](const DmTable& t) { return t.WithMiss(5 * kSpc, kSpc); });
  EXPECT_TRUE(ctl_.RoutingTables().empty());
  ASSERT_TRUE(ctl_.Start().ok());
  ASSERT_EQ(ctl_.RoutingTables().size(), 1u);
  EXPECT_EQ(*ctl_.RoutingTables()[0], DmTable::AllMiss(16 * kSpc));
  known_ = {{4, 40 * kCluster}, {5, 41 * kCluster}};
  ASSERT_TRUE(*ctl_.ReloadNow());
  EXPECT_EQ(dm_.LiveTable("cowtap-1")->SegmentAt(4 * kSpc).kind, K::kLinear);
  EXPECT_EQ(dm_.LiveTable("cowtap-1")->SegmentAt(5 * kSpc).kind, K::kMiss);
  ASSERT_EQ(ctl_.RoutingTables().size(), 1u);
  EXPECT_EQ(*ctl_.RoutingTables()[0], *dm_.LiveTable("cowtap-1"));
  EXPECT_FALSE(*ctl_.ReloadNow()) << "the gated plan equals the live table: no reload";
  // A reload that fails after its Load leaves both tables possible.
  known_ = {{4, 40 * kCluster}, {6, 42 * kCluster}};
  dm_.FailNext(FakeDeviceMapper::Call::kResume);
  EXPECT_FALSE(ctl_.ReloadNow().ok());
  const auto maybe = ctl_.RoutingTables();
  ASSERT_EQ(maybe.size(), 2u);
  EXPECT_EQ(maybe[0]->SegmentAt(6 * kSpc).kind, K::kMiss);
  EXPECT_EQ(maybe[1]->SegmentAt(6 * kSpc).kind, K::kLinear);
  ASSERT_TRUE(ctl_.ReloadNow().ok());
  EXPECT_EQ(ctl_.RoutingTables().size(), 1u);
  ASSERT_TRUE(ctl_.Stop().ok());
  EXPECT_TRUE(ctl_.RoutingTables().empty());
}

TEST_F(ControllerTest, FailedReloadsInARowAreRememberedUpToABoundThenOnlyAllMissIsTried) {
  ASSERT_TRUE(ctl_.Start().ok());
  for (uint64_t i = 0; i < 12; ++i) {
    known_ = {{i, (40 + i) * kCluster}};  // a new plan each time
    dm_.FailNext(FakeDeviceMapper::Call::kSuspend);
    EXPECT_FALSE(ctl_.ReloadNow().ok());
    EXPECT_LE(ctl_.RoutingTables().size(), 8u);
  }
  // Past the bound the reload loads all-miss (nothing to remember); a
  // success makes the list one table again.
  EXPECT_EQ(dm_.LiveTable("cowtap-1")->linear_sectors(), 0u);
  ASSERT_TRUE(ctl_.ReloadNow().ok());
  ASSERT_EQ(ctl_.RoutingTables().size(), 1u);
  EXPECT_EQ(*ctl_.RoutingTables()[0], *dm_.LiveTable("cowtap-1"));
  ASSERT_TRUE(ctl_.ReloadNow().ok());
  EXPECT_EQ(dm_.LiveTable("cowtap-1")->linear_sectors(), kSpc) << "planning resumes once a reload went through";
}

TEST_F(ControllerTest, ABrokenSourceIsRefusedNotLoaded) {
  ASSERT_TRUE(ctl_.Start().ok());
  known_ = {{99, 0}};
  EXPECT_EQ(ctl_.ReloadNow().status().code(), ErrorCode::kInvalidArgument);
  EXPECT_EQ(*dm_.LiveTable("cowtap-1"), DmTable::AllMiss(16 * kSpc));
}

TEST(ControllerConcurrencyTest, RevokedRangesStayMissWhileOtherThreadsReload) {
  // Allocating threads publish writable clusters and note changes; revoking
  // threads drop a cluster from the source (the engine's cache invalidation)
  // and revoke it; right after the revoke returns the kernel's (fake) table
  // must route it to user space, whatever reloads ran concurrently.
  FakeDeviceMapper dm;
  std::mutex mu;
  std::set<uint64_t> known;  // GUARDED_BY(mu)
  auto source = [&] {
    std::lock_guard lock(mu);
    std::vector<WritableCluster> out;
    for (uint64_t c : known) out.push_back({c, (c + 100) * kCluster});
    return out;
  };
  OffloadController ctl(dm, "cowtap-c", {"/dev/loop1", "/dev/nbd1"},
                        *OffloadPlanner::Make({256 * kCluster, kCluster, 64}), source,
                        {/*min_interval=*/0ms, /*max_delay=*/0ms, /*max_pending=*/1});
  ASSERT_TRUE(ctl.Start().ok());
  std::atomic<int> failures{0};
  std::vector<std::thread> threads;
  for (int t = 0; t < 4; ++t) {
    threads.emplace_back([&, t] {
      for (int i = 0; i < 200; ++i) {
        const uint64_t c = static_cast<uint64_t>(t) * 64 + static_cast<uint64_t>(i % 64);
        {
          std::lock_guard lock(mu);
          known.insert(c);
        }
        if (!ctl.NoteChanges(1).ok()) ++failures;
        if (i % 3 == 0) {
          {
            std::lock_guard lock(mu);
            known.erase(c);
          }
          if (!ctl.RevokeBeforeReuse(c, 1).ok()) ++failures;
          if (dm.LiveTable("cowtap-c")->SegmentAt(c * kSpc).kind != K::kMiss) ++failures;
        }
      }
    });
  }
  for (auto& th : threads) th.join();
  EXPECT_EQ(failures.load(), 0);
  EXPECT_GT(dm.reloads(), 10u);
  EXPECT_LE(dm.LiveTable("cowtap-c")->segments().size(), 64u);
}

}  // namespace
}  // namespace cowtap::dm
