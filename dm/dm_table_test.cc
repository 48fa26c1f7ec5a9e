#include "dm/dm_table.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <random>
#include <utility>
#include <vector>

namespace cowtap::dm {
namespace {

using K = DmSegment::Kind;

TEST(DmTableTest, AllMissCoversTheDevice) {
  DmTable t = DmTable::AllMiss(2048);
  ASSERT_EQ(t.segments().size(), 1u);
  EXPECT_EQ(t.segments()[0], (DmSegment{0, 2048, K::kMiss, 0}));
  EXPECT_EQ(t.linear_sectors(), 0u);
  EXPECT_EQ(t.ToText({"/dev/loop3", "/dev/nbd0"}), "0 2048 linear /dev/nbd0 0\n");
  EXPECT_TRUE(DmTable::AllMiss(0).segments().empty());
}

TEST(DmTableTest, MakeRefusesGapsOverlapsEmptyAndShortTables) {
  EXPECT_FALSE(DmTable::Make(100, {{0, 50, K::kMiss, 0}, {60, 40, K::kMiss, 60}}).ok());       // gap
  EXPECT_FALSE(DmTable::Make(100, {{0, 50, K::kMiss, 0}, {40, 60, K::kMiss, 40}}).ok());       // overlap
  EXPECT_FALSE(DmTable::Make(100, {{0, 0, K::kMiss, 0}, {0, 100, K::kMiss, 0}}).ok());         // empty
  EXPECT_FALSE(DmTable::Make(100, {{0, 50, K::kMiss, 0}}).ok());                               // short
  EXPECT_FALSE(DmTable::Make(100, {{0, 200, K::kMiss, 0}}).ok());                              // long
  EXPECT_FALSE(DmTable::Make(100, {{0, 100, K::kMiss, 5}}).ok());                              // miss not identity
  EXPECT_FALSE(DmTable::Make(100, {{0, 100, K::kLinear, UINT64_MAX - 10}}).ok());              // target wraps
  EXPECT_FALSE(DmTable::Make(UINT64_MAX, {{1, UINT64_MAX, K::kMiss, 1}}).ok());                // start wrong
  EXPECT_FALSE(DmTable::Make(UINT64_MAX, {{0, UINT64_MAX, K::kMiss, 0}, {UINT64_MAX, 5, K::kMiss, 0}}).ok());
}

TEST(DmTableTest, MakeMergesContinuingSegments) {
  auto t = DmTable::Make(400, {{0, 100, K::kMiss, 0},
                               {100, 100, K::kMiss, 100},
                               {200, 50, K::kLinear, 1000},
                               {250, 50, K::kLinear, 1050},   // continues on the target: merged
                               {300, 100, K::kLinear, 5000}});  // does not
  ASSERT_TRUE(t.ok()) << t.status().ToString();
  ASSERT_EQ(t->segments().size(), 3u);
  EXPECT_EQ(t->segments()[0], (DmSegment{0, 200, K::kMiss, 0}));
  EXPECT_EQ(t->segments()[1], (DmSegment{200, 100, K::kLinear, 1000}));
  EXPECT_EQ(t->segments()[2], (DmSegment{300, 100, K::kLinear, 5000}));
  EXPECT_EQ(t->linear_sectors(), 200u);
  EXPECT_EQ(t->linear_segment_count(), 2u);
  EXPECT_EQ(t->ToText({"/dev/loop3", "/dev/nbd0"}),
            "0 200 linear /dev/nbd0 0\n"
            "200 100 linear /dev/loop3 1000\n"
            "300 100 linear /dev/loop3 5000\n");
  EXPECT_EQ(&t->SegmentAt(0), &t->segments()[0]);
  EXPECT_EQ(&t->SegmentAt(199), &t->segments()[0]);
  EXPECT_EQ(&t->SegmentAt(200), &t->segments()[1]);
  EXPECT_EQ(&t->SegmentAt(399), &t->segments()[2]);
}

TEST(DmTableTest, WithMissCutsLinearSegmentsAndKeepsTheRest) {
  auto t = DmTable::Make(400, {{0, 100, K::kMiss, 0}, {100, 200, K::kLinear, 1000}, {300, 100, K::kMiss, 300}});
  ASSERT_TRUE(t.ok());
  DmTable m = t->WithMiss(150, 50);
  ASSERT_EQ(m.segments().size(), 5u);
  EXPECT_EQ(m.segments()[1], (DmSegment{100, 50, K::kLinear, 1000}));
  EXPECT_EQ(m.segments()[2], (DmSegment{150, 50, K::kMiss, 150}));
  EXPECT_EQ(m.segments()[3], (DmSegment{200, 100, K::kLinear, 1100}));
  EXPECT_EQ(m.linear_sectors(), 150u);
  // Covering the head merges with the miss before it.
  DmTable h = t->WithMiss(50, 100);
  ASSERT_EQ(h.segments().size(), 3u);
  EXPECT_EQ(h.segments()[0], (DmSegment{0, 150, K::kMiss, 0}));
  EXPECT_EQ(h.segments()[1], (DmSegment{150, 150, K::kLinear, 1050}));
  // Everything, past the end, and a wrapping count.
  EXPECT_EQ(t->WithMiss(0, UINT64_MAX), DmTable::AllMiss(400));
  EXPECT_EQ(t->WithMiss(120, UINT64_MAX).linear_sectors(), 20u);
  EXPECT_EQ(t->WithMiss(400, 10), *t);
  EXPECT_EQ(t->WithMiss(0, 100), *t);  // already miss
}

// One pass over many ranges gives what one WithMiss per range gives.
TEST(DmTableTest, WithMissRangesEqualsOneWithMissPerRange) {
  std::mt19937_64 rng(7);
  for (int round = 0; round < 300; ++round) {
    const uint64_t size = 64 + rng() % 2000;
    std::vector<DmSegment> segs;
    for (uint64_t pos = 0; pos < size;) {
      const uint64_t n = std::min<uint64_t>(size - pos, 1 + rng() % 100);
      if (rng() % 2) {
        segs.push_back({pos, n, K::kLinear, 100000 + rng() % 100000});
      } else {
        segs.push_back({pos, n, K::kMiss, pos});
      }
      pos += n;
    }
    auto t = DmTable::Make(size, segs);
    ASSERT_TRUE(t.ok()) << t.status().ToString();
    std::vector<std::pair<uint64_t, uint64_t>> ranges;
    DmTable expected = *t;
    for (int i = 0, n = static_cast<int>(rng() % 12); i < n; ++i) {
      const uint64_t first = rng() % (size + 50);
      const uint64_t count = rng() % 8 == 0 ? UINT64_MAX - rng() % 3 : rng() % 300;
      ranges.emplace_back(first, count);
      expected = expected.WithMiss(first, count);
    }
    EXPECT_EQ(t->WithMissRanges(ranges), expected) << "round " << round;
  }
}

}  // namespace
}  // namespace cowtap::dm
