#include "backend/nbd_protocol.h"

#include <gtest/gtest.h>

#include <string>
#include <vector>

#include "base/endian.h"

namespace cowtap::backend {
namespace {

struct OptionReply {
  uint32_t option = 0;
  uint32_t type = 0;
  std::vector<uint8_t> data;
};

// Splits a byte stream of option replies; fails the test on a malformed one.
std::vector<OptionReply> ParseReplies(const std::vector<uint8_t>& bytes) {
  std::vector<OptionReply> out;
  size_t at = 0;
  while (at < bytes.size()) {
    EXPECT_GE(bytes.size() - at, 20u);
    if (bytes.size() - at < 20) break;
    EXPECT_EQ(LoadBe64(&bytes[at]), kNbdOptionReplyMagic);
    OptionReply r;
    r.option = LoadBe32(&bytes[at + 8]);
    r.type = LoadBe32(&bytes[at + 12]);
    const uint32_t len = LoadBe32(&bytes[at + 16]);
    EXPECT_LE(len, bytes.size() - at - 20);
    if (len > bytes.size() - at - 20) break;
    r.data.assign(bytes.begin() + at + 20, bytes.begin() + at + 20 + len);
    out.push_back(std::move(r));
    at += 20 + len;
  }
  return out;
}

std::vector<uint8_t> GoData(const std::string& name, const std::vector<uint16_t>& infos) {
  std::vector<uint8_t> d(4 + name.size() + 2 + 2 * infos.size());
  StoreBe32(d.data(), static_cast<uint32_t>(name.size()));
  std::copy(name.begin(), name.end(), d.begin() + 4);
  StoreBe16(d.data() + 4 + name.size(), static_cast<uint16_t>(infos.size()));
  for (size_t i = 0; i < infos.size(); ++i) StoreBe16(d.data() + 6 + name.size() + 2 * i, infos[i]);
  return d;
}

NbdExportInfo Export() {
  NbdExportInfo info;
  info.name = "disk";
  info.description = "a test disk";
  info.size_bytes = 1 << 20;
  info.trim = true;
  return info;
}

NbdNegotiator FixedClient(NbdExportInfo info = Export(), uint32_t flags = kNbdFlagCFixedNewstyle) {
  NbdNegotiator n(std::move(info));
  EXPECT_TRUE(n.AcceptClientFlags(flags).ok());
  return n;
}

TEST(NbdGreetingTest, IsMagicOptMagicAndFixedNewstyleNoZeroes) {
  const auto g = EncodeNbdGreeting();
  EXPECT_EQ(std::string(g.begin(), g.begin() + 8), "NBDMAGIC");
  EXPECT_EQ(std::string(g.begin() + 8, g.begin() + 16), "IHAVEOPT");
  EXPECT_EQ(LoadBe16(g.data() + 16), kNbdFlagFixedNewstyle | kNbdFlagNoZeroes);
}

TEST(NbdOptionHeaderTest, DecodesOptionAndLength) {
  std::array<uint8_t, 16> h;
  StoreBe64(h.data(), kNbdOptionMagic);
  StoreBe32(h.data() + 8, kNbdOptGo);
  StoreBe32(h.data() + 12, 42);
  auto r = DecodeNbdOptionHeader(h);
  ASSERT_TRUE(r.ok());
  EXPECT_EQ(r->option, kNbdOptGo);
  EXPECT_EQ(r->length, 42u);
}

TEST(NbdOptionHeaderTest, RejectsBadMagic) {
  std::array<uint8_t, 16> h{};
  StoreBe64(h.data(), kNbdMagic);
  EXPECT_EQ(DecodeNbdOptionHeader(h).status().code(), ErrorCode::kInvalidArgument);
}

TEST(NbdOptionHeaderTest, RejectsDataLongerThanTheLimit) {
  std::array<uint8_t, 16> h;
  StoreBe64(h.data(), kNbdOptionMagic);
  StoreBe32(h.data() + 8, kNbdOptList);
  StoreBe32(h.data() + 12, kNbdMaxOptionBytes + 1);
  EXPECT_EQ(DecodeNbdOptionHeader(h).status().code(), ErrorCode::kInvalidArgument);
  StoreBe32(h.data() + 12, 0xffffffff);
  EXPECT_FALSE(DecodeNbdOptionHeader(h).ok());
}

TEST(NbdNegotiatorTest, RefusesUnknownClientFlags) {
  NbdNegotiator n(Export());
  EXPECT_EQ(n.AcceptClientFlags(1 << 2).code(), ErrorCode::kInvalidArgument);
  EXPECT_EQ(n.AcceptClientFlags(0x80000000 | kNbdFlagCFixedNewstyle).code(), ErrorCode::kInvalidArgument);
}

TEST(NbdNegotiatorTest, ExportNameSendsSizeFlagsAndZeroPadding) {
  NbdNegotiator n = FixedClient();
  std::vector<uint8_t> out;
  const std::string name = "disk";
  EXPECT_EQ(
      n.HandleOption(kNbdOptExportName, std::span(reinterpret_cast<const uint8_t*>(name.data()), name.size()), &out),
      NbdNegotiator::Outcome::kTransmission);
  ASSERT_EQ(out.size(), 8u + 2 + 124);
  EXPECT_EQ(LoadBe64(out.data()), 1u << 20);
  EXPECT_EQ(LoadBe16(out.data() + 8), n.transmission_flags());
  EXPECT_TRUE(std::all_of(out.begin() + 10, out.end(), [](uint8_t b) { return b == 0; }));
}

TEST(NbdNegotiatorTest, ExportNameOmitsPaddingWithNoZeroes) {
  NbdNegotiator n = FixedClient(Export(), kNbdFlagCFixedNewstyle | kNbdFlagCNoZeroes);
  std::vector<uint8_t> out;
  EXPECT_EQ(n.HandleOption(kNbdOptExportName, {}, &out), NbdNegotiator::Outcome::kTransmission);
  EXPECT_EQ(out.size(), 10u);
}

TEST(NbdNegotiatorTest, ExportNameOfAnUnknownExportHangsUp) {
  NbdNegotiator n = FixedClient();
  std::vector<uint8_t> out;
  const std::string name = "other";
  EXPECT_EQ(
      n.HandleOption(kNbdOptExportName, std::span(reinterpret_cast<const uint8_t*>(name.data()), name.size()), &out),
      NbdNegotiator::Outcome::kClose);
  EXPECT_TRUE(out.empty());
}

TEST(NbdNegotiatorTest, NonFixedClientSendingOtherOptionsIsDropped) {
  NbdNegotiator n(Export());
  ASSERT_TRUE(n.AcceptClientFlags(0).ok());
  std::vector<uint8_t> out;
  EXPECT_EQ(n.HandleOption(kNbdOptList, {}, &out), NbdNegotiator::Outcome::kClose);
  EXPECT_TRUE(out.empty());
}

TEST(NbdNegotiatorTest, ListNamesTheExport) {
  NbdNegotiator n = FixedClient();
  std::vector<uint8_t> out;
  EXPECT_EQ(n.HandleOption(kNbdOptList, {}, &out), NbdNegotiator::Outcome::kContinue);
  auto replies = ParseReplies(out);
  ASSERT_EQ(replies.size(), 2u);
  EXPECT_EQ(replies[0].type, kNbdRepServer);
  ASSERT_EQ(replies[0].data.size(), 8u);
  EXPECT_EQ(LoadBe32(replies[0].data.data()), 4u);
  EXPECT_EQ(std::string(replies[0].data.begin() + 4, replies[0].data.end()), "disk");
  EXPECT_EQ(replies[1].type, kNbdRepAck);
  EXPECT_EQ(replies[1].option, kNbdOptList);
}

TEST(NbdNegotiatorTest, ListWithDataIsInvalid) {
  NbdNegotiator n = FixedClient();
  std::vector<uint8_t> out;
  const uint8_t junk[3] = {1, 2, 3};
  EXPECT_EQ(n.HandleOption(kNbdOptList, junk, &out), NbdNegotiator::Outcome::kContinue);
  auto replies = ParseReplies(out);
  ASSERT_EQ(replies.size(), 1u);
  EXPECT_EQ(replies[0].type, kNbdRepErrInvalid);
}

TEST(NbdNegotiatorTest, AbortIsAcknowledgedThenClosed) {
  NbdNegotiator n = FixedClient();
  std::vector<uint8_t> out;
  EXPECT_EQ(n.HandleOption(kNbdOptAbort, {}, &out), NbdNegotiator::Outcome::kClose);
  auto replies = ParseReplies(out);
  ASSERT_EQ(replies.size(), 1u);
  EXPECT_EQ(replies[0].type, kNbdRepAck);
}

TEST(NbdNegotiatorTest, StructuredReplyIsAcknowledgedAndEnablesDf) {
  NbdNegotiator n = FixedClient();
  EXPECT_FALSE(n.transmission_flags() & kNbdFlagSendDf);
  std::vector<uint8_t> out;
  EXPECT_EQ(n.HandleOption(kNbdOptStructuredReply, {}, &out), NbdNegotiator::Outcome::kContinue);
  auto replies = ParseReplies(out);
  ASSERT_EQ(replies.size(), 1u);
  EXPECT_EQ(replies[0].type, kNbdRepAck);
  EXPECT_TRUE(n.structured_replies());
  EXPECT_TRUE(n.transmission_flags() & kNbdFlagSendDf);
}

TEST(NbdNegotiatorTest, StructuredReplyWithDataIsInvalidAndNotEnabled) {
  NbdNegotiator n = FixedClient();
  std::vector<uint8_t> out;
  const uint8_t junk[1] = {0};
  n.HandleOption(kNbdOptStructuredReply, junk, &out);
  EXPECT_EQ(ParseReplies(out).at(0).type, kNbdRepErrInvalid);
  EXPECT_FALSE(n.structured_replies());
}

TEST(NbdNegotiatorTest, GoSendsExportAndBlockSizeThenAckAndStartsTransmission) {
  NbdNegotiator n = FixedClient();
  std::vector<uint8_t> out;
  EXPECT_EQ(n.HandleOption(kNbdOptGo, GoData("disk", {kNbdInfoBlockSize}), &out),
            NbdNegotiator::Outcome::kTransmission);
  auto replies = ParseReplies(out);
  ASSERT_EQ(replies.size(), 3u);
  EXPECT_EQ(replies[0].type, kNbdRepInfo);
  ASSERT_EQ(replies[0].data.size(), 12u);
  EXPECT_EQ(LoadBe16(replies[0].data.data()), kNbdInfoExport);
  EXPECT_EQ(LoadBe64(replies[0].data.data() + 2), 1u << 20);
  EXPECT_EQ(LoadBe16(replies[0].data.data() + 10), n.transmission_flags());
  ASSERT_EQ(replies[1].data.size(), 14u);
  EXPECT_EQ(LoadBe16(replies[1].data.data()), kNbdInfoBlockSize);
  EXPECT_EQ(LoadBe32(replies[1].data.data() + 2), 1u);
  EXPECT_EQ(LoadBe32(replies[1].data.data() + 6), 4096u);
  EXPECT_EQ(LoadBe32(replies[1].data.data() + 10), kNbdMaxPayloadBytes);
  EXPECT_EQ(replies[2].type, kNbdRepAck);
  EXPECT_EQ(replies[2].option, kNbdOptGo);
}

TEST(NbdNegotiatorTest, InfoAnswersNameAndDescriptionAndKeepsNegotiating) {
  NbdNegotiator n = FixedClient();
  std::vector<uint8_t> out;
  EXPECT_EQ(n.HandleOption(kNbdOptInfo, GoData("", {kNbdInfoName, kNbdInfoDescription, 999}), &out),
            NbdNegotiator::Outcome::kContinue);
  auto replies = ParseReplies(out);
  ASSERT_EQ(replies.size(), 5u);
  EXPECT_EQ(LoadBe16(replies[2].data.data()), kNbdInfoName);
  EXPECT_EQ(std::string(replies[2].data.begin() + 2, replies[2].data.end()), "disk");
  EXPECT_EQ(LoadBe16(replies[3].data.data()), kNbdInfoDescription);
  EXPECT_EQ(std::string(replies[3].data.begin() + 2, replies[3].data.end()), "a test disk");
  EXPECT_EQ(replies[4].type, kNbdRepAck);
}

TEST(NbdNegotiatorTest, GoForAnUnknownExportIsErrUnknown) {
  NbdNegotiator n = FixedClient();
  std::vector<uint8_t> out;
  EXPECT_EQ(n.HandleOption(kNbdOptGo, GoData("nope", {}), &out), NbdNegotiator::Outcome::kContinue);
  auto replies = ParseReplies(out);
  ASSERT_EQ(replies.size(), 1u);
  EXPECT_EQ(replies[0].type, kNbdRepErrUnknown);
  EXPECT_FALSE(replies[0].data.empty());  // a message for a human
}

TEST(NbdNegotiatorTest, GoShorterThanItsFixedFieldsIsInvalid) {
  NbdNegotiator n = FixedClient();
  std::vector<uint8_t> out;
  const uint8_t short_data[5] = {0, 0, 0, 0, 0};
  EXPECT_EQ(n.HandleOption(kNbdOptGo, short_data, &out), NbdNegotiator::Outcome::kContinue);
  EXPECT_EQ(ParseReplies(out).at(0).type, kNbdRepErrInvalid);
}

TEST(NbdNegotiatorTest, GoWhoseNameLengthOverrunsTheDataIsInvalid) {
  NbdNegotiator n = FixedClient();
  std::vector<uint8_t> d = GoData("disk", {});
  StoreBe32(d.data(), 0xfffffff0);
  std::vector<uint8_t> out;
  EXPECT_EQ(n.HandleOption(kNbdOptGo, d, &out), NbdNegotiator::Outcome::kContinue);
  EXPECT_EQ(ParseReplies(out).at(0).type, kNbdRepErrInvalid);
}

TEST(NbdNegotiatorTest, GoWhoseInfoCountDisagreesWithItsLengthIsInvalid) {
  NbdNegotiator n = FixedClient();
  std::vector<uint8_t> d = GoData("disk", {kNbdInfoName});
  d.push_back(0);  // one stray byte
  std::vector<uint8_t> out;
  EXPECT_EQ(n.HandleOption(kNbdOptGo, d, &out), NbdNegotiator::Outcome::kContinue);
  EXPECT_EQ(ParseReplies(out).at(0).type, kNbdRepErrInvalid);
}

TEST(NbdNegotiatorTest, UnsupportedOptionsGetErrUnsup) {
  for (uint32_t option : {kNbdOptStartTls, kNbdOptListMetaContext, kNbdOptSetMetaContext, 11u, 4u, 0xdeadbeefu}) {
    NbdNegotiator n = FixedClient();
    std::vector<uint8_t> out;
    EXPECT_EQ(n.HandleOption(option, {}, &out), NbdNegotiator::Outcome::kContinue) << option;
    auto replies = ParseReplies(out);
    ASSERT_EQ(replies.size(), 1u);
    EXPECT_EQ(replies[0].type, kNbdRepErrUnsup);
    EXPECT_EQ(replies[0].option, option);
  }
}

TEST(NbdTransmissionFlagsTest, FollowTheExport) {
  NbdExportInfo info = Export();
  info.multi_conn = true;
  uint16_t f = NbdTransmissionFlags(info, false);
  EXPECT_EQ(f, kNbdFlagHasFlags | kNbdFlagSendFlush | kNbdFlagSendFua | kNbdFlagSendTrim | kNbdFlagSendWriteZeroes |
                   kNbdFlagCanMultiConn);
  info.read_only = true;
  info.multi_conn = false;
  f = NbdTransmissionFlags(info, true);
  EXPECT_EQ(f, kNbdFlagHasFlags | kNbdFlagReadOnly | kNbdFlagSendFlush | kNbdFlagSendDf);
  info.read_only = false;
  info.trim = false;
  EXPECT_FALSE(NbdTransmissionFlags(info, false) & kNbdFlagSendTrim);
}

std::array<uint8_t, kNbdRequestBytes> RequestBytes(uint16_t flags, uint16_t type, uint64_t handle, uint64_t offset,
                                                   uint32_t length) {
  std::array<uint8_t, kNbdRequestBytes> b;
  StoreBe32(b.data(), kNbdRequestMagic);
  StoreBe16(b.data() + 4, flags);
  StoreBe16(b.data() + 6, type);
  StoreBe64(b.data() + 8, handle);
  StoreBe64(b.data() + 16, offset);
  StoreBe32(b.data() + 24, length);
  return b;
}

TEST(NbdRequestTest, DecodesEveryField) {
  auto r = DecodeNbdRequest(RequestBytes(kNbdCmdFlagFua, kNbdCmdWrite, 0x1122334455667788, 4096, 512));
  ASSERT_TRUE(r.ok());
  EXPECT_EQ(r->flags, kNbdCmdFlagFua);
  EXPECT_EQ(r->type, kNbdCmdWrite);
  EXPECT_EQ(r->handle, 0x1122334455667788u);
  EXPECT_EQ(r->offset, 4096u);
  EXPECT_EQ(r->length, 512u);
  EXPECT_EQ(NbdPayloadBytes(*r), 512u);
  r->type = kNbdCmdRead;
  EXPECT_EQ(NbdPayloadBytes(*r), 0u);
}

TEST(NbdRequestTest, RejectsBadMagic) {
  auto b = RequestBytes(0, kNbdCmdRead, 1, 0, 512);
  b[0] ^= 1;
  EXPECT_EQ(DecodeNbdRequest(b).status().code(), ErrorCode::kInvalidArgument);
}

class NbdCheckTest : public ::testing::Test {
 protected:
  NbdCheckTest() {
    NbdExportInfo info = Export();
    state_.size_bytes = info.size_bytes;
    state_.transmission_flags = NbdTransmissionFlags(info, false);
  }
  uint32_t Check(uint16_t flags, uint16_t type, uint64_t offset, uint32_t length) {
    NbdRequest r{flags, type, 7, offset, length};
    return CheckNbdRequest(r, state_).error;
  }
  NbdTransmissionState state_;
};

TEST_F(NbdCheckTest, AcceptsWellFormedRequests) {
  EXPECT_EQ(Check(0, kNbdCmdRead, 0, 4096), 0u);
  EXPECT_EQ(Check(kNbdCmdFlagFua, kNbdCmdWrite, (1 << 20) - 512, 512), 0u);
  EXPECT_EQ(Check(0, kNbdCmdFlush, 0, 0), 0u);
  EXPECT_EQ(Check(kNbdCmdFlagFua, kNbdCmdTrim, 0, 1 << 20), 0u);
  EXPECT_EQ(Check(kNbdCmdFlagNoHole | kNbdCmdFlagFua, kNbdCmdWriteZeroes, 0, 1 << 20), 0u);
  EXPECT_EQ(Check(0, kNbdCmdDisc, 0, 0), 0u);
}

TEST_F(NbdCheckTest, UnknownAndUnadvertisedCommandsAreEinval) {
  EXPECT_EQ(Check(0, kNbdCmdCache, 0, 512), kNbdEinval);
  EXPECT_EQ(Check(0, kNbdCmdBlockStatus, 0, 512), kNbdEinval);
  EXPECT_EQ(Check(0, 200, 0, 512), kNbdEinval);
}

TEST_F(NbdCheckTest, FlagsNotAllowedForTheCommandAreEinval) {
  EXPECT_EQ(Check(kNbdCmdFlagFua, kNbdCmdRead, 0, 512), kNbdEinval);
  EXPECT_EQ(Check(kNbdCmdFlagNoHole, kNbdCmdWrite, 0, 512), kNbdEinval);
  EXPECT_EQ(Check(kNbdCmdFlagDf, kNbdCmdRead, 0, 512), kNbdEinval);  // DF needs structured replies
  EXPECT_EQ(Check(0x8000, kNbdCmdFlush, 0, 0), kNbdEinval);
  state_.structured_replies = true;
  EXPECT_EQ(Check(kNbdCmdFlagDf, kNbdCmdRead, 0, 512), 0u);
}

TEST_F(NbdCheckTest, FuaWithoutSendFuaIsEinval) {
  state_.transmission_flags &= ~kNbdFlagSendFua;
  EXPECT_EQ(Check(kNbdCmdFlagFua, kNbdCmdWrite, 0, 512), kNbdEinval);
}

TEST_F(NbdCheckTest, WritesToAReadOnlyExportAreEperm) {
  state_.transmission_flags |= kNbdFlagReadOnly;
  EXPECT_EQ(Check(0, kNbdCmdWrite, 0, 512), kNbdEperm);
  EXPECT_EQ(Check(0, kNbdCmdTrim, 0, 512), kNbdEperm);
  EXPECT_EQ(Check(0, kNbdCmdWriteZeroes, 0, 512), kNbdEperm);
  EXPECT_EQ(Check(0, kNbdCmdRead, 0, 512), 0u);
}

TEST_F(NbdCheckTest, TrimAndWriteZeroesNotAdvertisedAreEinval) {
  state_.transmission_flags &= ~(kNbdFlagSendTrim | kNbdFlagSendWriteZeroes);
  EXPECT_EQ(Check(0, kNbdCmdTrim, 0, 512), kNbdEinval);
  EXPECT_EQ(Check(0, kNbdCmdWriteZeroes, 0, 512), kNbdEinval);
}

TEST_F(NbdCheckTest, FlushNotAdvertisedIsEinval) {
  state_.transmission_flags &= ~kNbdFlagSendFlush;
  EXPECT_EQ(Check(0, kNbdCmdFlush, 0, 0), kNbdEinval);
}

TEST_F(NbdCheckTest, PayloadsOverTheMaximumAreEoverflow) {
  state_.size_bytes = 1ull << 40;
  EXPECT_EQ(Check(0, kNbdCmdRead, 0, kNbdMaxPayloadBytes), 0u);
  EXPECT_EQ(Check(0, kNbdCmdRead, 0, kNbdMaxPayloadBytes + 1), kNbdEoverflow);
  EXPECT_EQ(Check(0, kNbdCmdWrite, 0, 0xffffffff), kNbdEoverflow);
  // No payload: a large trim is fine.
  EXPECT_EQ(Check(0, kNbdCmdTrim, 0, 0xffffffff), 0u);
}

TEST_F(NbdCheckTest, RangesPastTheEndAreEnospcForWritesEinvalOtherwise) {
  EXPECT_EQ(Check(0, kNbdCmdWrite, (1 << 20) - 511, 512), kNbdEnospc);
  EXPECT_EQ(Check(0, kNbdCmdRead, 1 << 20, 1), kNbdEinval);
  EXPECT_EQ(Check(0, kNbdCmdTrim, 0, (1 << 20) + 1), kNbdEinval);
  EXPECT_EQ(Check(0, kNbdCmdWriteZeroes, 1 << 21, 0), kNbdEinval);
}

TEST_F(NbdCheckTest, OffsetOverflowIsRefused) {
  EXPECT_EQ(Check(0, kNbdCmdRead, UINT64_MAX - 10, 512), kNbdEinval);
  EXPECT_EQ(Check(0, kNbdCmdWrite, UINT64_MAX, 1), kNbdEnospc);
}

TEST(NbdErrorTest, MapsStatusCodes) {
  EXPECT_EQ(NbdErrorFromStatus(Status::Ok()), 0u);
  EXPECT_EQ(NbdErrorFromStatus(Status::IoError("x")), kNbdEio);
  EXPECT_EQ(NbdErrorFromStatus(Status::Corrupt("x")), kNbdEio);
  EXPECT_EQ(NbdErrorFromStatus(Status::NoSpace("x")), kNbdEnospc);
  EXPECT_EQ(NbdErrorFromStatus(Status::ReadOnly("x")), kNbdEperm);
  EXPECT_EQ(NbdErrorFromStatus(Status::OutOfRange("x")), kNbdEinval);
  EXPECT_EQ(NbdErrorFromStatus(Status::NotSupported("x")), kNbdEnotsup);
  EXPECT_EQ(NbdErrorFromStatus(Status::Cancelled("x")), kNbdEshutdown);
}

TEST(NbdReplyTest, SimpleReplyLayout) {
  const auto r = EncodeNbdSimpleReply(0xabcdef, kNbdEio);
  EXPECT_EQ(LoadBe32(r.data()), kNbdSimpleReplyMagic);
  EXPECT_EQ(LoadBe32(r.data() + 4), kNbdEio);
  EXPECT_EQ(LoadBe64(r.data() + 8), 0xabcdefu);
}

TEST(NbdReplyTest, ReadChunkCarriesOffsetAndLength) {
  const auto h = EncodeNbdReadChunkHeader(9, 4096, 512);
  ASSERT_EQ(h.size(), 28u);
  EXPECT_EQ(LoadBe32(h.data()), kNbdStructuredReplyMagic);
  EXPECT_EQ(LoadBe16(h.data() + 4), kNbdReplyFlagDone);
  EXPECT_EQ(LoadBe16(h.data() + 6), kNbdReplyTypeOffsetData);
  EXPECT_EQ(LoadBe64(h.data() + 8), 9u);
  EXPECT_EQ(LoadBe32(h.data() + 16), 8u + 512);
  EXPECT_EQ(LoadBe64(h.data() + 20), 4096u);
}

TEST(NbdReplyTest, StructuredErrorCarriesAMessageCutTo4096Bytes) {
  const auto e = EncodeNbdStructuredError(3, kNbdEinval, "bad");
  ASSERT_EQ(e.size(), 20u + 6 + 3);
  EXPECT_EQ(LoadBe16(e.data() + 6), kNbdReplyTypeError);
  EXPECT_EQ(LoadBe32(e.data() + 16), 9u);
  EXPECT_EQ(LoadBe32(e.data() + 20), kNbdEinval);
  EXPECT_EQ(LoadBe16(e.data() + 24), 3u);
  const auto long_error = EncodeNbdStructuredError(3, kNbdEio, std::string(10000, 'x'));
  EXPECT_EQ(long_error.size(), 20u + 6 + kNbdMaxStringBytes);
}

}  // namespace
}  // namespace cowtap::backend
