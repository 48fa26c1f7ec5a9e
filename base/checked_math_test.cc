#include "base/checked_math.h"

#include <gtest/gtest.h>

#include <limits>

namespace cowtap {
namespace {

TEST(CheckedMathTest, AddOverflowIsDetected) {
  uint64_t r;
  EXPECT_FALSE(CheckedAdd<uint64_t>(std::numeric_limits<uint64_t>::max(), 1, &r));
  EXPECT_TRUE(CheckedAdd<uint64_t>(1, 2, &r));
  EXPECT_EQ(r, 3u);
  EXPECT_FALSE(AddU64(~0ull, 5).has_value());
}

TEST(CheckedMathTest, RangeWithinRejectsWrapAround) {
  EXPECT_TRUE(RangeWithin(0, 10, 10));
  EXPECT_FALSE(RangeWithin(1, 10, 10));
  EXPECT_FALSE(RangeWithin(~0ull - 1, 4, ~0ull));
}

TEST(CheckedMathTest, AlignHelpers) {
  EXPECT_EQ(AlignDown(4097, 4096), 4096u);
  EXPECT_EQ(*AlignUp(4097, 4096), 8192u);
  EXPECT_FALSE(AlignUp(~0ull, 4096).has_value());
  EXPECT_EQ(DivRoundUp(10, 3), 4u);
  EXPECT_TRUE(IsPowerOfTwo(65536));
  EXPECT_FALSE(IsPowerOfTwo(0));
}

}  // namespace
}  // namespace cowtap
