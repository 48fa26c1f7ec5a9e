// Shared fixture for the qcow v1 unit tests (qcow_image_test.cc,
// qcow_header_test.cc, qcow_fault_test.cc): an in-memory file system, image
// creation and byte-level patching helpers, and a random writer that keeps a
// flat reference buffer in step with an image.
#pragma once

#include <gtest/gtest.h>

#include <array>
#include <random>
#include <string>
#include <vector>

#include "base/endian.h"
#include "cow/image.h"

namespace cowtap::cow::qcow_test {

inline constexpr uint64_t kMiB = 1 << 20;

inline std::vector<uint8_t> Pattern(uint64_t size, uint32_t seed) {
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

// Applies random writes (sizes 1 B .. 3 clusters, any alignment) to img and
// ref alike.
inline void RandomWrites(Image& img, std::vector<uint8_t>& ref, uint32_t seed, int count, uint64_t max_len) {
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

}  // namespace cowtap::cow::qcow_test
