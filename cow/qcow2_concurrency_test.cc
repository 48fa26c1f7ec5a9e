// Concurrent guest I/O on real files, checked against a model and by QEMU:
// several threads write, zero and read their own 16 KiB chunks (chunks of
// different threads share clusters, so allocations race), over qcow2 with
// and without a backing file, 4 KiB and 64 KiB clusters, subclusters, and
// raw; afterwards `qemu-img check` must be clean and `qemu-img compare`
// must find the image equal to a raw twin written from the model. Also:
// QD32 from one thread through the async API, and discard racing with
// writes to the same cluster while other clusters are reallocated.
// Skips the QEMU checks (not the rest) when qemu-img is missing.
#include <gtest/gtest.h>
#include <stdlib.h>
#include <unistd.h>

#include <atomic>
#include <cstdio>
#include <filesystem>
#include <random>
#include <thread>

#include "cow/image.h"

namespace cowtap::cow {
namespace {

constexpr uint64_t kSize = 8 << 20;
constexpr uint64_t kChunk = 16384;

int Shell(const std::string& cmd, std::string* out = nullptr) {
  FILE* p = popen((cmd + " 2>&1").c_str(), "r");
  if (!p) return -1;
  char buf[4096];
  std::string text;
  while (size_t n = fread(buf, 1, sizeof(buf), p)) text.append(buf, n);
  int rc = pclose(p);
  if (out) *out = text;
  return WIFEXITED(rc) ? WEXITSTATUS(rc) : -1;
}

bool HaveQemuImg() { return Shell("qemu-img --version") == 0; }

std::string MakeTempDir() {
  char tmpl[] = "/tmp/cowtap_conc_XXXXXX";
  char* d = mkdtemp(tmpl);
  return d ? d : "";
}

Status WriteFill(Image& img, uint64_t off, std::vector<uint8_t>& buf) {
  iovec v = MakeIoVec(buf.data(), buf.size());
  return img.Write(off, {&v, 1});
}

struct Shape {
  const char* name;
  bool raw;
  uint32_t cluster;
  bool backing;
  bool extended_l2;
};

class ConcurrencyTest : public ::testing::TestWithParam<Shape> {
 protected:
  void SetUp() override {
    dir_ = MakeTempDir();
    ASSERT_FALSE(dir_.empty());
  }
  void TearDown() override { std::filesystem::remove_all(dir_); }

  std::string dir_;
};

TEST_P(ConcurrencyTest, RandomWorkloadFromSeveralThreadsMatchesModelAndQemu) {
  const Shape& shape = GetParam();
  std::vector<uint8_t> model(kSize, 0);
  const std::string path = dir_ + (shape.raw ? "/img.raw" : "/img.qcow2");
  if (shape.backing) {
    // A raw base with a pattern, so copy-up is visible.
    CreateOptions bo;
    bo.format = ImageFormat::kRaw;
    bo.size_bytes = kSize;
    ASSERT_TRUE(CreateImage(dir_ + "/base.raw", bo).ok());
    auto base = OpenImage(dir_ + "/base.raw");
    ASSERT_TRUE(base.ok());
    for (uint64_t i = 0; i < kSize; ++i) model[i] = static_cast<uint8_t>((i / 512) * 7 + 3);
    iovec v = MakeIoVec(model.data(), model.size());
    ASSERT_TRUE((*base)->Write(0, {&v, 1}).ok());
    ASSERT_TRUE((*base)->Close().ok());
  }
  CreateOptions co;
  co.format = shape.raw ? ImageFormat::kRaw : ImageFormat::kQcow2;
  co.size_bytes = kSize;
  co.cluster_size = shape.cluster;
  co.extended_l2 = shape.extended_l2;
  if (shape.backing) co.backing_file = "base.raw";
  ASSERT_TRUE(CreateImage(path, co).ok());
  auto opened = OpenImage(path);
  ASSERT_TRUE(opened.ok()) << opened.status().ToString();
  std::shared_ptr<Image> img = std::move(opened).value();

  constexpr int kThreads = 4;
  constexpr int kOps = 300;
  std::atomic<int> failures{0};
  std::vector<std::thread> threads;
  for (int t = 0; t < kThreads; ++t) {
    threads.emplace_back([&, t] {
      std::mt19937_64 rng(1234 + t);
      const uint64_t chunks = kSize / kChunk;
      for (int op = 0; op < kOps && failures == 0; ++op) {
        // Chunks c with c % kThreads == t belong to this thread.
        const uint64_t c = (rng() % (chunks / kThreads)) * kThreads + t;
        const uint64_t off = c * kChunk + (rng() % 32) * 512;
        const uint64_t len = std::min<uint64_t>((rng() % 32 + 1) * 512, (c + 1) * kChunk - off);
        const int kind = static_cast<int>(rng() % 10);
        if (kind < 6) {
          std::vector<uint8_t> buf(len);
          for (auto& b : buf) b = static_cast<uint8_t>(rng());
          Status s = WriteFill(*img, off, buf);
          if (!s.ok()) {
            ADD_FAILURE() << "write " << off << "+" << len << ": " << s.ToString();
            ++failures;
          }
          std::copy(buf.begin(), buf.end(), model.begin() + off);
        } else if (kind < 7) {
          Status s = img->WriteZeroes(off, len, rng() % 2);
          if (!s.ok()) {
            ADD_FAILURE() << "zero " << off << "+" << len << ": " << s.ToString();
            ++failures;
          }
          std::fill(model.begin() + off, model.begin() + off + len, 0);
        } else {
          std::vector<uint8_t> buf(len, 0xee);
          iovec v = MakeIoVec(buf.data(), buf.size());
          Status s = WaitForCompletion([&](ImageCompletion done) { img->SubmitRead(off, {&v, 1}, std::move(done)); });
          if (!s.ok() || !std::equal(buf.begin(), buf.end(), model.begin() + off)) {
            ADD_FAILURE() << "read " << off << "+" << len << " differs from the model: " << s.ToString();
            ++failures;
          }
        }
      }
    });
  }
  for (auto& th : threads) th.join();
  ASSERT_EQ(failures.load(), 0);
  std::vector<uint8_t> all(kSize);
  iovec v = MakeIoVec(all.data(), all.size());
  ASSERT_TRUE(img->Read(0, {&v, 1}).ok());
  ASSERT_TRUE(all == model);
  ImageIoStats stats = img->io_stats();
  if (!shape.raw && !shape.extended_l2) {
    EXPECT_GT(stats.fast_writes + stats.fast_reads, 0u);
    EXPECT_GT(stats.allocations, 0u);
  }
  ASSERT_TRUE(img->Close().ok());
  img.reset();

  if (!HaveQemuImg()) GTEST_SKIP() << "qemu-img not installed (apt-get install qemu-utils): QEMU checks skipped";
  std::string msg;
  if (!shape.raw) EXPECT_EQ(Shell("qemu-img check '" + path + "'", &msg), 0) << msg;
  FILE* twin = fopen((dir_ + "/twin.raw").c_str(), "wb");
  ASSERT_NE(twin, nullptr);
  ASSERT_EQ(fwrite(model.data(), 1, model.size(), twin), model.size());
  fclose(twin);
  EXPECT_EQ(Shell("qemu-img compare -F raw '" + path + "' '" + dir_ + "/twin.raw'", &msg), 0) << msg;
}

INSTANTIATE_TEST_SUITE_P(Shapes, ConcurrencyTest,
                         ::testing::Values(Shape{"qcow2_64k", false, 65536, false, false},
                                           Shape{"qcow2_4k", false, 4096, false, false},
                                           Shape{"qcow2_64k_backing", false, 65536, true, false},
                                           Shape{"qcow2_4k_backing", false, 4096, true, false},
                                           Shape{"qcow2_64k_subclusters", false, 65536, false, true},
                                           Shape{"qcow2_64k_subclusters_backing", false, 65536, true, true},
                                           Shape{"raw", true, 0, false, false}),
                         [](const auto& info) { return std::string(info.param.name); });

TEST(ConcurrencyQdTest, ThirtyTwoAsyncWritesThenReadsFromOneThread) {
  const std::string dir = MakeTempDir();
  const std::string path = dir + "/qd.qcow2";
  CreateOptions co;
  co.size_bytes = kSize;
  ASSERT_TRUE(CreateImage(path, co).ok());
  auto img = OpenImage(path);
  ASSERT_TRUE(img.ok());
  constexpr int kQd = 32;
  std::vector<std::vector<uint8_t>> bufs(kQd, std::vector<uint8_t>(4096));
  std::vector<iovec> iovs(kQd);
  std::vector<uint64_t> offs(kQd);
  for (int round = 0; round < 3; ++round) {
    std::atomic<int> ok{0}, done{0};
    for (int i = 0; i < kQd; ++i) {
      // Several requests per cluster, some clusters new in every round.
      offs[i] = (static_cast<uint64_t>(i) * 5 + round * 3) % 96 * 4096 + round * 65536 * 8;
      std::fill(bufs[i].begin(), bufs[i].end(), static_cast<uint8_t>(i + round * 40 + 1));
      iovs[i] = MakeIoVec(bufs[i].data(), 4096);
      (*img)->SubmitWrite(offs[i], {&iovs[i], 1}, [&](Status s) {
        ok += s.ok();
        ++done;
      });
    }
    while (done < kQd) std::this_thread::sleep_for(std::chrono::milliseconds(1));
    EXPECT_EQ(ok.load(), kQd);
    std::vector<std::vector<uint8_t>> back(kQd, std::vector<uint8_t>(4096));
    std::vector<iovec> riov(kQd);
    done = 0;
    ok = 0;
    for (int i = 0; i < kQd; ++i) {
      riov[i] = MakeIoVec(back[i].data(), 4096);
      (*img)->SubmitRead(offs[i], {&riov[i], 1}, [&](Status s) {
        ok += s.ok();
        ++done;
      });
    }
    while (done < kQd) std::this_thread::sleep_for(std::chrono::milliseconds(1));
    EXPECT_EQ(ok.load(), kQd);
    for (int i = 0; i < kQd; ++i) EXPECT_EQ(back[i], bufs[i]) << "round " << round << " request " << i;
  }
  ASSERT_TRUE((*img)->Close().ok());
  if (HaveQemuImg()) {
    std::string msg;
    EXPECT_EQ(Shell("qemu-img check '" + path + "'", &msg), 0) << msg;
  }
  std::filesystem::remove_all(dir);
}

TEST(ConcurrencyDiscardTest, DiscardRacingWithWritesNeverCorruptsAnotherCluster) {
  const std::string dir = MakeTempDir();
  const std::string path = dir + "/race.qcow2";
  constexpr uint64_t kCluster = 65536;
  CreateOptions co;
  co.size_bytes = kSize;
  ASSERT_TRUE(CreateImage(path, co).ok());
  auto opened = OpenImage(path);
  ASSERT_TRUE(opened.ok());
  std::shared_ptr<Image> img = std::move(opened).value();
  std::atomic<bool> stop{false};
  std::atomic<int> bad{0};
  // Thread A writes cluster 5 again and again (fast path once allocated);
  // thread B discards it; thread C keeps reallocating clusters 16..47 with
  // their own pattern and checks them, so a freed cluster 5 gets reused.
  std::thread a([&] {
    std::vector<uint8_t> buf(kCluster, 0xaa);
    while (!stop) WriteFill(*img, 5 * kCluster, buf).IgnoreError();
  });
  std::thread b([&] {
    while (!stop) img->Discard(5 * kCluster, kCluster).IgnoreError();
  });
  std::thread c([&] {
    for (int round = 0; round < 15 && bad == 0; ++round) {
      for (uint64_t k = 16; k < 48; ++k) {
        std::vector<uint8_t> buf(kCluster, static_cast<uint8_t>(k + round));
        if (!WriteFill(*img, k * kCluster, buf).ok()) ++bad;
      }
      for (uint64_t k = 16; k < 48; ++k) {
        std::vector<uint8_t> back(kCluster);
        iovec v = MakeIoVec(back.data(), back.size());
        if (!img->Read(k * kCluster, {&v, 1}).ok()) ++bad;
        for (uint8_t x : back)
          if (x != static_cast<uint8_t>(k + round)) {
            ADD_FAILURE() << "cluster " << k << " round " << round << " holds " << int(x);
            ++bad;
            break;
          }
      }
      ASSERT_TRUE(img->Discard(16 * kCluster, 32 * kCluster).ok());
    }
    stop = true;
  });
  c.join();
  a.join();
  b.join();
  EXPECT_EQ(bad.load(), 0);
  std::vector<uint8_t> five(kCluster);
  iovec v = MakeIoVec(five.data(), five.size());
  ASSERT_TRUE(img->Read(5 * kCluster, {&v, 1}).ok());
  EXPECT_TRUE(std::all_of(five.begin(), five.end(), [](uint8_t x) { return x == 0; }) ||
              std::all_of(five.begin(), five.end(), [](uint8_t x) { return x == 0xaa; }));
  ASSERT_TRUE(img->Close().ok());
  img.reset();
  if (HaveQemuImg()) {
    std::string msg;
    EXPECT_EQ(Shell("qemu-img check '" + path + "'", &msg), 0) << msg;
  }
  std::filesystem::remove_all(dir);
}

}  // namespace
}  // namespace cowtap::cow
