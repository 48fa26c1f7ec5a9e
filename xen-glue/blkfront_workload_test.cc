#include "xen-glue/blkfront_workload.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <cstring>
#include <deque>
#include <vector>

namespace cowtap::xen {
namespace {

// A memory disk answering out of order, with injectable faults.
class MemTarget : public BlockTarget {
 public:
  explicit MemTarget(uint64_t sectors) : disk_(sectors * kGuestSectorBytes, 0) {}

  uint64_t sectors() const override { return disk_.size() / kGuestSectorBytes; }
  uint32_t max_sectors_per_io() const override { return 64; }
  uint32_t max_sectors_per_barrier() const override { return barrier_limit_; }
  bool Supports(BlkOp op) const override { return op != BlkOp::kSecureDiscard; }
  Status Submit(const BlkIo& io) override {
    if (pending_.size() >= 32) return Status::Busy("full");
    if (io.op == BlkOp::kWriteBarrier && io.nr_sectors > barrier_limit_) return Status::InvalidArgument("barrier");
    if (BlkOpHasData(io.op) && io.op != BlkOp::kRead) {
      uint64_t dst = (io.sector + (misplace_writes_ ? 1 : 0)) * kGuestSectorBytes;
      size_t len = std::min<size_t>(size_t{io.nr_sectors} * kGuestSectorBytes, disk_.size() - dst);
      std::memcpy(disk_.data() + dst, io.buffer, len);
    }
    if (io.op == BlkOp::kDiscard) {
      // Zero only whole 8-sector units, leaving heads and tails alone.
      for (uint64_t s = io.sector; s < io.sector + io.nr_sectors; ++s) {
        if (s % 8 == 0 && s + 8 <= io.sector + io.nr_sectors) {
          std::memset(disk_.data() + s * kGuestSectorBytes, 0, 8 * kGuestSectorBytes);
        }
      }
    }
    pending_.push_back(io);
    return Status::Ok();
  }
  Result<size_t> Poll(std::vector<BlkCompletion>* out, int timeout_ms) override {
    // Answer newest first, reads filled at completion time.
    size_t n = 0;
    while (!pending_.empty()) {
      BlkIo io = pending_.back();
      pending_.pop_back();
      if (io.op == BlkOp::kRead) {
        std::memcpy(io.buffer, disk_.data() + io.sector * kGuestSectorBytes, size_t{io.nr_sectors} * kGuestSectorBytes);
        if (corrupt_sector_ >= io.sector && corrupt_sector_ < io.sector + io.nr_sectors) {
          io.buffer[(corrupt_sector_ - io.sector) * kGuestSectorBytes + 100] ^= 1;
        }
      }
      out->push_back({io.cookie, io.op, fail_writes_ && io.op == BlkOp::kWrite ? int16_t{-1} : int16_t{0}});
      ++n;
    }
    return n;
  }
  uint32_t InFlight() const override { return static_cast<uint32_t>(pending_.size()); }

  std::vector<uint8_t> disk_;
  std::deque<BlkIo> pending_;
  uint64_t corrupt_sector_ = UINT64_MAX;
  bool misplace_writes_ = false;
  bool fail_writes_ = false;
  uint32_t barrier_limit_ = 64;
};

WorkloadOptions Mixed() {
  WorkloadOptions o;
  o.ops = 2000;
  o.queue_depth = 16;
  o.block_sectors = 16;
  o.random_sizes = true;
  o.initial = InitialContent::kZero;
  o.flush_every = 50;
  o.barrier_percent = 10;
  o.seed = 7;
  return o;
}

TEST(WorkloadTest, RandomMixOnAFaithfulDiskPassesAndVerifiesEverything) {
  MemTarget target(2048);
  auto w = Workload::Create(target, Mixed());
  ASSERT_TRUE(w.ok()) << w.status().ToString();
  auto report = w->Run();
  ASSERT_TRUE(report.ok()) << report.status().ToString();
  EXPECT_TRUE(report->passed()) << report->Summary();
  EXPECT_EQ(report->ops, 2000u + 0u);
  EXPECT_GT(report->reads, 500u);
  EXPECT_GT(report->writes, 500u);
  EXPECT_GT(report->barriers, 10u);
  EXPECT_GT(report->flushes, 5u);
  // The final pass read back all 2048 sectors.
  EXPECT_GE(report->verified_sectors, 2048u);
  EXPECT_EQ(target.InFlight(), 0u);
}

TEST(WorkloadTest, BarriersAreCappedToTheTargetsBarrierLimit) {
  MemTarget target(2048);
  target.barrier_limit_ = 8;
  WorkloadOptions o = Mixed();
  o.barrier_percent = 50;
  auto w = Workload::Create(target, o);
  ASSERT_TRUE(w.ok());
  auto report = w->Run();
  ASSERT_TRUE(report.ok()) << report.status().ToString();
  EXPECT_TRUE(report->passed()) << report->Summary();
  EXPECT_GT(report->barriers, 100u);
}

TEST(WorkloadTest, DetectsAFlippedBit) {
  MemTarget target(512);
  target.corrupt_sector_ = 300;
  auto w = Workload::Create(target, Mixed());
  ASSERT_TRUE(w.ok());
  auto report = w->Run();
  ASSERT_TRUE(report.ok());
  EXPECT_FALSE(report->passed());
  EXPECT_GT(report->mismatches, 0u);
  ASSERT_FALSE(report->mismatch_details.empty());
  EXPECT_NE(report->mismatch_details[0].find("sector 300"), std::string::npos) << report->mismatch_details[0];
}

TEST(WorkloadTest, DetectsWritesLandingOneSectorOff) {
  MemTarget target(512);
  target.misplace_writes_ = true;
  auto w = Workload::Create(target, Mixed());
  ASSERT_TRUE(w.ok());
  auto report = w->Run();
  ASSERT_TRUE(report.ok());
  EXPECT_GT(report->mismatches, 0u);
}

TEST(WorkloadTest, CountsFailedWritesAsErrors) {
  MemTarget target(512);
  target.fail_writes_ = true;
  auto w = Workload::Create(target, Mixed());
  ASSERT_TRUE(w.ok());
  auto report = w->Run();
  ASSERT_TRUE(report.ok());
  EXPECT_GT(report->errors, 0u);
  EXPECT_FALSE(report->passed());
}

TEST(WorkloadTest, DiscardedSectorsMayReadZeroOrOld) {
  MemTarget target(1024);
  // Initial content: the pattern of generation 0 with seed 99.
  for (uint64_t s = 0; s < 1024; ++s) FillWorkloadPattern(s, 0, 99, target.disk_.data() + s * kGuestSectorBytes);
  WorkloadOptions o = Mixed();
  o.initial = InitialContent::kPattern;
  o.initial_seed = 99;
  o.discard_percent = 20;
  auto w = Workload::Create(target, o);
  ASSERT_TRUE(w.ok());
  auto report = w->Run();
  ASSERT_TRUE(report.ok());
  EXPECT_TRUE(report->passed()) << report->Summary() << " " << (report->mismatch_details.empty() ? "" : report->mismatch_details[0]);
  EXPECT_GT(report->discards, 100u);
}

TEST(WorkloadTest, WrongInitialSeedIsCaught) {
  MemTarget target(256);
  for (uint64_t s = 0; s < 256; ++s) FillWorkloadPattern(s, 0, 1, target.disk_.data() + s * kGuestSectorBytes);
  WorkloadOptions o = Mixed();
  o.initial = InitialContent::kPattern;
  o.initial_seed = 2;
  o.ops = 10;
  auto w = Workload::Create(target, o);
  ASSERT_TRUE(w.ok());
  auto report = w->Run();
  ASSERT_TRUE(report.ok());
  EXPECT_GT(report->mismatches, 0u);
}

TEST(WorkloadTest, SequentialWithSameSeedIsReproducible) {
  MemTarget a(512), b(512);
  WorkloadOptions o = Mixed();
  o.sequential = true;
  auto wa = Workload::Create(a, o);
  auto wb = Workload::Create(b, o);
  ASSERT_TRUE(wa.ok() && wb.ok());
  ASSERT_TRUE(wa->Run().ok());
  ASSERT_TRUE(wb->Run().ok());
  EXPECT_EQ(a.disk_, b.disk_);
}

TEST(WorkloadTest, RejectsRegionBeyondDevice) {
  MemTarget target(100);
  WorkloadOptions o;
  o.region_start = 90;
  o.region_sectors = 20;
  EXPECT_EQ(Workload::Create(target, o).status().code(), ErrorCode::kInvalidArgument);
}

TEST(WorkloadTest, RejectsBlockLargerThanARequest) {
  MemTarget target(1000);
  WorkloadOptions o;
  o.block_sectors = 65;
  EXPECT_EQ(Workload::Create(target, o).status().code(), ErrorCode::kInvalidArgument);
}

TEST(WorkloadTest, RejectsZeroQueueDepth) {
  MemTarget target(1000);
  WorkloadOptions o;
  o.queue_depth = 0;
  EXPECT_EQ(Workload::Create(target, o).status().code(), ErrorCode::kInvalidArgument);
}

TEST(WorkloadTest, ReportsLatencyPercentiles) {
  MemTarget target(256);
  auto w = Workload::Create(target, Mixed());
  ASSERT_TRUE(w.ok());
  auto report = w->Run();
  ASSERT_TRUE(report.ok());
  EXPECT_LE(report->p50_us, report->p99_us);
  EXPECT_LE(report->p99_us, report->max_us);
  EXPECT_NE(report->Summary().find("mismatches=0"), std::string::npos);
}

}  // namespace
}  // namespace cowtap::xen
