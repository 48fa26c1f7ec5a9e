// One cowtapd per control socket: the second is refused with the holder's
// pid, and the lock goes with its holder.
#include "tools/daemon/instance_lock.h"

#include <gtest/gtest.h>
#include <stdlib.h>
#include <unistd.h>

#include <filesystem>

namespace cowtap::daemon {
namespace {

class InstanceLockTest : public ::testing::Test {
 protected:
  void SetUp() override {
    char tmpl[] = "/tmp/cowtap-lock-XXXXXX";
    ASSERT_NE(::mkdtemp(tmpl), nullptr);
    dir_ = tmpl;
  }
  void TearDown() override { std::filesystem::remove_all(dir_); }
  std::string dir_;
};

TEST_F(InstanceLockTest, SecondHolderIsRefusedWithThePid) {
  auto first = InstanceLock::Acquire(dir_ + "/ctl.sock");
  ASSERT_TRUE(first.ok()) << first.status().ToString();
  auto second = InstanceLock::Acquire(dir_ + "/ctl.sock");
  ASSERT_FALSE(second.ok());
  EXPECT_EQ(second.status().code(), ErrorCode::kBusy);
  EXPECT_NE(second.status().message().find(std::to_string(getpid())), std::string::npos) << second.status().message();
}

TEST_F(InstanceLockTest, ReleasedWhenTheHolderGoes) {
  {
    auto first = InstanceLock::Acquire(dir_ + "/ctl.sock");
    ASSERT_TRUE(first.ok());
  }
  auto again = InstanceLock::Acquire(dir_ + "/ctl.sock");
  EXPECT_TRUE(again.ok()) << again.status().ToString();
}

TEST_F(InstanceLockTest, OtherSocketsAreIndependentAndMissingDirectoryIsCreated) {
  auto a = InstanceLock::Acquire(dir_ + "/a.sock");
  auto b = InstanceLock::Acquire(dir_ + "/sub/b.sock");
  EXPECT_TRUE(a.ok());
  EXPECT_TRUE(b.ok()) << b.status().ToString();
}

TEST_F(InstanceLockTest, UncreatableLockIsAnError) {
  auto r = InstanceLock::Acquire("/proc/cowtap-no/such/ctl.sock");
  EXPECT_FALSE(r.ok());
  EXPECT_NE(r.status().code(), ErrorCode::kBusy);
}

}  // namespace
}  // namespace cowtap::daemon
