// ImageBlockDevice's asynchronous Submit over a real qcow2 file: many reads
// and writes in flight from one thread (as a ring server submits them
// between Plug and Unplug), each completing exactly once; a flush submitted
// after completed writes makes them durable (the image reopens with them);
// discard and write-zeroes run off the submitting thread and still complete.
#include <gtest/gtest.h>
#include <stdlib.h>

#include <atomic>
#include <condition_variable>
#include <filesystem>
#include <mutex>
#include <thread>

#include "backend/block_device.h"
#include "cow/image.h"

namespace cowtap::backend {
namespace {

constexpr uint64_t kSize = 4 << 20;

// Counts completions per request and lets the test wait for all of them.
class Completions {
 public:
  explicit Completions(size_t n) : calls_(n), status_(n) {}
  BlockCompletion For(size_t i) {
    return [this, i](Status s) {
      std::lock_guard lock(mu_);
      ++calls_[i];
      status_[i] = std::move(s);
      ++total_;
      cv_.notify_all();
    };
  }
  void WaitFor(size_t n) {
    std::unique_lock lock(mu_);
    ASSERT_TRUE(cv_.wait_for(lock, std::chrono::seconds(30), [&] { return total_ >= n; })) << total_ << " of " << n;
  }
  int calls(size_t i) {
    std::lock_guard lock(mu_);
    return calls_[i];
  }
  Status status(size_t i) {
    std::lock_guard lock(mu_);
    return status_[i];
  }

 private:
  std::mutex mu_;
  std::condition_variable cv_;
  std::vector<int> calls_;
  std::vector<Status> status_;
  size_t total_ = 0;
};

class ImageDeviceAsyncTest : public ::testing::Test {
 protected:
  void SetUp() override {
    char tmpl[] = "/tmp/cowtap_devasync_XXXXXX";
    ASSERT_NE(mkdtemp(tmpl), nullptr);
    dir_ = tmpl;
    path_ = dir_ + "/disk.qcow2";
    cow::CreateOptions co;
    co.size_bytes = kSize;
    ASSERT_TRUE(cow::CreateImage(path_, co).ok());
  }
  void TearDown() override { std::filesystem::remove_all(dir_); }

  std::shared_ptr<cow::Image> Open() {
    auto r = cow::OpenImage(path_);
    EXPECT_TRUE(r.ok()) << r.status().ToString();
    return r.ok() ? std::shared_ptr<cow::Image>(std::move(r).value()) : nullptr;
  }

  std::string dir_, path_;
};

TEST_F(ImageDeviceAsyncTest, ManyInFlightWritesAndReadsCompleteOnceWithTheirData) {
  auto image = Open();
  auto dev = NewImageBlockDevice(image);
  constexpr size_t kN = 64;
  std::vector<std::vector<uint8_t>> bufs(kN);
  std::vector<iovec> iovs(kN);
  Completions writes(kN);
  dev->Plug();
  for (size_t i = 0; i < kN; ++i) {
    bufs[i].assign(8192, static_cast<uint8_t>(i + 1));
    iovs[i] = MakeIoVec(bufs[i].data(), bufs[i].size());
    // Two requests per 64 KiB cluster: allocations race with in-place writes.
    const uint64_t off = (i / 2) * 65536 + (i % 2) * 16384;
    dev->Submit({.kind = BlockIoKind::kWrite,
                 .offset_bytes = off,
                 .length_bytes = 8192,
                 .iov = {&iovs[i], 1},
                 .flush_after = (i % 16 == 15)},
                writes.For(i));
  }
  dev->Unplug();
  writes.WaitFor(kN);
  for (size_t i = 0; i < kN; ++i) {
    EXPECT_EQ(writes.calls(i), 1) << i;
    EXPECT_TRUE(writes.status(i).ok()) << i << ": " << writes.status(i).ToString();
  }
  Completions flush(1);
  dev->Submit({.kind = BlockIoKind::kFlush}, flush.For(0));
  flush.WaitFor(1);
  EXPECT_TRUE(flush.status(0).ok());

  std::vector<std::vector<uint8_t>> back(kN, std::vector<uint8_t>(8192));
  std::vector<iovec> riovs(kN);
  Completions reads(kN);
  dev->Plug();
  for (size_t i = 0; i < kN; ++i) {
    riovs[i] = MakeIoVec(back[i].data(), back[i].size());
    const uint64_t off = (i / 2) * 65536 + (i % 2) * 16384;
    dev->Submit({.kind = BlockIoKind::kRead, .offset_bytes = off, .length_bytes = 8192, .iov = {&riovs[i], 1}},
                reads.For(i));
  }
  dev->Unplug();
  reads.WaitFor(kN);
  for (size_t i = 0; i < kN; ++i) {
    EXPECT_EQ(reads.calls(i), 1) << i;
    EXPECT_EQ(back[i], bufs[i]) << i;
  }
  EXPECT_GT(image->io_stats().fast_reads, 0u);

  // Durable: a fresh open sees every write.
  dev.reset();
  ASSERT_TRUE(image->Close().ok());
  image.reset();
  auto again = Open();
  for (size_t i = 0; i < kN; ++i) {
    std::vector<uint8_t> b(8192);
    iovec v = MakeIoVec(b.data(), b.size());
    ASSERT_TRUE(again->Read((i / 2) * 65536 + (i % 2) * 16384, {&v, 1}).ok());
    EXPECT_EQ(b, bufs[i]) << i;
  }
}

TEST_F(ImageDeviceAsyncTest, DiscardAndWriteZeroesRunOffTheSubmittingThread) {
  auto image = Open();
  auto dev = NewImageBlockDevice(image);
  std::vector<uint8_t> data(131072, 0x42);
  iovec v = MakeIoVec(data.data(), data.size());
  ASSERT_TRUE(dev->Write(0, {&v, 1}).ok());
  const auto submitter = std::this_thread::get_id();
  std::atomic<bool> other_thread{true};
  Completions done(2);
  auto check_thread = [&](BlockCompletion inner) {
    return [&, inner](Status s) {
      if (std::this_thread::get_id() == submitter) other_thread = false;
      inner(std::move(s));
    };
  };
  dev->Submit({.kind = BlockIoKind::kDiscard, .offset_bytes = 0, .length_bytes = 65536}, check_thread(done.For(0)));
  dev->Submit({.kind = BlockIoKind::kWriteZeroes, .offset_bytes = 65536, .length_bytes = 4096},
              check_thread(done.For(1)));
  done.WaitFor(2);
  EXPECT_TRUE(other_thread.load());
  EXPECT_TRUE(done.status(0).ok()) << done.status(0).ToString();
  EXPECT_TRUE(done.status(1).ok()) << done.status(1).ToString();
  std::vector<uint8_t> back(131072);
  iovec r = MakeIoVec(back.data(), back.size());
  ASSERT_TRUE(dev->Read(0, {&r, 1}).ok());
  EXPECT_EQ(back[0], 0);
  EXPECT_EQ(back[65535], 0);
  EXPECT_EQ(back[65536], 0);
  EXPECT_EQ(back[65536 + 4095], 0);
  EXPECT_EQ(back[65536 + 4096], 0x42);
}

}  // namespace
}  // namespace cowtap::backend
