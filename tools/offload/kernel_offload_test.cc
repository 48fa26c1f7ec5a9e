// KernelOffloadProvider where it can run here: the kernel check and its
// message, a refused Start leaving the image untouched, and the block-device
// I/O counters. The offload itself (dm, loop, nbd in a real kernel, driven
// through cowtapd's `ctl offload`) is checked in the VM: tests/vm/run.sh.
#include "tools/offload/kernel_offload.h"

#include <fcntl.h>
#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <stdlib.h>
#include <sys/uio.h>
#include <unistd.h>

#include <cstdio>
#include <filesystem>

#include "cow/image.h"
#include "dm/loop_device.h"
#include "dm/nbd_device.h"

namespace cowtap::offload {
namespace {

bool KernelReady() {
  return access("/dev/mapper/control", R_OK | W_OK) == 0 && dm::LoopAvailable() && dm::NbdAvailable();
}

class KernelOffloadTest : public ::testing::Test {
 protected:
  void SetUp() override {
    char tmpl[] = "/tmp/cowtap-koffload-XXXXXX";
    ASSERT_NE(::mkdtemp(tmpl), nullptr);
    dir_ = tmpl;
  }
  void TearDown() override { std::filesystem::remove_all(dir_); }
  std::string dir_;
};

TEST_F(KernelOffloadTest, CheckNamesEveryMissingPieceAndWhatToLoad) {
  if (KernelReady()) GTEST_SKIP() << "this kernel has device-mapper, loop and nbd: nothing is missing to name";
  Status s = CheckOffloadKernel();
  ASSERT_EQ(s.code(), ErrorCode::kNotSupported);
  if (access("/dev/mapper/control", F_OK) != 0) {
    EXPECT_THAT(s.message(), ::testing::HasSubstr("modprobe dm_mod"));
  }
  if (!dm::NbdAvailable()) {
    EXPECT_THAT(s.message(), ::testing::HasSubstr("modprobe nbd"));
  }
  if (!dm::LoopAvailable()) {
    EXPECT_THAT(s.message(), ::testing::HasSubstr("modprobe loop"));
  }
  EXPECT_THAT(s.message(), ::testing::HasSubstr("without offload"));
}

TEST_F(KernelOffloadTest, StartWithoutTheKernelPiecesIsRefusedAndTheImageStaysUsable) {
  if (KernelReady()) GTEST_SKIP() << "this kernel can offload (the VM test covers Start there)";
  const std::string path = dir_ + "/disk.qcow2";
  cow::CreateOptions c;
  c.size_bytes = 4 << 20;
  ASSERT_TRUE(cow::CreateImage(path, c).ok());
  auto image = cow::OpenImage(path, {});
  ASSERT_TRUE(image.ok()) << image.status().ToString();
  std::shared_ptr<cow::Image> img = std::move(image).value();
  KernelOffloadOptions options;
  options.socket_dir = dir_ + "/run";
  KernelOffloadProvider provider(options);
  auto started = provider.Start(img, path, "cowtap-disk");
  ASSERT_FALSE(started.ok());
  EXPECT_EQ(started.status().code(), ErrorCode::kNotSupported) << started.status().ToString();
  EXPECT_FALSE(std::filesystem::exists(dir_ + "/run/cowtap-disk.nbd")) << "nothing was set up";
  std::vector<uint8_t> data(4096, 0x5a), back(4096);
  const iovec w{data.data(), data.size()}, r{back.data(), back.size()};
  ASSERT_TRUE(img->Write(0, {&w, 1}).ok());
  ASSERT_TRUE(img->Read(0, {&r, 1}).ok());
  EXPECT_EQ(back, data);
  EXPECT_TRUE(img->Close().ok());
}

TEST_F(KernelOffloadTest, BlockDeviceIoSaysWhatIsNotABlockDevice) {
  auto r = ReadBlockDeviceIo(dir_);
  ASSERT_FALSE(r.ok());
  EXPECT_THAT(r.status().message(), ::testing::HasSubstr("not a block device"));
  auto gone = ReadBlockDeviceIo(dir_ + "/no-such-device");
  ASSERT_FALSE(gone.ok());
  EXPECT_THAT(gone.status().ToString(), ::testing::HasSubstr("no-such-device"));
}

TEST_F(KernelOffloadTest, BlockDeviceIoCountsWhatALoopDeviceServed) {
  if (!dm::LoopAvailable()) GTEST_SKIP() << "no usable /dev/loop-control (needs the loop module and root)";
  const std::string file = dir_ + "/raw";
  {
    std::vector<char> zeros(1 << 20, 0);
    FILE* f = std::fopen(file.c_str(), "w");
    ASSERT_NE(f, nullptr);
    ASSERT_EQ(std::fwrite(zeros.data(), 1, zeros.size(), f), zeros.size());
    std::fclose(f);
  }
  auto loop = dm::LoopDevice::Attach(file, {.direct_io = false});
  if (!loop.ok() && loop.status().code() == ErrorCode::kNotSupported) GTEST_SKIP() << loop.status().ToString();
  ASSERT_TRUE(loop.ok()) << loop.status().ToString();
  auto before = ReadBlockDeviceIo((*loop)->path());
  ASSERT_TRUE(before.ok()) << before.status().ToString();
  const int fd = ::open((*loop)->path().c_str(), O_RDONLY | O_DIRECT);
  ASSERT_GE(fd, 0);
  void* buf = nullptr;
  ASSERT_EQ(posix_memalign(&buf, 4096, 64 << 10), 0);
  EXPECT_EQ(::pread(fd, buf, 64 << 10, 0), 64 << 10);
  ::close(fd);
  std::free(buf);
  auto after = ReadBlockDeviceIo((*loop)->path());
  ASSERT_TRUE(after.ok()) << after.status().ToString();
  EXPECT_GE(after->sectors_read - before->sectors_read, 128u) << "64 KiB read is 128 sectors";
  EXPECT_TRUE((*loop)->Detach().ok());
}

}  // namespace
}  // namespace cowtap::offload
