#include "tools/cli/ctl_table.h"

#include <gtest/gtest.h>

#include <limits>
#include <string>
#include <vector>

namespace cowtap::cli {
namespace {

using daemon::VbdStatsSnapshot;

VbdStatsSnapshot Snap(std::string id) {
  VbdStatsSnapshot s;
  s.id = std::move(id);
  s.image = "/images/" + s.id + ".qcow2";
  s.format = "qcow2";
  s.state = "Connected";
  s.latency_us_log2.assign(20, 0);
  return s;
}

TEST(CtlTableTest, PercentileOfAnEmptyHistogramIsUnknown) {
  EXPECT_FALSE(HistogramPercentileUs(std::vector<uint64_t>{}, 0.5).has_value());
  EXPECT_FALSE(HistogramPercentileUs(std::vector<uint64_t>(10, 0), 0.99).has_value());
}

TEST(CtlTableTest, PercentileInterpolatesInsideTheBucket) {
  // 100 requests, all in bucket 10: [512, 1024) us.
  std::vector<uint64_t> h(16, 0);
  h[10] = 100;
  EXPECT_DOUBLE_EQ(*HistogramPercentileUs(h, 0.5), 512 + 512 * 0.5);
  EXPECT_DOUBLE_EQ(*HistogramPercentileUs(h, 0.99), 512 + 512 * 0.99);
  EXPECT_DOUBLE_EQ(*HistogramPercentileUs(h, 1.0), 1024);
}

TEST(CtlTableTest, PercentileFindsTheRightBucket) {
  std::vector<uint64_t> h(16, 0);
  h[3] = 98;  // [4, 8) us
  h[12] = 2;  // [2048, 4096) us
  const double p50 = *HistogramPercentileUs(h, 0.5);
  EXPECT_GE(p50, 4);
  EXPECT_LT(p50, 8);
  const double p99 = *HistogramPercentileUs(h, 0.99);
  EXPECT_GE(p99, 2048);
  EXPECT_LE(p99, 4096);
  h.assign(16, 0);
  h[0] = 10;  // faster than 1 us
  EXPECT_LE(*HistogramPercentileUs(h, 0.5), 1.0);
}

TEST(CtlTableTest, TheOpenEndedLastBucketReportsItsLowerBound) {
  std::vector<uint64_t> h(8, 0);
  h[7] = 5;  // >= 64 us, open-ended
  EXPECT_DOUBLE_EQ(*HistogramPercentileUs(h, 0.99), 64);
}

TEST(CtlTableTest, HugeCountsDoNotOverflow) {
  std::vector<uint64_t> h(4, std::numeric_limits<uint64_t>::max());
  auto p = HistogramPercentileUs(h, 0.5);
  ASSERT_TRUE(p.has_value());
  EXPECT_GE(*p, 1);
  EXPECT_LE(*p, 2);
}

TEST(CtlTableTest, RatesAreDeltasOverTheInterval) {
  VbdStatsSnapshot a = Snap("5/51712");
  a.reads = 100;
  a.writes = 50;
  a.bytes_read = 10 << 20;
  a.bytes_written = 1 << 20;
  a.remap_lookups = 1000;
  a.remap_hits = 500;
  a.fast_path_ios = 10;
  a.slow_path_ios = 10;
  a.latency_us_log2[2] = 1000;  // old, slow history must not count
  a.latency_us_log2[15] = 1000;
  a.errors = 3;
  VbdStatsSnapshot b = a;
  b.reads += 300;
  b.writes += 100;
  b.flushes += 100;
  b.bytes_read += 4 << 20;
  b.bytes_written += 2 << 20;
  b.remap_lookups += 100;
  b.remap_hits += 90;
  b.fast_path_ios += 30;
  b.slow_path_ios += 10;
  b.latency_us_log2[4] += 500;  // [8, 16) us
  b.queue_depth = 7;
  b.errors = 4;
  VbdRates r = ComputeRates(&a, b, 2.0);
  EXPECT_EQ(r.id, "5/51712");
  EXPECT_DOUBLE_EQ(r.ops_per_s, 250);
  EXPECT_DOUBLE_EQ(r.read_mib_per_s, 2);
  EXPECT_DOUBLE_EQ(r.write_mib_per_s, 1);
  ASSERT_TRUE(r.p50_us && r.p99_us);
  EXPECT_GE(*r.p50_us, 8);
  EXPECT_LE(*r.p99_us, 16) << "only this interval's requests";
  EXPECT_EQ(r.queue_depth, 7u);
  EXPECT_DOUBLE_EQ(*r.hit_rate, 0.9);
  EXPECT_DOUBLE_EQ(*r.fast_path, 0.75);
  EXPECT_EQ(r.errors, 1u);
}

TEST(CtlTableTest, AnIdleIntervalHasNoLatencyOrHitRate) {
  VbdStatsSnapshot a = Snap("1/1");
  a.reads = 5;
  a.remap_lookups = 5;
  a.latency_us_log2[3] = 5;
  VbdRates r = ComputeRates(&a, a, 1.0);
  EXPECT_EQ(r.ops_per_s, 0);
  EXPECT_FALSE(r.p50_us.has_value());
  EXPECT_FALSE(r.hit_rate.has_value());
  EXPECT_FALSE(r.fast_path.has_value());
  EXPECT_NE(FormatRatesTable({r}).find(" - "), std::string::npos);
}

TEST(CtlTableTest, ANewVbdOrAResetCounterCountsFromZero) {
  VbdStatsSnapshot b = Snap("1/1");
  b.reads = 10;
  EXPECT_DOUBLE_EQ(ComputeRates(nullptr, b, 1.0).ops_per_s, 10);
  VbdStatsSnapshot old = b;
  old.reads = 1000000;  // the previous VBD under this id
  EXPECT_DOUBLE_EQ(ComputeRates(&old, b, 1.0).ops_per_s, 10);
}

TEST(CtlTableTest, ListTableHasOneAlignedRowPerVbd) {
  VbdStatsSnapshot a = Snap("1/51712");
  a.reads = 7;
  a.bytes_read = 3 << 20;
  a.remap_lookups = 4;
  a.remap_hits = 3;
  VbdStatsSnapshot b = Snap("12/51728");
  b.paused = true;
  const std::string t = FormatVbdTable({a, b});
  EXPECT_EQ(t.rfind("ID", 0), 0u) << t;
  EXPECT_NE(t.find("1/51712"), std::string::npos);
  EXPECT_NE(t.find("paused"), std::string::npos);
  EXPECT_NE(t.find("75.0"), std::string::npos) << "hit rate: " << t;
  EXPECT_NE(t.find("3.0"), std::string::npos) << "MiB read: " << t;
  EXPECT_NE(t.find("/images/12/51728.qcow2"), std::string::npos);
  // Columns line up: the FORMAT column starts at the same offset on every line.
  std::vector<size_t> at;
  size_t pos = 0;
  while (pos < t.size()) {
    const size_t eol = t.find('\n', pos);
    const std::string line = t.substr(pos, eol - pos);
    at.push_back(line.find(line.rfind("ID", 0) == 0 ? "FORMAT" : "qcow2"));
    pos = eol + 1;
  }
  ASSERT_EQ(at.size(), 3u);
  EXPECT_EQ(at[0], at[1]);
  EXPECT_EQ(at[1], at[2]);
  EXPECT_EQ(FormatVbdTable({}), "No VBDs attached.\n");
}

TEST(CtlTableTest, DetailsNameEveryFigure) {
  VbdStatsSnapshot s = Snap("3/768");
  s.writes = 42;
  s.queue_depth = 9;
  s.allocations = 77;
  s.latency_us_log2[11] = 10;
  const std::string d = FormatVbdDetails(s);
  for (const char* key :
       {"vbd:", "image:", "format:", "state:", "reads:", "writes:", "flushes:", "discards:", "errors:", "queues:",
        "latency p50:", "latency p99:", "remap cache:", "fast path:", "allocations:", "memory:", "faults:"}) {
    EXPECT_NE(d.find(key), std::string::npos) << key;
  }
  EXPECT_NE(d.find("42"), std::string::npos);
  EXPECT_NE(d.find("9 requests in flight"), std::string::npos);
  EXPECT_NE(d.find("ms"), std::string::npos) << "p50 in [1024, 2048) us: " << d;
  EXPECT_NE(d.find("n/a of 0 I/Os"), std::string::npos) << "no fast-path figures: " << d;
  EXPECT_EQ(d.find("-%"), std::string::npos) << d;
}

TEST(CtlTableTest, LatencyUnits) {
  EXPECT_EQ(FormatLatencyUs(std::nullopt), "-");
  EXPECT_EQ(FormatLatencyUs(850), "850us");
  EXPECT_EQ(FormatLatencyUs(1250), "1.25ms");
  EXPECT_EQ(FormatLatencyUs(2.5e6), "2.50s");
}

TEST(CtlTableTest, RatesJsonHasNullForUnknowns) {
  VbdRates r;
  r.id = "1/2";
  r.ops_per_s = 3;
  auto j = RatesToJson({r});
  ASSERT_EQ(j.size(), 1u);
  EXPECT_EQ(j[0]["id"], "1/2");
  EXPECT_EQ(j[0]["ops_per_s"], 3.0);
  EXPECT_TRUE(j[0]["p99_us"].is_null());
}

}  // namespace
}  // namespace cowtap::cli
