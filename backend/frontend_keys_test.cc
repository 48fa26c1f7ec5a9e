#include "backend/frontend_keys.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <unistd.h>

#include "xen-glue/sim.h"

namespace cowtap::backend {
namespace {

TEST(ParseDecimalTest, AcceptsPlainDecimals) {
  EXPECT_EQ(*ParseDecimal("0", 10, "k"), 0u);
  EXPECT_EQ(*ParseDecimal("4294967295", UINT32_MAX, "k"), UINT32_MAX);
  EXPECT_EQ(*ParseDecimal("18446744073709551615", UINT64_MAX, "k"), UINT64_MAX);
}

TEST(ParseDecimalTest, RejectsEmpty) { EXPECT_FALSE(ParseDecimal("", 10, "k").ok()); }
TEST(ParseDecimalTest, RejectsSign) { EXPECT_FALSE(ParseDecimal("-1", 10, "k").ok()); }
TEST(ParseDecimalTest, RejectsLeadingSpace) { EXPECT_FALSE(ParseDecimal(" 1", 10, "k").ok()); }
TEST(ParseDecimalTest, RejectsHex) { EXPECT_FALSE(ParseDecimal("0x10", 100, "k").ok()); }
TEST(ParseDecimalTest, RejectsTrailingGarbage) { EXPECT_FALSE(ParseDecimal("12abc", 100, "k").ok()); }
TEST(ParseDecimalTest, RejectsOverflow) { EXPECT_FALSE(ParseDecimal("18446744073709551616", UINT64_MAX, "k").ok()); }
TEST(ParseDecimalTest, RejectsAboveMax) { EXPECT_FALSE(ParseDecimal("4294967296", UINT32_MAX, "k").ok()); }

TEST(ParseDecimalTest, MessageNamesKeyAndShowsBoundedPrintableValue) {
  auto r = ParseDecimal(std::string("1\n2\x01") + std::string(100, 'x'), 10, "/local/domain/1/device/vbd/0/ring-ref");
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.status().code(), ErrorCode::kInvalidArgument);
  EXPECT_THAT(r.status().message(), ::testing::HasSubstr("ring-ref"));
  EXPECT_THAT(r.status().message(), ::testing::HasSubstr("1?2?"));
  EXPECT_LT(r.status().message().size(), 200u);
}

class FrontendKeysTest : public ::testing::Test {
 protected:
  void SetUp() override {
    auto hv = xen::SimHypervisor::Start("/tmp/cowtap-fkeys-" + std::to_string(getpid()) + ".sock");
    ASSERT_TRUE(hv.ok()) << hv.status().ToString();
    hv_ = std::move(hv).value();
    platform_ = hv_->NewPlatform();
    xs_ = std::move(platform_->OpenXenStore()).value();
  }
  void Set(const std::string& key, const std::string& value) {
    ASSERT_TRUE(xs_->Write(xen::XsJoin(kDir, key), value).ok());
  }
  Result<FrontendKeys> Read(BackendOffer offer = {}) { return ReadFrontendKeys(*xs_, kDir, offer); }

  const std::string kDir = "/local/domain/3/device/vbd/768";
  std::unique_ptr<xen::SimHypervisor> hv_;
  std::unique_ptr<xen::XenPlatform> platform_;
  std::unique_ptr<xen::XenStore> xs_;
};

TEST_F(FrontendKeysTest, SinglePageDefaults) {
  Set("ring-ref", "9");
  Set("event-channel", "12");
  auto k = Read();
  ASSERT_TRUE(k.ok()) << k.status().ToString();
  EXPECT_EQ(k->abi, Abi::kX86_64);
  EXPECT_EQ(k->ring_page_order, 0u);
  EXPECT_FALSE(k->persistent);
  ASSERT_EQ(k->queues.size(), 1u);
  EXPECT_EQ(k->queues[0].ring_refs, std::vector<xen::GrantRef>{9});
  EXPECT_EQ(k->queues[0].event_channel, 12u);
}

TEST_F(FrontendKeysTest, RingRef0AcceptedForOrderZero) {
  Set("ring-ref0", "10");
  Set("event-channel", "1");
  auto k = Read();
  ASSERT_TRUE(k.ok()) << k.status().ToString();
  EXPECT_EQ(k->queues[0].ring_refs, std::vector<xen::GrantRef>{10});
}

TEST_F(FrontendKeysTest, MultiQueueMultiPage) {
  Set("multi-queue-num-queues", "2");
  Set("ring-page-order", "1");
  Set("protocol", "x86_32-abi");
  Set("feature-persistent", "1");
  Set("queue-0/ring-ref0", "8");
  Set("queue-0/ring-ref1", "9");
  Set("queue-0/event-channel", "3");
  Set("queue-1/ring-ref0", "10");
  Set("queue-1/ring-ref1", "11");
  Set("queue-1/event-channel", "4");
  auto k = Read();
  ASSERT_TRUE(k.ok()) << k.status().ToString();
  EXPECT_EQ(k->abi, Abi::kX86_32);
  EXPECT_TRUE(k->persistent);
  ASSERT_EQ(k->queues.size(), 2u);
  EXPECT_EQ(k->queues[1].ring_refs, (std::vector<xen::GrantRef>{10, 11}));
  EXPECT_EQ(k->queues[1].event_channel, 4u);
  BackendOffer no_persistent;
  no_persistent.persistent = false;
  EXPECT_FALSE(Read(no_persistent)->persistent) << "persistent only if both sides offered it";
}

TEST_F(FrontendKeysTest, RejectsMissingRingRefN) {
  Set("ring-page-order", "2");
  Set("ring-ref0", "8");
  Set("ring-ref1", "9");
  Set("ring-ref2", "10");
  Set("event-channel", "1");
  auto k = Read();
  ASSERT_FALSE(k.ok());
  EXPECT_THAT(k.status().message(), ::testing::HasSubstr("ring-ref3"));
}

TEST_F(FrontendKeysTest, RejectsZeroQueues) {
  Set("multi-queue-num-queues", "0");
  EXPECT_FALSE(Read().ok());
}

TEST_F(FrontendKeysTest, RejectsFeaturePersistentOtherThanZeroOrOne) {
  Set("ring-ref", "8");
  Set("event-channel", "1");
  Set("feature-persistent", "2");
  EXPECT_FALSE(Read().ok());
}

TEST_F(FrontendKeysTest, RejectsRingRefWiderThan32Bits) {
  Set("ring-ref", "4294967296");
  Set("event-channel", "1");
  EXPECT_FALSE(Read().ok());
}

}  // namespace
}  // namespace cowtap::backend
