#include "backend/nbd_server.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#include <atomic>
#include <cstring>
#include <numeric>
#include <thread>

#include "backend/mem_block_device.h"
#include "backend/nbd_protocol.h"
#include "backend/nbd_test_client.h"
#include "base/endian.h"

namespace cowtap::backend {
namespace {

using testing::NbdTestClient;

std::vector<uint8_t> Pattern(size_t n, uint8_t seed) {
  std::vector<uint8_t> v(n);
  for (size_t i = 0; i < n; ++i) v[i] = static_cast<uint8_t>(seed + i * 7 + (i >> 9));
  return v;
}

NbdServerOptions At(std::string address) {
  NbdServerOptions o;
  o.address = std::move(address);
  return o;
}

template <typename Pred>
bool WaitFor(Pred pred) {
  for (int i = 0; i < 500; ++i) {
    if (pred()) return true;
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  }
  return pred();
}

class NbdServerTest : public ::testing::Test {
 protected:
  void SetUp() override {
    char dir[] = "/tmp/cowtap-nbd-XXXXXX";
    ASSERT_NE(::mkdtemp(dir), nullptr);
    dir_ = dir;
  }
  void TearDown() override {
    server_.reset();
    ::unlink((dir_ + "/sock").c_str());
    ::rmdir(dir_.c_str());
  }
  void StartServer(MemBlockDeviceOptions dev_options = {}, NbdServerOptions options = {}) {
    device_ = std::make_shared<MemBlockDevice>(dev_options);
    if (options.address.empty()) options.address = "unix:" + dir_ + "/sock";
    auto server = NbdServer::Start(device_, options);
    ASSERT_TRUE(server.ok()) << server.status().ToString();
    server_ = std::move(server).value();
  }
  std::unique_ptr<NbdTestClient> Connected(bool structured = false, const std::string& name = "") {
    auto c = std::make_unique<NbdTestClient>();
    EXPECT_TRUE(c->Connect(server_->address()));
    EXPECT_TRUE(c->Handshake(name, structured));
    return c;
  }

  std::string dir_;
  std::shared_ptr<MemBlockDevice> device_;
  std::unique_ptr<NbdServer> server_;
};

TEST_F(NbdServerTest, WritesThenReadsBackThroughGo) {
  StartServer();
  auto c = Connected();
  EXPECT_EQ(c->size(), 64u << 20);
  EXPECT_TRUE(c->transmission_flags() & kNbdFlagSendFlush);
  EXPECT_FALSE(c->transmission_flags() & kNbdFlagReadOnly);
  const auto data = Pattern(1 << 20, 3);
  ASSERT_TRUE(c->SendRequest(0, kNbdCmdWrite, 1, 12345, data.size(), data));
  auto w = c->ReadReply(0);
  ASSERT_TRUE(w);
  EXPECT_EQ(w->error, 0u);
  EXPECT_EQ(w->handle, 1u);
  ASSERT_TRUE(c->SendRequest(0, kNbdCmdRead, 2, 12345, data.size()));
  auto r = c->ReadReply(data.size());
  ASSERT_TRUE(r);
  EXPECT_EQ(r->error, 0u);
  EXPECT_EQ(r->handle, 2u);
  EXPECT_EQ(r->data, data);
  const auto contents = device_->Contents();
  EXPECT_TRUE(std::equal(data.begin(), data.end(), contents.begin() + 12345));
  EXPECT_EQ(server_->stats().bytes_written, data.size());
  EXPECT_EQ(server_->stats().bytes_read, data.size());
}

TEST_F(NbdServerTest, ExportNameHandshakeServesTheDefaultExport) {
  NbdServerOptions options;
  options.export_name = "disk";
  StartServer({}, options);
  NbdTestClient c;
  ASSERT_TRUE(c.Connect(server_->address()));
  ASSERT_TRUE(c.Greet(kNbdFlagCFixedNewstyle));
  const std::string name = "disk";
  ASSERT_TRUE(c.SendOption(kNbdOptExportName, std::span(reinterpret_cast<const uint8_t*>(name.data()), 4)));
  uint8_t reply[8 + 2 + 124];
  ASSERT_TRUE(c.ReadFull(reply, sizeof(reply)));
  EXPECT_EQ(LoadBe64(reply), 64u << 20);
  ASSERT_TRUE(c.SendRequest(0, kNbdCmdFlush, 5, 0, 0));
  auto r = c.ReadReply(0);
  ASSERT_TRUE(r);
  EXPECT_EQ(r->error, 0u);
}

TEST_F(NbdServerTest, GoForAnotherExportNameIsRefusedAndNegotiationGoesOn) {
  NbdServerOptions options;
  options.export_name = "disk";
  StartServer({}, options);
  NbdTestClient c;
  ASSERT_TRUE(c.Connect(server_->address()));
  ASSERT_TRUE(c.Greet());
  std::vector<uint8_t> go = {0, 0, 0, 3, 'x', 'y', 'z', 0, 0};
  ASSERT_TRUE(c.SendOption(kNbdOptGo, go));
  auto r = c.ReadOptionReply();
  ASSERT_TRUE(r);
  EXPECT_EQ(r->type, kNbdRepErrUnknown);
  ASSERT_TRUE(c.SendOption(kNbdOptList, {}));
  r = c.ReadOptionReply();
  ASSERT_TRUE(r);
  EXPECT_EQ(r->type, kNbdRepServer);
}

TEST_F(NbdServerTest, StructuredRepliesAnswerReadsWithOffsetDataAndErrorsWithMessages) {
  StartServer();
  device_->Fill(4096, Pattern(4096, 9));
  auto c = Connected(/*structured=*/true);
  EXPECT_TRUE(c->transmission_flags() & kNbdFlagSendDf);
  ASSERT_TRUE(c->SendRequest(kNbdCmdFlagDf, kNbdCmdRead, 7, 4096, 4096));
  auto r = c->ReadReply(0);
  ASSERT_TRUE(r);
  EXPECT_TRUE(r->structured);
  EXPECT_EQ(r->type, kNbdReplyTypeOffsetData);
  EXPECT_EQ(r->flags, kNbdReplyFlagDone);
  EXPECT_EQ(r->offset, 4096u);
  EXPECT_EQ(r->data, Pattern(4096, 9));
  ASSERT_TRUE(c->SendRequest(0, kNbdCmdRead, 8, 64u << 20, 512));
  r = c->ReadReply(0);
  ASSERT_TRUE(r);
  EXPECT_EQ(r->type, kNbdReplyTypeError);
  EXPECT_EQ(r->error, kNbdEinval);
  EXPECT_THAT(r->message, ::testing::HasSubstr("outside the export"));
}

TEST_F(NbdServerTest, DeviceErrorsBecomeNbdErrors) {
  StartServer();
  auto c = Connected();
  device_->FailNext(BlockIoKind::kRead, Status::IoError("injected"));
  ASSERT_TRUE(c->SendRequest(0, kNbdCmdRead, 1, 0, 512));
  auto r = c->ReadReply(512);
  ASSERT_TRUE(r);
  EXPECT_EQ(r->error, kNbdEio);
  device_->FailNext(BlockIoKind::kWrite, Status::NoSpace("injected"));
  const auto data = Pattern(512, 1);
  ASSERT_TRUE(c->SendRequest(0, kNbdCmdWrite, 2, 0, 512, data));
  r = c->ReadReply(0);
  ASSERT_TRUE(r);
  EXPECT_EQ(r->error, kNbdEnospc);
  // The connection is still good.
  ASSERT_TRUE(c->SendRequest(0, kNbdCmdRead, 3, 0, 512));
  r = c->ReadReply(512);
  ASSERT_TRUE(r);
  EXPECT_EQ(r->error, 0u);
}

TEST_F(NbdServerTest, FuaTrimAndWriteZeroesReachTheDeviceWithTheirFlushes) {
  StartServer();
  auto c = Connected();
  ASSERT_TRUE(c->transmission_flags() & kNbdFlagSendTrim);
  ASSERT_TRUE(c->transmission_flags() & kNbdFlagSendWriteZeroes);
  device_->Fill(0, Pattern(8192, 1));
  const auto data = Pattern(512, 2);
  ASSERT_TRUE(c->SendRequest(kNbdCmdFlagFua, kNbdCmdWrite, 1, 0, 512, data));
  ASSERT_EQ(c->ReadReply(0)->error, 0u);
  ASSERT_TRUE(c->SendRequest(kNbdCmdFlagFua, kNbdCmdTrim, 2, 1024, 1024));
  ASSERT_EQ(c->ReadReply(0)->error, 0u);
  ASSERT_TRUE(c->SendRequest(kNbdCmdFlagNoHole, kNbdCmdWriteZeroes, 3, 4096, 2048));
  ASSERT_EQ(c->ReadReply(0)->error, 0u);
  ASSERT_TRUE(c->SendRequest(0, kNbdCmdFlush, 4, 0, 0));
  ASSERT_EQ(c->ReadReply(0)->error, 0u);
  const auto log = device_->log();
  std::vector<BlockIoKind> kinds;
  for (const auto& op : log) kinds.push_back(op.kind);
  EXPECT_THAT(kinds, ::testing::ElementsAre(BlockIoKind::kWrite, BlockIoKind::kFlush, BlockIoKind::kDiscard,
                                            BlockIoKind::kFlush, BlockIoKind::kWriteZeroes, BlockIoKind::kFlush));
  EXPECT_EQ(log[2].offset_bytes, 1024u);
  EXPECT_EQ(log[2].length_bytes, 1024u);
  const auto durable = device_->DurableContents();
  EXPECT_TRUE(std::equal(data.begin(), data.end(), durable.begin()));
  EXPECT_TRUE(std::all_of(durable.begin() + 4096, durable.begin() + 6144, [](uint8_t b) { return b == 0; }));
}

TEST_F(NbdServerTest, ReadOnlyExportRefusesWritesButKeepsTheStreamInStep) {
  NbdServerOptions options;
  options.read_only = true;
  StartServer({}, options);
  auto c = Connected();
  EXPECT_TRUE(c->transmission_flags() & kNbdFlagReadOnly);
  EXPECT_FALSE(c->transmission_flags() & kNbdFlagSendTrim);
  const auto data = Pattern(4096, 5);
  ASSERT_TRUE(c->SendRequest(0, kNbdCmdWrite, 1, 0, data.size(), data));
  auto r = c->ReadReply(0);
  ASSERT_TRUE(r);
  EXPECT_EQ(r->error, kNbdEperm);
  ASSERT_TRUE(c->SendRequest(0, kNbdCmdRead, 2, 0, 512));
  r = c->ReadReply(512);
  ASSERT_TRUE(r);
  EXPECT_EQ(r->handle, 2u);
  EXPECT_EQ(r->error, 0u);
  EXPECT_EQ(r->data, std::vector<uint8_t>(512, 0));
  for (const auto& op : device_->log()) EXPECT_NE(op.kind, BlockIoKind::kWrite);
}

TEST_F(NbdServerTest, WritePastTheEndIsEnospcAndItsDataIsSkipped) {
  StartServer({.size_bytes = 1 << 20});
  auto c = Connected();
  const auto data = Pattern(4096, 1);
  ASSERT_TRUE(c->SendRequest(0, kNbdCmdWrite, 1, (1 << 20) - 512, data.size(), data));
  EXPECT_EQ(c->ReadReply(0)->error, kNbdEnospc);
  ASSERT_TRUE(c->SendRequest(0, kNbdCmdRead, 2, 0, 16));
  auto r = c->ReadReply(16);
  ASSERT_TRUE(r);
  EXPECT_EQ(r->handle, 2u);
}

TEST_F(NbdServerTest, OversizedReadIsEoverflow) {
  StartServer({.size_bytes = 128 << 20});
  auto c = Connected();
  ASSERT_TRUE(c->SendRequest(0, kNbdCmdRead, 1, 0, kNbdMaxPayloadBytes + 1));
  auto r = c->ReadReply(0);
  ASSERT_TRUE(r);
  EXPECT_EQ(r->error, kNbdEoverflow);
}

TEST_F(NbdServerTest, OversizedWriteIsDrainedAndAnsweredEoverflow) {
  StartServer({.size_bytes = 128 << 20});
  auto c = Connected();
  const std::vector<uint8_t> data(kNbdMaxPayloadBytes + 4096, 0x5a);
  std::thread sender([&] { EXPECT_TRUE(c->SendRequest(0, kNbdCmdWrite, 1, 0, data.size(), data)); });
  auto r = c->ReadReply(0);
  sender.join();
  ASSERT_TRUE(r);
  EXPECT_EQ(r->error, kNbdEoverflow);
  ASSERT_TRUE(c->SendRequest(0, kNbdCmdRead, 2, 0, 16));
  r = c->ReadReply(16);
  ASSERT_TRUE(r);
  EXPECT_EQ(r->handle, 2u);
  EXPECT_EQ(r->data, std::vector<uint8_t>(16, 0));
}

TEST_F(NbdServerTest, UnknownCommandIsEinvalAndTheConnectionContinues) {
  StartServer();
  auto c = Connected();
  ASSERT_TRUE(c->SendRequest(0, kNbdCmdBlockStatus, 1, 0, 512));
  EXPECT_EQ(c->ReadReply(0)->error, kNbdEinval);
  ASSERT_TRUE(c->SendRequest(0, 77, 2, 0, 512));
  EXPECT_EQ(c->ReadReply(0)->error, kNbdEinval);
  ASSERT_TRUE(c->SendRequest(0, kNbdCmdFlush, 3, 0, 0));
  EXPECT_EQ(c->ReadReply(0)->error, 0u);
}

TEST_F(NbdServerTest, RequestsArePipelinedAndAnsweredInCompletionOrder) {
  StartServer({.defer_completions = true});
  auto c = Connected();
  for (uint64_t h = 1; h <= 8; ++h) ASSERT_TRUE(c->SendRequest(0, kNbdCmdRead, h, h * 4096, 4096));
  ASSERT_TRUE(WaitFor([&] { return device_->PendingCount() == 8; }));
  EXPECT_EQ(device_->CompletePending(SIZE_MAX, /*reverse=*/true), 8u);
  for (uint64_t h = 8; h >= 1; --h) {
    auto r = c->ReadReply(4096);
    ASSERT_TRUE(r);
    EXPECT_EQ(r->handle, h);
  }
}

TEST_F(NbdServerTest, InFlightRequestsPerConnectionAreBounded) {
  NbdServerOptions options;
  options.max_inflight_requests = 3;
  StartServer({.defer_completions = true}, options);
  auto c = Connected();
  for (uint64_t h = 1; h <= 10; ++h) ASSERT_TRUE(c->SendRequest(0, kNbdCmdRead, h, 0, 512));
  ASSERT_TRUE(WaitFor([&] { return device_->PendingCount() == 3; }));
  std::this_thread::sleep_for(std::chrono::milliseconds(100));
  EXPECT_EQ(device_->PendingCount(), 3u);
  size_t answered = 0;
  for (int spins = 0; answered < 10 && spins < 2000; ++spins) {
    answered += device_->CompletePending();
    std::this_thread::sleep_for(std::chrono::milliseconds(5));
    EXPECT_LE(device_->PendingCount(), 3u);
  }
  EXPECT_EQ(answered, 10u);
  for (int i = 0; i < 10; ++i) ASSERT_TRUE(c->ReadReply(512));
}

TEST_F(NbdServerTest, BadRequestMagicDisconnectsOnlyThatClient) {
  StartServer();
  auto good = Connected();
  auto bad = Connected();
  std::vector<uint8_t> junk(28, 0x42);
  ASSERT_TRUE(bad->SendRaw(junk));
  EXPECT_TRUE(bad->WaitClosed());
  ASSERT_TRUE(good->SendRequest(0, kNbdCmdRead, 1, 0, 512));
  EXPECT_EQ(good->ReadReply(512)->error, 0u);
  EXPECT_GE(server_->stats().protocol_errors, 1u);
}

TEST_F(NbdServerTest, BadOptionMagicDisconnects) {
  StartServer();
  NbdTestClient c;
  ASSERT_TRUE(c.Connect(server_->address()));
  ASSERT_TRUE(c.Greet());
  std::vector<uint8_t> junk(16, 0x11);
  ASSERT_TRUE(c.SendRaw(junk));
  EXPECT_TRUE(c.WaitClosed());
}

TEST_F(NbdServerTest, HugeOptionLengthDisconnectsWithoutReadingIt) {
  StartServer();
  NbdTestClient c;
  ASSERT_TRUE(c.Connect(server_->address()));
  ASSERT_TRUE(c.Greet());
  uint8_t h[16];
  StoreBe64(h, kNbdOptionMagic);
  StoreBe32(h + 8, kNbdOptGo);
  StoreBe32(h + 12, 0xfffffff0);
  ASSERT_TRUE(c.SendRaw(h));
  EXPECT_TRUE(c.WaitClosed());
}

TEST_F(NbdServerTest, UnknownClientFlagsDisconnect) {
  StartServer();
  NbdTestClient c;
  ASSERT_TRUE(c.Connect(server_->address()));
  ASSERT_TRUE(c.Greet(0x80000001));
  EXPECT_TRUE(c.WaitClosed());
}

TEST_F(NbdServerTest, AClientThatStallsInTheHandshakeIsCutOff) {
  NbdServerOptions options;
  options.handshake_timeout = std::chrono::milliseconds(200);
  StartServer({}, options);
  NbdTestClient c;
  ASSERT_TRUE(c.Connect(server_->address()));
  ASSERT_TRUE(c.Greet());
  EXPECT_TRUE(c.WaitClosed());
  EXPECT_TRUE(WaitFor([&] { return server_->client_count() == 0; }));
}

TEST_F(NbdServerTest, DisconnectInTheMiddleOfWriteDataLeavesTheServerServing) {
  StartServer();
  {
    auto c = Connected();
    const auto half = Pattern(2048, 1);
    ASSERT_TRUE(c->SendRequest(0, kNbdCmdWrite, 1, 0, 4096, half));  // 2048 bytes short
  }
  {
    auto c = Connected();
    std::vector<uint8_t> half_header(10, 0x25);
    ASSERT_TRUE(c->SendRaw(half_header));
  }
  EXPECT_TRUE(WaitFor([&] { return server_->client_count() == 0; }));
  for (const auto& op : device_->log()) EXPECT_NE(op.kind, BlockIoKind::kWrite);
  auto c = Connected();
  ASSERT_TRUE(c->SendRequest(0, kNbdCmdRead, 1, 0, 512));
  EXPECT_EQ(c->ReadReply(512)->error, 0u);
}

TEST_F(NbdServerTest, ASlowReaderDoesNotBlockOtherClients) {
  StartServer({.size_bytes = 64 << 20});
  auto slow = Connected();
  int small = 4096;
  ::setsockopt(slow->fd(), SOL_SOCKET, SO_RCVBUF, &small, sizeof(small));
  // 64 reads of 1 MiB that it never reads: the server's socket buffer fills
  // and its writer blocks; the reader stops at the in-flight bound.
  std::thread flood([&] {
    for (uint64_t h = 0; h < 64; ++h) {
      if (!slow->SendRequest(0, kNbdCmdRead, h, 0, 1 << 20)) break;
    }
  });
  std::this_thread::sleep_for(std::chrono::milliseconds(200));
  auto fast = Connected();
  const auto data = Pattern(65536, 4);
  for (uint64_t h = 0; h < 20; ++h) {
    ASSERT_TRUE(fast->SendRequest(0, kNbdCmdWrite, h, h * 65536, data.size(), data));
    auto r = fast->ReadReply(0);
    ASSERT_TRUE(r);
    EXPECT_EQ(r->error, 0u);
  }
  ::shutdown(slow->fd(), SHUT_RDWR);  // unblocks the flood thread's send
  flood.join();
  slow->Close();
}

TEST_F(NbdServerTest, MaxClientsRefusesTheExtraConnection) {
  NbdServerOptions options;
  options.max_clients = 2;
  StartServer({}, options);
  auto a = Connected();
  auto b = Connected();
  NbdTestClient c;
  ASSERT_TRUE(c.Connect(server_->address()));
  EXPECT_TRUE(c.WaitClosed());
  EXPECT_EQ(server_->stats().connections_refused, 1u);
  a.reset();
  ASSERT_TRUE(WaitFor([&] { return server_->client_count() == 1; }));
  auto d = Connected();  // a slot is free again
  ASSERT_TRUE(d->SendRequest(0, kNbdCmdFlush, 1, 0, 0));
  EXPECT_EQ(d->ReadReply(0)->error, 0u);
}

TEST_F(NbdServerTest, DiscAnswersInFlightRequestsBeforeClosing) {
  StartServer({.defer_completions = true});
  auto c = Connected();
  ASSERT_TRUE(c->SendRequest(0, kNbdCmdRead, 1, 0, 512));
  ASSERT_TRUE(c->SendRequest(0, kNbdCmdDisc, 2, 0, 0));
  ASSERT_TRUE(WaitFor([&] { return device_->PendingCount() == 1; }));
  device_->CompletePending();
  auto r = c->ReadReply(512);
  ASSERT_TRUE(r);
  EXPECT_EQ(r->handle, 1u);
  EXPECT_TRUE(c->WaitClosed());
}

TEST_F(NbdServerTest, StopWaitsForInFlightIoAndAnswersIt) {
  StartServer({.defer_completions = true});
  auto c = Connected();
  ASSERT_TRUE(c->SendRequest(0, kNbdCmdRead, 1, 0, 512));
  ASSERT_TRUE(WaitFor([&] { return device_->PendingCount() == 1; }));
  std::atomic<bool> stopped{false};
  std::thread stopper([&] {
    server_->Stop();
    stopped = true;
  });
  std::this_thread::sleep_for(std::chrono::milliseconds(100));
  EXPECT_FALSE(stopped.load());
  device_->CompletePending();
  auto r = c->ReadReply(512);
  ASSERT_TRUE(r);
  EXPECT_EQ(r->handle, 1u);
  EXPECT_TRUE(c->WaitClosed());
  stopper.join();
  EXPECT_TRUE(stopped.load());
  struct stat st;
  EXPECT_NE(::stat((dir_ + "/sock").c_str(), &st), 0);  // socket file removed
}

TEST_F(NbdServerTest, StopCutsOffAClientThatIsMidHandshake) {
  StartServer();
  NbdTestClient c;
  ASSERT_TRUE(c.Connect(server_->address()));
  ASSERT_TRUE(c.Greet());
  server_->Stop();
  EXPECT_TRUE(c.WaitClosed());
}

TEST_F(NbdServerTest, UnixSocketIsOwnerOnly) {
  StartServer();
  struct stat st;
  ASSERT_EQ(::stat((dir_ + "/sock").c_str(), &st), 0);
  EXPECT_TRUE(S_ISSOCK(st.st_mode));
  EXPECT_EQ(st.st_mode & 0777, 0600u);
}

TEST_F(NbdServerTest, ASecondServerOnALiveSocketIsBusyAndAStaleOneIsReplaced) {
  StartServer();
  auto second = NbdServer::Start(device_, At(server_->address()));
  EXPECT_EQ(second.status().code(), ErrorCode::kBusy);
  // A socket file nobody listens on (a crashed server's) is taken over.
  const std::string stale = dir_ + "/stale";
  {
    int fd = ::socket(AF_UNIX, SOCK_STREAM, 0);
    sockaddr_un sa{};
    sa.sun_family = AF_UNIX;
    std::strcpy(sa.sun_path, stale.c_str());
    ASSERT_EQ(::bind(fd, reinterpret_cast<sockaddr*>(&sa), sizeof(sa)), 0);
    ::close(fd);
  }
  auto third = NbdServer::Start(device_, At("unix:" + stale));
  ASSERT_TRUE(third.ok()) << third.status().ToString();
  third->reset();
  EXPECT_NE(::access(stale.c_str(), F_OK), 0);
}

TEST_F(NbdServerTest, TcpPortZeroPicksAPortOnLoopback) {
  StartServer({}, At("tcp:127.0.0.1:0"));
  EXPECT_THAT(server_->address(), ::testing::StartsWith("tcp:127.0.0.1:"));
  EXPECT_NE(server_->address(), "tcp:127.0.0.1:0");
  EXPECT_THAT(server_->uri(), ::testing::StartsWith("nbd://127.0.0.1:"));
  auto c = Connected();
  ASSERT_TRUE(c->SendRequest(0, kNbdCmdRead, 1, 0, 4096));
  EXPECT_EQ(c->ReadReply(4096)->error, 0u);
}

TEST_F(NbdServerTest, BadAddressesAreRefused) {
  auto device = std::make_shared<MemBlockDevice>();
  for (const std::string& address : std::vector<std::string>{"", "unix:", "tcp:0.0.0.0:0", "tcp:10.1.2.3:10809",
                                                             "tcp:127.0.0.1", "tcp:127.0.0.1:99999", "tcp:localhost:1",
                                                             "udp:127.0.0.1:1", "unix:" + std::string(200, 'x')}) {
    auto s = NbdServer::Start(device, At(address));
    EXPECT_EQ(s.status().code(), ErrorCode::kInvalidArgument) << address;
  }
}

TEST_F(NbdServerTest, MultiConnIsAdvertisedUnlessDisabled) {
  StartServer();
  EXPECT_TRUE(Connected()->transmission_flags() & kNbdFlagCanMultiConn);
  server_.reset();
  NbdServerOptions options;
  options.multi_conn = false;
  StartServer({}, options);
  EXPECT_FALSE(Connected()->transmission_flags() & kNbdFlagCanMultiConn);
}

}  // namespace
}  // namespace cowtap::backend
