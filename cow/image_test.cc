// Tests of the chain opener (OpenImage / CreateImage / ProbeFormat in
// image.cc) and of RawImage: probing, loops, depth limit, relative backing
// names, mixed-format chains, size mismatches, raw I/O and map, range checks.
// qcow v1 is the overlay format here (qcow2 is tested by its own suite).
#include "cow/image.h"

#include <gtest/gtest.h>
#include <unistd.h>

#include <filesystem>
#include <fstream>
#include <random>

#include "base/endian.h"
#include "cow/qcow_format.h"

namespace cowtap::cow {
namespace {

namespace stdfs = std::filesystem;
constexpr uint64_t kMiB = 1 << 20;

std::vector<uint8_t> Pattern(uint64_t size, uint32_t seed) {
  std::vector<uint8_t> v(size);
  std::mt19937 rng(seed);
  for (auto& b : v) b = static_cast<uint8_t>(rng() | 1);
  return v;
}

class ImageTest : public ::testing::Test {
 protected:
  std::unique_ptr<FileSystem> mem_ = NewMemFileSystem();
  FileSystem* fs_ = mem_.get();

  Status Create(const std::string& path, ImageFormat format, uint64_t size, const std::string& backing = "",
                bool overwrite = false) {
    CreateOptions c;
    c.fs = fs_;
    c.format = format;
    c.size_bytes = size;
    c.backing_file = backing;
    c.overwrite = overwrite;
    return CreateImage(path, c);
  }
  Result<std::unique_ptr<Image>> Open(const std::string& path, bool read_only = false, int max_depth = 64) {
    OpenOptions o;
    o.fs = fs_;
    o.read_only = read_only;
    o.max_chain_depth = max_depth;
    return OpenImage(path, o);
  }
  static Status Write(Image& img, uint64_t offset, const std::vector<uint8_t>& data) {
    iovec v = MakeIoVec(data.data(), data.size());
    return img.Write(offset, IoVecs(&v, 1));
  }
  static Status ReadInto(Image& img, uint64_t offset, std::vector<uint8_t>& out) {
    iovec v = MakeIoVec(out.data(), out.size());
    return img.Read(offset, IoVecs(&v, 1));
  }
  static std::vector<uint8_t> Read(Image& img, uint64_t offset, uint64_t length) {
    std::vector<uint8_t> out(length, 0xee);
    Status s = ReadInto(img, offset, out);
    EXPECT_TRUE(s.ok()) << s.ToString();
    return out;
  }
  void WriteFile(const std::string& path, const std::vector<uint8_t>& bytes) {
    FileOpenOptions fo;
    fo.create = true;
    auto f = fs_->Open(path, fo);
    ASSERT_TRUE(f.ok());
    ASSERT_TRUE((*f)->Truncate(0).ok());
    ASSERT_TRUE((*f)->WriteAt(0, bytes).ok());
  }
  // A raw image at path holding data.
  void MakeRaw(const std::string& path, const std::vector<uint8_t>& data) {
    ASSERT_TRUE(Create(path, ImageFormat::kRaw, data.size()).ok());
    auto img = Open(path);
    ASSERT_TRUE(img.ok()) << img.status().ToString();
    ASSERT_TRUE(Write(**img, 0, data).ok());
  }
};

// --- Probing ---------------------------------------------------------------

std::vector<uint8_t> QfiHeader(uint32_t version) {
  std::vector<uint8_t> h(512, 0);
  StoreBe32(h.data(), kQcowMagic);
  StoreBe32(h.data() + 4, version);
  return h;
}

Result<ImageFormat> ProbeBytes(const std::vector<uint8_t>& bytes) {
  auto f = NewMemFile("probe");
  if (!bytes.empty()) COWTAP_RETURN_IF_ERROR(f->WriteAt(0, bytes));
  return ProbeFormat(*f);
}

TEST_F(ImageTest, ProbesEmptyAndShortFilesAsRaw) {
  EXPECT_EQ(*ProbeBytes({}), ImageFormat::kRaw);
  EXPECT_EQ(*ProbeBytes({0x51, 0x46, 0x49, 0xfb}), ImageFormat::kRaw);
}

TEST_F(ImageTest, ProbesArbitraryBytesAsRaw) { EXPECT_EQ(*ProbeBytes(Pattern(4096, 1)), ImageFormat::kRaw); }

TEST_F(ImageTest, ProbesQcowVersions) {
  EXPECT_EQ(*ProbeBytes(QfiHeader(1)), ImageFormat::kQcow);
  EXPECT_EQ(*ProbeBytes(QfiHeader(2)), ImageFormat::kQcow2);
  EXPECT_EQ(*ProbeBytes(QfiHeader(3)), ImageFormat::kQcow2);
  auto r = ProbeBytes(QfiHeader(4));
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.status().code(), ErrorCode::kNotSupported);
}

TEST_F(ImageTest, OpenProbesEachLayersFormat) {
  MakeRaw("/base.raw", Pattern(64 * 1024, 1));
  ASSERT_TRUE(Create("/top.qcow", ImageFormat::kQcow, 0, "base.raw").ok());
  auto img = Open("/top.qcow");
  ASSERT_TRUE(img.ok()) << img.status().ToString();
  EXPECT_EQ((*img)->info().format, ImageFormat::kQcow);
  ASSERT_NE((*img)->backing(), nullptr);
  EXPECT_EQ((*img)->backing()->info().format, ImageFormat::kRaw);
  EXPECT_EQ((*img)->backing()->backing(), nullptr);
}

TEST_F(ImageTest, FormatNamesRoundTrip) {
  for (ImageFormat f : {ImageFormat::kRaw, ImageFormat::kQcow, ImageFormat::kQcow2})
    EXPECT_EQ(ParseFormatName(FormatName(f)), f);
  EXPECT_FALSE(ParseFormatName("QCOW2").has_value());
  EXPECT_FALSE(ParseFormatName("vmdk").has_value());
}

// --- Chains: loops, depth, names -------------------------------------------

TEST_F(ImageTest, RefusesTwoImageLoop) {
  ASSERT_TRUE(Create("/B", ImageFormat::kRaw, kMiB).ok());
  ASSERT_TRUE(Create("/A", ImageFormat::kQcow, 0, "B").ok());
  ASSERT_TRUE(Create("/B", ImageFormat::kQcow, 0, "A", /*overwrite=*/true).ok());  // now A -> B -> A
  auto r = Open("/A");
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.status().code(), ErrorCode::kCorrupt) << r.status().ToString();
  EXPECT_NE(r.status().message().find("loops"), std::string::npos) << r.status().ToString();
}

TEST_F(ImageTest, RefusesImageThatIsItsOwnBacking) {
  ASSERT_TRUE(Create("/A", ImageFormat::kRaw, kMiB).ok());
  ASSERT_TRUE(Create("/A", ImageFormat::kQcow, 0, "A", /*overwrite=*/true).ok());
  auto r = Open("/A", /*read_only=*/true);
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.status().code(), ErrorCode::kCorrupt) << r.status().ToString();
}

TEST_F(ImageTest, EnforcesChainDepthLimit) {
  MakeRaw("/l0", Pattern(4096, 1));
  for (int i = 1; i <= 4; ++i)
    ASSERT_TRUE(Create("/l" + std::to_string(i), ImageFormat::kQcow, 0, "l" + std::to_string(i - 1)).ok());
  // /l4 -> l3 -> l2 -> l1 -> l0: four backing levels.
  auto refused = Open("/l4", false, /*max_depth=*/3);
  ASSERT_FALSE(refused.ok());
  EXPECT_EQ(refused.status().code(), ErrorCode::kInvalidArgument) << refused.status().ToString();
  EXPECT_NE(refused.status().message().find("deeper than 3"), std::string::npos);
  auto ok = Open("/l4", false, /*max_depth=*/4);
  ASSERT_TRUE(ok.ok()) << ok.status().ToString();
  EXPECT_EQ(Read(**ok, 0, 4096), Pattern(4096, 1));
}

TEST_F(ImageTest, MissingBackingFileIsReportedWithTheOverlayName) {
  ASSERT_TRUE(Create("/base.raw", ImageFormat::kRaw, kMiB).ok());
  ASSERT_TRUE(Create("/top.qcow", ImageFormat::kQcow, 0, "base.raw").ok());
  ASSERT_TRUE(fs_->Remove("/base.raw").ok());
  auto r = Open("/top.qcow");
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.status().code(), ErrorCode::kNotFound);
  EXPECT_NE(r.status().message().find("opening backing file of /top.qcow"), std::string::npos)
      << r.status().ToString();
}

TEST_F(ImageTest, RelativeAndAbsoluteBackingNamesInMemoryFileSystem) {
  MakeRaw("/imgs/base.raw", Pattern(8192, 1));
  MakeRaw("/other/base.raw", Pattern(8192, 2));
  ASSERT_TRUE(Create("/imgs/rel.qcow", ImageFormat::kQcow, 0, "base.raw").ok());
  ASSERT_TRUE(Create("/imgs/abs.qcow", ImageFormat::kQcow, 0, "/other/base.raw").ok());
  auto rel = Open("/imgs/rel.qcow");
  auto abs = Open("/imgs/abs.qcow");
  ASSERT_TRUE(rel.ok() && abs.ok());
  EXPECT_EQ((*rel)->info().backing_path, "/imgs/base.raw");
  EXPECT_EQ(Read(**rel, 0, 8192), Pattern(8192, 1));
  EXPECT_EQ(Read(**abs, 0, 8192), Pattern(8192, 2));
}

class ImageDiskTest : public ImageTest {
 protected:
  void SetUp() override {
    fs_ = DefaultFileSystem();
    char tmpl[] = "/tmp/cowtap-image-test-XXXXXX";
    ASSERT_NE(::mkdtemp(tmpl), nullptr);
    dir_ = tmpl;
  }
  void TearDown() override {
    if (!dir_.empty()) stdfs::remove_all(dir_);
  }
  std::string dir_;
};

TEST_F(ImageDiskTest, RelativeNamesResolveAgainstEachOverlaysOwnDirectory) {
  stdfs::create_directories(dir_ + "/d1");
  stdfs::create_directories(dir_ + "/d2");
  MakeRaw(dir_ + "/d2/base.raw", Pattern(8192, 1));
  MakeRaw(dir_ + "/d1/base.raw", Pattern(8192, 2));  // decoy next to the top image
  ASSERT_TRUE(Create(dir_ + "/d2/mid.qcow", ImageFormat::kQcow, 0, "base.raw").ok());
  ASSERT_TRUE(Create(dir_ + "/d1/top.qcow", ImageFormat::kQcow, 0, "../d2/mid.qcow").ok());
  auto img = Open(dir_ + "/d1/top.qcow");
  ASSERT_TRUE(img.ok()) << img.status().ToString();
  EXPECT_EQ((*img)->info().backing_file, "../d2/mid.qcow");
  EXPECT_EQ(Read(**img, 0, 8192), Pattern(8192, 1));
  // Opening by a relative path from another working directory works too.
  const auto cwd = stdfs::current_path();
  stdfs::current_path(dir_);
  auto rel = Open("d1/top.qcow");
  stdfs::current_path(cwd);
  ASSERT_TRUE(rel.ok()) << rel.status().ToString();
  EXPECT_EQ(Read(**rel, 0, 8192), Pattern(8192, 1));
}

TEST_F(ImageDiskTest, LoopThroughASymlinkIsRefused) {
  MakeRaw(dir_ + "/b.raw", Pattern(4096, 1));
  stdfs::create_symlink("a.qcow", dir_ + "/link.qcow");
  // a.qcow over b.raw, then rewritten over link.qcow (which is a.qcow itself).
  ASSERT_TRUE(Create(dir_ + "/a.qcow", ImageFormat::kQcow, 0, "b.raw").ok());
  ASSERT_TRUE(Create(dir_ + "/a.qcow", ImageFormat::kQcow, 4096, "link.qcow", /*overwrite=*/true).ok());
  auto r = Open(dir_ + "/a.qcow");
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.status().code(), ErrorCode::kCorrupt) << r.status().ToString();
}

// --- Mixed formats and size mismatches -------------------------------------

TEST_F(ImageTest, RawCannotHaveABackingFile) {
  ASSERT_TRUE(Create("/base.raw", ImageFormat::kRaw, kMiB).ok());
  EXPECT_EQ(Create("/top.raw", ImageFormat::kRaw, 0, "base.raw").code(), ErrorCode::kInvalidArgument);
}

TEST_F(ImageTest, RawUnderQcowUnderQcowReadsThrough) {
  auto base = Pattern(256 * 1024, 1);
  MakeRaw("/base.raw", base);
  ASSERT_TRUE(Create("/mid.qcow", ImageFormat::kQcow, 0, "base.raw").ok());
  auto w1 = Pattern(5000, 2);
  {
    auto mid = Open("/mid.qcow");
    ASSERT_TRUE(Write(**mid, 1000, w1).ok());
  }
  std::copy(w1.begin(), w1.end(), base.begin() + 1000);
  ASSERT_TRUE(Create("/top.qcow", ImageFormat::kQcow, 0, "mid.qcow").ok());
  auto top = Open("/top.qcow");
  ASSERT_TRUE(top.ok());
  EXPECT_EQ(Read(**top, 0, base.size()), base);
  auto map = (*top)->Map(0, base.size());
  ASSERT_TRUE(map.ok());
  int max_depth = 0;
  for (const Extent& e : *map) max_depth = std::max(max_depth, e.depth);
  EXPECT_EQ(max_depth, 2);
  // Backing layers are read-only, whatever the top is.
  EXPECT_FALSE((*top)->read_only());
  EXPECT_TRUE((*top)->backing()->read_only());
  EXPECT_EQ(Write(*(*top)->backing(), 0, w1).code(), ErrorCode::kReadOnly);
}

TEST_F(ImageTest, BackingSmallerThanOverlayReadsZerosBeyond) {
  MakeRaw("/small.raw", Pattern(3000, 1));
  ASSERT_TRUE(Create("/big.qcow", ImageFormat::kQcow, kMiB, "small.raw").ok());
  auto img = Open("/big.qcow");
  ASSERT_TRUE(img.ok());
  auto got = Read(**img, 0, kMiB);
  EXPECT_EQ(std::vector<uint8_t>(got.begin(), got.begin() + 3000), Pattern(3000, 1));
  EXPECT_EQ(std::vector<uint8_t>(got.begin() + 3000, got.end()), std::vector<uint8_t>(kMiB - 3000, 0));
}

TEST_F(ImageTest, BackingLargerThanOverlayIsHiddenPastOverlayEnd) {
  MakeRaw("/large.raw", Pattern(kMiB, 1));
  ASSERT_TRUE(Create("/small.qcow", ImageFormat::kQcow, 4096, "large.raw").ok());
  auto img = Open("/small.qcow");
  ASSERT_TRUE(img.ok());
  EXPECT_EQ((*img)->size_bytes(), 4096u);
  auto pat = Pattern(kMiB, 1);
  EXPECT_EQ(Read(**img, 0, 4096), std::vector<uint8_t>(pat.begin(), pat.begin() + 4096));
  std::vector<uint8_t> buf(1);
  EXPECT_EQ(ReadInto(**img, 4096, buf).code(), ErrorCode::kOutOfRange);
}

// --- CreateImage ---------------------------------------------------------------

TEST_F(ImageTest, CreateOverBackingTakesItsSize) {
  MakeRaw("/base.raw", Pattern(3 * kMiB, 1));
  ASSERT_TRUE(Create("/top.qcow", ImageFormat::kQcow, 0, "base.raw").ok());
  auto img = Open("/top.qcow");
  ASSERT_TRUE(img.ok());
  EXPECT_EQ((*img)->size_bytes(), 3 * kMiB);
}

TEST_F(ImageTest, CreateNeedsASizeOrABackingFile) {
  EXPECT_EQ(Create("/x.qcow", ImageFormat::kQcow, 0).code(), ErrorCode::kInvalidArgument);
}

TEST_F(ImageTest, CreateRefusesToReplaceWithoutOverwrite) {
  ASSERT_TRUE(Create("/x.qcow", ImageFormat::kQcow, kMiB).ok());
  EXPECT_EQ(Create("/x.qcow", ImageFormat::kQcow, kMiB).code(), ErrorCode::kBusy);
  EXPECT_TRUE(Create("/x.qcow", ImageFormat::kQcow, 2 * kMiB, "", /*overwrite=*/true).ok());
  EXPECT_EQ((*Open("/x.qcow"))->size_bytes(), 2 * kMiB);
}

TEST_F(ImageTest, CreateOverMissingBackingFails) {
  auto s = Create("/x.qcow", ImageFormat::kQcow, 0, "nope.raw");
  EXPECT_EQ(s.code(), ErrorCode::kNotFound) << s.ToString();
  EXPECT_FALSE(fs_->Exists("/x.qcow"));
}

// --- Raw images ------------------------------------------------------------

TEST_F(ImageTest, RawReadWriteDiscardMap) {
  ASSERT_TRUE(Create("/r.raw", ImageFormat::kRaw, kMiB).ok());
  auto img = Open("/r.raw");
  ASSERT_TRUE(img.ok());
  EXPECT_EQ((*img)->info().format, ImageFormat::kRaw);
  EXPECT_EQ((*img)->size_bytes(), kMiB);
  EXPECT_EQ((*img)->remap_cache(), nullptr);
  auto data = Pattern(kMiB, 3);
  ASSERT_TRUE(Write(**img, 0, data).ok());
  EXPECT_EQ(Read(**img, 0, kMiB), data);
  ASSERT_TRUE((*img)->Discard(4096, 8192).ok());
  ASSERT_TRUE((*img)->WriteZeroes(100000, 10, false).ok());
  std::fill(data.begin() + 4096, data.begin() + 12288, 0);
  std::fill(data.begin() + 100000, data.begin() + 100010, 0);
  EXPECT_EQ(Read(**img, 0, kMiB), data);
  ASSERT_TRUE((*img)->Flush().ok());
  // A file without a descriptor cannot say where its holes are: all data.
  auto map = (*img)->Map(0, kMiB);
  ASSERT_TRUE(map.ok());
  ASSERT_EQ(map->size(), 1u);
  EXPECT_TRUE((*map)[0].data);
  EXPECT_EQ((*map)[0].host_offset, 0u);
  EXPECT_EQ((*map)[0].length, kMiB);
}

TEST_F(ImageTest, RawRefusesOutOfRangeAndReadOnlyAndClosed) {
  ASSERT_TRUE(Create("/r.raw", ImageFormat::kRaw, 4096).ok());
  auto ro = Open("/r.raw", /*read_only=*/true);
  ASSERT_TRUE(ro.ok());
  EXPECT_EQ(Write(**ro, 0, {1}).code(), ErrorCode::kReadOnly);
  EXPECT_EQ((*ro)->Discard(0, 512).code(), ErrorCode::kReadOnly);
  auto img = Open("/r.raw");
  ASSERT_TRUE(img.ok());
  std::vector<uint8_t> two(2);
  EXPECT_EQ(ReadInto(**img, 4095, two).code(), ErrorCode::kOutOfRange);
  EXPECT_EQ(Write(**img, 4095, two).code(), ErrorCode::kOutOfRange);
  EXPECT_EQ((*img)->WriteZeroes(~0ull - 1, 4, true).code(), ErrorCode::kOutOfRange);
  EXPECT_FALSE((*img)->Map(0, 4097).ok());
  EXPECT_TRUE(Write(**img, 4094, two).ok());
  ASSERT_TRUE((*img)->Close().ok());
  EXPECT_EQ(ReadInto(**img, 0, two).code(), ErrorCode::kCancelled);
}

TEST_F(ImageDiskTest, RawMapReportsHolesOfASparseFile) {
  const std::string path = dir_ + "/sparse.raw";
  ASSERT_TRUE(Create(path, ImageFormat::kRaw, 4 * kMiB).ok());
  auto img = Open(path);
  ASSERT_TRUE(img.ok());
  ASSERT_TRUE(Write(**img, kMiB, Pattern(64 * 1024, 1)).ok());
  ASSERT_TRUE((*img)->Flush().ok());
  auto map = (*img)->Map(0, 4 * kMiB);
  ASSERT_TRUE(map.ok());
  ASSERT_EQ(map->size(), 3u);
  EXPECT_FALSE((*map)[0].data);
  EXPECT_TRUE((*map)[0].zero);
  EXPECT_TRUE((*map)[1].data);
  EXPECT_LE((*map)[1].offset, kMiB);
  EXPECT_GE((*map)[1].offset + (*map)[1].length, kMiB + 64 * 1024);
  EXPECT_FALSE((*map)[2].data);
  EXPECT_EQ((*map)[2].offset + (*map)[2].length, 4 * kMiB);
  // Discard punches the hole back.
  ASSERT_TRUE((*img)->Discard(0, 4 * kMiB).ok());
  map = (*img)->Map(0, 4 * kMiB);
  ASSERT_TRUE(map.ok());
  ASSERT_EQ(map->size(), 1u);
  EXPECT_FALSE((*map)[0].data);
  EXPECT_EQ(Read(**img, kMiB, 4096), std::vector<uint8_t>(4096, 0));
}

}  // namespace
}  // namespace cowtap::cow
