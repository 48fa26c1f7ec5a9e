#include "dm/offload_miss_device.h"

#include <gtest/gtest.h>

#include <cstring>
#include <mutex>
#include <vector>

namespace cowtap::dm {
namespace {

// A device over memory that records which methods were called.
class RecordingDevice final : public backend::BlockDevice {
 public:
  explicit RecordingDevice(uint64_t size) : data(size, 0xAB) {}
  uint64_t size_bytes() const override { return data.size(); }
  bool read_only() const override { return false; }
  bool supports_discard() const override { return true; }
  Status Read(uint64_t offset, IoVecs iov) override {
    for (const iovec& v : iov) {
      std::memcpy(v.iov_base, data.data() + offset, v.iov_len);
      offset += v.iov_len;
    }
    return Status::Ok();
  }
  Status Write(uint64_t offset, IoVecs iov) override {
    ++writes;
    for (const iovec& v : iov) {
      std::memcpy(data.data() + offset, v.iov_base, v.iov_len);
      offset += v.iov_len;
    }
    return Status::Ok();
  }
  Status Flush() override { return Status::Ok(); }
  Status Discard(uint64_t, uint64_t, bool) override {
    ++discards;
    return Status::Ok();
  }
  Status WriteZeroes(uint64_t, uint64_t) override {
    ++write_zeroes;
    return Status::Ok();
  }
  std::vector<uint8_t> data;
  int writes = 0, discards = 0, write_zeroes = 0;
};

TEST(OffloadMissDeviceTest, OffersNoDiscardAndRefusesOneThatComesAnyway) {
  auto inner = std::make_shared<RecordingDevice>(1 << 20);
  auto dev = NewOffloadMissDevice(inner);
  EXPECT_FALSE(dev->supports_discard());
  Status s = dev->Discard(0, 65536, false);
  EXPECT_EQ(s.code(), ErrorCode::kNotSupported);
  EXPECT_NE(s.message().find("offloaded"), std::string::npos) << s.ToString();
  EXPECT_EQ(inner->discards, 0);
}

TEST(OffloadMissDeviceTest, WriteZeroesBecomesPlainWritesNeverAMetadataZero) {
  const uint64_t size = 3 << 20;
  auto inner = std::make_shared<RecordingDevice>(size);
  auto dev = NewOffloadMissDevice(inner);
  ASSERT_TRUE(dev->WriteZeroes(4096, (2 << 20) + 512).ok());
  EXPECT_EQ(inner->write_zeroes, 0);
  EXPECT_EQ(inner->writes, 3);  // 1 MiB pieces
  for (uint64_t i = 0; i < size; ++i) {
    const bool zeroed = i >= 4096 && i < 4096 + (2 << 20) + 512;
    ASSERT_EQ(inner->data[i], zeroed ? 0 : 0xAB) << "at " << i;
  }
}

TEST(OffloadMissDeviceTest, SubmittedDiscardAndWriteZeroesTakeTheSamePath) {
  auto inner = std::make_shared<RecordingDevice>(1 << 20);
  auto dev = NewOffloadMissDevice(inner);
  Status discard, zero;
  backend::BlockIo io;
  io.length_bytes = 4096;
  io.kind = backend::BlockIoKind::kDiscard;
  dev->Submit(io, [&](Status s) { discard = s; });
  io.kind = backend::BlockIoKind::kWriteZeroes;
  dev->Submit(io, [&](Status s) { zero = s; });
  EXPECT_EQ(discard.code(), ErrorCode::kNotSupported);
  EXPECT_TRUE(zero.ok()) << zero.ToString();
  EXPECT_EQ(inner->discards + inner->write_zeroes, 0);
  EXPECT_EQ(inner->data[0], 0);
}

}  // namespace
}  // namespace cowtap::dm
