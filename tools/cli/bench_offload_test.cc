// `cowtap bench --offload` where it can run here: the refusal without the
// kernel's pieces, and the table and JSON it prints (the run itself is in
// the VM of tests/vm/run.sh, which checks that no dm read reached user space).
#include "tools/cli/bench_offload.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <unistd.h>

#include "dm/loop_device.h"
#include "dm/nbd_device.h"

namespace cowtap::cli::bench {
namespace {

PeerResult Ran(uint64_t ops, double seconds) {
  PeerResult p;
  p.ran = true;
  p.ops = ops;
  p.bytes = ops * 4096;
  p.elapsed_s = seconds;
  return p;
}

OffloadBenchReport TwoRows() {
  OffloadBenchReport r;
  r.size_bytes = 64 << 20;
  r.dm_device = "/dev/mapper/cowtap-bench-1";
  r.nbd_device = "/dev/nbd0";
  r.loop_device = "/dev/loop1";
  r.linear_sectors = r.size_sectors = 131072;
  r.segments = 1;
  OffloadRowResult a;
  a.name = "randread-4k";
  a.devices = {Ran(950, 1), Ran(200, 1), Ran(1000, 1)};
  a.dm_vs_loop = 0.95;
  a.nbd_vs_loop = 0.2;
  OffloadRowResult b;
  b.name = "seqread-1m";
  b.devices = {Ran(800, 1), PeerResult{}, Ran(1000, 1)};
  b.devices[1].note = "open failed";
  b.dm_vs_loop = 0.8;
  b.dm_miss_requests = 3;
  r.rows = {a, b};
  return r;
}

TEST(BenchOffloadTest, RefusedWithWhatIsMissingWhereTheKernelCannotOffload) {
  if (access("/dev/mapper/control", R_OK | W_OK) == 0 && dm::LoopAvailable() && dm::NbdAvailable()) {
    GTEST_SKIP() << "this kernel can offload: the VM test runs the bench";
  }
  OffloadBenchOptions o;
  o.size_bytes = 4 << 20;
  o.seconds_per_device = 0.1;
  auto r = RunOffloadBench(o, stderr);
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.status().code(), ErrorCode::kNotSupported);
  EXPECT_THAT(r.status().message(), ::testing::HasSubstr("modprobe"));
}

TEST(BenchOffloadTest, BadOptionsAreRefusedBeforeAnythingIsMade) {
  OffloadBenchOptions small_size, no_time;
  small_size.size_bytes = 1000;
  no_time.seconds_per_device = 0;
  auto small = RunOffloadBench(small_size, stderr);
  EXPECT_EQ(small.status().code(), ErrorCode::kInvalidArgument);
  auto zero = RunOffloadBench(no_time, stderr);
  EXPECT_EQ(zero.status().code(), ErrorCode::kInvalidArgument);
}

TEST(BenchOffloadTest, TableShowsRatiosToTheLoopDeviceAndTheTargetVerdicts) {
  const std::string t = FormatOffloadTable(TwoRows());
  EXPECT_THAT(t, ::testing::HasSubstr("131072 of 131072 sectors linear"));
  EXPECT_THAT(t, ::testing::HasSubstr("0.95"));
  EXPECT_THAT(t, ::testing::HasSubstr("0.20"));
  EXPECT_THAT(t, ::testing::HasSubstr("PASS randread-4k"));
  EXPECT_THAT(t, ::testing::HasSubstr("MISS seqread-1m"));
  EXPECT_THAT(t, ::testing::HasSubstr("3 requests reached user space"));
  EXPECT_THAT(t, ::testing::HasSubstr("open failed")) << "a device that did not run says why";
}

TEST(BenchOffloadTest, JsonCarriesEveryDeviceAndTheVerdict) {
  const auto j = OffloadToJson(TwoRows());
  ASSERT_EQ(j["rows"].size(), 2u);
  EXPECT_EQ(j["rows"][0]["target_met"], true);
  EXPECT_EQ(j["rows"][1]["target_met"], false);
  EXPECT_DOUBLE_EQ(j["rows"][0]["dm"]["iops"].get<double>(), 950);
  EXPECT_DOUBLE_EQ(j["rows"][0]["loop-raw"]["iops"].get<double>(), 1000);
  EXPECT_EQ(j["rows"][1]["nbd-only"]["ran"], false);
  EXPECT_EQ(j["rows"][1]["dm_miss_requests"], 3u);
}

}  // namespace
}  // namespace cowtap::cli::bench
