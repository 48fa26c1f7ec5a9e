// Unit tests of qcow v1 on the in-memory file system: creation as qemu-img
// does it, read/write/copy-up over backing chains against a flat reference
// buffer, compressed clusters, discard, write-zeroes, map and the remap cache.
// Header validation is in qcow_header_test.cc, faults and power cuts in
// qcow_fault_test.cc.
#include <gtest/gtest.h>

#include <thread>

#include "cow/qcow_format.h"
#include "cow/qcow_test_util.h"
#include "cow/remap_cache.h"

namespace cowtap::cow {
namespace {

using namespace qcow_test;  // NOLINT: the shared fixture and helpers

// --- Creation matches qemu-img create -f qcow ------------------------------

TEST_F(QcowTest, CreateWithoutBackingUses4KiBClustersAnd4KiBL2) {
  Create("/a.qcow", ImageFormat::kQcow, 10 * kMiB);
  auto bytes = FileBytes("/a.qcow");
  EXPECT_EQ(bytes.size(), 560u);  // what qemu-img 7.2 writes for 10 MiB
  EXPECT_EQ(bytes[32], 12);
  EXPECT_EQ(bytes[33], 9);
  EXPECT_EQ(LoadBe64(bytes.data() + 40), 48u);
  auto img = Open("/a.qcow");
  EXPECT_EQ(img->info().format, ImageFormat::kQcow);
  EXPECT_EQ(img->info().cluster_size, 4096u);
  EXPECT_EQ(img->info().version, 1);
  EXPECT_EQ(img->size_bytes(), 10 * kMiB);
  EXPECT_EQ(Read(*img, 0, 8192), std::vector<uint8_t>(8192, 0));
}

TEST_F(QcowTest, CreateWithBackingUses512ByteClustersAndRecordsName) {
  Create("/base.raw", ImageFormat::kRaw, 10 * kMiB);
  Create("/b.qcow", ImageFormat::kQcow, 0, "base.raw");
  auto bytes = FileBytes("/b.qcow");
  EXPECT_EQ(bytes.size(), 568u);
  EXPECT_EQ(bytes[32], 9);
  EXPECT_EQ(bytes[33], 12);
  EXPECT_EQ(std::string(bytes.begin() + 48, bytes.begin() + 56), "base.raw");
  auto img = Open("/b.qcow");
  EXPECT_EQ(img->size_bytes(), 10 * kMiB);
  EXPECT_EQ(img->info().cluster_size, 512u);
  EXPECT_EQ(img->info().backing_file, "base.raw");
  EXPECT_EQ(img->info().backing_path, "/base.raw");
  EXPECT_FALSE(img->info().backing_format.has_value());
  ASSERT_NE(img->backing(), nullptr);
}

TEST_F(QcowTest, CreateRoundsSizeUpToSectors) {
  Create("/a.qcow", ImageFormat::kQcow, 1000);
  EXPECT_EQ(Open("/a.qcow")->size_bytes(), 1024u);
}

TEST_F(QcowTest, CreateRefusesSizeTooLargeForL1Limit) {
  CreateOptions c;
  c.fs = fs_.get();
  c.format = ImageFormat::kQcow;
  c.size_bytes = 1ull << 60;
  EXPECT_EQ(CreateImage("/a.qcow", c).code(), ErrorCode::kInvalidArgument);
}

TEST_F(QcowTest, RandomWritesWithoutBackingMatchReferenceAcrossReopen) {
  const uint64_t size = 8 * kMiB + 1536;  // not a multiple of the cluster size
  Create("/a.qcow", ImageFormat::kQcow, size);
  std::vector<uint8_t> ref(size, 0);
  {
    auto img = Open("/a.qcow");
    RandomWrites(*img, ref, 7, 300, 3 * 4096);
    ASSERT_EQ(Read(*img, 0, size), ref);
    ASSERT_TRUE(img->Close().ok());
  }
  auto img = Open("/a.qcow", Opts(/*read_only=*/true));
  EXPECT_EQ(Read(*img, 0, size), ref);
}

TEST_F(QcowTest, CopyUpOverTwoLevelChainMatchesReference) {
  const uint64_t size = 4 * kMiB;
  Create("/base.raw", ImageFormat::kRaw, size);
  std::vector<uint8_t> ref = Pattern(size, 3);
  {
    auto base = Open("/base.raw");
    ASSERT_TRUE(Write(*base, 0, ref).ok());
  }
  Create("/mid.qcow", ImageFormat::kQcow, 0, "base.raw");
  {
    auto mid = Open("/mid.qcow");
    RandomWrites(*mid, ref, 11, 100, 3000);
    ASSERT_TRUE(mid->Close().ok());
  }
  const auto mid_bytes = FileBytes("/mid.qcow");
  const auto base_bytes = FileBytes("/base.raw");
  const std::vector<uint8_t> mid_ref = ref;
  Create("/top.qcow", ImageFormat::kQcow, 0, "mid.qcow");
  {
    auto top = Open("/top.qcow");
    EXPECT_EQ(Read(*top, 0, size), ref);
    RandomWrites(*top, ref, 13, 200, 5000);
    EXPECT_EQ(Read(*top, 0, size), ref);
    // Vectored I/O across cluster boundaries, with odd segment sizes.
    std::vector<uint8_t> a = Pattern(700, 5), b = Pattern(1300, 6);
    iovec v[2] = {MakeIoVec(a.data(), a.size()), MakeIoVec(b.data(), b.size())};
    ASSERT_TRUE(top->Write(100000, IoVecs(v, 2)).ok());
    std::copy(a.begin(), a.end(), ref.begin() + 100000);
    std::copy(b.begin(), b.end(), ref.begin() + 100700);
    std::vector<uint8_t> r1(999), r2(size - 999);
    iovec rv[2] = {MakeIoVec(r1.data(), r1.size()), MakeIoVec(r2.data(), r2.size())};
    ASSERT_TRUE(top->Read(0, IoVecs(rv, 2)).ok());
    r1.insert(r1.end(), r2.begin(), r2.end());
    EXPECT_EQ(r1, ref);
    ASSERT_TRUE(top->Close().ok());
  }
  // Backing files are never written.
  EXPECT_EQ(FileBytes("/mid.qcow"), mid_bytes);
  EXPECT_EQ(FileBytes("/base.raw"), base_bytes);
  auto top = Open("/top.qcow");
  EXPECT_EQ(Read(*top, 0, size), ref);
  auto mid = Open("/mid.qcow", Opts(true));
  EXPECT_EQ(Read(*mid, 0, size), mid_ref);
}

TEST_F(QcowTest, BackingSmallerThanOverlayReadsZerosPastItsEnd) {
  Create("/base.raw", ImageFormat::kRaw, 1000);  // ends inside the second 512 B cluster
  std::vector<uint8_t> ref(64 * 1024, 0);
  auto pat = Pattern(1000, 4);
  {
    auto base = Open("/base.raw");
    ASSERT_TRUE(Write(*base, 0, pat).ok());
  }
  std::copy(pat.begin(), pat.end(), ref.begin());
  CreateOptions c;
  c.fs = fs_.get();
  c.format = ImageFormat::kQcow;
  c.size_bytes = ref.size();
  c.backing_file = "base.raw";
  ASSERT_TRUE(CreateImage("/o.qcow", c).ok());
  auto img = Open("/o.qcow");
  EXPECT_EQ(Read(*img, 0, ref.size()), ref);
  // A write into the cluster the backing file ends in copies up its head only.
  auto w = Pattern(10, 8);
  ASSERT_TRUE(Write(*img, 900, w).ok());
  std::copy(w.begin(), w.end(), ref.begin() + 900);
  ASSERT_TRUE(Write(*img, 5000, w).ok());
  std::copy(w.begin(), w.end(), ref.begin() + 5000);
  EXPECT_EQ(Read(*img, 0, ref.size()), ref);
}

TEST_F(QcowTest, BackingLargerThanOverlayIsCutAtOverlaySize) {
  Create("/base.raw", ImageFormat::kRaw, 1 * kMiB);
  auto pat = Pattern(1 * kMiB, 9);
  {
    auto base = Open("/base.raw");
    ASSERT_TRUE(Write(*base, 0, pat).ok());
  }
  CreateOptions c;
  c.fs = fs_.get();
  c.format = ImageFormat::kQcow;
  c.size_bytes = 256 * 1024 + 512;
  c.backing_file = "base.raw";
  ASSERT_TRUE(CreateImage("/o.qcow", c).ok());
  auto img = Open("/o.qcow");
  ASSERT_EQ(img->size_bytes(), 256u * 1024 + 512);
  std::vector<uint8_t> ref(pat.begin(), pat.begin() + 256 * 1024 + 512);
  EXPECT_EQ(Read(*img, 0, ref.size()), ref);
  auto w = Pattern(100, 10);
  ASSERT_TRUE(Write(*img, ref.size() - 100, w).ok());
  std::copy(w.begin(), w.end(), ref.end() - 100);
  EXPECT_EQ(Read(*img, 0, ref.size()), ref);
  std::vector<uint8_t> buf(1);
  iovec v = MakeIoVec(buf.data(), 1);
  EXPECT_EQ(img->Read(ref.size(), IoVecs(&v, 1)).code(), ErrorCode::kOutOfRange);
}

TEST_F(QcowTest, SmallL2CacheEvictsDirtyTablesSafely) {
  const uint64_t size = 64 * kMiB;  // 32 L2 tables of 2 MiB each
  Create("/a.qcow", ImageFormat::kQcow, size);
  OpenOptions o = Opts();
  o.l2_cache_bytes = 4096;  // rounds up to the minimum of two tables
  std::vector<uint8_t> ref(size, 0);
  {
    auto img = Open("/a.qcow", o);
    RandomWrites(*img, ref, 21, 200, 6000);
    EXPECT_EQ(Read(*img, 0, size), ref);
  }  // destructor closes and flushes
  auto img = Open("/a.qcow", o);
  EXPECT_EQ(Read(*img, 0, size), ref);
}

TEST_F(QcowTest, ConcurrentWritersToDisjointRanges) {
  const uint64_t size = 8 * kMiB;
  Create("/a.qcow", ImageFormat::kQcow, size);
  auto img = Open("/a.qcow");
  std::vector<std::thread> threads;
  for (int t = 0; t < 4; ++t) {
    threads.emplace_back([&, t] {
      for (int i = 0; i < 64; ++i) {
        auto data = Pattern(3000, t * 1000 + i);
        ASSERT_TRUE(Write(*img, (t * 64 + i) * 8192ull + 77, data).ok());
      }
    });
  }
  for (auto& th : threads) th.join();
  for (int t = 0; t < 4; ++t)
    for (int i = 0; i < 64; ++i) EXPECT_EQ(Read(*img, (t * 64 + i) * 8192ull + 77, 3000), Pattern(3000, t * 1000 + i));
}

// --- Compressed clusters ---------------------------------------------------

TEST_F(QcowTest, ReadsCompressedClusterAndCopiesItUpOnPartialWrite) {
  Create("/a.qcow", ImageFormat::kQcow, 1 * kMiB);
  {
    auto img = Open("/a.qcow");
    ASSERT_TRUE(Write(*img, 0, Pattern(4096, 1)).ok());  // creates the L2 table
  }
  // Compressible content for guest cluster 1, stored compressed at EOF.
  std::vector<uint8_t> plain(4096);
  for (size_t i = 0; i < plain.size(); ++i) plain[i] = static_cast<uint8_t>(i / 64);
  auto packed = QcowDeflateCluster(plain);
  ASSERT_TRUE(packed.ok());
  ASSERT_LT(packed->size(), 4096u);
  const uint64_t at = FileBytes("/a.qcow").size() + 3;  // compressed data need not be aligned
  Patch("/a.qcow", at, *packed);
  QcowHeader h;
  h.cluster_bits = 12;
  PatchBe64("/a.qcow", L1Entry("/a.qcow", 0) + 8, EncodeQcowCompressedEntry(h, at, packed->size()));

  auto img = Open("/a.qcow");
  EXPECT_EQ(Read(*img, 4096, 4096), plain);
  EXPECT_EQ(Read(*img, 4096 + 100, 50), std::vector<uint8_t>(plain.begin() + 100, plain.begin() + 150));
  auto map = img->Map(4096, 4096);
  ASSERT_TRUE(map.ok());
  ASSERT_EQ(map->size(), 1u);
  EXPECT_TRUE((*map)[0].compressed);
  EXPECT_TRUE((*map)[0].data);

  auto w = Pattern(10, 3);
  ASSERT_TRUE(Write(*img, 4096 + 2000, w).ok());
  std::copy(w.begin(), w.end(), plain.begin() + 2000);
  EXPECT_EQ(Read(*img, 4096, 4096), plain);
  map = img->Map(4096, 4096);
  ASSERT_TRUE(map.ok());
  EXPECT_FALSE((*map)[0].compressed);
  EXPECT_TRUE((*map)[0].host_offset.has_value());
  ASSERT_TRUE(img->Close().ok());
  EXPECT_EQ(Read(*Open("/a.qcow"), 4096, 4096), plain);
}

TEST_F(QcowTest, CorruptCompressedStreamIsReportedNotCrashed) {
  Create("/a.qcow", ImageFormat::kQcow, 1 * kMiB);
  {
    auto img = Open("/a.qcow");
    ASSERT_TRUE(Write(*img, 0, Pattern(4096, 1)).ok());
  }
  const uint64_t at = FileBytes("/a.qcow").size();
  Patch("/a.qcow", at, Pattern(200, 77));
  QcowHeader h;
  h.cluster_bits = 12;
  PatchBe64("/a.qcow", L1Entry("/a.qcow", 0) + 8, EncodeQcowCompressedEntry(h, at, 200));
  auto img = Open("/a.qcow");
  std::vector<uint8_t> buf(4096);
  iovec v = MakeIoVec(buf.data(), buf.size());
  EXPECT_EQ(img->Read(4096, IoVecs(&v, 1)).code(), ErrorCode::kCorrupt);
}

TEST_F(QcowTest, CompressedEntryOfLengthZeroIsCorrupt) {
  Create("/a.qcow", ImageFormat::kQcow, 1 * kMiB);
  {
    auto img = Open("/a.qcow");
    ASSERT_TRUE(Write(*img, 0, Pattern(4096, 1)).ok());
  }
  PatchBe64("/a.qcow", L1Entry("/a.qcow", 0) + 8, kQcowCompressedFlag | 8192);
  auto img = Open("/a.qcow");
  std::vector<uint8_t> buf(4096);
  iovec v = MakeIoVec(buf.data(), buf.size());
  EXPECT_EQ(img->Read(4096, IoVecs(&v, 1)).code(), ErrorCode::kCorrupt);
}

// --- Discard, write-zeroes, map ---------------------------------------------

TEST_F(QcowTest, DiscardWithoutBackingUnallocates) {
  Create("/a.qcow", ImageFormat::kQcow, 1 * kMiB);
  auto img = Open("/a.qcow");
  ASSERT_TRUE(Write(*img, 0, Pattern(64 * 1024, 1)).ok());
  ASSERT_TRUE(img->Discard(4096, 8192).ok());
  EXPECT_EQ(Read(*img, 4096, 8192), std::vector<uint8_t>(8192, 0));
  auto map = img->Map(0, 64 * 1024);
  ASSERT_TRUE(map.ok());
  ASSERT_EQ(map->size(), 3u);
  EXPECT_TRUE((*map)[0].data);
  EXPECT_FALSE((*map)[1].data);
  EXPECT_TRUE((*map)[1].zero);
  EXPECT_EQ((*map)[1].offset, 4096u);
  EXPECT_EQ((*map)[1].length, 8192u);
  // An unaligned discard leaves the partial clusters alone.
  auto before = Read(*img, 20000, 100);
  ASSERT_TRUE(img->Discard(20000, 100).ok());
  EXPECT_EQ(Read(*img, 20000, 100), before);
}

TEST_F(QcowTest, DiscardOverBackingWritesZerosSoBackingNeverReappears) {
  Create("/base.raw", ImageFormat::kRaw, 1 * kMiB);
  {
    auto base = Open("/base.raw");
    ASSERT_TRUE(Write(*base, 0, Pattern(1 * kMiB, 2)).ok());
  }
  Create("/o.qcow", ImageFormat::kQcow, 0, "base.raw");
  {
    auto img = Open("/o.qcow");
    ASSERT_TRUE(Write(*img, 0, Pattern(2048, 3)).ok());
    ASSERT_TRUE(img->Discard(0, 4096).ok());      // allocated and unallocated clusters
    ASSERT_TRUE(img->WriteZeroes(10000, 3000, true).ok());  // partial clusters too
  }
  auto img = Open("/o.qcow");
  EXPECT_EQ(Read(*img, 0, 4096), std::vector<uint8_t>(4096, 0));
  EXPECT_EQ(Read(*img, 10000, 3000), std::vector<uint8_t>(3000, 0));
  const auto base = Pattern(1 * kMiB, 2);
  EXPECT_EQ(Read(*img, 13000, 100), std::vector<uint8_t>(base.begin() + 13000, base.begin() + 13100));
  EXPECT_EQ(Read(*img, 4096, 5000), std::vector<uint8_t>(base.begin() + 4096, base.begin() + 9096));
}

TEST_F(QcowTest, WriteZeroesWithoutBackingZeroesPartialClusters) {
  Create("/a.qcow", ImageFormat::kQcow, 1 * kMiB);
  auto img = Open("/a.qcow");
  std::vector<uint8_t> ref = Pattern(1 * kMiB, 5);
  ASSERT_TRUE(Write(*img, 0, ref).ok());
  ASSERT_TRUE(img->WriteZeroes(1000, 20000, false).ok());
  std::fill(ref.begin() + 1000, ref.begin() + 21000, 0);
  ASSERT_TRUE(img->WriteZeroes(200000, 600000, true).ok());
  std::fill(ref.begin() + 200000, ref.begin() + 800000, 0);
  EXPECT_EQ(Read(*img, 0, ref.size()), ref);
}

TEST_F(QcowTest, MapReportsDepthAndHostOffsets) {
  Create("/base.raw", ImageFormat::kRaw, 64 * 1024);
  {
    auto base = Open("/base.raw");
    ASSERT_TRUE(Write(*base, 0, Pattern(64 * 1024, 1)).ok());
  }
  CreateOptions c;
  c.fs = fs_.get();
  c.format = ImageFormat::kQcow;
  c.size_bytes = 128 * 1024;
  c.backing_file = "base.raw";
  ASSERT_TRUE(CreateImage("/o.qcow", c).ok());
  auto img = Open("/o.qcow");
  ASSERT_TRUE(Write(*img, 1024, Pattern(1024, 2)).ok());
  auto map = img->Map(0, 128 * 1024);
  ASSERT_TRUE(map.ok());
  ASSERT_EQ(map->size(), 4u);
  EXPECT_EQ((*map)[0].depth, 1);  // backing, raw data
  EXPECT_TRUE((*map)[0].data);
  EXPECT_EQ((*map)[0].length, 1024u);
  EXPECT_EQ((*map)[1].depth, 0);  // our two new 512 B clusters, contiguous
  EXPECT_EQ((*map)[1].offset, 1024u);
  EXPECT_EQ((*map)[1].length, 1024u);
  ASSERT_TRUE((*map)[1].host_offset.has_value());
  EXPECT_EQ(*(*map)[1].host_offset % 512, 0u);
  EXPECT_EQ((*map)[1].file, "/o.qcow");
  EXPECT_EQ((*map)[2].depth, 1);
  EXPECT_EQ((*map)[2].offset + (*map)[2].length, 64u * 1024);
  EXPECT_TRUE((*map)[3].zero);  // past the end of the backing file
  EXPECT_FALSE((*map)[3].data);
  EXPECT_EQ((*map)[3].offset, 64u * 1024);
}

TEST_F(QcowTest, SnapshotRequestIsRefused) {
  Create("/a.qcow", ImageFormat::kQcow, 1 * kMiB);
  OpenOptions o = Opts();
  o.snapshot = "snap1";
  auto r = OpenImage("/a.qcow", o);
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.status().code(), ErrorCode::kNotSupported);
}

TEST_F(QcowTest, ReadOnlyAndOutOfRangeAreRefused) {
  Create("/a.qcow", ImageFormat::kQcow, 1 * kMiB);
  auto ro = Open("/a.qcow", Opts(true));
  EXPECT_EQ(Write(*ro, 0, Pattern(10, 1)).code(), ErrorCode::kReadOnly);
  EXPECT_EQ(ro->Discard(0, 4096).code(), ErrorCode::kReadOnly);
  auto img = Open("/a.qcow");
  EXPECT_EQ(Write(*img, 1 * kMiB - 5, Pattern(10, 1)).code(), ErrorCode::kOutOfRange);
  EXPECT_EQ(img->WriteZeroes(~0ull - 10, 20, true).code(), ErrorCode::kOutOfRange);
  EXPECT_FALSE(img->Map(1 * kMiB, 1).ok());
  ASSERT_TRUE(img->Close().ok());
  EXPECT_EQ(Write(*img, 0, Pattern(10, 1)).code(), ErrorCode::kCancelled);
}

// --- Remap cache -----------------------------------------------------------

TEST_F(QcowTest, RemapCachePublishesResolvedClustersAndInvalidatesOnChange) {
  Create("/base.raw", ImageFormat::kRaw, 64 * 1024);
  CreateOptions c;
  c.fs = fs_.get();
  c.format = ImageFormat::kQcow;
  c.size_bytes = 1 * kMiB;
  c.backing_file = "base.raw";
  ASSERT_TRUE(CreateImage("/o.qcow", c).ok());
  auto img = Open("/o.qcow");
  RemapCache* remap = img->remap_cache();
  ASSERT_NE(remap, nullptr);
  ASSERT_TRUE(Write(*img, 1024, Pattern(512, 1)).ok());  // guest cluster 2
  Read(*img, 0, 8192);
  auto hit = remap->Lookup(2);
  ASSERT_TRUE(hit.has_value());
  EXPECT_EQ(hit->flags, Remap::kWritable);
  EXPECT_EQ(hit->layer, 0);
  auto map = img->Map(1024, 512);
  ASSERT_TRUE(map.ok());
  EXPECT_EQ(hit->host_offset, *(*map)[0].host_offset);
  EXPECT_FALSE(remap->Lookup(0).has_value());  // backing data: not this layer's
  Read(*img, 512 * 1024, 512);                  // past the backing file: zeros
  auto zero = remap->Lookup(1024);
  ASSERT_TRUE(zero.has_value());
  EXPECT_EQ(zero->flags, Remap::kZero);
  // Writing the zero cluster and discarding the written one both invalidate.
  ASSERT_TRUE(Write(*img, 512 * 1024, Pattern(512, 2)).ok());
  EXPECT_EQ(Read(*img, 512 * 1024, 512), Pattern(512, 2));
  EXPECT_EQ(remap->Lookup(1024)->flags, Remap::kWritable);
  ASSERT_TRUE(img->Discard(512 * 1024, 512).ok());
  EXPECT_EQ(Read(*img, 512 * 1024, 512), std::vector<uint8_t>(512, 0));
  EXPECT_GT(remap->Stats().hits, 0u);
  EXPECT_GT(remap->Stats().invalidations, 0u);

  OpenOptions o = Opts();
  o.remap_cache_entries = 0;
  EXPECT_EQ(Open("/o.qcow", o)->remap_cache(), nullptr);
}
}  // namespace
}  // namespace cowtap::cow
