// What the daemon reads from a toolstack's backend directory: params in
// every form libxl and blktap write, target/format, mode.
#include "tools/daemon/backend_params.h"

#include <gtest/gtest.h>
#include <unistd.h>

#include "xen-glue/sim.h"

namespace cowtap::daemon {
namespace {

TEST(ParseParamsTest, PlainPathProbesTheFormat) {
  auto s = ParseParams("/images/a.qcow2");
  ASSERT_TRUE(s.ok());
  EXPECT_EQ(s->path, "/images/a.qcow2");
  EXPECT_EQ(s->format, "");
}

TEST(ParseParamsTest, QdiskFormatPrefix) {
  auto s = ParseParams("qcow2:/images/a.qcow2");
  ASSERT_TRUE(s.ok());
  EXPECT_EQ(s->path, "/images/a.qcow2");
  EXPECT_EQ(s->format, "qcow2");
}

TEST(ParseParamsTest, AioMeansRaw) {
  auto s = ParseParams("aio:/images/disk.img");
  ASSERT_TRUE(s.ok());
  EXPECT_EQ(s->format, "raw");
  EXPECT_EQ(s->path, "/images/disk.img");
}

TEST(ParseParamsTest, TapdiskPrefixIsSkipped) {
  auto s = ParseParams("tapdisk:qcow:/i/old.qcow");
  ASSERT_TRUE(s.ok());
  EXPECT_EQ(s->format, "qcow");
  EXPECT_EQ(s->path, "/i/old.qcow");
}

TEST(ParseParamsTest, ColonInsideThePathIsKept) {
  auto s = ParseParams("/images/vm:1/disk.raw");
  ASSERT_TRUE(s.ok());
  EXPECT_EQ(s->path, "/images/vm:1/disk.raw");
  EXPECT_EQ(s->format, "");
}

TEST(ParseParamsTest, UnsupportedFormatIsRefused) {
  EXPECT_EQ(ParseParams("vhd:/x.vhd").status().code(), ErrorCode::kNotSupported);
}

TEST(ParseParamsTest, EmptyPathIsRefused) {
  EXPECT_EQ(ParseParams("").status().code(), ErrorCode::kInvalidArgument);
  EXPECT_EQ(ParseParams("qcow2:").status().code(), ErrorCode::kInvalidArgument);
}

class ReadDiskSourceTest : public ::testing::Test {
 protected:
  void SetUp() override {
    auto hv = xen::SimHypervisor::Start("/tmp/cowtap-params-" + std::to_string(getpid()) + ".sock");
    ASSERT_TRUE(hv.ok());
    hv_ = std::move(hv).value();
    platform_ = hv_->NewPlatform();
    xs_ = std::move(platform_->OpenXenStore()).value();
  }
  void Set(const std::string& key, const std::string& value) {
    ASSERT_TRUE(xs_->Write(xen::XsJoin(kDir, key), value).ok());
  }
  static constexpr char kDir[] = "/local/domain/0/backend/qdisk/3/51712";
  std::unique_ptr<xen::SimHypervisor> hv_;
  std::unique_ptr<xen::XenPlatform> platform_;
  std::unique_ptr<xen::XenStore> xs_;
};

TEST_F(ReadDiskSourceTest, ParamsAndReadOnlyMode) {
  Set("params", "qcow2:/a.qcow2");
  Set("mode", "r");
  auto s = ReadDiskSource(*xs_, kDir);
  ASSERT_TRUE(s.ok()) << s.status().ToString();
  EXPECT_EQ(s->path, "/a.qcow2");
  EXPECT_EQ(s->format, "qcow2");
  EXPECT_FALSE(s->writable);
}

TEST_F(ReadDiskSourceTest, TargetAndFormatWinOverParams) {
  Set("params", "aio:/old.img");
  Set("target", "/new.qcow2");
  Set("format", "qcow2");
  auto s = ReadDiskSource(*xs_, kDir);
  ASSERT_TRUE(s.ok());
  EXPECT_EQ(s->path, "/new.qcow2");
  EXPECT_EQ(s->format, "qcow2");
  EXPECT_TRUE(s->writable);
}

TEST_F(ReadDiskSourceTest, NeitherTargetNorParamsIsAnError) {
  Set("mode", "w");
  auto s = ReadDiskSource(*xs_, kDir);
  EXPECT_EQ(s.status().code(), ErrorCode::kNotFound);
  EXPECT_NE(s.status().message().find("params"), std::string::npos) << s.status().message();
}

}  // namespace
}  // namespace cowtap::daemon
