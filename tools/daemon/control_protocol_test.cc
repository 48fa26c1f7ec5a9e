#include "tools/daemon/control_protocol.h"

#include <gtest/gtest.h>

#include <cmath>
#include <limits>
#include <set>
#include <string>
#include <tuple>

namespace cowtap::daemon {
namespace {

ControlRequest RoundTrip(const ControlRequest& in) {
  const std::string line = EncodeRequest(in);
  EXPECT_EQ(line.back(), '\n');
  EXPECT_EQ(line.find('\n'), line.size() - 1) << "one message is one line";
  ControlReply error;
  std::optional<ControlRequest> out = DecodeRequest(line, &error);
  EXPECT_TRUE(out.has_value()) << line << " -> " << error.error;
  return out.value_or(ControlRequest{});
}

// Decodes a request that must be refused; returns the error reply.
ControlReply Refused(std::string_view line) {
  ControlReply error;
  std::optional<ControlRequest> out = DecodeRequest(line, &error);
  EXPECT_FALSE(out.has_value()) << line;
  EXPECT_FALSE(error.ok);
  EXPECT_FALSE(error.error.empty());
  return error;
}

VbdStatsSnapshot SampleStats() {
  VbdStatsSnapshot s;
  s.id = "5/51712";
  s.image = "/images/vm5.qcow2";
  s.format = "qcow2";
  s.state = "Connected";
  s.paused = true;
  s.reads = 1;
  s.writes = 2;
  s.flushes = 3;
  s.discards = 4;
  s.errors = 5;
  s.bytes_read = std::numeric_limits<uint64_t>::max();
  s.bytes_written = 7;
  s.queues = 4;
  s.queue_depth = 17;
  s.latency_us_log2 = {0, 1, 2, 300, 0, 5};
  s.remap_lookups = 1000;
  s.remap_hits = 900;
  s.remap_mean_probe = 1.25;
  s.fast_path_ios = 11;
  s.slow_path_ios = 12;
  s.allocations = 13;
  s.memory_bytes = 1 << 20;
  s.leaked_pages = 14;
  s.notify_failures = 15;
  return s;
}

void ExpectSameStats(const VbdStatsSnapshot& a, const VbdStatsSnapshot& b) {
  EXPECT_EQ(a.id, b.id);
  EXPECT_EQ(a.image, b.image);
  EXPECT_EQ(a.format, b.format);
  EXPECT_EQ(a.state, b.state);
  EXPECT_EQ(a.paused, b.paused);
  EXPECT_EQ(a.reads, b.reads);
  EXPECT_EQ(a.writes, b.writes);
  EXPECT_EQ(a.flushes, b.flushes);
  EXPECT_EQ(a.discards, b.discards);
  EXPECT_EQ(a.errors, b.errors);
  EXPECT_EQ(a.bytes_read, b.bytes_read);
  EXPECT_EQ(a.bytes_written, b.bytes_written);
  EXPECT_EQ(a.queues, b.queues);
  EXPECT_EQ(a.queue_depth, b.queue_depth);
  EXPECT_EQ(a.leaked_pages, b.leaked_pages);
  EXPECT_EQ(a.notify_failures, b.notify_failures);
  EXPECT_EQ(a.latency_us_log2, b.latency_us_log2);
  EXPECT_EQ(a.remap_lookups, b.remap_lookups);
  EXPECT_EQ(a.remap_hits, b.remap_hits);
  EXPECT_DOUBLE_EQ(a.remap_mean_probe, b.remap_mean_probe);
  EXPECT_EQ(a.fast_path_ios, b.fast_path_ios);
  EXPECT_EQ(a.slow_path_ios, b.slow_path_ios);
  EXPECT_EQ(a.allocations, b.allocations);
  EXPECT_EQ(a.memory_bytes, b.memory_bytes);
}

TEST(ControlProtocolTest, EveryCommandRoundTrips) {
  ControlRequest list;
  EXPECT_EQ(RoundTrip(list).cmd, ControlCommand::kList);

  ControlRequest attach;
  attach.cmd = ControlCommand::kAttach;
  attach.attach = {7, 51728, "/img/a b.qcow2", "qcow2", false};
  ControlRequest a = RoundTrip(attach);
  EXPECT_EQ(a.cmd, ControlCommand::kAttach);
  EXPECT_EQ(a.attach.domid, 7u);
  EXPECT_EQ(a.attach.devid, 51728u);
  EXPECT_EQ(a.attach.image, "/img/a b.qcow2");
  EXPECT_EQ(a.attach.format, "qcow2");
  EXPECT_FALSE(a.attach.writable);

  attach.attach.format = "";
  attach.attach.writable = true;
  a = RoundTrip(attach);
  EXPECT_EQ(a.attach.format, "");
  EXPECT_TRUE(a.attach.writable);

  for (ControlCommand cmd :
       {ControlCommand::kDetach, ControlCommand::kPause, ControlCommand::kResume, ControlCommand::kStats}) {
    ControlRequest r;
    r.cmd = cmd;
    r.id = "5/51712";
    ControlRequest out = RoundTrip(r);
    EXPECT_EQ(out.cmd, cmd);
    EXPECT_EQ(out.id, "5/51712");
  }
  ControlRequest all_stats;
  all_stats.cmd = ControlCommand::kStats;
  EXPECT_EQ(RoundTrip(all_stats).id, "");

  ControlRequest level;
  level.cmd = ControlCommand::kSetLogLevel;
  level.level = "debug";
  EXPECT_EQ(RoundTrip(level).level, "debug");

  ControlRequest exp;
  exp.cmd = ControlCommand::kExport;
  exp.what = "5/51712";
  exp.address = "tcp:127.0.0.1:0";
  exp.read_only = true;
  ControlRequest e = RoundTrip(exp);
  EXPECT_EQ(e.what, "5/51712");
  EXPECT_EQ(e.address, "tcp:127.0.0.1:0");
  EXPECT_TRUE(e.read_only);

  ControlRequest unexp;
  unexp.cmd = ControlCommand::kUnexport;
  unexp.address = "unix:/run/x.sock";
  EXPECT_EQ(RoundTrip(unexp).address, "unix:/run/x.sock");
}

TEST(ControlProtocolTest, HandWrittenRequestsDecode) {
  ControlReply error;
  auto r = DecodeRequest(R"({"cmd":"attach","domid":3,"devid":768,"image":"/i.raw","version":1})"
                         "\r\n",
                         &error);
  ASSERT_TRUE(r.has_value()) << error.error;
  EXPECT_EQ(r->attach.domid, 3u);
  EXPECT_EQ(r->attach.devid, 768u);
  EXPECT_TRUE(r->attach.writable);
  EXPECT_EQ(r->attach.format, "");
}

TEST(ControlProtocolTest, RepliesRoundTripWithEveryStatsField) {
  ControlReply reply = ReplyFromStatus(Status::Ok());
  reply.vbds = {SampleStats(), SampleStats()};
  reply.vbds[1].id = "6/768";
  const std::string line = EncodeReply(reply);
  EXPECT_EQ(line.find('\n'), line.size() - 1);
  auto back = DecodeReply(line);
  ASSERT_TRUE(back.ok()) << back.status().ToString();
  EXPECT_TRUE(back->ok);
  EXPECT_EQ(back->version, kControlProtocolVersion);
  ASSERT_EQ(back->vbds.size(), 2u);
  ExpectSameStats(back->vbds[0], SampleStats());
  EXPECT_EQ(back->vbds[1].id, "6/768");

  ControlReply exported = ReplyFromStatus(Status::Ok());
  exported.address = "tcp:127.0.0.1:40001";
  auto e = DecodeReply(EncodeReply(exported));
  ASSERT_TRUE(e.ok());
  EXPECT_EQ(e->address, "tcp:127.0.0.1:40001");
}

TEST(ControlProtocolTest, ErrorRepliesCarryCodeAndMessage) {
  auto r = DecodeReply(EncodeReply(ReplyFromStatus(Status::NotFound("no VBD 9/51712; 'cowtap ctl list' shows them"))));
  ASSERT_TRUE(r.ok());
  EXPECT_FALSE(r->ok);
  EXPECT_EQ(r->code, "not_found");
  EXPECT_EQ(r->error, "no VBD 9/51712; 'cowtap ctl list' shows them");
  EXPECT_NE(EncodeReply(ErrorReply("busy", "x")).find("\"version\":1"), std::string::npos);
}

TEST(ControlProtocolTest, EveryErrorCodeHasADistinctWireCode) {
  std::set<std::string_view> seen;
  for (ErrorCode c : {ErrorCode::kInvalidArgument, ErrorCode::kNotSupported, ErrorCode::kCorrupt, ErrorCode::kIoError,
                      ErrorCode::kNoSpace, ErrorCode::kOutOfRange, ErrorCode::kReadOnly, ErrorCode::kNotFound,
                      ErrorCode::kBusy, ErrorCode::kInternal, ErrorCode::kCancelled}) {
    EXPECT_FALSE(WireCode(c).empty());
    EXPECT_TRUE(seen.insert(WireCode(c)).second) << WireCode(c);
  }
  EXPECT_EQ(WireCode(ErrorCode::kOk), "");
}

TEST(ControlProtocolTest, InvalidUtf8InARepliedPathIsReplacedNotThrown) {
  ControlReply reply = ReplyFromStatus(Status::NotFound("cannot open /img/\xff\xfe.qcow2"));
  std::string line;
  ASSERT_NO_THROW(line = EncodeReply(reply));
  auto back = DecodeReply(line);
  ASSERT_TRUE(back.ok()) << back.status().ToString();
  EXPECT_NE(back->error.find("\xEF\xBF\xBD"), std::string::npos) << "U+FFFD in place of the bad bytes";
}

TEST(ControlProtocolTest, NonFiniteMeanProbeIsSentAsZero) {
  ControlReply reply = ReplyFromStatus(Status::Ok());
  reply.vbds = {SampleStats()};
  reply.vbds[0].remap_mean_probe = std::nan("");
  auto back = DecodeReply(EncodeReply(reply));
  ASSERT_TRUE(back.ok()) << back.status().ToString();
  EXPECT_EQ(back->vbds[0].remap_mean_probe, 0.0);
}

TEST(ControlProtocolTest, MalformedJsonIsAParseError) {
  EXPECT_EQ(Refused("{\"cmd\":").code, "parse_error");
  EXPECT_EQ(Refused("hello").code, "parse_error");
  EXPECT_EQ(Refused("").code, "parse_error");
  EXPECT_EQ(Refused("{\"cmd\":\"list\"} trailing").code, "parse_error");
  EXPECT_EQ(Refused("{\"cmd\":\"li\xff\"}").code, "parse_error") << "invalid UTF-8";
}

TEST(ControlProtocolTest, DeepNestingIsRefusedWithoutCrashing) {
  EXPECT_EQ(Refused(std::string(60000, '[')).code, "parse_error");
  std::string deep = std::string(30000, '[') + std::string(30000, ']');
  EXPECT_EQ(Refused(deep).code, "bad_request");
}

TEST(ControlProtocolTest, NonObjectsAreBadRequests) {
  EXPECT_EQ(Refused("[1,2]").code, "bad_request");
  EXPECT_EQ(Refused("\"list\"").code, "bad_request");
  EXPECT_EQ(Refused("42").code, "bad_request");
  EXPECT_EQ(Refused("null").code, "bad_request");
}

TEST(ControlProtocolTest, MissingOrNonStringCmdIsABadRequest) {
  EXPECT_EQ(Refused("{}").code, "bad_request");
  EXPECT_EQ(Refused(R"({"cmd":1})").code, "bad_request");
  EXPECT_EQ(Refused(R"({"cmd":null})").code, "bad_request");
}

TEST(ControlProtocolTest, UnknownCommandIsNamed) {
  ControlReply e = Refused(R"({"cmd":"reboot"})");
  EXPECT_EQ(e.code, "unknown_command");
  EXPECT_NE(e.error.find("'reboot'"), std::string::npos) << e.error;
  EXPECT_NE(e.error.find("list"), std::string::npos) << "says what is known: " << e.error;
}

TEST(ControlProtocolTest, UnknownKeyIsABadRequest) {
  ControlReply e = Refused(R"({"cmd":"detach","id":"5/51712","force":true})");
  EXPECT_EQ(e.code, "bad_request");
  EXPECT_NE(e.error.find("'force'"), std::string::npos) << e.error;
  EXPECT_EQ(Refused(R"({"cmd":"list","id":"5/51712"})").code, "bad_request");
}

TEST(ControlProtocolTest, WrongTypesAreBadRequestsNamingTheField) {
  struct Case {
    const char* line;
    const char* field;
  };
  for (const Case& c : {
           Case{R"({"cmd":"attach","domid":"5","devid":51712,"image":"/i"})", "domid"},
           Case{R"({"cmd":"attach","domid":-1,"devid":51712,"image":"/i"})", "domid"},
           Case{R"({"cmd":"attach","domid":1.5,"devid":51712,"image":"/i"})", "domid"},
           Case{R"({"cmd":"attach","domid":5,"devid":4294967296,"image":"/i"})", "devid"},
           Case{R"({"cmd":"attach","domid":5,"devid":51712,"image":7})", "image"},
           Case{R"({"cmd":"attach","domid":5,"devid":51712,"image":"/i","read_only":"yes"})", "read_only"},
           Case{R"({"cmd":"attach","domid":5,"devid":51712,"image":"/i","format":["raw"]})", "format"},
           Case{R"({"cmd":"detach","id":51712})", "id"},
           Case{R"({"cmd":"stats","id":null})", "id"},
           Case{R"({"cmd":"set-log-level","level":3})", "level"},
           Case{R"({"cmd":"export","what":"5/51712","address":{}})", "address"},
           Case{R"({"cmd":"export","what":"5/51712","address":"unix:/x","read_only":1})", "read_only"},
       }) {
    ControlReply e = Refused(c.line);
    EXPECT_EQ(e.code, "bad_request") << c.line;
    EXPECT_NE(e.error.find(c.field), std::string::npos) << c.line << " -> " << e.error;
  }
}

TEST(ControlProtocolTest, MissingRequiredFieldsAreBadRequests) {
  for (const char* line :
       {R"({"cmd":"attach","devid":51712,"image":"/i"})", R"({"cmd":"attach","domid":5,"image":"/i"})",
        R"({"cmd":"attach","domid":5,"devid":1})", R"({"cmd":"attach","domid":5,"devid":1,"image":""})",
        R"({"cmd":"detach"})", R"({"cmd":"pause"})", R"({"cmd":"resume"})", R"({"cmd":"set-log-level"})",
        R"({"cmd":"export","what":"5/1"})", R"({"cmd":"export","address":"unix:/x"})",
        R"({"cmd":"export","what":"","address":"unix:/x"})", R"({"cmd":"unexport"})"}) {
    EXPECT_EQ(Refused(line).code, "bad_request") << line;
  }
}

TEST(ControlProtocolTest, MalformedVbdIdsAreRefusedAtTheEdge) {
  for (const char* id : {"5", "5/", "/51712", "a/b", "5/51712/1", "-5/51712", "+5/1", "5/99999999999", " 5/1", ""}) {
    std::string line = std::string(R"({"cmd":"pause","id":")") + id + "\"}";
    ControlReply e = Refused(line);
    EXPECT_EQ(e.code, "bad_request") << id;
  }
  EXPECT_TRUE(IsVbdId("0/0"));
  EXPECT_TRUE(IsVbdId("32752/4294967295"));
  EXPECT_FALSE(IsVbdId("1/4294967296"));
}

TEST(ControlProtocolTest, UnknownFormatIsRefused) {
  ControlReply e = Refused(R"({"cmd":"attach","domid":5,"devid":1,"image":"/i","format":"vmdk"})");
  EXPECT_EQ(e.code, "bad_request");
  EXPECT_NE(e.error.find("vmdk"), std::string::npos);
}

TEST(ControlProtocolTest, NewerVersionIsRefusedOlderAccepted) {
  EXPECT_EQ(Refused(R"({"cmd":"list","version":2})").code, "unsupported_version");
  EXPECT_EQ(Refused(R"({"cmd":"list","version":0})").code, "bad_request");
  EXPECT_EQ(Refused(R"({"cmd":"list","version":"1"})").code, "bad_request");
  ControlReply error;
  EXPECT_TRUE(DecodeRequest(R"({"version":1,"cmd":"list"})", &error).has_value());
}

TEST(ControlProtocolTest, MalformedRepliesAreRefused) {
  EXPECT_FALSE(DecodeReply("not json").ok());
  EXPECT_FALSE(DecodeReply("[]").ok());
  EXPECT_FALSE(DecodeReply(R"({"version":1})").ok()) << "no ok";
  EXPECT_FALSE(DecodeReply(R"({"ok":"true"})").ok());
  EXPECT_FALSE(DecodeReply(R"({"ok":false,"error":"x"})").ok()) << "failure without a code";
  EXPECT_FALSE(DecodeReply(R"({"ok":true,"vbds":{}})").ok());
  EXPECT_FALSE(DecodeReply(R"({"ok":true,"vbds":[1]})").ok());
  EXPECT_FALSE(DecodeReply(R"({"ok":true,"vbds":[{"reads":-1}]})").ok());
  EXPECT_FALSE(DecodeReply(R"({"ok":true,"vbds":[{"queues":4294967296}]})").ok());
  EXPECT_FALSE(DecodeReply(R"({"ok":true,"vbds":[{"latency_us_log2":[1,"2"]}]})").ok());
  EXPECT_FALSE(DecodeReply(R"({"ok":true,"vbds":[{"remap_mean_probe":"1"}]})").ok());
  std::string csv;
  for (int i = 0; i < 65; ++i) csv += i ? ",1" : "1";
  EXPECT_FALSE(DecodeReply(R"({"ok":true,"vbds":[{"latency_us_log2":[)" + csv + "]}]}").ok());
}

TEST(ControlProtocolTest, RepliesWithUnknownKeysAndMissingFiguresDecode) {
  auto r = DecodeReply(R"({"ok":true,"version":3,"future":{"x":1},"vbds":[{"id":"1/2","new_counter":5}]})");
  ASSERT_TRUE(r.ok()) << r.status().ToString();
  EXPECT_EQ(r->version, 3);
  ASSERT_EQ(r->vbds.size(), 1u);
  EXPECT_EQ(r->vbds[0].id, "1/2");
  EXPECT_EQ(r->vbds[0].reads, 0u);
}

TEST(ControlProtocolTest, CommandNamesAreTheWireNames) {
  EXPECT_EQ(ControlCommandName(ControlCommand::kSetLogLevel), "set-log-level");
  EXPECT_EQ(ControlCommandName(ControlCommand::kUnexport), "unexport");
}

TEST(ControlProtocolTest, OffloadRequestsRoundTrip) {
  for (OffloadAction action : {OffloadAction::kOn, OffloadAction::kOff, OffloadAction::kStatus}) {
    ControlRequest r;
    r.cmd = ControlCommand::kOffload;
    r.offload = action;
    r.what = "/img/a b.qcow2";
    ControlRequest out = RoundTrip(r);
    EXPECT_EQ(out.cmd, ControlCommand::kOffload);
    EXPECT_EQ(out.offload, action);
    EXPECT_EQ(out.what, "/img/a b.qcow2");
  }
  ControlRequest all;
  all.cmd = ControlCommand::kOffload;
  all.offload = OffloadAction::kStatus;
  EXPECT_EQ(RoundTrip(all).what, "");
}

TEST(ControlProtocolTest, OffloadWithoutActionIsRefused) {
  EXPECT_NE(Refused(R"({"cmd":"offload","what":"/a"})").error.find("'action' is missing"), std::string::npos);
}

TEST(ControlProtocolTest, OffloadWithAnUnknownActionIsRefused) {
  EXPECT_NE(Refused(R"({"cmd":"offload","action":"maybe","what":"/a"})").error.find("not on, off or status"),
            std::string::npos);
}

TEST(ControlProtocolTest, OffloadOnOrOffWithoutAnImageIsRefused) {
  EXPECT_NE(Refused(R"({"cmd":"offload","action":"on"})").error.find("needs 'what'"), std::string::npos);
  EXPECT_NE(Refused(R"({"cmd":"offload","action":"off","what":""})").error.find("needs 'what'"), std::string::npos);
}

TEST(ControlProtocolTest, OffloadRepliesRoundTripWithEveryField) {
  ControlReply r;
  r.ok = true;
  OffloadSnapshot o;
  o.image = "/img/a.qcow2";
  o.device = "/dev/mapper/cowtap-a";
  o.size_sectors = 1;
  o.segments = 2;
  o.linear_sectors = 3;
  o.reloads = 4;
  o.reload_time_us = 5;
  o.revokes = 6;
  o.primed_clusters = 7;
  o.miss_requests = 8;
  o.miss_bytes_read = 9;
  o.miss_bytes_written = 10;
  o.zeroes_in_place = 13;
  o.zeroes_to_engine = 14;
  o.device_io_known = true;
  o.device_sectors_read = 11;
  o.device_sectors_written = 12;
  r.offloads = {o, o};
  auto back = DecodeReply(EncodeReply(r));
  ASSERT_TRUE(back.ok()) << back.status().ToString();
  ASSERT_EQ(back->offloads.size(), 2u);
  const OffloadSnapshot& b = back->offloads[1];
  EXPECT_EQ(b.image, o.image);
  EXPECT_EQ(b.device, o.device);
  EXPECT_EQ(std::tie(b.size_sectors, b.segments, b.linear_sectors, b.reloads, b.reload_time_us, b.revokes,
                     b.primed_clusters, b.miss_requests, b.miss_bytes_read, b.miss_bytes_written, b.device_sectors_read,
                     b.device_sectors_written, b.zeroes_in_place, b.zeroes_to_engine),
            std::tie(o.size_sectors, o.segments, o.linear_sectors, o.reloads, o.reload_time_us, o.revokes,
                     o.primed_clusters, o.miss_requests, o.miss_bytes_read, o.miss_bytes_written, o.device_sectors_read,
                     o.device_sectors_written, o.zeroes_in_place, o.zeroes_to_engine));
  EXPECT_TRUE(b.device_io_known);
}

TEST(ControlProtocolTest, AnOffloadEntryOfTheWrongTypeIsNotAReply) {
  EXPECT_FALSE(DecodeReply(R"({"ok":true,"version":1,"offloads":[{"reloads":"many"}]})").ok());
  EXPECT_FALSE(DecodeReply(R"({"ok":true,"version":1,"offloads":{}})").ok());
}

TEST(ControlProtocolTest, OffloadFractions) {
  OffloadSnapshot o;
  EXPECT_EQ(OffloadLinearFraction(o), 0);
  EXPECT_EQ(OffloadKernelFraction(o), -1) << "no device I/O: unknown";
  o.size_sectors = 100;
  o.linear_sectors = 25;
  EXPECT_DOUBLE_EQ(OffloadLinearFraction(o), 0.25);
  o.device_io_known = true;
  o.device_sectors_read = 8;  // 4096 bytes
  o.miss_bytes_read = 1024;
  EXPECT_DOUBLE_EQ(OffloadKernelFraction(o), 0.75);
  o.miss_bytes_written = 1 << 20;  // more than the device saw (reads the kernel did not count): clamped
  EXPECT_EQ(OffloadKernelFraction(o), 0);
}

}  // namespace
}  // namespace cowtap::daemon
