// Qcow2Image asynchronous I/O on in-memory files: the remap-cache fast path
// (proved by the counters), allocations in flight (one allocation per
// cluster however many writes race for it), frees deferred until fast-path
// I/O to the cluster drained, and clusters given back when a data write
// fails. Real files, threads and qemu-img are in qcow2_concurrency_test.cc.
#include <gtest/gtest.h>

#include <atomic>
#include <barrier>
#include <deque>
#include <functional>
#include <thread>

#include "cow/check.h"
#include "cow/image.h"
#include "cow/qcow2_image.h"

namespace cowtap::cow {
namespace {

// A File decorator whose asynchronous writes can be held back (queued until
// Release) or made to fail, so that tests decide when "async" I/O completes.
class HoldingFile final : public File {
 public:
  explicit HoldingFile(std::unique_ptr<File> inner) : inner_(std::move(inner)) {}

  void set_hold(bool hold) { hold_ = hold; }
  void fail_next_async_write() { fail_next_ = true; }
  size_t held() {
    std::lock_guard lock(mu_);
    return held_.size();
  }
  // Completes held writes (in submission order) until none is left; several
  // threads may release at once.
  void Release() {
    while (true) {
      std::function<void()> op;
      {
        std::lock_guard lock(mu_);
        if (held_.empty()) return;
        op = std::move(held_.front());
        held_.pop_front();
      }
      op();
    }
  }

  Status ReadAt(uint64_t offset, std::span<uint8_t> buf) override { return inner_->ReadAt(offset, buf); }
  Status WriteAt(uint64_t offset, std::span<const uint8_t> data) override { return inner_->WriteAt(offset, data); }
  Status Flush() override { return inner_->Flush(); }
  void SubmitWritev(uint64_t offset, IoVecs iov, FileCompletion done) override {
    if (fail_next_.exchange(false)) return done(Status::IoError("injected async write failure"));
    if (!hold_) return done(WritevAt(offset, iov));
    std::lock_guard lock(mu_);
    held_.push_back([this, offset, iov, done] { done(WritevAt(offset, iov)); });
  }
  Result<uint64_t> Size() override { return inner_->Size(); }
  Status Truncate(uint64_t size_bytes) override { return inner_->Truncate(size_bytes); }
  Status Allocate(uint64_t offset, uint64_t length, bool keep_size) override {
    return inner_->Allocate(offset, length, keep_size);
  }
  Status PunchHole(uint64_t offset, uint64_t length) override { return inner_->PunchHole(offset, length); }
  const std::string& path() const override { return inner_->path(); }

 private:
  std::unique_ptr<File> inner_;
  std::atomic<bool> hold_{false};
  std::atomic<bool> fail_next_{false};
  std::mutex mu_;
  std::deque<std::function<void()>> held_;
};

TEST(Qcow2EpochGateTest, FlipWaitsForOlderReadersOnly) {
  Qcow2EpochGate gate;
  const int a = gate.Enter();
  const int old = gate.Flip();
  EXPECT_EQ(a, old);
  EXPECT_FALSE(gate.Drained(old));
  const int b = gate.Enter();  // entered after the flip: not waited for
  EXPECT_NE(b, old);
  gate.Exit(a);
  EXPECT_TRUE(gate.Drained(old));
  EXPECT_FALSE(gate.Drained(b));
  gate.Exit(b);
  EXPECT_TRUE(gate.Drained(b));
}

constexpr uint64_t kCluster = 65536;

class Qcow2AsyncTest : public ::testing::Test {
 protected:
  void SetUp() override {
    fs_ = NewMemFileSystem();
    CreateOptions co;
    co.size_bytes = 4 << 20;
    co.cluster_size = kCluster;
    co.fs = fs_.get();
    ASSERT_TRUE(CreateImage("a.qcow2", co).ok());
    auto f = fs_->Open("a.qcow2", FileOpenOptions{.writable = true});
    ASSERT_TRUE(f.ok());
    auto holding = std::make_unique<HoldingFile>(std::move(f).value());
    file_ = holding.get();
    OpenOptions oo;
    oo.fs = fs_.get();
    auto img = Qcow2Image::Open(std::move(holding), "a.qcow2", oo, nullptr);
    ASSERT_TRUE(img.ok()) << img.status().ToString();
    img_ = std::move(img).value();
  }

  Status Write(uint64_t off, uint64_t len, uint8_t fill) {
    std::vector<uint8_t> b(len, fill);
    iovec v = MakeIoVec(b.data(), b.size());
    return img_->Write(off, {&v, 1});
  }
  std::vector<uint8_t> Read(uint64_t off, uint64_t len) {
    std::vector<uint8_t> b(len, 0xee);
    iovec v = MakeIoVec(b.data(), b.size());
    Status s = WaitForCompletion([&](ImageCompletion done) { img_->SubmitRead(off, {&v, 1}, std::move(done)); });
    EXPECT_TRUE(s.ok()) << s.ToString();
    return b;
  }
  uint64_t HostOf(uint64_t vcluster) {
    auto m = img_->Map(vcluster * kCluster, kCluster);
    EXPECT_TRUE(m.ok());
    return m.ok() && !m->empty() && (*m)[0].host_offset ? *(*m)[0].host_offset : 0;
  }
  uint64_t Refcount(uint64_t host) {
    auto r = img_->refcounts()->Get(host / kCluster);
    EXPECT_TRUE(r.ok());
    return r.ok() ? *r : ~0ull;
  }

  std::unique_ptr<FileSystem> fs_;
  HoldingFile* file_ = nullptr;
  std::unique_ptr<Qcow2Image> img_;
};

TEST_F(Qcow2AsyncTest, SecondWriteAndReadsOfAClusterTakeTheFastPath) {
  ASSERT_TRUE(Write(0, kCluster, 0x11).ok());
  ImageIoStats s = img_->io_stats();
  EXPECT_EQ(s.slow_writes, 1u);
  EXPECT_EQ(s.fast_writes, 0u);
  EXPECT_EQ(s.allocations, 1u);
  EXPECT_EQ(s.links, 1u);
  ASSERT_TRUE(Write(4096, 4096, 0x22).ok());
  ASSERT_TRUE(Write(8192, 8192, 0x33).ok());
  s = img_->io_stats();
  EXPECT_EQ(s.fast_writes, 2u);
  EXPECT_EQ(s.slow_writes, 1u);
  EXPECT_EQ(s.allocations, 1u);
  auto b = Read(0, 16384);
  EXPECT_EQ(b[0], 0x11);
  EXPECT_EQ(b[4096], 0x22);
  EXPECT_EQ(b[12000], 0x33);
  EXPECT_EQ(img_->io_stats().fast_reads, 1u);
  // An unallocated cluster: resolved once, then served from the cache.
  EXPECT_EQ(Read(kCluster * 3, 512)[0], 0);
  EXPECT_EQ(img_->io_stats().slow_reads, 1u);
  EXPECT_EQ(Read(kCluster * 3, 512)[0], 0);
  EXPECT_EQ(img_->io_stats().fast_reads, 2u);
  // A read spanning a cached and an uncached cluster goes the slow way.
  Read(kCluster - 512, 1024);
  EXPECT_EQ(img_->io_stats().slow_reads, 2u);
}

TEST_F(Qcow2AsyncTest, WritesToAClusterWhoseAllocationIsInFlightWaitAndAllocateOnce) {
  file_->set_hold(true);
  constexpr int kWriters = 16;
  std::vector<std::vector<uint8_t>> bufs(kWriters);
  std::vector<iovec> iovs(kWriters);
  std::atomic<int> completed{0};
  std::vector<Status> results(kWriters);
  for (int i = 0; i < kWriters; ++i) {
    bufs[i].assign(4096, static_cast<uint8_t>(i + 1));
    iovs[i] = MakeIoVec(bufs[i].data(), 4096);
    img_->SubmitWrite(kCluster * 2 + i * 4096, {&iovs[i], 1}, [&, i](Status s) {
      results[i] = s;
      completed.fetch_add(1);
    });
  }
  // One allocation's data write is held; the other writes wait for it.
  EXPECT_EQ(file_->held(), 1u);
  EXPECT_EQ(completed.load(), 0);
  EXPECT_EQ(img_->io_stats().alloc_waits, kWriters - 1u);
  file_->set_hold(false);
  file_->Release();
  EXPECT_EQ(completed.load(), kWriters);
  for (int i = 0; i < kWriters; ++i) EXPECT_TRUE(results[i].ok()) << i << ": " << results[i].ToString();
  EXPECT_EQ(img_->io_stats().allocations, 1u);
  auto b = Read(kCluster * 2, kCluster);
  for (int i = 0; i < kWriters; ++i) EXPECT_EQ(b[i * 4096 + 100], i + 1) << i;
  ASSERT_TRUE(img_->Close().ok());
  auto check = CheckImage("a.qcow2", CheckOptions{.fs = fs_.get()});
  ASSERT_TRUE(check.ok());
  EXPECT_EQ(check->ExitCode(), 0) << (check->messages.empty() ? "" : check->messages[0]);
}

TEST_F(Qcow2AsyncTest, AllocationsCompletingOnSeveralThreadsAllLink) {
  file_->set_hold(true);
  std::vector<uint8_t> buf(kCluster, 0x5a);
  iovec v = MakeIoVec(buf.data(), buf.size());
  std::atomic<int> completed{0};
  for (int i = 0; i < 8; ++i) img_->SubmitWrite(i * kCluster, {&v, 1}, [&](Status s) { completed += s.ok(); });
  EXPECT_EQ(file_->held(), 8u);
  EXPECT_EQ(img_->io_stats().allocations, 8u);
  file_->set_hold(false);
  // Completions arrive on several threads at once; each links what is queued.
  std::vector<std::thread> threads;
  for (int i = 0; i < 4; ++i) threads.emplace_back([&] { file_->Release(); });
  for (auto& t : threads) t.join();
  file_->Release();
  EXPECT_EQ(completed.load(), 8);
  ImageIoStats s = img_->io_stats();
  EXPECT_EQ(s.links, 8u);
  EXPECT_GE(s.link_rounds, 1u);
  EXPECT_LE(s.link_rounds, 8u);
  auto b = Read(0, 8 * kCluster);
  EXPECT_TRUE(std::all_of(b.begin(), b.end(), [](uint8_t x) { return x == 0x5a; }));
}

TEST_F(Qcow2AsyncTest, DiscardedClusterIsNotReusedWhileAFastPathWriteToItIsInFlight) {
  ASSERT_TRUE(Write(0, kCluster, 0x11).ok());
  const uint64_t host = HostOf(0);
  ASSERT_NE(host, 0u);
  file_->set_hold(true);
  std::vector<uint8_t> late(kCluster, 0x99);
  iovec v = MakeIoVec(late.data(), late.size());
  Status late_status = Status::Internal("not completed");
  img_->SubmitWrite(0, {&v, 1}, [&](Status s) { late_status = s; });
  ASSERT_EQ(img_->io_stats().fast_writes, 1u);
  ASSERT_EQ(file_->held(), 1u);
  file_->set_hold(false);
  ASSERT_TRUE(img_->Discard(0, kCluster).ok());
  // Unlinked, but the in-flight write still targets the cluster: not free.
  EXPECT_EQ(Refcount(host), 1u);
  EXPECT_GE(img_->io_stats().deferred_frees, 1u);
  ASSERT_TRUE(Write(kCluster, kCluster, 0x22).ok());
  EXPECT_NE(HostOf(1), host);
  file_->Release();
  EXPECT_TRUE(late_status.ok()) << late_status.ToString();
  // The late write landed in the orphan cluster only.
  EXPECT_EQ(Read(kCluster, 1)[0], 0x22);
  EXPECT_EQ(Read(0, 1)[0], 0);
  ASSERT_TRUE(img_->Flush().ok());
  EXPECT_EQ(Refcount(host), 0u);
  ASSERT_TRUE(img_->Close().ok());
  auto check = CheckImage("a.qcow2", CheckOptions{.fs = fs_.get()});
  ASSERT_TRUE(check.ok());
  EXPECT_EQ(check->ExitCode(), 0) << (check->messages.empty() ? "" : check->messages[0]);
}

TEST_F(Qcow2AsyncTest, FailedDataWriteOfAnAllocationGivesTheClustersBack) {
  ASSERT_TRUE(Write(0, kCluster, 0x11).ok());
  file_->fail_next_async_write();
  Status s = Write(kCluster, 2 * kCluster, 0x22);
  EXPECT_EQ(s.code(), ErrorCode::kIoError) << s.ToString();
  // Nothing was linked, the clusters are free again and nothing written
  // before is lost.
  EXPECT_EQ(Read(kCluster, 1)[0], 0);
  EXPECT_EQ(Read(0, 1)[0], 0x11);
  ASSERT_TRUE(Write(kCluster, 2 * kCluster, 0x33).ok());
  EXPECT_EQ(Read(2 * kCluster, 1)[0], 0x33);
  ASSERT_TRUE(img_->Close().ok());
  auto check = CheckImage("a.qcow2", CheckOptions{.fs = fs_.get()});
  ASSERT_TRUE(check.ok());
  EXPECT_EQ(check->ExitCode(), 0) << (check->messages.empty() ? "" : check->messages[0]);
  EXPECT_EQ(check->leaks, 0u);
}

TEST_F(Qcow2AsyncTest, DiscardWaitsForAllocationsInFlightInItsRange) {
  file_->set_hold(true);
  std::vector<uint8_t> buf(kCluster, 0x77);
  iovec v = MakeIoVec(buf.data(), buf.size());
  Status ws = Status::Internal("not completed");
  img_->SubmitWrite(0, {&v, 1}, [&](Status s) { ws = s; });
  ASSERT_EQ(file_->held(), 1u);
  std::atomic<bool> discarded{false};
  std::thread t([&] {
    EXPECT_TRUE(img_->Discard(0, kCluster).ok());
    discarded = true;
  });
  std::this_thread::sleep_for(std::chrono::milliseconds(50));
  EXPECT_FALSE(discarded.load());
  file_->set_hold(false);
  file_->Release();
  t.join();
  EXPECT_TRUE(ws.ok());
  EXPECT_EQ(Read(0, 1)[0], 0);  // the discard came after the write
  ASSERT_TRUE(img_->Close().ok());
  auto check = CheckImage("a.qcow2", CheckOptions{.fs = fs_.get()});
  ASSERT_TRUE(check.ok());
  EXPECT_EQ(check->ExitCode(), 0) << (check->messages.empty() ? "" : check->messages[0]);
}

// A reader that misses the remap cache where the cluster before is known
// (or at a slice start) gets the rest of the slice published: a sequential
// reader then stays on the fast path.
TEST_F(Qcow2AsyncTest, SequentialReaderIsServedFromReadAheadRemaps) {
  for (uint64_t c = 0; c < 8; ++c) ASSERT_TRUE(Write(c * kCluster, kCluster, static_cast<uint8_t>(0x40 + c)).ok());
  ASSERT_TRUE(img_->Close().ok());
  auto f = fs_->Open("a.qcow2", FileOpenOptions{.writable = true});
  ASSERT_TRUE(f.ok());
  OpenOptions oo;
  oo.fs = fs_.get();
  auto img = Qcow2Image::Open(std::move(f).value(), "a.qcow2", oo, nullptr);
  ASSERT_TRUE(img.ok()) << img.status().ToString();
  img_ = std::move(img).value();
  ASSERT_EQ(img_->remap_cache()->Stats().size, 0u);
  for (uint64_t c = 0; c < 10; ++c) EXPECT_EQ(Read(c * kCluster, kCluster)[kCluster - 1], c < 8 ? 0x40 + c : 0);
  const ImageIoStats s = img_->io_stats();
  EXPECT_EQ(s.slow_reads, 1u);
  EXPECT_EQ(s.fast_reads, 9u);
  // The published states are the L2 tables': allocated ones writable in
  // place, unallocated ones zero (no backing file).
  auto m = img_->LookupRemap(5);
  ASSERT_TRUE(m.has_value());
  EXPECT_EQ(m->host_offset, HostOf(5));
  EXPECT_TRUE(m->flags & Remap::kWritable);
  m = img_->LookupRemap(9);
  ASSERT_TRUE(m.has_value());
  EXPECT_TRUE(m->flags & Remap::kZero);
}

// Entries published ahead obey the same invalidation as any other: an
// allocation, a discard and a zeroing of such clusters are seen at once.
TEST_F(Qcow2AsyncTest, ReadAheadRemapsFollowLaterAllocationsDiscardsAndZeroing) {
  ASSERT_TRUE(Write(0, kCluster, 0x11).ok());
  ASSERT_TRUE(Write(2 * kCluster, 2 * kCluster, 0x22).ok());
  img_->remap_cache()->Clear();
  EXPECT_EQ(Read(0, 512)[0], 0x11);  // a slice start: clusters 1.. published
  ASSERT_TRUE(img_->LookupRemap(1).has_value());
  ASSERT_TRUE(img_->LookupRemap(3).has_value());
  ASSERT_TRUE(img_->LookupRemap(6).has_value());
  ASSERT_TRUE(Write(kCluster, kCluster, 0x33).ok());  // allocates cluster 1
  ASSERT_TRUE(img_->Discard(2 * kCluster, kCluster).ok());
  ASSERT_TRUE(img_->WriteZeroes(3 * kCluster, kCluster, /*may_unmap=*/false).ok());
  ASSERT_TRUE(Write(6 * kCluster, 4096, 0x66).ok());  // allocates cluster 6 (head written, tail zero)
  EXPECT_EQ(Read(kCluster, kCluster)[kCluster - 1], 0x33);
  EXPECT_EQ(Read(2 * kCluster, kCluster)[100], 0);
  EXPECT_EQ(Read(3 * kCluster, kCluster)[100], 0);
  auto six = Read(6 * kCluster, kCluster);
  EXPECT_EQ(six[0], 0x66);
  EXPECT_EQ(six[4096], 0);
  ASSERT_TRUE(img_->Close().ok());
  auto check = CheckImage("a.qcow2", CheckOptions{.fs = fs_.get()});
  ASSERT_TRUE(check.ok());
  EXPECT_EQ(check->ExitCode(), 0) << (check->messages.empty() ? "" : check->messages[0]);
}

}  // namespace
}  // namespace cowtap::cow
