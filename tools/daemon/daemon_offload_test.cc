// Daemon::OffloadOn / OffloadOff / OffloadStatus over a fake OffloadProvider
// (the kernel one is tools/offload/, checked in the VM): the daemon's table
// of offloads, its refusals, and that it opens, locks and closes the image.
#include <gtest/gtest.h>
#include <spdlog/spdlog.h>
#include <stdlib.h>
#include <unistd.h>

#include <atomic>
#include <mutex>

#include "cow/image.h"
#include "tools/daemon/daemon.h"

namespace cowtap::daemon {
namespace {

struct FakeState {
  std::mutex mu;
  int started = 0, stopped = 0;
  std::string last_name, last_file;
  Status fail_with;
};

class FakeOffload final : public ImageOffload {
 public:
  FakeOffload(std::shared_ptr<FakeState> state, std::string name, uint64_t size)
      : state_(std::move(state)), name_(std::move(name)), size_(size) {}
  ~FakeOffload() override { Stop().IgnoreError(); }
  OffloadSnapshot Snapshot() const override {
    OffloadSnapshot s;
    s.device = "/dev/mapper/" + name_;
    s.size_sectors = size_ / 512;
    s.segments = 1;
    return s;
  }
  Status Stop() override {
    if (stopped_.exchange(true)) return Status::Ok();
    std::lock_guard lock(state_->mu);
    ++state_->stopped;
    return Status::Ok();
  }

 private:
  std::shared_ptr<FakeState> state_;
  std::string name_;
  uint64_t size_;
  std::atomic<bool> stopped_{false};
};

class FakeProvider final : public OffloadProvider {
 public:
  explicit FakeProvider(std::shared_ptr<FakeState> state) : state_(std::move(state)) {}
  Result<std::unique_ptr<ImageOffload>> Start(std::shared_ptr<cow::Image> image, const std::string& image_file,
                                              const std::string& dm_name) override {
    std::lock_guard lock(state_->mu);
    if (!state_->fail_with.ok()) return state_->fail_with;
    ++state_->started;
    state_->last_name = dm_name;
    state_->last_file = image_file;
    return std::unique_ptr<ImageOffload>(new FakeOffload(state_, dm_name, image->size_bytes()));
  }

 private:
  std::shared_ptr<FakeState> state_;
};

class DaemonOffloadTest : public ::testing::Test {
 protected:
  void SetUp() override {
    spdlog::set_level(spdlog::level::warn);
    char tmpl[] = "/tmp/cowtapd-offload-XXXXXX";
    ASSERT_NE(::mkdtemp(tmpl), nullptr);
    dir_ = tmpl;
    image_ = dir_ + "/vm disk.qcow2";
    cow::CreateOptions c;
    c.size_bytes = 8 << 20;
    ASSERT_TRUE(cow::CreateImage(image_, c).ok());
  }
  void TearDown() override {
    daemon_.reset();
    EXPECT_EQ(std::system(("rm -rf '" + dir_ + "'").c_str()), 0);
  }
  void StartDaemon(bool with_provider) {
    DaemonOptions o;
    o.platform = "sim";
    o.sim_socket = dir_ + "/sim.sock";
    if (with_provider) o.offload = std::make_shared<FakeProvider>(state_);
    auto d = Daemon::Start(o);
    ASSERT_TRUE(d.ok()) << d.status().ToString();
    daemon_ = std::move(d).value();
  }

  std::shared_ptr<FakeState> state_ = std::make_shared<FakeState>();
  std::string dir_, image_;
  std::unique_ptr<Daemon> daemon_;
};

TEST_F(DaemonOffloadTest, OnStatusOff) {
  StartDaemon(true);
  auto on = daemon_->OffloadOn(image_);
  ASSERT_TRUE(on.ok()) << on.status().ToString();
  EXPECT_EQ(on->image, image_);
  EXPECT_EQ(on->device, "/dev/mapper/cowtap-vm_disk");
  EXPECT_EQ(on->size_sectors, (8u << 20) / 512);
  EXPECT_EQ(state_->last_file, image_) << "the canonical path of the top layer";

  auto all = daemon_->OffloadStatus("");
  ASSERT_TRUE(all.ok());
  ASSERT_EQ(all->size(), 1u);
  EXPECT_EQ((*all)[0].image, image_);
  auto one = daemon_->OffloadStatus(dir_ + "/./vm disk.qcow2");
  ASSERT_TRUE(one.ok()) << "found by its canonical path too";
  EXPECT_EQ(one->size(), 1u);

  ASSERT_TRUE(daemon_->OffloadOff(image_).ok());
  EXPECT_EQ(state_->stopped, 1);
  auto none = daemon_->OffloadStatus("");
  ASSERT_TRUE(none.ok());
  EXPECT_TRUE(none->empty());
  EXPECT_EQ(daemon_->OffloadStatus(image_).status().code(), ErrorCode::kNotFound);
  EXPECT_EQ(daemon_->OffloadOff(image_).code(), ErrorCode::kNotFound);
}

TEST_F(DaemonOffloadTest, TheImageIsHeldOpenAndLockedWhileOffloadedAndReleasedAfter) {
  StartDaemon(true);
  ASSERT_TRUE(daemon_->OffloadOn(image_).ok());
  auto exported = daemon_->Export(image_, "unix:" + dir_ + "/nbd.sock", /*read_only=*/false);
  EXPECT_FALSE(exported.ok()) << "a second read-write open of an offloaded image must be refused";
  ASSERT_TRUE(daemon_->OffloadOff(image_).ok());
  exported = daemon_->Export(image_, "unix:" + dir_ + "/nbd.sock", /*read_only=*/false);
  ASSERT_TRUE(exported.ok()) << exported.status().ToString();
  EXPECT_TRUE(daemon_->Unexport(*exported).ok());
}

TEST_F(DaemonOffloadTest, ASecondOnOfTheSameImageIsBusy) {
  StartDaemon(true);
  ASSERT_TRUE(daemon_->OffloadOn(image_).ok());
  auto again = daemon_->OffloadOn(dir_ + "//vm disk.qcow2");
  EXPECT_EQ(again.status().code(), ErrorCode::kBusy);
  EXPECT_NE(again.status().message().find("/dev/mapper/cowtap-vm_disk"), std::string::npos);
  EXPECT_EQ(state_->started, 1);
}

TEST_F(DaemonOffloadTest, ImagesWithTheSameNameGetDistinctDevices) {
  StartDaemon(true);
  ASSERT_EQ(::mkdir((dir_ + "/b").c_str(), 0700), 0);
  const std::string other = dir_ + "/b/vm disk.qcow2";
  cow::CreateOptions c;
  c.size_bytes = 1 << 20;
  ASSERT_TRUE(cow::CreateImage(other, c).ok());
  ASSERT_TRUE(daemon_->OffloadOn(image_).ok());
  auto second = daemon_->OffloadOn(other);
  ASSERT_TRUE(second.ok()) << second.status().ToString();
  EXPECT_EQ(second->device, "/dev/mapper/cowtap-vm_disk-2");
}

TEST_F(DaemonOffloadTest, AVbdIdIsRefusedWithWhy) {
  StartDaemon(true);
  auto r = daemon_->OffloadOn("5/51712");
  EXPECT_EQ(r.status().code(), ErrorCode::kInvalidArgument);
  EXPECT_NE(r.status().message().find("phy:/dev/mapper/"), std::string::npos) << r.status().ToString();
}

TEST_F(DaemonOffloadTest, AMissingImageIsNotFound) {
  StartDaemon(true);
  auto r = daemon_->OffloadOn(dir_ + "/nope.qcow2");
  EXPECT_EQ(r.status().code(), ErrorCode::kNotFound);
  EXPECT_NE(r.status().message().find("nope.qcow2"), std::string::npos);
}

TEST_F(DaemonOffloadTest, WithoutAProviderOnIsNotSupported) {
  StartDaemon(false);
  auto r = daemon_->OffloadOn(image_);
  EXPECT_EQ(r.status().code(), ErrorCode::kNotSupported);
}

TEST_F(DaemonOffloadTest, AProviderFailureIsReportedAndTheImageIsClosed) {
  StartDaemon(true);
  state_->fail_with = Status::NotSupported("kernel offload needs nbd (modprobe nbd)");
  auto r = daemon_->OffloadOn(image_);
  EXPECT_EQ(r.status().code(), ErrorCode::kNotSupported);
  EXPECT_NE(r.status().message().find("modprobe nbd"), std::string::npos);
  EXPECT_NE(r.status().message().find(image_), std::string::npos) << r.status().ToString();
  state_->fail_with = Status::Ok();
  EXPECT_TRUE(daemon_->OffloadOn(image_).ok()) << "the failed attempt released the image's lock";
}

TEST_F(DaemonOffloadTest, ShutdownTurnsEveryOffloadOff) {
  StartDaemon(true);
  ASSERT_TRUE(daemon_->OffloadOn(image_).ok());
  daemon_->Shutdown();
  EXPECT_EQ(state_->stopped, 1);
}

}  // namespace
}  // namespace cowtap::daemon
