#include "backend/block_device.h"

#include <gtest/gtest.h>

#include <cstring>

#include "backend/mem_block_device.h"
#include "cow/image.h"

namespace cowtap::backend {
namespace {

class ImageBlockDeviceTest : public ::testing::Test {
 protected:
  void SetUp() override {
    fs_ = cow::NewMemFileSystem();
    cow::CreateOptions create;
    create.format = cow::ImageFormat::kRaw;
    create.size_bytes = 1 << 20;
    create.fs = fs_.get();
    ASSERT_TRUE(cow::CreateImage("disk.raw", create).ok());
  }
  std::shared_ptr<cow::Image> Open(bool read_only = false) {
    cow::OpenOptions open;
    open.fs = fs_.get();
    open.read_only = read_only;
    open.format = cow::ImageFormat::kRaw;
    auto image = cow::OpenImage("disk.raw", open);
    EXPECT_TRUE(image.ok()) << image.status().ToString();
    return image.ok() ? std::shared_ptr<cow::Image>(std::move(image).value()) : nullptr;
  }
  std::unique_ptr<cow::FileSystem> fs_;
};

TEST_F(ImageBlockDeviceTest, ReadsBackWhatItWrites) {
  auto dev = NewImageBlockDevice(Open());
  EXPECT_EQ(dev->size_bytes(), 1u << 20);
  EXPECT_FALSE(dev->read_only());
  EXPECT_EQ(dev->logical_sector_size(), 512u);
  EXPECT_EQ(dev->physical_sector_size(), 4096u);
  std::vector<uint8_t> a(4096, 0xab), b(512, 0xcd), in(4608);
  iovec out_iov[] = {MakeIoVec(a.data(), a.size()), MakeIoVec(b.data(), b.size())};
  ASSERT_TRUE(dev->Write(8192, out_iov).ok());
  ASSERT_TRUE(dev->Flush().ok());
  iovec in_iov[] = {MakeIoVec(in.data(), in.size())};
  ASSERT_TRUE(dev->Read(8192, in_iov).ok());
  EXPECT_EQ(in[0], 0xab);
  EXPECT_EQ(in[4095], 0xab);
  EXPECT_EQ(in[4096], 0xcd);
}

TEST_F(ImageBlockDeviceTest, RefusesRangesPastTheEnd) {
  auto dev = NewImageBlockDevice(Open());
  std::vector<uint8_t> buf(4096);
  iovec iov[] = {MakeIoVec(buf.data(), buf.size())};
  EXPECT_EQ(dev->Read((1 << 20) - 512, iov).code(), ErrorCode::kOutOfRange);
  EXPECT_EQ(dev->Write(UINT64_MAX - 100, iov).code(), ErrorCode::kOutOfRange);
  EXPECT_EQ(dev->Discard(1 << 20, 1, false).code(), ErrorCode::kOutOfRange);
  EXPECT_EQ(dev->WriteZeroes(0, (1 << 20) + 1).code(), ErrorCode::kOutOfRange);
}

TEST_F(ImageBlockDeviceTest, ReadOnlyOptionRefusesWritesAndDiscard) {
  auto dev = NewImageBlockDevice(Open(), {.read_only = true});
  EXPECT_TRUE(dev->read_only());
  EXPECT_FALSE(dev->supports_discard());
  std::vector<uint8_t> buf(512);
  iovec iov[] = {MakeIoVec(buf.data(), buf.size())};
  EXPECT_EQ(dev->Write(0, iov).code(), ErrorCode::kReadOnly);
  EXPECT_EQ(dev->Discard(0, 512, false).code(), ErrorCode::kReadOnly);
  EXPECT_TRUE(dev->Read(0, iov).ok());
  EXPECT_TRUE(dev->Flush().ok());
}

TEST_F(ImageBlockDeviceTest, ReadOnlyImageIsReadOnlyDevice) {
  auto dev = NewImageBlockDevice(Open(/*read_only=*/true));
  EXPECT_TRUE(dev->read_only());
}

TEST_F(ImageBlockDeviceTest, DiscardReadsAsZerosAndSecureIsUnsupported) {
  auto dev = NewImageBlockDevice(Open());
  EXPECT_TRUE(dev->supports_discard());
  EXPECT_FALSE(dev->supports_secure_discard());
  std::vector<uint8_t> buf(8192, 0x5a);
  iovec iov[] = {MakeIoVec(buf.data(), buf.size())};
  ASSERT_TRUE(dev->Write(0, iov).ok());
  ASSERT_TRUE(dev->Discard(0, 8192, false).ok());
  ASSERT_TRUE(dev->Read(0, iov).ok());
  EXPECT_EQ(buf[0], 0);
  EXPECT_EQ(buf[8191], 0);
  EXPECT_EQ(dev->Discard(0, 4096, true).code(), ErrorCode::kNotSupported);
}

TEST_F(ImageBlockDeviceTest, DiscardDisabledByOption) {
  auto dev = NewImageBlockDevice(Open(), {.discard = false});
  EXPECT_FALSE(dev->supports_discard());
  EXPECT_EQ(dev->Discard(0, 4096, false).code(), ErrorCode::kNotSupported);
}

TEST_F(ImageBlockDeviceTest, SubmitCompletesExactlyOnce) {
  auto dev = NewImageBlockDevice(Open());
  std::vector<uint8_t> buf(4096, 1);
  iovec iov[] = {MakeIoVec(buf.data(), buf.size())};
  int calls = 0;
  Status got;
  dev->Submit({.kind = BlockIoKind::kWrite, .offset_bytes = 0, .length_bytes = 4096, .iov = iov, .flush_after = true},
              [&](Status s) {
                ++calls;
                got = s;
              });
  EXPECT_EQ(calls, 1);
  EXPECT_TRUE(got.ok());
  dev->Submit({.kind = BlockIoKind::kRead, .offset_bytes = 1 << 20, .length_bytes = 4096, .iov = iov}, [&](Status s) {
    ++calls;
    got = s;
  });
  EXPECT_EQ(calls, 2);
  EXPECT_EQ(got.code(), ErrorCode::kOutOfRange);
}

TEST(MemBlockDeviceTest, SubmitWithFlushAfterWritesThenFlushes) {
  MemBlockDevice dev({.size_bytes = 1 << 16});
  std::vector<uint8_t> buf(512, 9);
  iovec iov[] = {MakeIoVec(buf.data(), buf.size())};
  dev.Submit({.kind = BlockIoKind::kWrite, .offset_bytes = 512, .length_bytes = 512, .iov = iov, .flush_after = true},
             [](Status s) { EXPECT_TRUE(s.ok()); });
  auto log = dev.log();
  ASSERT_EQ(log.size(), 2u);
  EXPECT_EQ(log[0].kind, BlockIoKind::kWrite);
  EXPECT_EQ(log[1].kind, BlockIoKind::kFlush);
  EXPECT_EQ(dev.DurableContents()[512], 9);
}

TEST(MemBlockDeviceTest, WritesAreNotDurableUntilFlush) {
  MemBlockDevice dev({.size_bytes = 1 << 16});
  std::vector<uint8_t> buf(512, 7);
  iovec iov[] = {MakeIoVec(buf.data(), buf.size())};
  ASSERT_TRUE(dev.Write(0, iov).ok());
  EXPECT_EQ(dev.Contents()[0], 7);
  EXPECT_EQ(dev.DurableContents()[0], 0);
  ASSERT_TRUE(dev.Flush().ok());
  EXPECT_EQ(dev.DurableContents()[0], 7);
}

TEST(MemBlockDeviceTest, DeferredCompletionsRunWhenAsked) {
  MemBlockDevice dev({.size_bytes = 1 << 16, .defer_completions = true});
  int done = 0;
  BlockIo flush;
  flush.kind = BlockIoKind::kFlush;
  dev.Submit(flush, [&](Status) { ++done; });
  dev.Submit(flush, [&](Status) { ++done; });
  EXPECT_EQ(done, 0);
  EXPECT_EQ(dev.PendingCount(), 2u);
  EXPECT_EQ(dev.CompletePending(1), 1u);
  EXPECT_EQ(done, 1);
  EXPECT_EQ(dev.CompletePending(), 1u);
  EXPECT_EQ(done, 2);
}

TEST(MemBlockDeviceTest, InjectedFailureHitsOnce) {
  MemBlockDevice dev({.size_bytes = 1 << 16});
  dev.FailNext(BlockIoKind::kFlush, Status::IoError("boom"));
  EXPECT_EQ(dev.Flush().code(), ErrorCode::kIoError);
  EXPECT_TRUE(dev.Flush().ok());
}

}  // namespace
}  // namespace cowtap::backend
