#include "tools/daemon/control_server.h"

#include <fcntl.h>
#include <fmt/format.h>
#include <poll.h>
#include <spdlog/spdlog.h>
#include <sys/eventfd.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#include <cerrno>
#include <chrono>
#include <cstring>
#include <exception>
#include <optional>
#include <utility>
#include <vector>

#include "base/log.h"
#include "tools/daemon/control_protocol.h"

namespace cowtap::daemon {
namespace {

// How long accepting pauses when the process is out of descriptors (the
// listening socket stays readable, so polling it again at once would spin).
constexpr int kAcceptBackoffMs = 100;
constexpr size_t kReadChunkBytes = 64 * 1024;

struct Client {
  int fd = -1;
  pid_t pid = 0;
  uid_t uid = 0;
  std::string in;            // bytes of requests not yet complete
  std::string out;           // reply bytes not yet written
  bool read_closed = false;  // the peer shut down its side
  bool closing = false;      // close once out is written; read no more
  bool dead = false;         // close now
};

void CloseFd(int& fd) {
  if (fd >= 0) ::close(fd);
  fd = -1;
}

// Best effort: one short reply to a connection about to be closed.
void SendAndForget(int fd, const ControlReply& reply) {
  const std::string line = EncodeReply(reply);
  ssize_t n = ::send(fd, line.data(), line.size(), MSG_NOSIGNAL | MSG_DONTWAIT);
  (void)n;
}

std::string ParentDir(const std::string& path) {
  const size_t slash = path.rfind('/');
  if (slash == std::string::npos) return ".";
  if (slash == 0) return "/";
  return path.substr(0, slash);
}

}  // namespace

// The server thread's state: the connections and what to do with each.
class ControlServer::Loop {
 public:
  explicit Loop(ControlServer& server) : s_(server) {}
  ~Loop() {
    for (auto& c : clients_) Close(*c);
  }

  void Run() {
    std::vector<pollfd> fds;
    while (true) {
      fds.clear();
      const bool accepting = std::chrono::steady_clock::now() >= accept_resume_;
      fds.push_back({s_.stop_fd_, POLLIN, 0});
      fds.push_back({accepting ? s_.listen_fd_ : -1, POLLIN, 0});
      for (auto& c : clients_) {
        short events = 0;
        if (!c->closing && !c->read_closed) events |= POLLIN;
        if (!c->out.empty()) events |= POLLOUT;
        fds.push_back({c->fd, events, 0});
      }
      const int rc = ::poll(fds.data(), fds.size(), accepting ? -1 : kAcceptBackoffMs);
      if (rc < 0) {
        if (errno == EINTR) continue;
        spdlog::error("control: poll failed ({}); retrying", std::strerror(errno));
        std::this_thread::sleep_for(std::chrono::milliseconds(kAcceptBackoffMs));
        continue;
      }
      if (fds[0].revents) return;
      // Clients first, in the order polled (fds[i + 2] is clients_[i]), so a
      // connection accepted below waits for the next round.
      for (size_t i = 0; i < clients_.size(); ++i) Handle(*clients_[i], fds[i + 2].revents);
      if (fds[1].revents & POLLIN) AcceptAll();
      Reap();
    }
  }

 private:
  void AcceptAll() {
    while (true) {
      int fd = ::accept4(s_.listen_fd_, nullptr, nullptr, SOCK_NONBLOCK | SOCK_CLOEXEC);
      if (fd < 0) {
        if (errno == EINTR || errno == ECONNABORTED) continue;
        if (errno == EAGAIN || errno == EWOULDBLOCK) return;
        if (limiter_.Allow()) {
          spdlog::warn("control: accepting a connection on {} failed ({}); retrying in {} ms", s_.path_,
                       std::strerror(errno), kAcceptBackoffMs);
        }
        accept_resume_ = std::chrono::steady_clock::now() + std::chrono::milliseconds(kAcceptBackoffMs);
        return;
      }
      ucred cred{};
      socklen_t len = sizeof(cred);
      if (::getsockopt(fd, SOL_SOCKET, SO_PEERCRED, &cred, &len) != 0) {
        spdlog::warn("control: cannot read the peer credentials of a connection ({}); refused", std::strerror(errno));
        Refuse(fd);
        continue;
      }
      if (cred.uid != 0 && cred.uid != ::geteuid()) {
        if (limiter_.Allow()) spdlog::warn("control: refused pid {} uid {}: not root", cred.pid, cred.uid);
        Refuse(fd, ErrorReply(wire::kPermissionDenied,
                              fmt::format("uid {} may not control cowtapd; run cowtap ctl as root", cred.uid)));
        continue;
      }
      if (clients_.size() >= s_.options_.max_clients) {
        if (limiter_.Allow()) {
          spdlog::warn("control: refused pid {}: already {} control connections", cred.pid, clients_.size());
        }
        Refuse(fd, ErrorReply(wire::kTooManyClients, fmt::format("cowtapd already serves {} control connections; "
                                                                 "close some (e.g. stats --watch) and retry",
                                                                 clients_.size())));
        continue;
      }
      auto c = std::make_unique<Client>();
      c->fd = fd;
      c->pid = cred.pid;
      c->uid = cred.uid;
      clients_.push_back(std::move(c));
      s_.clients_now_.fetch_add(1, std::memory_order_relaxed);
      spdlog::debug("control: connection from pid {} uid {}", cred.pid, cred.uid);
    }
  }

  // Counted before the peer can see the reply, so the counter never lags it.
  void Refuse(int fd, std::optional<ControlReply> why = std::nullopt) {
    s_.dropped_.fetch_add(1, std::memory_order_relaxed);
    if (why) SendAndForget(fd, *why);
    ::close(fd);
  }

  void Handle(Client& c, short revents) {
    if (revents & POLLIN) Read(c);
    if (!c.dead && (revents & (POLLOUT | POLLERR | POLLHUP))) Flush(c);
    if (!c.dead && (revents & (POLLERR | POLLNVAL))) c.dead = true;
    // HUP with nothing left to read: the peer is gone both ways.
    if (!c.dead && (revents & POLLHUP) && !(revents & POLLIN)) c.dead = true;
    if (!c.dead && c.out.empty() && (c.closing || c.read_closed)) c.dead = true;
  }

  void Read(Client& c) {
    char buf[kReadChunkBytes];
    const ssize_t n = ::recv(c.fd, buf, sizeof(buf), MSG_DONTWAIT);
    if (n < 0) {
      if (errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR) c.dead = true;
      return;
    }
    if (n == 0) {
      c.read_closed = true;  // a partial last line without '\n' is not a request
      return;
    }
    c.in.append(buf, static_cast<size_t>(n));
    size_t start = 0;
    while (!c.closing && !c.dead) {
      const size_t nl = c.in.find('\n', start);
      if (nl == std::string::npos) break;
      if (nl + 1 - start > kMaxControlRequestBytes) break;  // reported below
      const std::string_view line(c.in.data() + start, nl - start);
      start = nl + 1;
      if (line.empty() || line == "\r") continue;
      Queue(c, Serve(c, line));
    }
    c.in.erase(0, start);
    const size_t nl = c.in.find('\n');
    const size_t pending = nl == std::string::npos ? c.in.size() : nl + 1;
    if (!c.closing && !c.dead && pending > kMaxControlRequestBytes) {
      if (limiter_.Allow()) spdlog::warn("control: pid {} sent a request over {} bytes; closing", c.pid, pending);
      Queue(c, EncodeReply(ErrorReply(
                   wire::kTooLarge,
                   fmt::format("a request may be at most {} bytes including its newline", kMaxControlRequestBytes))));
      s_.requests_.fetch_add(1, std::memory_order_relaxed);
      s_.dropped_.fetch_add(1, std::memory_order_relaxed);
      c.closing = true;
      c.in.clear();
      c.in.shrink_to_fit();
    }
    if (!c.dead) Flush(c);
  }

  void Queue(Client& c, const std::string& reply) {
    if (c.dead) return;
    if (c.out.size() + reply.size() > s_.options_.max_output_bytes) {
      if (limiter_.Allow()) {
        spdlog::warn("control: pid {} does not read its replies ({} bytes waiting); dropping it", c.pid, c.out.size());
      }
      s_.dropped_.fetch_add(1, std::memory_order_relaxed);
      c.dead = true;
      return;
    }
    c.out += reply;
  }

  void Flush(Client& c) {
    while (!c.out.empty()) {
      const ssize_t n = ::send(c.fd, c.out.data(), c.out.size(), MSG_NOSIGNAL | MSG_DONTWAIT);
      if (n < 0) {
        if (errno == EINTR) continue;
        if (errno != EAGAIN && errno != EWOULDBLOCK) c.dead = true;
        return;
      }
      c.out.erase(0, static_cast<size_t>(n));
    }
  }

  std::string Serve(const Client& c, std::string_view line) {
    s_.requests_.fetch_add(1, std::memory_order_relaxed);
    try {
      ControlReply error;
      std::optional<ControlRequest> request = DecodeRequest(line, &error);
      if (!request) {
        spdlog::debug("control: pid {}: {}", c.pid, error.error);
        return EncodeReply(error);
      }
      ControlReply reply = Dispatch(*request);
      if (request->cmd != ControlCommand::kList && request->cmd != ControlCommand::kStats) {
        const std::string_view what = ControlCommandName(request->cmd);
        if (reply.ok) {
          spdlog::info("control: {} {} (pid {}): done", what, Target(*request), c.pid);
        } else {
          spdlog::info("control: {} {} (pid {}): {}", what, Target(*request), c.pid, reply.error);
        }
      }
      return EncodeReply(reply);
    } catch (const std::exception& e) {
      spdlog::error("control: internal error serving pid {}: {}", c.pid, e.what());
      return EncodeReply(ErrorReply(WireCode(ErrorCode::kInternal),
                                    fmt::format("internal error in cowtapd: {}; see the daemon's log", e.what())));
    }
  }

  static std::string Target(const ControlRequest& r) {
    switch (r.cmd) {
      case ControlCommand::kAttach:
        return fmt::format("{}/{} image {}", r.attach.domid, r.attach.devid, r.attach.image);
      case ControlCommand::kSetLogLevel:
        return r.level;
      case ControlCommand::kExport:
        return fmt::format("{} at {}", r.what, r.address);
      case ControlCommand::kUnexport:
        return r.address;
      case ControlCommand::kOffload:
        return r.what;
      default:
        return r.id;
    }
  }

  ControlReply Dispatch(const ControlRequest& r) {
    DaemonControl& d = s_.control_;
    switch (r.cmd) {
      case ControlCommand::kList: {
        ControlReply reply = ReplyFromStatus(Status::Ok());
        reply.vbds = d.List();
        return reply;
      }
      case ControlCommand::kAttach:
        return ReplyFromStatus(d.Attach(r.attach));
      case ControlCommand::kDetach:
        return ReplyFromStatus(d.Detach(r.id));
      case ControlCommand::kPause:
        return ReplyFromStatus(d.Pause(r.id));
      case ControlCommand::kResume:
        return ReplyFromStatus(d.Resume(r.id));
      case ControlCommand::kStats: {
        ControlReply reply = ReplyFromStatus(Status::Ok());
        if (r.id.empty()) {
          reply.vbds = d.List();
          return reply;
        }
        Result<VbdStatsSnapshot> stats = d.Stats(r.id);
        if (!stats.ok()) return ReplyFromStatus(stats.status());
        reply.vbds.push_back(std::move(stats).value());
        return reply;
      }
      case ControlCommand::kSetLogLevel:
        return ReplyFromStatus(d.SetLogLevel(r.level));
      case ControlCommand::kExport: {
        Result<std::string> address = d.Export(r.what, r.address, r.read_only);
        if (!address.ok()) return ReplyFromStatus(address.status());
        ControlReply reply = ReplyFromStatus(Status::Ok());
        reply.address = std::move(address).value();
        return reply;
      }
      case ControlCommand::kUnexport:
        return ReplyFromStatus(d.Unexport(r.address));
      case ControlCommand::kOffload: {
        if (r.offload == OffloadAction::kOff) return ReplyFromStatus(d.OffloadOff(r.what));
        if (r.offload == OffloadAction::kOn) {
          Result<OffloadSnapshot> on = d.OffloadOn(r.what);
          if (!on.ok()) return ReplyFromStatus(on.status());
          ControlReply reply = ReplyFromStatus(Status::Ok());
          reply.offloads.push_back(std::move(on).value());
          return reply;
        }
        Result<std::vector<OffloadSnapshot>> status = d.OffloadStatus(r.what);
        if (!status.ok()) return ReplyFromStatus(status.status());
        ControlReply reply = ReplyFromStatus(Status::Ok());
        reply.offloads = std::move(status).value();
        return reply;
      }
    }
    return ErrorReply(WireCode(ErrorCode::kInternal), "unhandled command");
  }

  void Close(Client& c) {
    CloseFd(c.fd);
    s_.clients_now_.fetch_sub(1, std::memory_order_relaxed);
  }

  void Reap() {
    for (size_t i = 0; i < clients_.size();) {
      if (clients_[i]->dead) {
        Close(*clients_[i]);
        clients_[i] = std::move(clients_.back());
        clients_.pop_back();
      } else {
        ++i;
      }
    }
  }

  ControlServer& s_;
  std::vector<std::unique_ptr<Client>> clients_;
  std::chrono::steady_clock::time_point accept_resume_{};
  RateLimiter limiter_{10, std::chrono::seconds(10)};
};

ControlServer::ControlServer(DaemonControl& control, std::string path, const ControlServerOptions& options)
    : control_(control), path_(std::move(path)), options_(options) {}

Result<std::unique_ptr<ControlServer>> ControlServer::Start(DaemonControl& control, const std::string& socket_path) {
  return Start(control, socket_path, ControlServerOptions());
}

Result<std::unique_ptr<ControlServer>> ControlServer::Start(DaemonControl& control, const std::string& socket_path,
                                                            const ControlServerOptions& options) {
  if (options.max_clients == 0 || options.max_output_bytes == 0) {
    return Status::InvalidArgument("control server: max_clients and max_output_bytes must be positive");
  }
  std::unique_ptr<ControlServer> server(new ControlServer(control, socket_path, options));
  COWTAP_RETURN_IF_ERROR(server->Listen());
  server->thread_ = std::thread([s = server.get()] { s->Run(); });
  spdlog::info("control: listening on {}", socket_path);
  return server;
}

Status ControlServer::Listen() {
  sockaddr_un addr{};
  addr.sun_family = AF_UNIX;
  if (path_.empty() || path_.size() >= sizeof(addr.sun_path)) {
    return Status::InvalidArgument(
        fmt::format("control socket path '{}' must be 1 to {} bytes long", path_, sizeof(addr.sun_path) - 1));
  }
  path_.copy(addr.sun_path, path_.size());

  const std::string dir = ParentDir(path_);
  struct stat st {};
  if (::stat(dir.c_str(), &st) != 0) {
    if (errno != ENOENT || ::mkdir(dir.c_str(), 0755) != 0) {
      return Status::FromErrno(errno, fmt::format("creating the control socket's directory {}", dir));
    }
  }
  if (::lstat(path_.c_str(), &st) == 0) {
    if (!S_ISSOCK(st.st_mode)) {
      return Status::InvalidArgument(
          fmt::format("{} exists and is not a socket; remove it or choose another control socket path", path_));
    }
    // Non-blocking: a live daemon with a full backlog answers EAGAIN
    // instead of stalling the start.
    int probe = ::socket(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (probe < 0) return Status::FromErrno(errno, "creating a socket");
    const int rc = ::connect(probe, reinterpret_cast<const sockaddr*>(&addr), sizeof(addr));
    const int err = errno;
    ::close(probe);
    if (rc == 0 || err == EAGAIN) {
      return Status::Busy(fmt::format("another cowtapd is listening on {}; stop it or choose another socket", path_));
    }
    if (err != ECONNREFUSED) return Status::FromErrno(err, fmt::format("probing the existing socket {}", path_));
    if (::unlink(path_.c_str()) != 0 && errno != ENOENT) {
      return Status::FromErrno(errno, fmt::format("removing the stale control socket {}", path_));
    }
  }

  listen_fd_ = ::socket(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
  if (listen_fd_ < 0) return Status::FromErrno(errno, "creating the control socket");
  // The umask makes the socket 0600 from birth (no window where another user
  // could connect); chmod states it whatever the umask did.
  const mode_t old_umask = ::umask(0177);
  const int rc = ::bind(listen_fd_, reinterpret_cast<const sockaddr*>(&addr), sizeof(addr));
  const int bind_errno = errno;
  ::umask(old_umask);
  if (rc != 0) return Status::FromErrno(bind_errno, fmt::format("binding the control socket {}", path_));
  if (::stat(path_.c_str(), &st) != 0) return Status::FromErrno(errno, fmt::format("stat {}", path_));
  socket_dev_ = st.st_dev;
  socket_ino_ = st.st_ino;
  if (::chmod(path_.c_str(), 0600) != 0) return Status::FromErrno(errno, fmt::format("chmod 0600 {}", path_));
  if (::listen(listen_fd_, 64) != 0) return Status::FromErrno(errno, fmt::format("listening on {}", path_));
  stop_fd_ = ::eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
  if (stop_fd_ < 0) return Status::FromErrno(errno, "creating the control server's stop eventfd");
  return Status::Ok();
}

void ControlServer::Run() {
  Loop loop(*this);
  loop.Run();
}

void ControlServer::Stop() {
  if (stopped_) return;
  stopped_ = true;
  if (thread_.joinable()) {
    const uint64_t one = 1;
    while (::write(stop_fd_, &one, sizeof(one)) < 0 && errno == EINTR) {
    }
    thread_.join();
  }
  CloseFd(listen_fd_);
  CloseFd(stop_fd_);
  struct stat st {};
  if (socket_ino_ != 0 && ::lstat(path_.c_str(), &st) == 0 && st.st_dev == socket_dev_ && st.st_ino == socket_ino_) {
    ::unlink(path_.c_str());
  }
}

ControlServer::~ControlServer() { Stop(); }

}  // namespace cowtap::daemon
