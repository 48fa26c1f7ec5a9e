// qcow v1 under injected faults: failed writes and flushes, random metadata
// damage, growth of the file, and power cuts at every point of a flush with
// torn sectors (through FaultInjectingFileSystem).
#include <gtest/gtest.h>

#include "cow/fault_file.h"
#include "cow/qcow_test_util.h"

namespace cowtap::cow {
namespace {

using namespace qcow_test;  // NOLINT: the shared fixture and helpers

TEST_F(QcowTest, FailedMetadataWriteDuringFlushIsRetriedByTheNextFlush) {
  Create("/base.raw", ImageFormat::kRaw, 1 * kMiB);
  Create("/o.qcow", ImageFormat::kQcow, 0, "base.raw");
  FaultInjectingFileSystem ffs(fs_.get());
  auto control = ffs.Target("/o.qcow");
  OpenOptions o = Opts();
  o.fs = &ffs;
  std::vector<uint8_t> ref(1 * kMiB, 0);
  {
    auto img = Open("/o.qcow", o);
    RandomWrites(*img, ref, 5, 50, 5000);
    // The data run writes are done; the next write is the L2 table in Flush.
    control->AddFault({FaultOp::kWrite, FaultTrigger::kNth, 1, EIO, 0});
    EXPECT_EQ(img->Flush().code(), ErrorCode::kIoError);
    EXPECT_EQ(Read(*img, 0, ref.size()), ref);  // still served from the cache
    ASSERT_TRUE(img->Flush().ok());
  }
  EXPECT_EQ(Read(*Open("/o.qcow"), 0, ref.size()), ref);
}

// Random damage to the metadata of a written image: every open, read, write
// and map either works or fails with a Status; nothing crashes (run this
// suite under ASan/UBSan to make "crash" include memory errors).
TEST_F(QcowTest, RandomMetadataDamageNeverCrashes) {
  Create("/base.raw", ImageFormat::kRaw, 256 * 1024);
  Create("/good.qcow", ImageFormat::kQcow, 0, "base.raw");
  {
    auto img = Open("/good.qcow");
    std::vector<uint8_t> ref(256 * 1024, 0);
    RandomWrites(*img, ref, 1, 40, 3000);
  }
  const auto good = FileBytes("/good.qcow");
  const uint64_t l1 = LoadBe64(good.data() + 40);
  const uint64_t l2 = LoadBe64(good.data() + l1);
  std::mt19937_64 rng(99);
  int opened = 0;
  for (int iter = 0; iter < 400; ++iter) {
    auto bad = good;
    for (int k = 0; k < 1 + static_cast<int>(rng() % 4); ++k) {
      // Aim at the header, the L1 table and the first L2 table.
      const uint64_t region = rng() % 3;
      uint64_t at = region == 0 ? rng() % 56 : region == 1 ? l1 + rng() % 16 : l2 + rng() % (32 * 1024);
      if (at >= bad.size()) continue;
      bad[at] = static_cast<uint8_t>(rng());
    }
    FileOpenOptions fo;
    fo.create = true;
    auto f = fs_->Open("/bad.qcow", fo);
    ASSERT_TRUE((*f)->Truncate(0).ok());
    ASSERT_TRUE((*f)->WriteAt(0, bad).ok());
    OpenOptions o = Opts();
    o.format = ImageFormat::kQcow;
    o.l2_cache_bytes = 1;
    auto r = OpenImage("/bad.qcow", o);
    if (!r.ok()) continue;
    ++opened;
    Image& img = **r;
    const uint64_t size = std::min<uint64_t>(img.size_bytes(), 1 * kMiB);
    std::vector<uint8_t> buf(size);
    iovec v = MakeIoVec(buf.data(), buf.size());
    img.Read(0, IoVecs(&v, 1)).IgnoreError();
    if (size > 600) {
      auto w = Pattern(600, iter);
      iovec wv = MakeIoVec(w.data(), w.size());
      img.Write(rng() % (size - 600), IoVecs(&wv, 1)).IgnoreError();
      img.Discard(0, size).IgnoreError();
    }
    img.Map(0, size).status().IgnoreError();
    img.Close().IgnoreError();
  }
  EXPECT_GT(opened, 50);  // most damage lands in L2 tables and is found at run time
}

TEST_F(QcowTest, GrowsTheFileAheadInLargeStepsNotPerCluster) {
  Create("/a.qcow", ImageFormat::kQcow, 8 * kMiB);
  FaultInjectingFileSystem ffs(fs_.get());
  auto control = ffs.Target("/a.qcow");
  OpenOptions o = Opts();
  o.fs = &ffs;
  auto img = Open("/a.qcow", o);
  const auto chunk = Pattern(64 * 1024, 1);
  for (uint64_t off = 0; off < 4 * kMiB; off += chunk.size()) ASSERT_TRUE(Write(*img, off, chunk).ok());
  const FaultCounters c = control->counters();
  // 1024 clusters and two L2 tables appended: a handful of 1 MiB reservations,
  // and one data write per 64 KiB request (copy-up merged, clusters batched).
  EXPECT_GE(c.allocates, 4u);
  EXPECT_LE(c.allocates, 6u);
  EXPECT_EQ(c.writes, 64u);
  EXPECT_EQ(c.flushes, 0u);  // durability waits for Flush()
}

// --- Crash consistency -----------------------------------------------------

// Writes over a backing file, flushes, writes more, then cuts the power at
// every point of the next flush with random torn sectors. After reopening,
// every byte must read as the last flushed value or the newest one; in
// particular no byte may read zero where the backing file has data.
TEST_F(QcowTest, PowerCutAtAnyPointOfFlushLeavesOldOrNewData) {
  const uint64_t size = 2 * kMiB;
  Create("/base.raw", ImageFormat::kRaw, size);
  const auto base_data = Pattern(size, 42);
  {
    auto base = Open("/base.raw");
    ASSERT_TRUE(Write(*base, 0, base_data).ok());
  }
  int outcomes_with_new_data = 0;
  for (int cut = 1; cut <= 4; ++cut) {
    for (uint64_t seed = 1; seed <= 6; ++seed) {
      SCOPED_TRACE("flush cut " + std::to_string(cut) + " seed " + std::to_string(seed));
      Create("/o.qcow", ImageFormat::kQcow, 0, "base.raw");
      FaultInjectingFileSystem ffs(fs_.get());
      auto control = ffs.Target("/o.qcow");
      control->SetPowerLossMode(true);
      OpenOptions o = Opts();
      o.fs = &ffs;
      std::vector<uint8_t> flushed = base_data;
      std::vector<uint8_t> newest;
      {
        auto img = Open("/o.qcow", o);
        RandomWrites(*img, flushed, static_cast<uint32_t>(seed), 20, 3000);
        ASSERT_TRUE(img->Flush().ok());
        newest = flushed;
        RandomWrites(*img, newest, static_cast<uint32_t>(seed + 100), 20, 3000);
        // The cut'th file flush inside Flush() fails; the power goes with it.
        control->AddFault({FaultOp::kFlush, FaultTrigger::kAfterN, static_cast<uint64_t>(cut - 1), EIO, 0});
        img->Flush().IgnoreError();
        CrashOptions crash;
        crash.survive_probability = 0.5;
        crash.seed = seed;
        ASSERT_TRUE(ffs.Crash("/o.qcow", crash).ok());
      }  // the dead image's Close() cannot reach the storage any more
      auto img = Open("/o.qcow");
      ASSERT_NE(img, nullptr);
      auto got = Read(*img, 0, size);
      bool saw_new = false;
      for (uint64_t i = 0; i < size; ++i) {
        if (got[i] != flushed[i] && got[i] != newest[i]) {
          ADD_FAILURE() << "byte " << i << " reads " << int(got[i]) << ", flushed " << int(flushed[i])
                        << ", newest " << int(newest[i]);
          break;
        }
        saw_new |= got[i] != flushed[i];
      }
      outcomes_with_new_data += saw_new;
      ASSERT_TRUE(fs_->Remove("/o.qcow").ok());
    }
  }
  // Late cuts let some of the new data through; otherwise the test proves little.
  EXPECT_GT(outcomes_with_new_data, 0);
}

TEST_F(QcowTest, WriteErrorIsReportedAndImageStaysReadable) {
  Create("/a.qcow", ImageFormat::kQcow, 1 * kMiB);
  FaultInjectingFileSystem ffs(fs_.get());
  auto control = ffs.Target("/a.qcow");
  OpenOptions o = Opts();
  o.fs = &ffs;
  auto img = Open("/a.qcow", o);
  ASSERT_TRUE(Write(*img, 0, Pattern(4096, 1)).ok());
  control->AddFault({FaultOp::kWrite, FaultTrigger::kNth, 1, ENOSPC, 100});
  EXPECT_EQ(Write(*img, 8192, Pattern(4096, 2)).code(), ErrorCode::kNoSpace);
  EXPECT_EQ(Read(*img, 8192, 4096), std::vector<uint8_t>(4096, 0));  // never linked
  EXPECT_EQ(Read(*img, 0, 4096), Pattern(4096, 1));
  ASSERT_TRUE(Write(*img, 8192, Pattern(4096, 3)).ok());
  ASSERT_TRUE(img->Close().ok());
  auto again = Open("/a.qcow");
  EXPECT_EQ(Read(*again, 8192, 4096), Pattern(4096, 3));
}

}  // namespace
}  // namespace cowtap::cow
