#include "base/iovec.h"

#include <gtest/gtest.h>

#include <numeric>
#include <vector>

namespace cowtap {
namespace {

TEST(IoVecTest, SliceCopyAndZeroAcrossPieces) {
  std::vector<uint8_t> a(5), b(3), c(8);
  iovec v[] = {MakeIoVec(a.data(), a.size()), MakeIoVec(b.data(), b.size()), MakeIoVec(c.data(), c.size())};
  EXPECT_EQ(TotalLength(v), 16u);
  std::vector<uint8_t> src(16);
  std::iota(src.begin(), src.end(), 1);
  CopyToIoVecs(v, 0, src.data(), 16);
  EXPECT_EQ(b[0], 6);
  EXPECT_EQ(c[7], 16);
  std::vector<iovec> s;
  SliceIoVecs(v, 4, 6, &s);
  ASSERT_EQ(s.size(), 3u);
  EXPECT_EQ(s[0].iov_len, 1u);
  EXPECT_EQ(s[1].iov_len, 3u);
  EXPECT_EQ(s[2].iov_len, 2u);
  uint8_t out[6];
  CopyFromIoVecs(v, 4, out, 6);
  EXPECT_EQ(out[0], 5);
  EXPECT_EQ(out[5], 10);
  ZeroIoVecs(v, 4, 6);
  EXPECT_EQ(a[3], 4);
  EXPECT_EQ(a[4], 0);
  EXPECT_EQ(c[1], 0);
  EXPECT_EQ(c[2], 11);
}

}  // namespace
}  // namespace cowtap
