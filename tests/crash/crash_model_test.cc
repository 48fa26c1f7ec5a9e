// Tests of the crash checker itself: CrashModel must flag each kind of
// violation it exists to catch, or the crash sweep would prove nothing.
#include "tests/crash/crash_model.h"

#include <gtest/gtest.h>

namespace cowtap::tests {
namespace {

WorkloadOp Write(uint64_t offset, uint64_t length, uint64_t seed) {
  return WorkloadOp{WorkloadOp::kWrite, offset, length, seed};
}
const WorkloadOp kFlush{WorkloadOp::kFlush, 0, 0, 0};

TEST(CrashModelTest, FlushedWriteThatReadsAsOldDataIsReported) {
  CrashModel model(std::vector<uint8_t>(4096, 0x11));
  WorkloadOp w = Write(100, 200, 1);
  model.Begin(w);
  model.Done(w);
  model.Begin(kFlush);
  model.Done(kFlush);
  std::vector<uint8_t> lost(4096, 0x11);
  EXPECT_NE(model.Verify(lost, true), "");
  std::vector<uint8_t> kept = lost;
  std::vector<uint8_t> data = OpData(w);
  std::copy(data.begin(), data.end(), kept.begin() + 100);
  EXPECT_EQ(model.Verify(kept, true), "");
}

TEST(CrashModelTest, NeverWrittenByteThatChangedIsReported) {
  CrashModel model(std::vector<uint8_t>(4096, 0x22));
  std::vector<uint8_t> actual(4096, 0x22);
  actual[4000] = 0;  // e.g. a partial-cluster CoW that lost the backing bytes
  std::string problem = model.Verify(actual, false);
  EXPECT_NE(problem.find("never written"), std::string::npos) << problem;
}

TEST(CrashModelTest, UnflushedBytesMayBeOldOrNewButNotGarbageInStrictMode) {
  CrashModel model(std::vector<uint8_t>(4096, 0x33));
  WorkloadOp w = Write(0, 512, 2);
  model.Begin(w);
  model.Done(w);  // no flush after it
  std::vector<uint8_t> old_data(4096, 0x33);
  EXPECT_EQ(model.Verify(old_data, true), "");
  std::vector<uint8_t> new_data = old_data;
  std::vector<uint8_t> data = OpData(w);
  std::copy(data.begin(), data.end(), new_data.begin());
  EXPECT_EQ(model.Verify(new_data, true), "");
  std::vector<uint8_t> garbage = old_data;
  for (size_t i = 0; i < 512; ++i) garbage[i] = static_cast<uint8_t>(data[i] ^ 0x80) == 0x33 ? 0x34 : data[i] ^ 0x80;
  EXPECT_NE(model.Verify(garbage, true), "");
  EXPECT_EQ(model.Verify(garbage, false), "");  // lenient (torn) mode accepts it
}

TEST(CrashModelTest, ZeroesAndDiscardsSinceFlushMayReadAsZero) {
  CrashModel model(std::vector<uint8_t>(8192, 0x44));
  WorkloadOp z{WorkloadOp::kZeroUnmap, 4096, 4096, 0};
  model.Begin(z);
  model.Done(z);
  std::vector<uint8_t> actual(8192, 0x44);
  std::fill(actual.begin() + 4096, actual.end(), 0);
  EXPECT_EQ(model.Verify(actual, true), "");
  model.Begin(kFlush);
  model.Done(kFlush);
  std::vector<uint8_t> reappeared(8192, 0x44);  // discarded data came back after a flush
  EXPECT_NE(model.Verify(reappeared, true), "");
}

TEST(CrashModelTest, FailedOpCountsAsUnflushed) {
  CrashModel model(std::vector<uint8_t>(4096, 0));
  WorkloadOp w = Write(0, 4096, 3);
  model.Begin(w);  // the crash hit it: never Done
  std::vector<uint8_t> actual = OpData(w);
  EXPECT_EQ(model.Verify(actual, true), "");
}

}  // namespace
}  // namespace cowtap::tests
