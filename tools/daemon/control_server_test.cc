#include "tools/daemon/control_server.h"

#include <fcntl.h>
#include <gtest/gtest.h>
#include <poll.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <cstdlib>
#include <cstring>
#include <map>
#include <mutex>
#include <optional>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#include "tools/daemon/control_protocol.h"

namespace cowtap::daemon {
namespace {

using namespace std::chrono_literals;

// A DaemonControl over a map of VBDs; records what it was asked.
class FakeDaemon : public DaemonControl {
 public:
  FakeDaemon() {
    for (const char* id : {"1/51712", "2/51712"}) {
      VbdStatsSnapshot s;
      s.id = id;
      s.image = std::string("/img/") + id[0] + ".qcow2";
      s.format = "qcow2";
      s.state = "Connected";
      vbds_[id] = s;
    }
  }

  std::vector<VbdStatsSnapshot> List() override {
    std::lock_guard lock(mu_);
    ++list_calls_;
    std::vector<VbdStatsSnapshot> out;
    for (auto& [id, s] : vbds_) out.push_back(s);
    for (size_t i = 0; i < padding_entries_; ++i) out.push_back(vbds_.begin()->second);
    return out;
  }
  Status Attach(const AttachSpec& spec) override {
    std::lock_guard lock(mu_);
    const std::string id = std::to_string(spec.domid) + "/" + std::to_string(spec.devid);
    if (vbds_.count(id)) return Status::Busy("VBD " + id + " is attached already; detach it first");
    VbdStatsSnapshot s;
    s.id = id;
    s.image = spec.image;
    s.format = spec.format;
    vbds_[id] = s;
    last_attach_ = spec;
    return Status::Ok();
  }
  Status Detach(const std::string& id) override {
    std::lock_guard lock(mu_);
    if (!vbds_.erase(id)) return NotFound(id);
    return Status::Ok();
  }
  Status Pause(const std::string& id) override {
    std::lock_guard lock(mu_);
    if (!vbds_.count(id)) return NotFound(id);
    vbds_[id].paused = true;
    return Status::Ok();
  }
  Status Resume(const std::string& id) override {
    std::lock_guard lock(mu_);
    if (!vbds_.count(id)) return NotFound(id);
    vbds_[id].paused = false;
    return Status::Ok();
  }
  Result<VbdStatsSnapshot> Stats(const std::string& id) override {
    std::lock_guard lock(mu_);
    if (id == "9/9") throw std::runtime_error("fake bug");
    auto it = vbds_.find(id);
    if (it == vbds_.end()) return NotFound(id);
    return it->second;
  }
  Status SetLogLevel(const std::string& level) override {
    std::lock_guard lock(mu_);
    if (level != "debug" && level != "info") return Status::InvalidArgument("unknown level " + level);
    level_ = level;
    return Status::Ok();
  }
  Result<std::string> Export(const std::string& what, const std::string& address, bool read_only) override {
    if (address == "tcp:127.0.0.1:0") return std::string("tcp:127.0.0.1:40000");
    return address;
  }
  Status Unexport(const std::string& address) override { return Status::NotFound("no export at " + address); }
  Result<OffloadSnapshot> OffloadOn(const std::string& image) override {
    OffloadSnapshot o;
    o.image = image;
    o.device = "/dev/mapper/cowtap-x";
    return o;
  }
  Status OffloadOff(const std::string& image) override { return Status::NotFound("no offload of " + image); }
  Result<std::vector<OffloadSnapshot>> OffloadStatus(const std::string& image) override {
    return std::vector<OffloadSnapshot>{};
  }

  bool paused(const std::string& id) {
    std::lock_guard lock(mu_);
    return vbds_[id].paused;
  }
  std::string level() {
    std::lock_guard lock(mu_);
    return level_;
  }
  AttachSpec last_attach() {
    std::lock_guard lock(mu_);
    return last_attach_;
  }
  int list_calls() {
    std::lock_guard lock(mu_);
    return list_calls_;
  }
  void set_padding_entries(size_t n) {
    std::lock_guard lock(mu_);
    padding_entries_ = n;
  }

 private:
  static Status NotFound(const std::string& id) { return Status::NotFound("no VBD " + id); }

  std::mutex mu_;
  std::map<std::string, VbdStatsSnapshot> vbds_;
  AttachSpec last_attach_;
  std::string level_ = "info";
  int list_calls_ = 0;
  size_t padding_entries_ = 0;
};

std::string TempDir() {
  char tmpl[] = "/tmp/cowtap-ctl-XXXXXX";
  const char* dir = ::mkdtemp(tmpl);
  EXPECT_NE(dir, nullptr);
  return dir ? dir : "/tmp";
}

// A blocking test client with timeouts.
class Conn {
 public:
  explicit Conn(const std::string& path) {
    fd_ = ::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    sockaddr_un addr{};
    addr.sun_family = AF_UNIX;
    path.copy(addr.sun_path, sizeof(addr.sun_path) - 1);
    connected_ = ::connect(fd_, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) == 0;
  }
  ~Conn() { Close(); }
  Conn(const Conn&) = delete;
  Conn& operator=(const Conn&) = delete;

  bool connected() const { return connected_; }
  int fd() const { return fd_; }
  void Close() {
    if (fd_ >= 0) ::close(fd_);
    fd_ = -1;
  }

  bool Send(std::string_view data) {
    while (!data.empty()) {
      ssize_t n = ::send(fd_, data.data(), data.size(), MSG_NOSIGNAL);
      if (n <= 0) return false;
      data.remove_prefix(static_cast<size_t>(n));
    }
    return true;
  }

  // The next line (without '\n'), or nullopt on EOF, error or timeout.
  std::optional<std::string> ReadLine(std::chrono::milliseconds timeout = 5s) {
    const auto deadline = std::chrono::steady_clock::now() + timeout;
    while (true) {
      const size_t nl = buf_.find('\n');
      if (nl != std::string::npos) {
        std::string line = buf_.substr(0, nl);
        buf_.erase(0, nl + 1);
        return line;
      }
      const auto left =
          std::chrono::duration_cast<std::chrono::milliseconds>(deadline - std::chrono::steady_clock::now());
      if (left.count() <= 0) return std::nullopt;
      pollfd p{fd_, POLLIN, 0};
      if (::poll(&p, 1, static_cast<int>(left.count())) <= 0) continue;
      char tmp[65536];
      ssize_t n = ::recv(fd_, tmp, sizeof(tmp), 0);
      if (n <= 0) return std::nullopt;
      buf_.append(tmp, static_cast<size_t>(n));
    }
  }

  // True when the server closed the connection (EOF or reset) within timeout.
  bool SeesClose(std::chrono::milliseconds timeout = 5s) {
    const auto deadline = std::chrono::steady_clock::now() + timeout;
    while (std::chrono::steady_clock::now() < deadline) {
      pollfd p{fd_, POLLIN, 0};
      if (::poll(&p, 1, 100) <= 0) continue;
      char tmp[65536];
      ssize_t n = ::recv(fd_, tmp, sizeof(tmp), 0);
      if (n <= 0) return true;
    }
    return false;
  }

  ControlReply Call(std::string_view request_line) {
    EXPECT_TRUE(Send(request_line));
    std::optional<std::string> line = ReadLine();
    EXPECT_TRUE(line.has_value()) << "no reply to " << request_line;
    if (!line) return ErrorReply("test", "no reply");
    auto reply = DecodeReply(*line);
    EXPECT_TRUE(reply.ok()) << *line;
    return reply.ok() ? *reply : ErrorReply("test", "undecodable");
  }

 private:
  int fd_ = -1;
  bool connected_ = false;
  std::string buf_;
};

template <typename Pred>
bool WaitFor(Pred pred, std::chrono::milliseconds timeout = 5s) {
  const auto deadline = std::chrono::steady_clock::now() + timeout;
  while (std::chrono::steady_clock::now() < deadline) {
    if (pred()) return true;
    std::this_thread::sleep_for(5ms);
  }
  return pred();
}

class ControlServerTest : public ::testing::Test {
 protected:
  void SetUp() override {
    dir_ = TempDir();
    path_ = dir_ + "/cowtapd.sock";
  }
  void TearDown() override {
    server_.reset();
    std::string cmd = "rm -rf " + dir_;
    EXPECT_EQ(std::system(cmd.c_str()), 0);
  }
  void StartServer(ControlServerOptions options = {}) {
    auto s = ControlServer::Start(daemon_, path_, options);
    ASSERT_TRUE(s.ok()) << s.status().ToString();
    server_ = std::move(s).value();
  }

  FakeDaemon daemon_;
  std::string dir_;
  std::string path_;
  std::unique_ptr<ControlServer> server_;
};

TEST_F(ControlServerTest, SocketIsOwnerOnlyAndRemovedOnStop) {
  StartServer();
  struct stat st {};
  ASSERT_EQ(::lstat(path_.c_str(), &st), 0);
  EXPECT_TRUE(S_ISSOCK(st.st_mode));
  EXPECT_EQ(st.st_mode & 07777, 0600u);
  EXPECT_EQ(st.st_uid, ::geteuid());
  server_->Stop();
  EXPECT_NE(::lstat(path_.c_str(), &st), 0) << "socket file left behind";
}

TEST_F(ControlServerTest, SocketIs0600EvenUnderAPermissiveUmask) {
  const mode_t old = ::umask(0);
  StartServer();
  ::umask(old);
  struct stat st {};
  ASSERT_EQ(::lstat(path_.c_str(), &st), 0);
  EXPECT_EQ(st.st_mode & 07777, 0600u);
}

TEST_F(ControlServerTest, MissingParentDirectoryIsCreated) {
  path_ = dir_ + "/run/cowtapd.sock";
  StartServer();
  Conn c(path_);
  ASSERT_TRUE(c.connected());
  EXPECT_TRUE(c.Call("{\"cmd\":\"list\"}\n").ok);
}

TEST_F(ControlServerTest, EveryCommandReachesTheDaemon) {
  StartServer();
  Conn c(path_);
  ASSERT_TRUE(c.connected());

  ControlReply list = c.Call("{\"cmd\":\"list\"}\n");
  ASSERT_TRUE(list.ok) << list.error;
  ASSERT_EQ(list.vbds.size(), 2u);
  EXPECT_EQ(list.vbds[0].id, "1/51712");

  ControlRequest attach;
  attach.cmd = ControlCommand::kAttach;
  attach.attach = {7, 768, "/img/7.raw", "raw", false};
  EXPECT_TRUE(c.Call(EncodeRequest(attach)).ok);
  EXPECT_EQ(daemon_.last_attach().image, "/img/7.raw");
  EXPECT_FALSE(daemon_.last_attach().writable);
  ControlReply again = c.Call(EncodeRequest(attach));
  EXPECT_EQ(again.code, "busy");
  EXPECT_NE(again.error.find("detach it first"), std::string::npos) << "the daemon's message is passed on";

  EXPECT_TRUE(c.Call("{\"cmd\":\"pause\",\"id\":\"7/768\"}\n").ok);
  EXPECT_TRUE(daemon_.paused("7/768"));
  ControlReply stats = c.Call("{\"cmd\":\"stats\",\"id\":\"7/768\"}\n");
  ASSERT_TRUE(stats.ok);
  ASSERT_EQ(stats.vbds.size(), 1u);
  EXPECT_TRUE(stats.vbds[0].paused);
  EXPECT_TRUE(c.Call("{\"cmd\":\"resume\",\"id\":\"7/768\"}\n").ok);
  EXPECT_FALSE(daemon_.paused("7/768"));
  EXPECT_EQ(c.Call("{\"cmd\":\"stats\"}\n").vbds.size(), 3u) << "stats without id: every VBD";
  EXPECT_TRUE(c.Call("{\"cmd\":\"detach\",\"id\":\"7/768\"}\n").ok);
  EXPECT_EQ(c.Call("{\"cmd\":\"list\"}\n").vbds.size(), 2u);

  EXPECT_TRUE(c.Call("{\"cmd\":\"set-log-level\",\"level\":\"debug\"}\n").ok);
  EXPECT_EQ(daemon_.level(), "debug");
  EXPECT_EQ(c.Call("{\"cmd\":\"set-log-level\",\"level\":\"loud\"}\n").code, "invalid_argument");

  ControlReply exp = c.Call("{\"cmd\":\"export\",\"what\":\"1/51712\",\"address\":\"tcp:127.0.0.1:0\"}\n");
  ASSERT_TRUE(exp.ok);
  EXPECT_EQ(exp.address, "tcp:127.0.0.1:40000");
  EXPECT_EQ(c.Call("{\"cmd\":\"unexport\",\"address\":\"unix:/nope\"}\n").code, "not_found");
  EXPECT_EQ(server_->requests_served(), 13u);
}

TEST_F(ControlServerTest, UnknownVbdIsNotFoundAndTheConnectionStaysUsable) {
  StartServer();
  Conn c(path_);
  for (const char* cmd : {"detach", "pause", "resume", "stats"}) {
    ControlReply r = c.Call(std::string("{\"cmd\":\"") + cmd + "\",\"id\":\"42/51712\"}\n");
    EXPECT_FALSE(r.ok);
    EXPECT_EQ(r.code, "not_found") << cmd;
    EXPECT_NE(r.error.find("42/51712"), std::string::npos);
  }
  EXPECT_TRUE(c.Call("{\"cmd\":\"list\"}\n").ok);
}

TEST_F(ControlServerTest, MalformedRequestsGetErrorsAndTheConnectionStaysUsable) {
  StartServer();
  Conn c(path_);
  EXPECT_EQ(c.Call("{\"cmd\":\n").code, "parse_error");
  EXPECT_EQ(c.Call("[]\n").code, "bad_request");
  EXPECT_EQ(c.Call("{\"cmd\":\"detach\",\"id\":5}\n").code, "bad_request");
  EXPECT_EQ(c.Call("{\"cmd\":\"format-disk\"}\n").code, "unknown_command");
  EXPECT_EQ(c.Call(std::string("{\"cmd\":\"li\xc3\x28\"}\n")).code, "parse_error");
  EXPECT_TRUE(c.Call("{\"cmd\":\"list\"}\n").ok);
  EXPECT_EQ(server_->client_count(), 1u);
}

TEST_F(ControlServerTest, ADaemonExceptionIsAnInternalErrorNotACrash) {
  StartServer();
  Conn c(path_);
  ControlReply r = c.Call("{\"cmd\":\"stats\",\"id\":\"9/9\"}\n");
  EXPECT_EQ(r.code, "internal");
  EXPECT_NE(r.error.find("fake bug"), std::string::npos);
  EXPECT_TRUE(c.Call("{\"cmd\":\"list\"}\n").ok);
}

TEST_F(ControlServerTest, PipelinedAndSplitRequestsAreAnsweredInOrder) {
  StartServer();
  Conn c(path_);
  ASSERT_TRUE(c.Send("{\"cmd\":\"pause\",\"id\":\"1/51712\"}\n\n{\"cmd\":\"nope\"}\r\n{\"cmd\":\"li"));
  std::this_thread::sleep_for(20ms);
  ASSERT_TRUE(c.Send("st\"}\n"));
  auto r1 = DecodeReply(c.ReadLine().value_or(""));
  auto r2 = DecodeReply(c.ReadLine().value_or(""));
  auto r3 = DecodeReply(c.ReadLine().value_or(""));
  ASSERT_TRUE(r1.ok() && r2.ok() && r3.ok());
  EXPECT_TRUE(r1->ok);
  EXPECT_EQ(r2->code, "unknown_command");
  EXPECT_TRUE(r3->ok);
  EXPECT_EQ(r3->vbds.size(), 2u);
}

TEST_F(ControlServerTest, OversizeRequestGetsTooLargeAndTheConnectionCloses) {
  StartServer();
  Conn c(path_);
  // A request that is one byte too long, newline included.
  std::string line = "{\"cmd\":\"list\",\"pad\":\"";
  line += std::string(kMaxControlRequestBytes - line.size() - 3 + 1, 'x');
  line += "\"}\n";
  ASSERT_EQ(line.size(), kMaxControlRequestBytes + 1);
  c.Send(line);
  std::optional<std::string> reply = c.ReadLine();
  ASSERT_TRUE(reply.has_value());
  auto r = DecodeReply(*reply);
  ASSERT_TRUE(r.ok());
  EXPECT_EQ(r->code, "too_large");
  EXPECT_TRUE(c.SeesClose());
  EXPECT_TRUE(WaitFor([&] { return server_->client_count() == 0; }));
  EXPECT_EQ(daemon_.list_calls(), 0);
}

TEST_F(ControlServerTest, RequestOfExactlyTheLimitIsServed) {
  StartServer();
  Conn c(path_);
  std::string line = "{\"cmd\":\"list\",\"version\":1";
  line += std::string(kMaxControlRequestBytes - line.size() - 2, ' ');
  line += "}\n";
  ASSERT_EQ(line.size(), kMaxControlRequestBytes);
  EXPECT_TRUE(c.Call(line).ok);
}

TEST_F(ControlServerTest, EndlessLineWithoutNewlineIsCutOff) {
  StartServer();
  Conn c(path_);
  std::thread writer([&] {
    std::string chunk(4096, 'a');
    for (int i = 0; i < 64; ++i)
      if (!c.Send(chunk)) break;  // the server closes the connection part way
  });
  std::optional<std::string> reply = c.ReadLine();
  writer.join();
  ASSERT_TRUE(reply.has_value());
  EXPECT_NE(reply->find("too_large"), std::string::npos) << *reply;
}

TEST_F(ControlServerTest, ManyClientsAtOnceAreAllServed) {
  StartServer();
  constexpr int kClients = 32;
  constexpr int kRequests = 50;
  std::atomic<int> good{0};
  std::vector<std::thread> threads;
  for (int i = 0; i < kClients; ++i) {
    threads.emplace_back([&, i] {
      Conn c(path_);
      if (!c.connected()) return;
      for (int k = 0; k < kRequests; ++k) {
        const bool bad = (k + i) % 5 == 0;
        ControlReply r = c.Call(bad ? "{\"cmd\":1}\n" : "{\"cmd\":\"stats\",\"id\":\"2/51712\"}\n");
        if (bad ? r.code == "bad_request" : (r.ok && r.vbds.size() == 1 && r.vbds[0].id == "2/51712")) ++good;
      }
    });
  }
  for (auto& t : threads) t.join();
  EXPECT_EQ(good.load(), kClients * kRequests);
  EXPECT_TRUE(WaitFor([&] { return server_->client_count() == 0; }));
}

TEST_F(ControlServerTest, ClientsBeyondTheLimitAreRefusedAndSlotsAreReused) {
  ControlServerOptions o;
  o.max_clients = 4;
  StartServer(o);
  std::vector<std::unique_ptr<Conn>> conns;
  for (int i = 0; i < 4; ++i) {
    conns.push_back(std::make_unique<Conn>(path_));
    ASSERT_TRUE(conns.back()->Call("{\"cmd\":\"list\"}\n").ok);
  }
  Conn extra(path_);
  std::optional<std::string> line = extra.ReadLine();
  ASSERT_TRUE(line.has_value());
  EXPECT_EQ(DecodeReply(*line)->code, "too_many_clients");
  EXPECT_TRUE(extra.SeesClose());

  conns[0]->Close();
  ASSERT_TRUE(WaitFor([&] { return server_->client_count() == 3; }));
  Conn next(path_);
  EXPECT_TRUE(next.Call("{\"cmd\":\"list\"}\n").ok);
}

TEST_F(ControlServerTest, AClientThatNeverReadsIsDroppedAndOthersKeepGoing) {
  ControlServerOptions o;
  o.max_output_bytes = 256 * 1024;
  StartServer(o);
  daemon_.set_padding_entries(200);  // each list reply is tens of KiB
  Conn hog(path_);
  ASSERT_TRUE(hog.connected());
  Conn polite(path_);
  std::atomic<bool> done{false};
  std::thread writer([&] {
    for (int i = 0; i < 100000 && !done; ++i)
      if (!hog.Send("{\"cmd\":\"list\"}\n")) break;
  });
  EXPECT_TRUE(WaitFor([&] { return server_->clients_dropped() >= 1; }, 10s));
  done = true;
  writer.join();
  ControlReply r = polite.Call("{\"cmd\":\"stats\",\"id\":\"1/51712\"}\n");
  EXPECT_TRUE(r.ok);
  EXPECT_EQ(server_->client_count(), 1u);
}

TEST_F(ControlServerTest, StopWithClientsConnectedClosesThemPromptly) {
  StartServer();
  std::vector<std::unique_ptr<Conn>> conns;
  for (int i = 0; i < 8; ++i) {
    conns.push_back(std::make_unique<Conn>(path_));
    ASSERT_TRUE(conns.back()->connected());
  }
  ASSERT_TRUE(conns[0]->Call("{\"cmd\":\"list\"}\n").ok);
  ASSERT_TRUE(conns[1]->Send("{\"cmd\":\"li"));  // half a request
  ASSERT_TRUE(WaitFor([&] { return server_->client_count() == 8; }));
  const auto start = std::chrono::steady_clock::now();
  server_->Stop();
  EXPECT_LT(std::chrono::steady_clock::now() - start, 2s);
  EXPECT_EQ(server_->client_count(), 0u);
  for (auto& c : conns) EXPECT_TRUE(c->SeesClose(1s));
  Conn late(path_);
  EXPECT_FALSE(late.connected());
  server_->Stop();  // idempotent
}

TEST_F(ControlServerTest, ALiveSocketIsBusy) {
  StartServer();
  FakeDaemon other;
  auto second = ControlServer::Start(other, path_);
  ASSERT_FALSE(second.ok());
  EXPECT_EQ(second.status().code(), ErrorCode::kBusy);
  Conn c(path_);
  EXPECT_TRUE(c.Call("{\"cmd\":\"list\"}\n").ok) << "the first server still serves";
}

TEST_F(ControlServerTest, AStaleSocketIsReplaced) {
  int fd = ::socket(AF_UNIX, SOCK_STREAM, 0);
  sockaddr_un addr{};
  addr.sun_family = AF_UNIX;
  path_.copy(addr.sun_path, sizeof(addr.sun_path) - 1);
  ASSERT_EQ(::bind(fd, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)), 0);
  ::close(fd);  // the file stays, nobody listens
  StartServer();
  Conn c(path_);
  EXPECT_TRUE(c.Call("{\"cmd\":\"list\"}\n").ok);
}

TEST_F(ControlServerTest, APathThatIsNotASocketIsLeftAlone) {
  int fd = ::open(path_.c_str(), O_CREAT | O_WRONLY, 0644);
  ASSERT_GE(fd, 0);
  ::close(fd);
  auto s = ControlServer::Start(daemon_, path_);
  ASSERT_FALSE(s.ok());
  EXPECT_EQ(s.status().code(), ErrorCode::kInvalidArgument);
  struct stat st {};
  ASSERT_EQ(::lstat(path_.c_str(), &st), 0);
  EXPECT_TRUE(S_ISREG(st.st_mode));
}

TEST_F(ControlServerTest, ATooLongPathIsRefused) {
  auto s = ControlServer::Start(daemon_, dir_ + "/" + std::string(120, 's'));
  ASSERT_FALSE(s.ok());
  EXPECT_EQ(s.status().code(), ErrorCode::kInvalidArgument);
}

TEST_F(ControlServerTest, AnotherUserIsRefusedEvenIfTheFileModeLetsItIn) {
  if (::geteuid() != 0) GTEST_SKIP() << "needs root to connect as another uid";
  StartServer();
  ASSERT_EQ(::chmod(dir_.c_str(), 0755), 0);
  ASSERT_EQ(::chmod(path_.c_str(), 0666), 0);  // only SO_PEERCRED stands in the way now
  int pipefd[2];
  ASSERT_EQ(::pipe(pipefd), 0);
  const pid_t pid = ::fork();
  ASSERT_GE(pid, 0);
  if (pid == 0) {
    ::close(pipefd[0]);
    auto fail = [&](const char* why, int code) {
      const std::string m = std::string(why) + ": " + std::strerror(errno);
      ssize_t n = ::write(pipefd[1], m.data(), m.size());
      ::_exit(n >= 0 ? code : 4);
    };
    if (::setgid(65534) != 0 || ::setuid(65534) != 0) fail("setuid", 2);
    Conn c(path_);
    if (!c.connected()) fail("connect", 3);
    c.Send("{\"cmd\":\"list\"}\n");
    std::string line = c.ReadLine().value_or("<none>");
    ssize_t n = ::write(pipefd[1], line.data(), line.size());
    ::_exit(n >= 0 ? 0 : 4);
  }
  ::close(pipefd[1]);
  std::string got;
  char buf[4096];
  ssize_t n;
  while ((n = ::read(pipefd[0], buf, sizeof(buf))) > 0) got.append(buf, static_cast<size_t>(n));
  ::close(pipefd[0]);
  int status = 0;
  ASSERT_EQ(::waitpid(pid, &status, 0), pid);
  ASSERT_TRUE(WIFEXITED(status));
  ASSERT_EQ(WEXITSTATUS(status), 0) << got;
  auto r = DecodeReply(got);
  ASSERT_TRUE(r.ok()) << got;
  EXPECT_EQ(r->code, "permission_denied");
  EXPECT_EQ(daemon_.list_calls(), 0);
  EXPECT_GE(server_->clients_dropped(), 1u);
}

}  // namespace
}  // namespace cowtap::daemon
