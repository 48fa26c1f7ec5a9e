// Qcow2Image behaviour on in-memory files that the random workload does not
// pin down: run-time rejection of damaged metadata (the I/O fails with
// kCorrupt, the process never aborts), the corrupt bit, autoclear bits,
// dirty-image refcount rebuild, refcount table growth and overflow, discard
// rules, Map(), the remap cache, and the external data file.
#include <gtest/gtest.h>

#include <sys/stat.h>
#include <unistd.h>

#include <atomic>
#include <thread>

#include "base/endian.h"
#include "cow/check.h"
#include "cow/image.h"
#include "cow/qcow2_image.h"

namespace cowtap::cow {
namespace {

class Qcow2EngineTest : public ::testing::Test {
 protected:
  void SetUp() override { fs_ = NewMemFileSystem(); }

  void Create(const std::string& path, uint64_t size, std::function<void(CreateOptions&)> tweak = nullptr) {
    CreateOptions co;
    co.size_bytes = size;
    co.fs = fs_.get();
    co.overwrite = true;
    if (tweak) tweak(co);
    Status s = CreateImage(path, co);
    ASSERT_TRUE(s.ok()) << s.ToString();
  }
  std::unique_ptr<Image> Open(const std::string& path, bool read_only = false) {
    OpenOptions oo;
    oo.fs = fs_.get();
    oo.read_only = read_only;
    auto r = OpenImage(path, oo);
    EXPECT_TRUE(r.ok()) << r.status().ToString();
    return r.ok() ? std::move(r).value() : nullptr;
  }
  Status Write(Image& img, uint64_t off, uint64_t len, uint8_t fill) {
    std::vector<uint8_t> b(len, fill);
    iovec v = MakeIoVec(b.data(), b.size());
    return img.Write(off, {&v, 1});
  }
  Result<std::vector<uint8_t>> Read(Image& img, uint64_t off, uint64_t len) {
    std::vector<uint8_t> b(len);
    iovec v = MakeIoVec(b.data(), b.size());
    COWTAP_RETURN_IF_ERROR(img.Read(off, {&v, 1}));
    return b;
  }
  uint64_t Peek64(const std::string& path, uint64_t off) {
    auto f = fs_->Open(path, {});
    uint8_t b[8] = {};
    EXPECT_TRUE((*f)->ReadAt(off, b).ok());
    return LoadBe64(b);
  }
  void Poke64(const std::string& path, uint64_t off, uint64_t v) {
    FileOpenOptions fo;
    fo.writable = true;
    auto f = fs_->Open(path, fo);
    uint8_t b[8];
    StoreBe64(b, v);
    ASSERT_TRUE((*f)->WriteAt(off, b).ok());
  }
  int CheckExit(const std::string& path) {
    CheckOptions ck;
    ck.fs = fs_.get();
    auto r = CheckImage(path, ck);
    EXPECT_TRUE(r.ok()) << r.status().ToString();
    return r.ok() ? r->ExitCode() : -1;
  }
  // An image with cluster 0 written; returns the L2 table offset.
  uint64_t ImageWithOneCluster(const std::string& path) {
    Create(path, 1 << 20);
    auto img = Open(path);
    EXPECT_TRUE(Write(*img, 0, 65536, 0xab).ok());
    EXPECT_TRUE(img->Close().ok());
    uint64_t l1 = Peek64(path, 40);
    return Peek64(path, l1) & kQcow2OffsetMask;
  }

  std::unique_ptr<FileSystem> fs_;
};

TEST_F(Qcow2EngineTest, L2EntryBeyondEofFailsThatIoWithCorrupt) {
  uint64_t l2 = ImageWithOneCluster("a.qcow2");
  Poke64("a.qcow2", l2, (1ull << 40) | kQcow2Copied);
  auto img = Open("a.qcow2");
  auto r = Read(*img, 0, 4096);
  EXPECT_EQ(r.status().code(), ErrorCode::kCorrupt);
  EXPECT_NE(r.status().message().find("a.qcow2"), std::string::npos) << r.status().message();
  EXPECT_TRUE(Read(*img, 65536, 4096).ok());  // other clusters still serve
  EXPECT_EQ(Write(*img, 0, 512, 1).code(), ErrorCode::kCorrupt);
  // After corruption was seen on a write, the image refuses further writes.
  EXPECT_EQ(Write(*img, 65536, 512, 1).code(), ErrorCode::kReadOnly);
}

TEST_F(Qcow2EngineTest, MisalignedL2DataOffsetFailsRead) {
  uint64_t l2 = ImageWithOneCluster("a.qcow2");
  Poke64("a.qcow2", l2, (Peek64("a.qcow2", l2) + 512) | kQcow2Copied);
  auto img = Open("a.qcow2");
  EXPECT_EQ(Read(*img, 0, 4096).status().code(), ErrorCode::kCorrupt);
}

TEST_F(Qcow2EngineTest, MisalignedL2TableOffsetFailsRead) {
  uint64_t l2 = ImageWithOneCluster("a.qcow2");
  Poke64("a.qcow2", Peek64("a.qcow2", 40), (l2 + 512) | kQcow2Copied);
  auto img = Open("a.qcow2");
  EXPECT_EQ(Read(*img, 0, 4096).status().code(), ErrorCode::kCorrupt);
}

TEST_F(Qcow2EngineTest, L2TableBeyondEofFailsRead) {
  ImageWithOneCluster("a.qcow2");
  Poke64("a.qcow2", Peek64("a.qcow2", 40), (1ull << 40) | kQcow2Copied);
  auto img = Open("a.qcow2");
  EXPECT_EQ(Read(*img, 0, 4096).status().code(), ErrorCode::kCorrupt);
}

TEST_F(Qcow2EngineTest, ReservedL1BitsFailRead) {
  uint64_t l2 = ImageWithOneCluster("a.qcow2");
  Poke64("a.qcow2", Peek64("a.qcow2", 40), l2 | kQcow2Copied | (1ull << 60));
  auto img = Open("a.qcow2");
  EXPECT_EQ(Read(*img, 0, 4096).status().code(), ErrorCode::kCorrupt);
}

TEST_F(Qcow2EngineTest, CorruptBitOpensReadOnly) {
  ImageWithOneCluster("a.qcow2");
  Poke64("a.qcow2", kQcow2OffIncompatible, kQcow2IncompatCorrupt);
  auto img = Open("a.qcow2");
  ASSERT_NE(img, nullptr);
  EXPECT_TRUE(img->read_only());
  EXPECT_TRUE(img->info().corrupt);
  Status s = Write(*img, 0, 512, 1);
  EXPECT_EQ(s.code(), ErrorCode::kReadOnly);
  EXPECT_NE(s.message().find("corrupt"), std::string::npos) << s.message();
  auto r = Read(*img, 0, 512);
  ASSERT_TRUE(r.ok());
  EXPECT_EQ((*r)[0], 0xab);
}

TEST_F(Qcow2EngineTest, AutoclearBitsClearedOnFirstWriteOnly) {
  Create("a.qcow2", 1 << 20);
  Poke64("a.qcow2", kQcow2OffAutoclear, kQcow2AutoclearBitmaps | (1ull << 7));
  {
    auto img = Open("a.qcow2");
    ASSERT_TRUE(Read(*img, 0, 512).ok());
    ASSERT_TRUE(img->Flush().ok());
    EXPECT_EQ(Peek64("a.qcow2", kQcow2OffAutoclear), kQcow2AutoclearBitmaps | (1ull << 7));
    ASSERT_TRUE(Write(*img, 0, 512, 1).ok());
    EXPECT_EQ(Peek64("a.qcow2", kQcow2OffAutoclear), 0u);
  }
  EXPECT_EQ(CheckExit("a.qcow2"), 0);
}

TEST_F(Qcow2EngineTest, LazyRefcountsSetDirtyUntilClose) {
  Create("a.qcow2", 1 << 20, [](CreateOptions& c) { c.lazy_refcounts = true; });
  auto img = Open("a.qcow2");
  EXPECT_EQ(Peek64("a.qcow2", kQcow2OffIncompatible) & kQcow2IncompatDirty, 0u);
  ASSERT_TRUE(Write(*img, 0, 65536 * 3, 7).ok());
  EXPECT_NE(Peek64("a.qcow2", kQcow2OffIncompatible) & kQcow2IncompatDirty, 0u);
  ASSERT_TRUE(img->Close().ok());
  EXPECT_EQ(Peek64("a.qcow2", kQcow2OffIncompatible) & kQcow2IncompatDirty, 0u);
  EXPECT_EQ(CheckExit("a.qcow2"), 0);
}

TEST_F(Qcow2EngineTest, DirtyImageRefcountsRebuiltOnReadWriteOpen) {
  Create("a.qcow2", 4 << 20, [](CreateOptions& c) {
    c.lazy_refcounts = true;
    c.cluster_size = 4096;
  });
  {
    auto img = Open("a.qcow2");
    ASSERT_TRUE(Write(*img, 0, 1 << 20, 0x5a).ok());
    ASSERT_TRUE(Write(*img, 3 << 20, 5000, 0x6b).ok());
    ASSERT_TRUE(img->Flush().ok());
    // "Crash": lose every refcount while the dirty bit is still set.
    uint64_t rt = Peek64("a.qcow2", kQcow2OffRefcountTable);
    uint64_t block = Peek64("a.qcow2", rt);
    FileOpenOptions fo;
    fo.writable = true;
    auto f = fs_->Open("a.qcow2", fo);
    std::vector<uint8_t> zeros(4096, 0);
    ASSERT_TRUE((*f)->WriteAt(block, zeros).ok());
    auto copy = fs_->Open("crash.qcow2", FileOpenOptions{true, true, false, false});
    std::vector<uint8_t> all(*(*f)->Size());
    ASSERT_TRUE((*f)->ReadAt(0, all).ok());
    ASSERT_TRUE((*copy)->WriteAt(0, all).ok());
  }
  EXPECT_EQ(CheckExit("crash.qcow2"), 2);  // references without refcounts
  {
    auto img = Open("crash.qcow2");
    ASSERT_NE(img, nullptr);
    EXPECT_FALSE(img->info().dirty);
    ASSERT_TRUE(Write(*img, 2 << 20, 8192, 0x77).ok());  // allocation after rebuild
    ASSERT_TRUE(img->Close().ok());
  }
  EXPECT_EQ(CheckExit("crash.qcow2"), 0);
  auto img = Open("crash.qcow2", true);
  auto r = Read(*img, 0, 4 << 20);
  ASSERT_TRUE(r.ok());
  EXPECT_EQ((*r)[0], 0x5a);
  EXPECT_EQ((*r)[(1 << 20) - 1], 0x5a);
  EXPECT_EQ((*r)[1 << 20], 0);
  EXPECT_EQ((*r)[2 << 20], 0x77);
  EXPECT_EQ((*r)[(3 << 20) + 4999], 0x6b);
}

TEST_F(Qcow2EngineTest, RefcountTableGrowsAndStaysConsistent) {
  // 512-byte clusters with 64-bit refcounts: one table cluster covers only
  // 64 blocks x 64 clusters = 2 MiB, so 4 MiB of data must grow it.
  Create("a.qcow2", 8 << 20, [](CreateOptions& c) {
    c.cluster_size = 512;
    c.refcount_bits = 64;
  });
  uint32_t before = static_cast<uint32_t>(Peek64("a.qcow2", 56) >> 32);
  {
    auto img = Open("a.qcow2");
    for (uint64_t off = 0; off < (4 << 20); off += 65536)
      ASSERT_TRUE(Write(*img, off, 65536, static_cast<uint8_t>(off >> 16)).ok());
    ASSERT_TRUE(img->Close().ok());
  }
  uint32_t after = static_cast<uint32_t>(Peek64("a.qcow2", 56) >> 32);
  EXPECT_GT(after, before);
  EXPECT_EQ(CheckExit("a.qcow2"), 0);
  auto img = Open("a.qcow2", true);
  for (uint64_t off = 0; off < (4 << 20); off += 65536) {
    auto r = Read(*img, off, 65536);
    ASSERT_TRUE(r.ok());
    EXPECT_EQ((*r)[0], static_cast<uint8_t>(off >> 16));
    EXPECT_EQ((*r)[65535], static_cast<uint8_t>(off >> 16));
  }
}

TEST_F(Qcow2EngineTest, RefcountOverflowAndUnderflowAreErrors) {
  Create("a.qcow2", 1 << 20, [](CreateOptions& c) { c.refcount_bits = 1; });
  auto img = Open("a.qcow2");
  auto* q = dynamic_cast<Qcow2Image*>(img.get());
  ASSERT_NE(q, nullptr);
  Status s = q->refcounts()->Add(0, 1);  // the header cluster already has 1
  EXPECT_EQ(s.code(), ErrorCode::kOutOfRange);
  EXPECT_NE(s.message().find("overflow"), std::string::npos);
  EXPECT_EQ(q->refcounts()->Add(100, -1).code(), ErrorCode::kCorrupt);
}

TEST_F(Qcow2EngineTest, Version2DiscardWithBackingRefused) {
  Create("base.qcow2", 1 << 20);
  Create("top.qcow2", 1 << 20, [](CreateOptions& c) {
    c.qcow2_version = 2;
    c.backing_file = "base.qcow2";
  });
  auto img = Open("top.qcow2");
  EXPECT_EQ(img->Discard(0, 65536).code(), ErrorCode::kNotSupported);
}

TEST_F(Qcow2EngineTest, DiscardedDataNeverReappearsFromBacking) {
  Create("base.qcow2", 1 << 20);
  {
    auto base = Open("base.qcow2");
    ASSERT_TRUE(Write(*base, 0, 1 << 20, 0xbb).ok());
  }
  Create("top.qcow2", 1 << 20, [](CreateOptions& c) { c.backing_file = "base.qcow2"; });
  auto img = Open("top.qcow2");
  ASSERT_TRUE(Write(*img, 0, 131072, 0xcc).ok());
  ASSERT_TRUE(img->Discard(0, 262144).ok());
  auto r = Read(*img, 0, 262144);
  ASSERT_TRUE(r.ok());
  EXPECT_EQ(std::count(r->begin(), r->end(), 0), 262144);
  ASSERT_TRUE(img->Close().ok());
  EXPECT_EQ(CheckExit("top.qcow2"), 0);
}

TEST_F(Qcow2EngineTest, MapReportsDataZeroAndBackingDepth) {
  Create("base.qcow2", 128 << 10);
  {
    auto base = Open("base.qcow2");
    ASSERT_TRUE(Write(*base, 0, 128 << 10, 0xbb).ok());
  }
  Create("top.qcow2", 512 << 10, [](CreateOptions& c) { c.backing_file = "base.qcow2"; });
  auto img = Open("top.qcow2");
  ASSERT_TRUE(Write(*img, 0, 65536, 1).ok());
  ASSERT_TRUE(img->WriteZeroes(256 << 10, 65536, false).ok());
  auto m = img->Map(0, 512 << 10);
  ASSERT_TRUE(m.ok()) << m.status().ToString();
  // Extent has no "present" flag, so the zero cluster merges with the
  // unallocated range past the backing end (both: no data, zero, depth 0).
  ASSERT_EQ(m->size(), 3u);
  EXPECT_TRUE((*m)[0].data && (*m)[0].depth == 0 && (*m)[0].host_offset.has_value());
  EXPECT_EQ((*m)[0].length, 65536u);
  EXPECT_TRUE((*m)[1].data && (*m)[1].depth == 1);  // from the backing image
  EXPECT_EQ((*m)[1].offset, 65536u);
  EXPECT_TRUE(!(*m)[2].data && (*m)[2].zero && (*m)[2].depth == 0 && !(*m)[2].host_offset);
  EXPECT_EQ((*m)[2].offset, 128u << 10);
  // Extents tile the range.
  uint64_t end = 0;
  for (auto& e : *m) {
    EXPECT_EQ(e.offset, end);
    end += e.length;
  }
  EXPECT_EQ(end, 512u << 10);
}

TEST_F(Qcow2EngineTest, RemapCacheFilledByReadsAndInvalidatedByDiscard) {
  Create("a.qcow2", 1 << 20);
  auto img = Open("a.qcow2");
  ASSERT_NE(img->remap_cache(), nullptr);
  ASSERT_TRUE(Write(*img, 65536, 65536, 3).ok());
  ASSERT_TRUE(Read(*img, 65536, 4096).ok());
  auto hit = img->remap_cache()->Lookup(1);
  ASSERT_TRUE(hit.has_value());
  EXPECT_TRUE(hit->flags & Remap::kWritable);
  auto m = img->Map(65536, 65536);
  ASSERT_TRUE(m.ok());
  EXPECT_EQ(hit->host_offset, *(*m)[0].host_offset);
  ASSERT_TRUE(Read(*img, 0, 4096).ok());
  auto zero = img->remap_cache()->Lookup(0);
  ASSERT_TRUE(zero.has_value());
  EXPECT_TRUE(zero->flags & Remap::kZero);
  ASSERT_TRUE(img->Discard(65536, 65536).ok());
  EXPECT_FALSE(img->remap_cache()->Lookup(1).has_value());
  auto r = Read(*img, 65536, 4096);
  ASSERT_TRUE(r.ok());
  EXPECT_EQ((*r)[0], 0);
}

TEST_F(Qcow2EngineTest, RemapCacheResolvesThroughRawBacking) {
  Create("base.raw", 1 << 20, [](CreateOptions& c) { c.format = ImageFormat::kRaw; });
  {
    auto base = Open("base.raw");
    ASSERT_TRUE(Write(*base, 0, 1 << 20, 0x44).ok());
  }
  Create("top.qcow2", 1 << 20, [](CreateOptions& c) {
    c.backing_file = "base.raw";
    c.backing_format = ImageFormat::kRaw;
  });
  auto img = Open("top.qcow2");
  ASSERT_TRUE(Read(*img, 3 * 65536 + 100, 100).ok());
  auto m = img->remap_cache()->Lookup(3);
  ASSERT_TRUE(m.has_value());
  EXPECT_TRUE(m->flags & Remap::kBacking);
  EXPECT_EQ(m->layer, 1);
  EXPECT_EQ(m->host_offset, 3u * 65536);
  // A write makes the cluster this layer's own: the entry must not survive.
  ASSERT_TRUE(Write(*img, 3 * 65536, 512, 0x55).ok());
  auto after = img->remap_cache()->Lookup(3);
  EXPECT_TRUE(!after.has_value() || !(after->flags & Remap::kBacking));
  auto r = Read(*img, 3 * 65536, 1024);
  ASSERT_TRUE(r.ok());
  EXPECT_EQ((*r)[0], 0x55);
  EXPECT_EQ((*r)[600], 0x44);
}

TEST_F(Qcow2EngineTest, ExternalRawDataFileHoldsGuestBytesAtGuestOffsets) {
  Create("a.qcow2", 1 << 20, [](CreateOptions& c) {
    c.data_file = "a.data";
    c.data_file_raw = true;
  });
  {
    auto img = Open("a.qcow2");
    ASSERT_TRUE(img != nullptr);
    EXPECT_EQ(img->info().data_file, "a.data");
    ASSERT_TRUE(Write(*img, 70000, 1000, 0x42).ok());
    ASSERT_TRUE(img->WriteZeroes(70000, 100, false).ok());
    ASSERT_TRUE(img->Close().ok());
  }
  auto f = fs_->Open("a.data", {});
  ASSERT_TRUE(f.ok());
  std::vector<uint8_t> b(1000);
  ASSERT_TRUE((*f)->ReadAt(70000, b).ok());
  EXPECT_EQ(b[0], 0);
  EXPECT_EQ(b[100], 0x42);
  EXPECT_EQ(b[999], 0x42);
  EXPECT_EQ(CheckExit("a.qcow2"), 0);
}

TEST_F(Qcow2EngineTest, BackingLargerThanOverlayIsTruncated) {
  Create("base.qcow2", 4 << 20);
  {
    auto base = Open("base.qcow2");
    ASSERT_TRUE(Write(*base, 0, 4 << 20, 0x99).ok());
  }
  Create("top.qcow2", 1 << 20, [](CreateOptions& c) { c.backing_file = "base.qcow2"; });
  auto img = Open("top.qcow2");
  EXPECT_EQ(img->size_bytes(), 1u << 20);
  auto r = Read(*img, (1 << 20) - 512, 512);
  ASSERT_TRUE(r.ok());
  EXPECT_EQ((*r)[511], 0x99);
  EXPECT_EQ(Read(*img, 1 << 20, 512).status().code(), ErrorCode::kOutOfRange);
}

TEST_F(Qcow2EngineTest, MissingSnapshotIsNotFound) {
  Create("a.qcow2", 1 << 20);
  OpenOptions oo;
  oo.fs = fs_.get();
  oo.snapshot = "nope";
  EXPECT_EQ(OpenImage("a.qcow2", oo).status().code(), ErrorCode::kNotFound);
}

TEST_F(Qcow2EngineTest, CheckRepairsLeaks) {
  Create("a.qcow2", 1 << 20);
  {
    auto img = Open("a.qcow2");
    auto* q = dynamic_cast<Qcow2Image*>(img.get());
    ASSERT_TRUE(q->refcounts()->Set(50, 1).ok());  // a leaked cluster
    ASSERT_TRUE(img->Close().ok());
  }
  EXPECT_EQ(CheckExit("a.qcow2"), 3);
  CheckOptions ck;
  ck.fs = fs_.get();
  ck.repair_leaks = true;
  auto r = CheckImage("a.qcow2", ck);
  ASSERT_TRUE(r.ok());
  EXPECT_EQ(r->leaks_fixed, 1u);
  EXPECT_EQ(r->ExitCode(), 0);
}

TEST_F(Qcow2EngineTest, CheckRepairAllFixesMissingRefcountsAndCopiedFlags) {
  uint64_t l2 = ImageWithOneCluster("a.qcow2");
  uint64_t data = Peek64("a.qcow2", l2) & kQcow2OffsetMask;
  {
    auto img = Open("a.qcow2");
    auto* q = dynamic_cast<Qcow2Image*>(img.get());
    ASSERT_TRUE(q->refcounts()->Set(data / 65536, 0).ok());  // referenced but free
    ASSERT_TRUE(img->Close().ok());
  }
  Poke64("a.qcow2", l2, data);  // COPIED flag dropped from the L2 entry
  CheckOptions ck;
  ck.fs = fs_.get();
  auto before = CheckImage("a.qcow2", ck);
  ASSERT_TRUE(before.ok());
  EXPECT_EQ(before->ExitCode(), 2);
  EXPECT_GE(before->corruptions, 1u);
  ck.repair_leaks = true;  // leaks-only repair leaves corruptions alone
  auto leaks_only = CheckImage("a.qcow2", ck);
  ASSERT_TRUE(leaks_only.ok());
  EXPECT_EQ(leaks_only->ExitCode(), 2);
  ck.repair_all = true;
  auto fixed = CheckImage("a.qcow2", ck);
  ASSERT_TRUE(fixed.ok()) << fixed.status().ToString();
  EXPECT_GE(fixed->corruptions_fixed, 1u);
  EXPECT_EQ(fixed->ExitCode(), 0);
  EXPECT_EQ(CheckExit("a.qcow2"), 0);
  EXPECT_NE(Peek64("a.qcow2", l2) & kQcow2Copied, 0u);
  auto img = Open("a.qcow2", true);
  auto r = Read(*img, 0, 65536);
  ASSERT_TRUE(r.ok());
  EXPECT_EQ((*r)[65535], 0xab);
}

TEST_F(Qcow2EngineTest, ConcurrentWritersAndReadersOnDisjointRanges) {
  Create("base.qcow2", 8 << 20);
  {
    auto base = Open("base.qcow2");
    ASSERT_TRUE(Write(*base, 0, 8 << 20, 0x10).ok());
  }
  Create("top.qcow2", 8 << 20, [](CreateOptions& c) {
    c.backing_file = "base.qcow2";
    c.cluster_size = 4096;
  });
  auto img = Open("top.qcow2");
  std::vector<std::thread> threads;
  std::atomic<int> failures{0};
  for (int t = 0; t < 4; ++t) {
    threads.emplace_back([&, t] {
      const uint64_t region = uint64_t(t) * (2 << 20);
      for (int i = 0; i < 200; ++i) {
        uint64_t off = region + (uint64_t(i) * 7919 % 500) * 4096 + 100;
        std::vector<uint8_t> b(3000, static_cast<uint8_t>(0x20 + t));
        iovec v = MakeIoVec(b.data(), b.size());
        if (!img->Write(off, {&v, 1}).ok()) ++failures;
        std::vector<uint8_t> r(3000);
        iovec rv = MakeIoVec(r.data(), r.size());
        if (!img->Read(off, {&rv, 1}).ok() || r != b) ++failures;
      }
    });
  }
  for (auto& th : threads) th.join();
  EXPECT_EQ(failures.load(), 0);
  ASSERT_TRUE(img->Close().ok());
  EXPECT_EQ(CheckExit("top.qcow2"), 0);
}

TEST_F(Qcow2EngineTest, L2CacheSizeFollowsOptionsAndImage) {
  Create("a.qcow2", 1ull << 30);
  OpenOptions oo;
  oo.fs = fs_.get();
  oo.l2_cache_bytes = 64 << 10;
  auto small = OpenImage("a.qcow2", oo);
  ASSERT_TRUE(small.ok());
  EXPECT_EQ(dynamic_cast<Qcow2Image*>(small->get())->l2_cache_bytes(), 64u << 10);
  small->reset();
  oo.l2_cache_bytes = 0;  // default: enough to map the whole image (1 GiB: 128 KiB of L2)
  auto dflt = OpenImage("a.qcow2", oo);
  ASSERT_TRUE(dflt.ok());
  EXPECT_EQ(dynamic_cast<Qcow2Image*>(dflt->get())->l2_cache_bytes(), 128u << 10);
}

TEST_F(Qcow2EngineTest, CheckNotSupportedForRaw) {
  Create("a.raw", 1 << 20, [](CreateOptions& c) { c.format = ImageFormat::kRaw; });
  EXPECT_EQ(CheckExit("a.raw"), 63);
}

}  // namespace
}  // namespace cowtap::cow

namespace cowtap::cow {
namespace {

// A thin overlay must not keep the space reserved ahead of use once closed
// (SAN boot keeps hundreds of them), and must reserve little while open.
TEST(Qcow2SpaceTest, ThinOverlayReservesLittleAndReturnsItOnClose) {
  char dir_template[] = "/tmp/cowtap-space-XXXXXX";
  ASSERT_NE(::mkdtemp(dir_template), nullptr);
  const std::string path = std::string(dir_template) + "/thin.qcow2";
  CreateOptions co;
  co.size_bytes = 1ull << 30;
  ASSERT_TRUE(CreateImage(path, co).ok());
  auto image = OpenImage(path);
  ASSERT_TRUE(image.ok()) << image.status().ToString();
  std::vector<uint8_t> data(65536, 0x5a);
  iovec v{data.data(), data.size()};
  ASSERT_TRUE((*image)->Write(0, {&v, 1}).ok());
  ASSERT_TRUE((*image)->Flush().ok());
  struct stat st;
  ASSERT_EQ(::stat(path.c_str(), &st), 0);
  EXPECT_LE(uint64_t(st.st_blocks) * 512, uint64_t(st.st_size) + (2ull << 20)) << "reserved too much ahead while open";
  ASSERT_TRUE((*image)->Close().ok());
  ASSERT_EQ(::stat(path.c_str(), &st), 0);
  EXPECT_LE(uint64_t(st.st_blocks) * 512, uint64_t(st.st_size) + 4096) << "reservation past EOF kept after Close";
  ::unlink(path.c_str());
  ::rmdir(dir_template);
}

}  // namespace
}  // namespace cowtap::cow

#include "cow/fault_file.h"

namespace cowtap::cow {
namespace {

// A write refused for lack of space leaks nothing, however often the guest
// retries, and succeeds once space returns.
TEST(Qcow2SpaceTest, WritesRefusedForNoSpaceLeakNoClusters) {
  auto mem = NewMemFileSystem();
  FaultInjectingFileSystem fs(mem.get());
  CreateOptions co;
  co.size_bytes = 64ull << 20;
  co.fs = mem.get();
  ASSERT_TRUE(CreateImage("full.qcow2", co).ok());
  auto faults = fs.Target("full.qcow2");
  faults->AddFault({.op = FaultOp::kAllocate, .trigger = FaultTrigger::kAfterN, .n = 0, .errno_value = ENOSPC});
  OpenOptions oo;
  oo.fs = &fs;
  auto image = OpenImage("full.qcow2", oo);
  ASSERT_TRUE(image.ok()) << image.status().ToString();
  std::vector<uint8_t> data(65536, 0x77);
  iovec v{data.data(), data.size()};
  for (int retry = 0; retry < 20; ++retry) {
    EXPECT_EQ((*image)->Write(uint64_t(retry) << 16, {&v, 1}).code(), ErrorCode::kNoSpace);
  }
  faults->ClearFaults();
  ASSERT_TRUE((*image)->Write(0, {&v, 1}).ok());
  ASSERT_TRUE((*image)->Close().ok());
  image = Status::Cancelled("closed");
  CheckOptions check;
  check.fs = mem.get();
  auto r = CheckImage("full.qcow2", check);
  ASSERT_TRUE(r.ok()) << r.status().ToString();
  EXPECT_EQ(r->leaks, 0u);
  EXPECT_EQ(r->corruptions, 0u);
}

}  // namespace
}  // namespace cowtap::cow
