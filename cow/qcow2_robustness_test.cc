// Damaged images never take the process down: random byte damage to a
// qcow2 image's metadata, then open / read / write / zero / discard / map /
// flush / close / check. Every outcome must be OK or a deliberate error
// code (never kInternal); a crash, hang or sanitizer report fails the test.
#include <gtest/gtest.h>

#include <random>

#include "cow/check.h"
#include "cow/image.h"

namespace cowtap::cow {
namespace {

void ExpectDeliberate(const Status& s, const char* what) {
  EXPECT_NE(s.code(), ErrorCode::kInternal) << what << ": " << s.ToString();
}

TEST(Qcow2RobustnessTest, RandomMetadataDamageNeverCrashes) {
  auto fs = NewMemFileSystem();
  CreateOptions co;
  co.size_bytes = 2 << 20;
  co.cluster_size = 4096;
  co.fs = fs.get();
  ASSERT_TRUE(CreateImage("good.qcow2", co).ok());
  std::mt19937_64 rng(42);
  {
    OpenOptions oo;
    oo.fs = fs.get();
    auto img = OpenImage("good.qcow2", oo);
    ASSERT_TRUE(img.ok());
    std::vector<uint8_t> b(20000, 0x3c);
    for (uint64_t off : {0ull, 100000ull, 700000ull, 1500000ull}) {
      iovec v = MakeIoVec(b.data(), b.size());
      ASSERT_TRUE((*img)->Write(off, {&v, 1}).ok());
    }
    ASSERT_TRUE((*img)->WriteZeroes(300000, 50000, false).ok());
    ASSERT_TRUE((*img)->Close().ok());
  }
  std::vector<uint8_t> pristine;
  {
    auto f = fs->Open("good.qcow2", {});
    pristine.resize(*(*f)->Size());
    ASSERT_TRUE((*f)->ReadAt(0, pristine).ok());
  }
  int opened = 0;
  for (int iter = 0; iter < 400; ++iter) {
    std::vector<uint8_t> bytes = pristine;
    int damage = 1 + static_cast<int>(rng() % 4);
    for (int d = 0; d < damage; ++d) {
      // Mostly the metadata clusters at the front, sometimes anywhere.
      uint64_t pos = rng() % 2 ? rng() % (5 * 4096) : rng() % bytes.size();
      bytes[pos] = rng() % 3 ? static_cast<uint8_t>(rng()) : static_cast<uint8_t>(bytes[pos] ^ (1u << (rng() % 8)));
    }
    {
      FileOpenOptions fo;
      fo.create = true;
      fo.writable = true;
      auto f = fs->Open("bad.qcow2", fo);
      ASSERT_TRUE((*f)->Truncate(0).ok());
      ASSERT_TRUE((*f)->WriteAt(0, bytes).ok());
    }
    OpenOptions oo;
    oo.fs = fs.get();
    oo.l2_cache_bytes = 8192;
    auto img = OpenImage("bad.qcow2", oo);
    if (!img.ok()) {
      ExpectDeliberate(img.status(), "open");
      continue;
    }
    ++opened;
    Image& im = **img;
    const uint64_t size = std::min<uint64_t>(im.size_bytes(), 4 << 20);
    std::vector<uint8_t> buf(65536);
    for (uint64_t off = 0; off + 4096 <= size; off += 65536) {
      iovec v = MakeIoVec(buf.data(), std::min<uint64_t>(buf.size(), size - off));
      ExpectDeliberate(im.Read(off, {&v, 1}), "read");
    }
    if (size > 200000) {
      std::vector<uint8_t> w(9000, 0x7e);
      iovec v = MakeIoVec(w.data(), w.size());
      ExpectDeliberate(im.Write(rng() % (size - 9000), {&v, 1}), "write");
      ExpectDeliberate(im.WriteZeroes(rng() % (size - 9000), 9000, rng() % 2), "zero");
      ExpectDeliberate(im.Discard(rng() % (size - 9000), 9000), "discard");
      auto m = im.Map(0, size);
      ExpectDeliberate(m.status(), "map");
    }
    ExpectDeliberate(im.Flush(), "flush");
    ExpectDeliberate(im.Close(), "close");
    CheckOptions ck;
    ck.fs = fs.get();
    auto r = CheckImage("bad.qcow2", ck);
    ExpectDeliberate(r.status(), "check");
  }
  EXPECT_GT(opened, 50);  // the damage must not make every image unopenable
}

}  // namespace
}  // namespace cowtap::cow
