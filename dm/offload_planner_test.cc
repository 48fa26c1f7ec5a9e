#include "dm/offload_planner.h"

#include <gtest/gtest.h>
#include <stdlib.h>

#include <cstdlib>
#include <filesystem>

namespace cowtap::dm {
namespace {

using K = DmSegment::Kind;
constexpr uint32_t kCluster = 65536;
constexpr uint64_t kSpc = kCluster / 512;  // sectors per cluster

OffloadPlanner MakePlanner(uint64_t clusters, size_t max_segments = 4096) {
  auto p = OffloadPlanner::Make({clusters * kCluster, kCluster, max_segments});
  EXPECT_TRUE(p.ok()) << p.status().ToString();
  return *p;
}

TEST(OffloadPlannerTest, NothingKnownIsAllMiss) {
  auto t = MakePlanner(16).Plan({});
  ASSERT_TRUE(t.ok());
  EXPECT_EQ(*t, DmTable::AllMiss(16 * kSpc));
}

TEST(OffloadPlannerTest, CoalescesRunsContiguousVirtuallyAndOnTheHost) {
  // 2,3,4 contiguous on both; 5 virtually next but elsewhere on the host;
  // 8 alone. Given out of order.
  std::vector<WritableCluster> c = {{4, 12 * kCluster}, {2, 10 * kCluster}, {5, 40 * kCluster},
                                    {3, 11 * kCluster}, {8, 3 * kCluster}};
  auto t = MakePlanner(16).Plan(c);
  ASSERT_TRUE(t.ok()) << t.status().ToString();
  std::vector<DmSegment> want = {{0, 2 * kSpc, K::kMiss, 0},
                                 {2 * kSpc, 3 * kSpc, K::kLinear, 10 * kSpc},
                                 {5 * kSpc, kSpc, K::kLinear, 40 * kSpc},
                                 {6 * kSpc, 2 * kSpc, K::kMiss, 6 * kSpc},
                                 {8 * kSpc, kSpc, K::kLinear, 3 * kSpc},
                                 {9 * kSpc, 7 * kSpc, K::kMiss, 9 * kSpc}};
  EXPECT_EQ(t->segments(), want);
}

TEST(OffloadPlannerTest, SegmentCapDropsTheShortestRuns) {
  // Runs of lengths 1, 3, 2, 1 at clusters 0, 2, 6, 9; each far apart on the host.
  std::vector<WritableCluster> c = {{0, 100 * kCluster}, {2, 200 * kCluster}, {3, 201 * kCluster},
                                    {4, 202 * kCluster}, {6, 300 * kCluster}, {7, 301 * kCluster},
                                    {9, 400 * kCluster}};
  auto t = MakePlanner(12, /*max_segments=*/5).Plan(c);  // room for 2 runs
  ASSERT_TRUE(t.ok());
  EXPECT_LE(t->segments().size(), 5u);
  ASSERT_EQ(t->linear_segment_count(), 2u);
  EXPECT_EQ(t->SegmentAt(2 * kSpc).kind, K::kLinear);
  EXPECT_EQ(t->SegmentAt(6 * kSpc).kind, K::kLinear);
  EXPECT_EQ(t->SegmentAt(0).kind, K::kMiss);
  EXPECT_EQ(t->SegmentAt(9 * kSpc).kind, K::kMiss);
  // A cap of 1 leaves room for no linear run at all.
  auto one = MakePlanner(12, 1).Plan(c);
  ASSERT_TRUE(one.ok());
  EXPECT_EQ(*one, DmTable::AllMiss(12 * kSpc));
  // Many runs: never more segments than the cap.
  std::vector<WritableCluster> many;
  for (uint64_t i = 0; i < 1000; i += 2) many.push_back({i, (5000 - i) * kCluster});
  auto capped = MakePlanner(1000, 101).Plan(many);
  ASSERT_TRUE(capped.ok());
  EXPECT_LE(capped->segments().size(), 101u);
  EXPECT_EQ(capped->linear_segment_count(), 50u);
}

TEST(OffloadPlannerTest, ClampsTheLastClusterToTheDiskEnd) {
  auto p = OffloadPlanner::Make({kCluster + 4096, kCluster, 4096});
  ASSERT_TRUE(p.ok());
  auto t = p->Plan({{1, 7 * kCluster}});
  ASSERT_TRUE(t.ok()) << t.status().ToString();
  EXPECT_EQ(t->size_sectors(), kSpc + 8);
  EXPECT_EQ(t->segments().back(), (DmSegment{kSpc, 8, K::kLinear, 7 * kSpc}));
}

TEST(OffloadPlannerTest, RefusesBrokenSources) {
  OffloadPlanner p = MakePlanner(16);
  EXPECT_FALSE(p.Plan({{16, 0}}).ok());                                   // past the end
  EXPECT_FALSE(p.Plan({{UINT64_MAX, 0}}).ok());                           // far past
  EXPECT_FALSE(p.Plan({{1, 4096}}).ok());                                 // unaligned host
  EXPECT_FALSE(p.Plan({{1, UINT64_MAX - kCluster + 1}}).ok());            // host end wraps
  EXPECT_FALSE(p.Plan({{1, kCluster}, {1, 2 * kCluster}}).ok());          // conflicting duplicate
  EXPECT_TRUE(p.Plan({{1, kCluster}, {1, kCluster}}).ok());               // same twice is fine
  EXPECT_FALSE(OffloadPlanner::Make({1000, kCluster, 10}).ok());          // not sectors
  EXPECT_FALSE(OffloadPlanner::Make({kCluster, 1000, 10}).ok());          // cluster not 2^n
  EXPECT_FALSE(OffloadPlanner::Make({kCluster, 256, 10}).ok());           // cluster < sector
  EXPECT_FALSE(OffloadPlanner::Make({kCluster, kCluster, 0}).ok());       // no segments
}

class PlannerImageTest : public ::testing::Test {
 protected:
  void SetUp() override {
    char tmpl[] = "/tmp/cowtap_dm_plan_XXXXXX";
    ASSERT_NE(mkdtemp(tmpl), nullptr);
    dir_ = tmpl;
  }
  void TearDown() override { std::filesystem::remove_all(dir_); }
  std::string dir_;
};

TEST_F(PlannerImageTest, CollectsOnlyTopLayerWritableClusters) {
  cow::CreateOptions bo;
  bo.size_bytes = 16 * kCluster;
  ASSERT_TRUE(cow::CreateImage(dir_ + "/base.qcow2", bo).ok());
  {
    auto base = cow::OpenImage(dir_ + "/base.qcow2");
    ASSERT_TRUE(base.ok());
    std::vector<uint8_t> buf(kCluster, 0xab);
    iovec v{buf.data(), buf.size()};
    ASSERT_TRUE((*base)->Write(3 * kCluster, {&v, 1}).ok());
    ASSERT_TRUE((*base)->Close().ok());
  }
  cow::CreateOptions oo;
  oo.backing_file = "base.qcow2";
  ASSERT_TRUE(cow::CreateImage(dir_ + "/top.qcow2", oo).ok());
  auto top = cow::OpenImage(dir_ + "/top.qcow2");
  ASSERT_TRUE(top.ok()) << top.status().ToString();
  cow::Image& img = **top;
  std::vector<uint8_t> buf(kCluster, 0xcd);
  iovec v{buf.data(), buf.size()};
  ASSERT_TRUE(img.Write(5 * kCluster, {&v, 1}).ok());
  ASSERT_TRUE(img.Write(6 * kCluster, {&v, 1}).ok());
  // Reads resolve (and cache) the backing cluster 3 and the hole 9 too.
  ASSERT_TRUE(img.Read(3 * kCluster, {&v, 1}).ok());
  ASSERT_TRUE(img.Read(9 * kCluster, {&v, 1}).ok());
  ASSERT_TRUE(img.Read(5 * kCluster, {&v, 1}).ok());
  ASSERT_TRUE(img.Read(6 * kCluster, {&v, 1}).ok());
  std::vector<WritableCluster> c = CollectWritableClusters(img);
  ASSERT_EQ(c.size(), 2u);
  EXPECT_EQ(c[0].virtual_cluster, 5u);
  EXPECT_EQ(c[1].virtual_cluster, 6u);
  // Discard drops cluster 5 from what may be offloaded.
  ASSERT_TRUE(img.Discard(5 * kCluster, kCluster).ok());
  c = CollectWritableClusters(img);
  ASSERT_EQ(c.size(), 1u);
  EXPECT_EQ(c[0].virtual_cluster, 6u);

  auto opts = OffloadPlanner::OptionsFor(img);
  ASSERT_TRUE(opts.ok()) << opts.status().ToString();
  EXPECT_EQ(opts->cluster_size, kCluster);
  EXPECT_EQ(opts->disk_size_bytes, 16 * kCluster);
}

TEST_F(PlannerImageTest, ClustersSharedWithASnapshotAreNotOffloadedUntilCopied) {
  if (std::system("qemu-img --version >/dev/null 2>&1") != 0) GTEST_SKIP() << "qemu-img not installed";
  cow::CreateOptions co;
  co.size_bytes = 8 * kCluster;
  const std::string path = dir_ + "/snap.qcow2";
  ASSERT_TRUE(cow::CreateImage(path, co).ok());
  std::vector<uint8_t> buf(kCluster, 0x11);
  iovec v{buf.data(), buf.size()};
  {
    auto img = cow::OpenImage(path);
    ASSERT_TRUE(img.ok());
    ASSERT_TRUE((*img)->Write(2 * kCluster, {&v, 1}).ok());
    ASSERT_TRUE((*img)->Close().ok());
  }
  // An internal snapshot raises cluster 2's refcount to 2: not writable in place.
  ASSERT_EQ(std::system(("qemu-img snapshot -c s1 '" + path + "' >/dev/null 2>&1").c_str()), 0);
  auto img = cow::OpenImage(path);
  ASSERT_TRUE(img.ok()) << img.status().ToString();
  ASSERT_TRUE((*img)->Read(2 * kCluster, {&v, 1}).ok());
  EXPECT_TRUE(CollectWritableClusters(**img).empty());
  auto planner = OffloadPlanner::Make(*OffloadPlanner::OptionsFor(**img));
  ASSERT_TRUE(planner.ok());
  EXPECT_EQ(planner->Plan(CollectWritableClusters(**img))->linear_sectors(), 0u);
  // A write copies it to a cluster of its own: now it may go linear.
  ASSERT_TRUE((*img)->Write(2 * kCluster, {&v, 1}).ok());
  std::vector<WritableCluster> c = CollectWritableClusters(**img);
  ASSERT_EQ(c.size(), 1u);
  EXPECT_EQ(c[0].virtual_cluster, 2u);
  ASSERT_TRUE((*img)->Close().ok());
}

TEST_F(PlannerImageTest, PrimingAtAttachFindsTheTopLayersClusters) {
  cow::CreateOptions bo;
  bo.size_bytes = 32 * kCluster;
  ASSERT_TRUE(cow::CreateImage(dir_ + "/base.qcow2", bo).ok());
  cow::CreateOptions oo;
  oo.backing_file = "base.qcow2";
  const std::string top = dir_ + "/top.qcow2";
  ASSERT_TRUE(cow::CreateImage(top, oo).ok());
  std::vector<uint8_t> buf(3 * kCluster, 0x77);
  iovec v{buf.data(), buf.size()};
  {
    auto base = cow::OpenImage(dir_ + "/base.qcow2");
    ASSERT_TRUE(base.ok());
    ASSERT_TRUE((*base)->Write(20 * kCluster, {&v, 1}).ok());  // backing data: never offloaded
    ASSERT_TRUE((*base)->Close().ok());
    auto img = cow::OpenImage(top);
    ASSERT_TRUE(img.ok());
    ASSERT_TRUE((*img)->Write(4 * kCluster, {&v, 1}).ok());
    ASSERT_TRUE((*img)->Write(10 * kCluster + 512, {&v, 1}).ok());  // 10..13, partial ends
    ASSERT_TRUE((*img)->WriteZeroes(16 * kCluster, kCluster, false).ok());
    ASSERT_TRUE((*img)->Close().ok());
  }
  auto img = cow::OpenImage(top);
  ASSERT_TRUE(img.ok());
  EXPECT_TRUE(CollectWritableClusters(**img).empty());  // nothing known yet
  auto primed = PrimeRemapCache(**img, 1000);
  ASSERT_TRUE(primed.ok()) << primed.status().ToString();
  std::vector<uint64_t> got;
  for (const auto& c : CollectWritableClusters(**img)) got.push_back(c.virtual_cluster);
  EXPECT_EQ(got, (std::vector<uint64_t>{4, 5, 6, 10, 11, 12, 13}));
  EXPECT_GE(*primed, 7u);
  // Bounded.
  ASSERT_TRUE((*img)->Close().ok());
  auto again = cow::OpenImage(top);
  ASSERT_TRUE(again.ok());
  auto two = PrimeRemapCache(**again, 2);
  ASSERT_TRUE(two.ok());
  EXPECT_EQ(*two, 2u);
  EXPECT_EQ(CollectWritableClusters(**again).size(), 2u);
}

TEST_F(PlannerImageTest, OptionsForRefusesRawAndReadOnly) {
  cow::CreateOptions ro;
  ro.format = cow::ImageFormat::kRaw;
  ro.size_bytes = kCluster;
  ASSERT_TRUE(cow::CreateImage(dir_ + "/a.raw", ro).ok());
  auto raw = cow::OpenImage(dir_ + "/a.raw");
  ASSERT_TRUE(raw.ok());
  EXPECT_EQ(OffloadPlanner::OptionsFor(**raw).status().code(), ErrorCode::kNotSupported);
  cow::CreateOptions qo;
  qo.size_bytes = kCluster;
  ASSERT_TRUE(cow::CreateImage(dir_ + "/b.qcow2", qo).ok());
  cow::OpenOptions open;
  open.read_only = true;
  auto q = cow::OpenImage(dir_ + "/b.qcow2", open);
  ASSERT_TRUE(q.ok()) << q.status().ToString();
  EXPECT_EQ(OffloadPlanner::OptionsFor(**q).status().code(), ErrorCode::kNotSupported);
}

}  // namespace
}  // namespace cowtap::dm
