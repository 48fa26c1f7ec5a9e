// Tests for cowtap-xenpv-dm's pieces: QEMU argument parsing as libxl 4.17
// writes it, the QMP replies libxl checks, the monitor socket loop (real Unix
// sockets), and the xenstore steps against the simulated xenstored.
#include "tools/xl/xenpv_dm.h"

#include <gtest/gtest.h>
#include <sys/eventfd.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <future>
#include <nlohmann/json.hpp>

#include "xen-glue/xs_db.h"

namespace cowtap::xl {
namespace {

using nlohmann::json;

// What libxl 4.17's libxl__build_device_model_args_new passes for a PV guest.
std::vector<std::string> LibxlPvArgs(const std::string& dir) {
  return {"-xen-domid",  "7",
          "-chardev",    "socket,id=libxl-cmd,path=" + dir + "/qmp-libxl-7,server=on,wait=off",
          "-mon",        "chardev=libxl-cmd,mode=control",
          "-chardev",    "socket,id=libxenstat-cmd,path=" + dir + "/qmp-libxenstat-7,server=on,wait=off",
          "-mon",        "chardev=libxenstat-cmd,mode=control",
          "-nodefaults", "-no-user-config",
          "-xen-attach", "-name",
          "g1",          "-vnc",
          "none",        "-display",
          "none",        "-nographic",
          "-machine",    "xenpv",
          "-m",          "257"};
}

TEST(ParseDmArgsTest, TakesDomidAndBothMonitorSockets) {
  Result<DmArgs> a = ParseDmArgs(LibxlPvArgs("/run/xen"));
  ASSERT_TRUE(a.ok()) << a.status().ToString();
  EXPECT_EQ(a->domid, 7);
  ASSERT_EQ(a->monitors.size(), 2u);
  EXPECT_EQ(a->monitors[0].path, "/run/xen/qmp-libxl-7");
  EXPECT_EQ(a->monitors[1].path, "/run/xen/qmp-libxenstat-7");
}

TEST(ParseDmArgsTest, TakesAPreopenedMonitorFd) {
  std::vector<std::string> args = {"-xen-domid", "3", "-chardev", "socket,id=libxl-cmd,fd=9,server=on,wait=off"};
  Result<DmArgs> a = ParseDmArgs(args);
  ASSERT_TRUE(a.ok());
  ASSERT_EQ(a->monitors.size(), 1u);
  EXPECT_EQ(a->monitors[0].fd, 9);
}

TEST(ParseDmArgsTest, RefusesMissingOrBadDomid) {
  std::vector<std::string> none = {"-chardev", "socket,id=x,path=/tmp/x"};
  EXPECT_EQ(ParseDmArgs(none).status().code(), ErrorCode::kInvalidArgument);
  std::vector<std::string> dom0 = {"-xen-domid", "0"};
  EXPECT_EQ(ParseDmArgs(dom0).status().code(), ErrorCode::kInvalidArgument);
  std::vector<std::string> junk = {"-xen-domid", "7x"};
  EXPECT_EQ(ParseDmArgs(junk).status().code(), ErrorCode::kInvalidArgument);
  std::vector<std::string> dangling = {"-xen-domid"};
  EXPECT_EQ(ParseDmArgs(dangling).status().code(), ErrorCode::kInvalidArgument);
  std::vector<std::string> nopath = {"-xen-domid", "4", "-chardev", "socket,id=x,server=on"};
  EXPECT_EQ(ParseDmArgs(nopath).status().code(), ErrorCode::kInvalidArgument);
}

TEST(QmpSessionTest, GreetingCarriesTheQemuVersionLibxlReads) {
  std::string g = QmpSession::Greeting();
  ASSERT_TRUE(g.ends_with("\r\n"));
  json j = json::parse(g);
  EXPECT_EQ(j["QMP"]["version"]["qemu"]["major"], 7);
  EXPECT_TRUE(j["QMP"]["capabilities"].is_array());
}

TEST(QmpSessionTest, AnswersLibxlsPostconfigQuestionsWithTheirIds) {
  QmpSession s;
  json caps = json::parse(s.Handle(R"({"execute":"qmp_capabilities","id":1})").text);
  EXPECT_EQ(caps["id"], 1);
  EXPECT_TRUE(caps["return"].is_object());
  json chardev = json::parse(s.Handle(R"({"execute":"query-chardev","id":2})").text);
  EXPECT_EQ(chardev["id"], 2);
  EXPECT_TRUE(chardev["return"].is_array());
  json vnc = json::parse(s.Handle(R"({"execute":"query-vnc","id":3})").text);
  EXPECT_EQ(vnc["return"]["enabled"], false);
  QmpSession::Reply quit = s.Handle(R"({"execute":"quit","id":4})");
  EXPECT_TRUE(quit.quit);
}

TEST(QmpSessionTest, UnknownCommandIsCommandNotFound) {
  QmpSession s;
  QmpSession::Reply r = s.Handle(R"({"execute":"xen-save-devices-state","id":9})");
  json j = json::parse(r.text);
  EXPECT_EQ(j["error"]["class"], "CommandNotFound");
  EXPECT_EQ(j["id"], 9);
  EXPECT_FALSE(r.quit);
}

TEST(QmpSessionTest, MalformedInputIsAnErrorNotACrash) {
  QmpSession s;
  for (const char* bad : {"", "{", "[1,2]", R"({"execute":5})", "\xff\xfe", R"({"id":1})"}) {
    json j = json::parse(s.Handle(bad).text);
    EXPECT_EQ(j["error"]["class"], "GenericError") << bad;
  }
}

class QmpServerTest : public ::testing::Test {
 protected:
  void SetUp() override {
    char tmpl[] = "/tmp/cowtap-xenpv-dm-XXXXXX";
    ASSERT_NE(mkdtemp(tmpl), nullptr);
    dir_ = tmpl;
    stop_fd_ = eventfd(0, EFD_CLOEXEC);
  }
  void TearDown() override {
    close(stop_fd_);
    std::filesystem::remove_all(dir_);
  }
  int Connect(const std::string& path) {
    int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    sockaddr_un addr{};
    addr.sun_family = AF_UNIX;
    std::strncpy(addr.sun_path, path.c_str(), sizeof(addr.sun_path) - 1);
    for (int i = 0; i < 200; ++i) {
      if (connect(fd, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) == 0) return fd;
      usleep(10000);
    }
    close(fd);
    return -1;
  }
  static std::string ReadLine(int fd) {
    std::string s;
    char c;
    while (recv(fd, &c, 1, 0) == 1) {
      s += c;
      if (c == '\n') break;
    }
    return s;
  }
  std::string dir_;
  int stop_fd_ = -1;
};

TEST_F(QmpServerTest, ServesLibxlsExchangeOnBothSocketsAndStopsOnSignal) {
  Result<DmArgs> args = ParseDmArgs(LibxlPvArgs(dir_));
  ASSERT_TRUE(args.ok());
  Result<QmpServer> server = QmpServer::Listen(args->monitors);
  ASSERT_TRUE(server.ok()) << server.status().ToString();
  auto done = std::async(std::launch::async, [&] { return server->Run(stop_fd_); });
  for (const char* name : {"/qmp-libxl-7", "/qmp-libxenstat-7"}) {
    int fd = Connect(dir_ + name);
    ASSERT_GE(fd, 0) << name;
    EXPECT_TRUE(json::parse(ReadLine(fd)).contains("QMP"));
    std::string two = "{\"execute\":\"qmp_capabilities\",\"id\":1}\r\n{\"execute\":\"query-vnc\",\"id\":2}\r\n";
    ASSERT_EQ(send(fd, two.data(), two.size(), 0), static_cast<ssize_t>(two.size()));
    EXPECT_EQ(json::parse(ReadLine(fd))["id"], 1);
    EXPECT_EQ(json::parse(ReadLine(fd))["return"]["enabled"], false);
    close(fd);
  }
  uint64_t one = 1;
  ASSERT_EQ(write(stop_fd_, &one, sizeof(one)), 8);
  ASSERT_EQ(done.wait_for(std::chrono::seconds(10)), std::future_status::ready);
  EXPECT_TRUE(done.get().ok());
}

TEST_F(QmpServerTest, QuitStopsTheServerAndSocketsAreRemoved) {
  Result<DmArgs> args = ParseDmArgs(LibxlPvArgs(dir_));
  ASSERT_TRUE(args.ok());
  {
    Result<QmpServer> server = QmpServer::Listen(args->monitors);
    ASSERT_TRUE(server.ok());
    auto done = std::async(std::launch::async, [&] { return server->Run(stop_fd_); });
    int fd = Connect(dir_ + "/qmp-libxl-7");
    ASSERT_GE(fd, 0);
    ReadLine(fd);
    std::string quit = "{\"execute\":\"quit\"}\n";
    ASSERT_EQ(send(fd, quit.data(), quit.size(), 0), static_cast<ssize_t>(quit.size()));
    ASSERT_EQ(done.wait_for(std::chrono::seconds(10)), std::future_status::ready);
    EXPECT_TRUE(done.get().ok());
    close(fd);
  }
  EXPECT_FALSE(std::filesystem::exists(dir_ + "/qmp-libxl-7"));
}

TEST_F(QmpServerTest, OversizedLineDropsOnlyThatClient) {
  Result<DmArgs> args = ParseDmArgs(LibxlPvArgs(dir_));
  ASSERT_TRUE(args.ok());
  Result<QmpServer> server = QmpServer::Listen(args->monitors);
  ASSERT_TRUE(server.ok());
  auto done = std::async(std::launch::async, [&] { return server->Run(stop_fd_); });
  int bad = Connect(dir_ + "/qmp-libxl-7");
  ASSERT_GE(bad, 0);
  ReadLine(bad);
  std::string junk(QmpServer::kMaxLineBytes + 4096, 'x');
  send(bad, junk.data(), junk.size(), MSG_NOSIGNAL);
  char c;
  EXPECT_LE(recv(bad, &c, 1, 0), 0);  // closed by the server
  close(bad);
  int good = Connect(dir_ + "/qmp-libxl-7");
  ASSERT_GE(good, 0);
  ReadLine(good);
  std::string cmd = "{\"execute\":\"query-chardev\",\"id\":5}\n";
  send(good, cmd.data(), cmd.size(), 0);
  EXPECT_EQ(json::parse(ReadLine(good))["id"], 5);
  close(good);
  uint64_t one = 1;
  ASSERT_EQ(write(stop_fd_, &one, sizeof(one)), 8);
  EXPECT_TRUE(done.get().ok());
}

class BackendWaitTest : public ::testing::Test {
 protected:
  void SetUp() override {
    db_ = std::make_shared<xen::XsDb>();
    Result<std::unique_ptr<xen::XenStore>> s = xen::XsDb::Connect(db_, 0);
    ASSERT_TRUE(s.ok());
    store_ = std::move(*s);
  }
  std::shared_ptr<xen::XsDb> db_;
  std::unique_ptr<xen::XenStore> store_;
};

TEST_F(BackendWaitTest, NoQdiskDiskIsNotFound) {
  Status s = WaitForQdiskBackends(*store_, 0, 5, std::chrono::milliseconds(50));
  EXPECT_EQ(s.code(), ErrorCode::kNotFound);
}

TEST_F(BackendWaitTest, UnservedDiskTimesOutNamingIt) {
  ASSERT_TRUE(store_->Write("/local/domain/0/backend/qdisk/5/51712/state", "1").ok());
  Status s = WaitForQdiskBackends(*store_, 0, 5, std::chrono::milliseconds(200));
  EXPECT_EQ(s.code(), ErrorCode::kBusy);
  EXPECT_NE(s.message().find("backend/qdisk/5/51712"), std::string::npos);
  EXPECT_NE(s.message().find("cowtapd"), std::string::npos);
}

TEST_F(BackendWaitTest, ReturnsOnceEveryDiskReachedInitWait) {
  ASSERT_TRUE(store_->Write("/local/domain/0/backend/qdisk/5/51712/state", "1").ok());
  ASSERT_TRUE(store_->Write("/local/domain/0/backend/qdisk/5/51728/state", "2").ok());
  auto later = std::async(std::launch::async, [&] {
    std::this_thread::sleep_for(std::chrono::milliseconds(200));
    Result<std::unique_ptr<xen::XenStore>> other = xen::XsDb::Connect(db_, 0);
    return (*other)->Write("/local/domain/0/backend/qdisk/5/51712/state", "2");
  });
  Status s = WaitForQdiskBackends(*store_, 0, 5, std::chrono::seconds(10));
  EXPECT_TRUE(s.ok()) << s.ToString();
  EXPECT_TRUE(later.get().ok());
}

TEST_F(BackendWaitTest, MarkRunningWritesTheKeyLibxlWaitsFor) {
  ASSERT_TRUE(MarkRunning(*store_, 0, 5).ok());
  Result<std::string> v = store_->Read("/local/domain/0/device-model/5/state");
  ASSERT_TRUE(v.ok());
  EXPECT_EQ(*v, "running");
}

}  // namespace
}  // namespace cowtap::xl
