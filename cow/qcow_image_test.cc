// Unit tests of qcow v1 on the in-memory file system: header validation (one
// test per rejected condition), read/write/copy-up over backing chains against
// a flat reference buffer, compressed clusters, discard, map, and crash
// consistency under the fault-injecting file system.
#include <gtest/gtest.h>

#include <array>
#include <random>
#include <thread>

#include "base/endian.h"
#include "cow/fault_file.h"
#include "cow/image.h"
#include "cow/qcow_format.h"
#include "cow/remap_cache.h"

namespace cowtap::cow {
namespace {

constexpr uint64_t kMiB = 1 << 20;

std::vector<uint8_t> Pattern(uint64_t size, uint32_t seed) {
  std::vector<uint8_t> v(size);
  std::mt19937 rng(seed);
  for (auto& b : v) b = static_cast<uint8_t>(rng() | 1);  // never zero, so copy-up gaps show
  return v;
}

class QcowTest : public ::testing::Test {
 protected:
  std::unique_ptr<FileSystem> fs_ = NewMemFileSystem();

  OpenOptions Opts(bool read_only = false) {
    OpenOptions o;
    o.fs = fs_.get();
    o.read_only = read_only;
    return o;
  }
  void Create(const std::string& path, ImageFormat format, uint64_t size, const std::string& backing = "") {
    CreateOptions c;
    c.fs = fs_.get();
    c.format = format;
    c.size_bytes = size;
    c.backing_file = backing;
    Status s = CreateImage(path, c);
    ASSERT_TRUE(s.ok()) << s.ToString();
  }
  std::unique_ptr<Image> Open(const std::string& path, OpenOptions o) {
    auto r = OpenImage(path, o);
    EXPECT_TRUE(r.ok()) << r.status().ToString();
    return r.ok() ? std::move(r).value() : nullptr;
  }
  std::unique_ptr<Image> Open(const std::string& path) { return Open(path, Opts()); }
  static Status Write(Image& img, uint64_t offset, const std::vector<uint8_t>& data) {
    iovec v = MakeIoVec(data.data(), data.size());
    return img.Write(offset, IoVecs(&v, 1));
  }
  static std::vector<uint8_t> Read(Image& img, uint64_t offset, uint64_t length) {
    std::vector<uint8_t> out(length, 0xee);
    iovec v = MakeIoVec(out.data(), out.size());
    Status s = img.Read(offset, IoVecs(&v, 1));
    EXPECT_TRUE(s.ok()) << s.ToString();
    return out;
  }
  // Raw bytes of a file in fs_.
  std::vector<uint8_t> FileBytes(const std::string& path) {
    auto f = fs_->Open(path, {});
    uint64_t size = *(*f)->Size();
    std::vector<uint8_t> out(size);
    EXPECT_TRUE((*f)->ReadAt(0, out).ok());
    return out;
  }
  void Patch(const std::string& path, uint64_t offset, std::span<const uint8_t> bytes) {
    FileOpenOptions fo;
    fo.writable = true;
    auto f = fs_->Open(path, fo);
    ASSERT_TRUE(f.ok());
    ASSERT_TRUE((*f)->WriteAt(offset, bytes).ok());
  }
  void PatchBe64(const std::string& path, uint64_t offset, uint64_t v) {
    uint8_t b[8];
    StoreBe64(b, v);
    Patch(path, offset, b);
  }
  void PatchBe32(const std::string& path, uint64_t offset, uint32_t v) {
    uint8_t b[4];
    StoreBe32(b, v);
    Patch(path, offset, b);
  }
  uint64_t L1Entry(const std::string& path, uint64_t index) {
    auto bytes = FileBytes(path);
    return LoadBe64(bytes.data() + LoadBe64(bytes.data() + 40) + index * 8);
  }
  // Opening path must fail with code and a message naming the file.
  void ExpectOpenFails(const std::string& path, ErrorCode code, const std::string& needle) {
    OpenOptions o = Opts();
    o.format = ImageFormat::kQcow;
    auto r = OpenImage(path, o);
    ASSERT_FALSE(r.ok());
    EXPECT_EQ(r.status().code(), code) << r.status().ToString();
    EXPECT_NE(r.status().message().find(path), std::string::npos) << r.status().ToString();
    EXPECT_NE(r.status().message().find(needle), std::string::npos) << r.status().ToString();
  }
};

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

// --- Rejected headers: one test per condition ------------------------------

class QcowHeaderTest : public QcowTest {
 protected:
  void SetUp() override { Create("/h.qcow", ImageFormat::kQcow, 4 * kMiB); }
};

TEST_F(QcowHeaderTest, ValidImageOpens) { EXPECT_NE(Open("/h.qcow"), nullptr); }

TEST_F(QcowHeaderTest, RejectsFileShorterThanHeader) {
  FileOpenOptions fo;
  fo.create = true;
  auto f = fs_->Open("/short.qcow", fo);
  ASSERT_TRUE((*f)->WriteAt(0, std::vector<uint8_t>{0x51, 0x46, 0x49, 0xfb, 0, 0, 0, 1}).ok());
  ExpectOpenFails("/short.qcow", ErrorCode::kCorrupt, "shorter than the 48-byte header");
}

TEST_F(QcowHeaderTest, RejectsBadMagic) {
  PatchBe32("/h.qcow", 0, 0x12345678);
  ExpectOpenFails("/h.qcow", ErrorCode::kCorrupt, "bad magic");
}

TEST_F(QcowHeaderTest, RejectsVersionOtherThanOne) {
  PatchBe32("/h.qcow", 4, 2);
  ExpectOpenFails("/h.qcow", ErrorCode::kNotSupported, "version 2");
}

TEST_F(QcowHeaderTest, RejectsEncryption) {
  PatchBe32("/h.qcow", 36, 1);
  ExpectOpenFails("/h.qcow", ErrorCode::kNotSupported, "encryption");
}

TEST_F(QcowHeaderTest, RejectsClusterBitsBelow9) {
  Patch("/h.qcow", 32, std::array<uint8_t, 1>{8});
  ExpectOpenFails("/h.qcow", ErrorCode::kCorrupt, "cluster_bits 8");
}

TEST_F(QcowHeaderTest, RejectsClusterBitsAbove16) {
  Patch("/h.qcow", 32, std::array<uint8_t, 1>{17});
  ExpectOpenFails("/h.qcow", ErrorCode::kCorrupt, "cluster_bits 17");
}

TEST_F(QcowHeaderTest, RejectsL2BitsBelow6) {
  Patch("/h.qcow", 33, std::array<uint8_t, 1>{5});
  ExpectOpenFails("/h.qcow", ErrorCode::kCorrupt, "l2_bits 5");
}

TEST_F(QcowHeaderTest, RejectsL2BitsAbove13) {
  Patch("/h.qcow", 33, std::array<uint8_t, 1>{14});
  ExpectOpenFails("/h.qcow", ErrorCode::kCorrupt, "l2_bits 14");
}

TEST_F(QcowHeaderTest, RejectsTinyVirtualSize) {
  PatchBe64("/h.qcow", 24, 1);
  ExpectOpenFails("/h.qcow", ErrorCode::kCorrupt, "too small");
}

TEST_F(QcowHeaderTest, RejectsVirtualSizeNeedingHugeL1) {
  PatchBe64("/h.qcow", 24, ~0ull);
  ExpectOpenFails("/h.qcow", ErrorCode::kCorrupt, "more than the limit");
}

TEST_F(QcowHeaderTest, RejectsL1InsideHeader) {
  PatchBe64("/h.qcow", 40, 8);
  ExpectOpenFails("/h.qcow", ErrorCode::kCorrupt, "overlaps the header");
}

TEST_F(QcowHeaderTest, RejectsL1PastEndOfFile) {
  PatchBe64("/h.qcow", 40, 1 * kMiB);
  ExpectOpenFails("/h.qcow", ErrorCode::kCorrupt, "past the end of the file");
}

TEST_F(QcowHeaderTest, RejectsL1LargerThanFile) {
  // 4 GiB of virtual size needs 2048 L1 entries = 16 KiB; the file has 560 bytes.
  PatchBe64("/h.qcow", 24, 4096 * kMiB);
  ExpectOpenFails("/h.qcow", ErrorCode::kCorrupt, "L1 table");
}

TEST_F(QcowHeaderTest, RejectsEmptyBackingName) {
  PatchBe64("/h.qcow", 8, 48);
  PatchBe32("/h.qcow", 16, 0);
  ExpectOpenFails("/h.qcow", ErrorCode::kCorrupt, "is empty");
}

TEST_F(QcowHeaderTest, RejectsBackingNameLongerThan1023) {
  PatchBe64("/h.qcow", 8, 48);
  PatchBe32("/h.qcow", 16, 1024);
  ExpectOpenFails("/h.qcow", ErrorCode::kCorrupt, "exceeds 1023");
}

TEST_F(QcowHeaderTest, RejectsBackingNamePastEndOfFile) {
  PatchBe64("/h.qcow", 8, 550);
  PatchBe32("/h.qcow", 16, 100);
  ExpectOpenFails("/h.qcow", ErrorCode::kCorrupt, "past the end of the file");
}

TEST_F(QcowHeaderTest, RejectsBackingNameInsideHeader) {
  PatchBe64("/h.qcow", 8, 40);
  PatchBe32("/h.qcow", 16, 4);
  ExpectOpenFails("/h.qcow", ErrorCode::kCorrupt, "overlaps the header");
}

TEST_F(QcowHeaderTest, RejectsBackingNameOverlappingL1) {
  PatchBe64("/h.qcow", 8, 50);
  PatchBe32("/h.qcow", 16, 4);
  ExpectOpenFails("/h.qcow", ErrorCode::kCorrupt, "overlaps the L1 table");
}

TEST_F(QcowHeaderTest, RejectsBackingNameWithNul) {
  Create("/base.raw", ImageFormat::kRaw, 4 * kMiB);
  Create("/o.qcow", ImageFormat::kQcow, 0, "base.raw");
  Patch("/o.qcow", 50, std::array<uint8_t, 1>{0});
  ExpectOpenFails("/o.qcow", ErrorCode::kCorrupt, "NUL");
}

TEST_F(QcowHeaderTest, RejectsUnalignedL1Entry) {
  PatchBe64("/h.qcow", 48, 4096 + 8);
  Patch("/h.qcow", 8191, std::array<uint8_t, 1>{0});  // make the file long enough
  ExpectOpenFails("/h.qcow", ErrorCode::kCorrupt, "not aligned");
}

TEST_F(QcowHeaderTest, RejectsL1EntryPastEndOfFile) {
  PatchBe64("/h.qcow", 48, 64 * 4096);
  ExpectOpenFails("/h.qcow", ErrorCode::kCorrupt, "past the end of the file");
}

TEST_F(QcowHeaderTest, RejectsL1EntryPointingAtMetadata) {
  // 8 GiB with 4 KiB clusters: an L1 table of 4096 entries at 48..32816.
  Create("/big.qcow", ImageFormat::kQcow, 1ull << 33);
  PatchBe64("/big.qcow", 48, 4096);  // an aligned offset inside the L1 table itself
  ExpectOpenFails("/big.qcow", ErrorCode::kCorrupt, "overlaps the header or L1");
}

// --- Entries found invalid at run time -------------------------------------

TEST_F(QcowTest, UnalignedL2EntryFailsReadAndStopsWrites) {
  Create("/a.qcow", ImageFormat::kQcow, 4 * kMiB);
  {
    auto img = Open("/a.qcow");
    ASSERT_TRUE(Write(*img, 0, Pattern(4096, 1)).ok());
    ASSERT_TRUE(img->Close().ok());
  }
  const uint64_t l2 = L1Entry("/a.qcow", 0);
  PatchBe64("/a.qcow", l2, 4096 * 3 + 16);
  auto img = Open("/a.qcow");
  std::vector<uint8_t> buf(512);
  iovec v = MakeIoVec(buf.data(), buf.size());
  Status s = img->Read(0, IoVecs(&v, 1));
  EXPECT_EQ(s.code(), ErrorCode::kCorrupt) << s.ToString();
  EXPECT_NE(s.message().find("guest cluster 0"), std::string::npos) << s.ToString();
  // Other clusters still read; writes are refused from now on.
  EXPECT_EQ(Read(*img, 8192, 512), std::vector<uint8_t>(512, 0));
  EXPECT_EQ(Write(*img, 8192, Pattern(512, 2)).code(), ErrorCode::kCorrupt);
}

TEST_F(QcowTest, L2EntryPastEndOfFileIsCorrupt) {
  Create("/a.qcow", ImageFormat::kQcow, 4 * kMiB);
  {
    auto img = Open("/a.qcow");
    ASSERT_TRUE(Write(*img, 0, Pattern(4096, 1)).ok());
  }
  PatchBe64("/a.qcow", L1Entry("/a.qcow", 0) + 8, 1024 * 4096);
  auto img = Open("/a.qcow");
  std::vector<uint8_t> buf(4096);
  iovec v = MakeIoVec(buf.data(), buf.size());
  EXPECT_EQ(img->Read(4096, IoVecs(&v, 1)).code(), ErrorCode::kCorrupt);
}

// --- Read/write/copy-up against a flat reference ---------------------------

// Applies random writes (sizes 1 B .. 3 clusters, any alignment) to img and
// ref alike.
void RandomWrites(Image& img, std::vector<uint8_t>& ref, uint32_t seed, int count, uint64_t max_len) {
  std::mt19937_64 rng(seed);
  for (int i = 0; i < count; ++i) {
    uint64_t len = 1 + rng() % max_len;
    uint64_t off = rng() % (ref.size() - len + 1);
    auto data = Pattern(len, static_cast<uint32_t>(rng()));
    iovec v = MakeIoVec(data.data(), data.size());
    ASSERT_TRUE(img.Write(off, IoVecs(&v, 1)).ok());
    std::copy(data.begin(), data.end(), ref.begin() + static_cast<ptrdiff_t>(off));
  }
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
