// The sim's wire codec, and the hypervisor fed hostile datagrams on a
// guest's sockets: every one is answered or the guest is dropped; the
// hypervisor never crashes and keeps serving others.
#include "xen-glue/sim_wire.h"

#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include <random>

#include <gtest/gtest.h>

#include "xen-glue/sim.h"

namespace cowtap::xen::sim {
namespace {

TEST(WireTest, RoundTrip) {
  WireWriter w;
  w.U8(7).U16(0xBEEF).U32(0xDEADBEEF).Str("hello").Put(Status::Busy("retry"));
  WireReader r(w.bytes());
  uint8_t a;
  uint16_t b;
  uint32_t c;
  std::string s;
  Status st;
  ASSERT_TRUE(r.U8(&a) && r.U16(&b) && r.U32(&c) && r.Str(&s) && r.Get(&st));
  EXPECT_EQ(a, 7);
  EXPECT_EQ(b, 0xBEEF);
  EXPECT_EQ(c, 0xDEADBEEFu);
  EXPECT_EQ(s, "hello");
  EXPECT_EQ(st.code(), ErrorCode::kBusy);
  EXPECT_EQ(st.message(), "retry");
  EXPECT_FALSE(r.U8(&a));  // past the end
}

TEST(WireTest, ShortAndOversizedFieldsFailWithoutReadingPastTheEnd) {
  WireWriter w;
  w.U32(1000).U8('x');  // a string claiming 1000 bytes, with one present
  WireReader r(w.bytes());
  std::string s;
  EXPECT_FALSE(r.Str(&s));
  EXPECT_FALSE(r.ok());
  uint32_t v;
  EXPECT_FALSE(r.U32(&v));  // stays failed

  WireWriter w2;
  w2.Str("abcdef");
  WireReader r2(w2.bytes());
  EXPECT_FALSE(r2.Str(&s, 3));  // longer than the caller's bound

  WireWriter w3;
  w3.U8(200).Str("");  // an error code that does not exist
  WireReader r3(w3.bytes());
  Status st;
  EXPECT_FALSE(r3.Get(&st));
}

TEST(WireTest, FdsPassAndExtraFdsAreNotLeaked) {
  int pair[2];
  ASSERT_EQ(socketpair(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0, pair), 0);
  UniqueFd a(pair[0]), b(pair[1]);
  UniqueFd memfd(memfd_create("t", MFD_CLOEXEC));
  ASSERT_TRUE(memfd.valid());
  ASSERT_EQ(write(memfd.get(), "zz", 2), 2);
  WireWriter w;
  w.U32(42);
  int fds[] = {memfd.get()};
  ASSERT_TRUE(SendMessage(a.get(), w.bytes(), fds).ok());
  auto m = ReceiveMessage(b.get());
  ASSERT_TRUE(m.ok()) << m.status().ToString();
  ASSERT_EQ(m->fds.size(), 1u);
  char buf[2];
  EXPECT_EQ(pread(m->fds[0].get(), buf, 2, 0), 2);
  EXPECT_EQ(buf[0], 'z');
  a.Reset();
  EXPECT_EQ(ReceiveMessage(b.get()).status().code(), ErrorCode::kCancelled);
}

// A raw client that does what SimGuest does, then misbehaves.
class RawGuest {
 public:
  explicit RawGuest(const std::string& path) {
    sock_.Reset(socket(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0));
    sockaddr_un addr{};
    addr.sun_family = AF_UNIX;
    path.copy(addr.sun_path, path.size());
    EXPECT_EQ(connect(sock_.get(), reinterpret_cast<sockaddr*>(&addr), sizeof(addr)), 0);
  }
  Status Hello(DomId domid) {
    UniqueFd ram(memfd_create("ram", MFD_CLOEXEC | MFD_ALLOW_SEALING));
    UniqueFd table(memfd_create("gt", MFD_CLOEXEC | MFD_ALLOW_SEALING));
    if (ftruncate(ram.get(), 16 * kPageSize) != 0 || ftruncate(table.get(), kPageSize) != 0) {
      return Status::Internal("ftruncate");
    }
    WireWriter w;
    w.U32(static_cast<uint32_t>(MsgType::kHello)).U16(domid).U32(16).U32(64);
    int fds[] = {ram.get(), table.get()};
    return Call(sock_.get(), w.bytes(), fds).status();
  }
  Result<UniqueFd> OpenXs() {
    WireWriter w;
    w.U32(static_cast<uint32_t>(MsgType::kOpenXs));
    COWTAP_ASSIGN_OR_RETURN(Message m, Call(sock_.get(), w.bytes(), {}));
    if (m.fds.size() != 2) return Status::Internal("no fds");
    return std::move(m.fds[0]);
  }
  static Result<Message> Call(int sock, std::span<const uint8_t> bytes, std::span<const int> fds) {
    COWTAP_RETURN_IF_ERROR(SendMessage(sock, bytes, fds));
    COWTAP_ASSIGN_OR_RETURN(Message m, ReceiveMessage(sock));
    WireReader r(m.bytes);
    Status s;
    if (!r.Get(&s)) return Status::Internal("malformed reply");
    COWTAP_RETURN_IF_ERROR(s);
    return m;
  }
  int sock() const { return sock_.get(); }

 private:
  UniqueFd sock_;
};

TEST(WireTest, HypervisorSurvivesRandomRequestsOnGuestSockets) {
  std::string path = "/tmp/cowtap-wire-" + std::to_string(getpid()) + ".sock";
  auto hv = SimHypervisor::Start(path);
  ASSERT_TRUE(hv.ok());
  RawGuest g(path);
  ASSERT_TRUE(g.Hello(6).ok());
  auto xs = g.OpenXs();
  ASSERT_TRUE(xs.ok()) << xs.status().ToString();
  std::mt19937 rng(1234);
  int answered = 0;
  for (int i = 0; i < 3000; ++i) {
    // Plausible headers (type, transaction) with random tails, so the
    // decoders of every request type see truncated and bogus fields.
    WireWriter w;
    w.U32(100 + rng() % 14).U32(rng() % 3);
    size_t tail = rng() % 64;
    for (size_t j = 0; j < tail; ++j) w.U8(static_cast<uint8_t>(rng() % 4 == 0 ? rng() : rng() % 8));
    ASSERT_TRUE(SendMessage(xs->get(), w.bytes(), {}).ok());
    auto reply = ReceiveMessage(xs->get());
    ASSERT_TRUE(reply.ok()) << "request " << i << ": " << reply.status().ToString();
    WireReader r(reply->bytes);
    Status s;
    ASSERT_TRUE(r.Get(&s)) << "request " << i << " got a malformed reply";
    ++answered;
  }
  EXPECT_EQ(answered, 3000);
  // Main-socket requests with bad fields are refused, not fatal.
  for (MsgType t : {MsgType::kBindInterdomain, MsgType::kUnbind, MsgType::kBindUnbound, MsgType::kHello}) {
    WireWriter w;
    w.U32(static_cast<uint32_t>(t)).U8(1);
    EXPECT_FALSE(RawGuest::Call(g.sock(), w.bytes(), {}).ok());
  }
  // The repeated hello (last above) is fatal for that guest only.
  for (int i = 0; i < 400 && (*hv)->DomainAlive(6); ++i) usleep(5000);
  EXPECT_FALSE((*hv)->DomainAlive(6));
  auto good = SimGuest::Connect(path, {.domid = 7});
  ASSERT_TRUE(good.ok()) << good.status().ToString();
  auto gxs = (*good)->OpenXenStore();
  ASSERT_TRUE(gxs.ok());
  EXPECT_TRUE((*gxs)->Write("/local/domain/7/ok", "1").ok());
}

}  // namespace
}  // namespace cowtap::xen::sim
