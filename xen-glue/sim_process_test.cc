// The sim with the guest in a SEPARATE PROCESS (fork): pages shared both
// ways, event channels across processes, xenstore between them, and a guest
// killed with SIGKILL while the backend has its pages mapped.
#include <poll.h>
#include <signal.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cstring>
#include <thread>

#include <gtest/gtest.h>

#include "xen-glue/sim.h"

namespace cowtap::xen {
namespace {

constexpr DomId kGuestDomid = 7;
const std::string kDir = "/local/domain/7/test";

bool Readable(int fd, int timeout_ms) {
  pollfd p{fd, POLLIN, 0};
  return poll(&p, 1, timeout_ms) == 1;
}

// Waits until `path` exists (polling; the child has no gtest).
Result<std::string> WaitForKey(XenStore& xs, const std::string& path) {
  for (int i = 0; i < 1000; ++i) {
    auto v = xs.Read(path);
    if (v.ok() || v.status().code() != ErrorCode::kNotFound) return v;
    std::this_thread::sleep_for(std::chrono::milliseconds(5));
  }
  return Status::NotFound("timed out waiting for " + path);
}

// The guest process. Returns its exit code: 0 = all good, else the step that
// failed. Never returns if the parent kills it (the expected end).
int GuestMain(const std::string& socket_path) {
  auto guest = SimGuest::Connect(socket_path, {.domid = kGuestDomid, .ram_pages = 16, .grant_entries = 64});
  if (!guest.ok()) return 10;
  SimGuest& g = **guest;
  auto xs = g.OpenXenStore();
  auto ev = g.OpenEventChannel();
  if (!xs.ok() || !ev.ok()) return 11;
  uint32_t page = *g.AllocPage();
  std::memset(g.Page(page), 0x6B, kPageSize);  // the guest's data, for the backend to read
  auto ref = g.GrantAccess(page, kDom0, false);
  auto port = (*ev)->BindUnbound(kDom0);
  if (!ref.ok() || !port.ok()) return 12;
  if (!(*xs)->Write(kDir + "/ring-ref", std::to_string(*ref)).ok()) return 13;
  if (!(*xs)->Write(kDir + "/event-channel", std::to_string(*port)).ok()) return 14;
  // Wait for the backend's kick, then check what it wrote into our page.
  if (!Readable((*ev)->fd(), 10000)) return 15;
  auto pending = (*ev)->Pending();
  if (!pending.ok() || *pending != std::optional<EvtchnPort>(*port)) return 16;
  if (!(*ev)->Unmask(*port).ok()) return 17;
  for (size_t i = 0; i < kPageSize / 2; ++i) {
    if (g.Page(page)[i] != 0xB6) return 18;
  }
  if (!(*ev)->Notify(*port).ok()) return 19;
  // EndAccess must fail: the backend still has the page mapped.
  if (g.EndAccess(*ref).code() != ErrorCode::kBusy) return 20;
  if (!(*xs)->Write(kDir + "/checked", "1").ok()) return 21;
  pause();  // until SIGKILL
  return 22;
}

TEST(SimProcessTest, GuestProcessSharesPagesAndEventsThenDiesBySigkill) {
  std::string socket_path = "/tmp/cowtap-simproc-" + std::to_string(getpid()) + ".sock";
  auto hv = SimHypervisor::Start(socket_path);
  ASSERT_TRUE(hv.ok()) << hv.status().ToString();
  pid_t pid = fork();
  ASSERT_GE(pid, 0);
  if (pid == 0) _exit(GuestMain(socket_path));

  auto platform = (*hv)->NewPlatform();
  auto xs = platform->OpenXenStore();
  auto gt = platform->OpenGrantTable();
  auto ev = platform->OpenEventChannel();
  ASSERT_TRUE(xs.ok() && gt.ok() && ev.ok());
  ASSERT_TRUE((*xs)->Watch("@releaseDomain", "rel").ok());
  ASSERT_TRUE((*hv)->WaitForDomain(kGuestDomid, std::chrono::seconds(10)));
  auto ref_text = WaitForKey(**xs, kDir + "/ring-ref");
  auto port_text = WaitForKey(**xs, kDir + "/event-channel");
  ASSERT_TRUE(ref_text.ok() && port_text.ok()) << ref_text.status().ToString();
  GrantRef refs[] = {static_cast<GrantRef>(std::stoul(*ref_text))};

  auto mapping = (*gt)->Map(kGuestDomid, refs, true);
  ASSERT_TRUE(mapping.ok()) << mapping.status().ToString();
  uint8_t* page = (*mapping)->addr();
  for (size_t i = 0; i < kPageSize; ++i) ASSERT_EQ(page[i], 0x6B) << "byte " << i;  // written by the guest
  std::memset(page, 0xB6, kPageSize / 2);  // for the guest to read

  auto local = (*ev)->BindInterdomain(kGuestDomid, static_cast<EvtchnPort>(std::stoul(*port_text)));
  ASSERT_TRUE(local.ok()) << local.status().ToString();
  ASSERT_TRUE((*ev)->Notify(*local).ok());
  ASSERT_TRUE(Readable((*ev)->fd(), 10000)) << "the guest did not notify back";
  EXPECT_EQ(*(*ev)->Pending(), std::optional<EvtchnPort>(*local));
  ASSERT_TRUE((*ev)->Unmask(*local).ok());
  auto checked = WaitForKey(**xs, kDir + "/checked");
  ASSERT_TRUE(checked.ok()) << "guest failed; its exit code tells which step";

  ASSERT_EQ(kill(pid, SIGKILL), 0);
  int wstatus = 0;
  ASSERT_EQ(waitpid(pid, &wstatus, 0), pid);
  ASSERT_TRUE(WIFSIGNALED(wstatus) && WTERMSIG(wstatus) == SIGKILL)
      << "guest exited early with code " << (WIFEXITED(wstatus) ? WEXITSTATUS(wstatus) : -1);

  for (int i = 0; i < 400 && platform->DomainAlive(kGuestDomid); ++i) {
    std::this_thread::sleep_for(std::chrono::milliseconds(5));
  }
  EXPECT_FALSE(platform->DomainAlive(kGuestDomid));
  // The dead guest's pages are still valid memory in the backend.
  page[0] = 0x01;
  EXPECT_EQ(page[0], 0x01);
  EXPECT_EQ(page[kPageSize - 1], 0x6B);
  EXPECT_TRUE((*ev)->Notify(*local).ok());
  bool released = false;
  for (int i = 0; i < 10 && !released; ++i) {
    if (!Readable((*xs)->fd(), 1000)) break;
    while (auto e = *(*xs)->ReadWatch()) released |= e->path == "@releaseDomain";
  }
  EXPECT_TRUE(released);
  EXPECT_EQ((*gt)->Map(kGuestDomid, refs, false).status().code(), ErrorCode::kCancelled);
  EXPECT_EQ((*hv)->MappedGrantCount(kGuestDomid), 1u);
  mapping->reset();
  EXPECT_EQ((*hv)->MappedGrantCount(kGuestDomid), 0u);
  // Cleanup still works through xenstore after the death.
  EXPECT_TRUE((*xs)->Remove("/local/domain/7").ok());
}

TEST(SimProcessTest, GuestDyingAbruptlyWithPagesMappedLeavesBackendIntact) {
  std::string socket_path = "/tmp/cowtap-simproc-die-" + std::to_string(getpid()) + ".sock";
  auto hv = SimHypervisor::Start(socket_path);
  ASSERT_TRUE(hv.ok());
  auto platform = (*hv)->NewPlatform();
  auto xs = platform->OpenXenStore();
  auto gt = platform->OpenGrantTable();
  ASSERT_TRUE(xs.ok() && gt.ok());
  pid_t pid = fork();
  ASSERT_GE(pid, 0);
  if (pid == 0) {
    auto guest = SimGuest::Connect(socket_path, {.domid = 8, .ram_pages = 8, .grant_entries = 16});
    if (!guest.ok()) _exit(10);
    auto gxs = (*guest)->OpenXenStore();
    uint32_t page = *(*guest)->AllocPage();
    std::memset((*guest)->Page(page), 0x3C, kPageSize);
    auto ref = (*guest)->GrantAccess(page, kDom0, false);
    if (!gxs.ok() || !ref.ok()) _exit(11);
    if (!(*gxs)->Write("/local/domain/8/ref", std::to_string(*ref)).ok()) _exit(12);
    // Die as soon as the backend says it has the page mapped.
    if (!WaitForKey(**gxs, "/local/domain/8/mapped").ok()) _exit(13);
    (*guest)->DieAbruptly();
  }
  auto ref_text = WaitForKey(**xs, "/local/domain/8/ref");
  ASSERT_TRUE(ref_text.ok());
  GrantRef refs[] = {static_cast<GrantRef>(std::stoul(*ref_text))};
  auto mapping = (*gt)->Map(8, refs, true);
  ASSERT_TRUE(mapping.ok()) << mapping.status().ToString();
  ASSERT_TRUE((*xs)->Write("/local/domain/8/mapped", "1").ok());
  int wstatus = 0;
  ASSERT_EQ(waitpid(pid, &wstatus, 0), pid);
  EXPECT_TRUE(WIFSIGNALED(wstatus) && WTERMSIG(wstatus) == SIGKILL);
  for (int i = 0; i < 400 && platform->DomainAlive(8); ++i) std::this_thread::sleep_for(std::chrono::milliseconds(5));
  EXPECT_FALSE(platform->DomainAlive(8));
  for (size_t i = 0; i < kPageSize; ++i) ASSERT_EQ((*mapping)->addr()[i], 0x3C);
  std::memset((*mapping)->addr(), 0, kPageSize);  // still writable memory
  mapping->reset();
  EXPECT_EQ((*hv)->MappedGrantCount(8), 0u);
}

TEST(SimProcessTest, GarbageFromAGuestSocketIsRefusedAndServiceContinues) {
  std::string socket_path = "/tmp/cowtap-simproc-garbage-" + std::to_string(getpid()) + ".sock";
  auto hv = SimHypervisor::Start(socket_path);
  ASSERT_TRUE(hv.ok());
  auto connect_raw = [&] {
    int fd = socket(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0);
    sockaddr_un addr{};
    addr.sun_family = AF_UNIX;
    socket_path.copy(addr.sun_path, socket_path.size());
    EXPECT_EQ(connect(fd, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)), 0);
    return fd;
  };
  // 1: random bytes instead of a hello: the hypervisor hangs up.
  int a = connect_raw();
  uint8_t junk[64];
  for (size_t i = 0; i < sizeof(junk); ++i) junk[i] = static_cast<uint8_t>(i * 37 + 11);
  ASSERT_EQ(send(a, junk, sizeof(junk), 0), static_cast<ssize_t>(sizeof(junk)));
  ASSERT_TRUE(Readable(a, 5000));
  char buf[256];
  EXPECT_EQ(recv(a, buf, sizeof(buf), 0), 0);
  close(a);
  // 2: a truncated hello (type only, no fds): refused with a reply, then closed.
  int b = connect_raw();
  uint32_t hello_type = 1;
  ASSERT_EQ(send(b, &hello_type, sizeof(hello_type), 0), 4);
  ASSERT_TRUE(Readable(b, 5000));
  EXPECT_GT(recv(b, buf, sizeof(buf), 0), 0);  // the error reply
  ASSERT_TRUE(Readable(b, 5000));
  EXPECT_EQ(recv(b, buf, sizeof(buf), 0), 0);
  close(b);
  // A well-behaved guest is still served.
  auto good = SimGuest::Connect(socket_path, {.domid = 3});
  ASSERT_TRUE(good.ok()) << good.status().ToString();
  EXPECT_TRUE((*hv)->DomainAlive(3));
}

}  // namespace
}  // namespace cowtap::xen
