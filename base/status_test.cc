#include "base/status.h"

#include <gtest/gtest.h>

namespace cowtap {
namespace {

Result<int> Half(int v) {
  if (v % 2) return Status::InvalidArgument("odd");
  return v / 2;
}

Status UseHalf(int v, int* out) {
  COWTAP_ASSIGN_OR_RETURN(*out, Half(v));
  return Status::Ok();
}

TEST(StatusTest, ErrnoMapping) {
  EXPECT_EQ(Status::FromErrno(ENOSPC, "write x").code(), ErrorCode::kNoSpace);
  EXPECT_EQ(Status::FromErrno(EIO, "write x").code(), ErrorCode::kIoError);
  EXPECT_NE(Status::FromErrno(EIO, "write x").message().find("write x"), std::string::npos);
}

TEST(StatusTest, ResultPropagates) {
  int out = 0;
  EXPECT_TRUE(UseHalf(4, &out).ok());
  EXPECT_EQ(out, 2);
  Status s = UseHalf(3, &out);
  EXPECT_EQ(s.code(), ErrorCode::kInvalidArgument);
  EXPECT_EQ(s.Annotate("img.qcow2").message(), "img.qcow2: odd");
}

TEST(StatusTest, ResultFromOkStatusBecomesInternalError) {
  Result<int> r{Status::Ok()};
  EXPECT_FALSE(r.ok());
  EXPECT_EQ(r.status().code(), ErrorCode::kInternal);
}

}  // namespace
}  // namespace cowtap
