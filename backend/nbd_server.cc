#include "backend/nbd_server.h"

#include <arpa/inet.h>
#include <fcntl.h>
#include <fmt/format.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <spdlog/spdlog.h>
#include <sys/eventfd.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <charconv>
#include <cstring>

#include "backend/nbd_connection.h"
#include "backend/nbd_protocol.h"

namespace cowtap::backend {
namespace {

constexpr std::chrono::milliseconds kStopGrace{2000};

// Closes an fd on scope exit unless released.
class FdCloser {
 public:
  explicit FdCloser(int fd) : fd_(fd) {}
  ~FdCloser() {
    if (fd_ >= 0) ::close(fd_);
  }
  int release() { return std::exchange(fd_, -1); }

 private:
  int fd_;
};

struct Bound {
  int fd = -1;
  std::string address;
  std::string unix_path;
};

Result<Bound> BindUnix(const std::string& path) {
  sockaddr_un sa{};
  sa.sun_family = AF_UNIX;
  if (path.empty() || path.size() >= sizeof(sa.sun_path)) {
    return Status::InvalidArgument(
        fmt::format("NBD socket path '{}' must be 1..{} bytes", path, sizeof(sa.sun_path) - 1));
  }
  std::memcpy(sa.sun_path, path.data(), path.size());
  const int fd = ::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (fd < 0) return Status::FromErrno(errno, "socket(AF_UNIX)");
  FdCloser closer(fd);

  struct stat st;
  if (::lstat(path.c_str(), &st) == 0) {
    if (!S_ISSOCK(st.st_mode)) {
      return Status::Busy(fmt::format("{}: exists and is not a socket; remove it or pick another path", path));
    }
    // A socket someone still listens on is theirs; a dead one is stale.
    const int probe = ::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (probe < 0) return Status::FromErrno(errno, "socket(AF_UNIX)");
    const bool live = ::connect(probe, reinterpret_cast<sockaddr*>(&sa), sizeof(sa)) == 0;
    ::close(probe);
    if (live) return Status::Busy(fmt::format("{}: another server is listening on this socket", path));
    if (::unlink(path.c_str()) != 0) return Status::FromErrno(errno, fmt::format("unlink stale socket {}", path));
  }
  // Nobody can connect before listen(), so binding and then restricting the
  // mode leaves no window in which another user could get in.
  if (::bind(fd, reinterpret_cast<sockaddr*>(&sa), sizeof(sa)) != 0) {
    return Status::FromErrno(errno, fmt::format("bind {}", path));
  }
  if (::chmod(path.c_str(), 0600) != 0) {
    const Status s = Status::FromErrno(errno, fmt::format("chmod 0600 {}", path));
    ::unlink(path.c_str());
    return s;
  }
  if (::listen(fd, 64) != 0) {
    const Status s = Status::FromErrno(errno, fmt::format("listen {}", path));
    ::unlink(path.c_str());
    return s;
  }
  return Bound{closer.release(), "unix:" + path, path};
}

Result<Bound> BindTcp(std::string_view host_port) {
  const size_t colon = host_port.rfind(':');
  if (colon == std::string_view::npos) {
    return Status::InvalidArgument(fmt::format("NBD address 'tcp:{}' needs HOST:PORT", host_port));
  }
  const std::string host(host_port.substr(0, colon));
  const std::string_view port_text = host_port.substr(colon + 1);
  uint16_t port = 0;
  const auto [end, ec] = std::from_chars(port_text.data(), port_text.data() + port_text.size(), port);
  if (port_text.empty() || ec != std::errc() || end != port_text.data() + port_text.size()) {
    return Status::InvalidArgument(
        fmt::format("NBD address 'tcp:{}': port '{}' is not 0..65535", host_port, port_text));
  }
  sockaddr_in sa{};
  sa.sin_family = AF_INET;
  sa.sin_port = htons(port);
  if (::inet_pton(AF_INET, host.c_str(), &sa.sin_addr) != 1) {
    return Status::InvalidArgument(fmt::format("NBD address 'tcp:{}': '{}' is not an IPv4 address", host_port, host));
  }
  if ((ntohl(sa.sin_addr.s_addr) >> 24) != 127) {
    return Status::InvalidArgument(fmt::format(
        "NBD address 'tcp:{}': NBD has no authentication, so only loopback (127.x.x.x) is served", host_port));
  }
  const int fd = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (fd < 0) return Status::FromErrno(errno, "socket(AF_INET)");
  FdCloser closer(fd);
  const int one = 1;
  ::setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
  if (::bind(fd, reinterpret_cast<sockaddr*>(&sa), sizeof(sa)) != 0) {
    return Status::FromErrno(errno, fmt::format("bind tcp:{}", host_port));
  }
  if (::listen(fd, 64) != 0) return Status::FromErrno(errno, fmt::format("listen tcp:{}", host_port));
  socklen_t len = sizeof(sa);
  if (::getsockname(fd, reinterpret_cast<sockaddr*>(&sa), &len) != 0) return Status::FromErrno(errno, "getsockname");
  return Bound{closer.release(), fmt::format("tcp:{}:{}", host, ntohs(sa.sin_port)), ""};
}

}  // namespace

Result<std::unique_ptr<NbdServer>> NbdServer::Start(std::shared_ptr<BlockDevice> device,
                                                    const NbdServerOptions& options) {
  if (!device) return Status::InvalidArgument("NbdServer::Start: no device");
  if (options.export_name.size() > kNbdMaxStringBytes || options.description.size() > kNbdMaxStringBytes) {
    return Status::InvalidArgument("NBD export name and description must be at most 4096 bytes");
  }
  if (options.max_clients == 0 || options.max_inflight_requests == 0 ||
      options.max_inflight_bytes < kNbdMaxPayloadBytes) {
    return Status::InvalidArgument(
        fmt::format("NBD server limits: max_clients and max_inflight_requests must be > 0, max_inflight_bytes >= {}",
                    kNbdMaxPayloadBytes));
  }
  const std::string_view address = options.address;
  Result<Bound> bound = Status::InvalidArgument(
      fmt::format("NBD address '{}' must be unix:/path or tcp:127.0.0.1:PORT", options.address));
  if (address.starts_with("unix:")) {
    bound = BindUnix(std::string(address.substr(5)));
  } else if (address.starts_with("tcp:")) {
    bound = BindTcp(address.substr(4));
  }
  if (!bound.ok()) return bound.status();
  FdCloser listen_closer(bound->fd);
  const int wake_fd = ::eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
  if (wake_fd < 0) {
    if (!bound->unix_path.empty()) ::unlink(bound->unix_path.c_str());
    return Status::FromErrno(errno, "eventfd");
  }
  std::unique_ptr<NbdServer> server(
      new NbdServer(std::move(device), options, listen_closer.release(), wake_fd, bound->address, bound->unix_path));
  server->accept_thread_ = std::thread(&NbdServer::AcceptLoop, server.get());
  spdlog::info("nbd: serving export '{}' at {}", options.export_name, server->address_);
  return server;
}

NbdServer::NbdServer(std::shared_ptr<BlockDevice> device, const NbdServerOptions& options, int listen_fd, int wake_fd,
                     std::string address, std::string unix_path)
    : device_(std::move(device)),
      options_(options),
      listen_fd_(listen_fd),
      wake_fd_(wake_fd),
      address_(std::move(address)),
      unix_path_(std::move(unix_path)) {}

NbdServer::~NbdServer() {
  Stop();
  ::close(wake_fd_);
}

std::string NbdServer::uri() const {
  if (!unix_path_.empty()) return fmt::format("nbd+unix:///{}?socket={}", options_.export_name, unix_path_);
  return fmt::format("nbd://{}/{}", address_.substr(4), options_.export_name);
}

void NbdServer::AcceptLoop() {
  uint64_t next_id = 1;
  while (!stopping_.load()) {
    pollfd fds[2] = {{listen_fd_, POLLIN, 0}, {wake_fd_, POLLIN, 0}};
    if (::poll(fds, 2, -1) < 0) {
      if (errno == EINTR) continue;
      spdlog::error("nbd {}: poll failed: {}; no longer accepting", address_, std::strerror(errno));
      return;
    }
    if (fds[1].revents) {
      uint64_t v;
      (void)!::read(wake_fd_, &v, sizeof(v));
      std::lock_guard<std::mutex> lock(mu_);
      ReapFinished();
    }
    if (stopping_.load()) return;
    if (!(fds[0].revents & POLLIN)) continue;
    const int fd = ::accept4(listen_fd_, nullptr, nullptr, SOCK_CLOEXEC);
    if (fd < 0) {
      // ECONNABORTED, EMFILE...: keep serving the clients we have.
      if (errno != EINTR && errno != EAGAIN) {
        spdlog::warn("nbd {}: accept failed: {}", address_, std::strerror(errno));
        if (errno == EMFILE || errno == ENFILE) std::this_thread::sleep_for(std::chrono::milliseconds(100));
      }
      continue;
    }
    const int one = 1;
    ::setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));  // fails harmlessly on Unix sockets
    std::lock_guard<std::mutex> lock(mu_);
    ReapFinished();
    if (connections_.size() >= options_.max_clients) {
      counters_.connections_refused.fetch_add(1, std::memory_order_relaxed);
      spdlog::warn("nbd {}: refusing a client: already serving {} (max_clients)", address_, connections_.size());
      ::close(fd);
      continue;
    }
    counters_.connections_accepted.fetch_add(1, std::memory_order_relaxed);
    NbdExportInfo info;
    info.name = options_.export_name;
    info.description = options_.description;
    info.size_bytes = device_->size_bytes();
    info.read_only = options_.read_only || device_->read_only();
    info.flush = true;
    info.trim = device_->supports_discard();
    info.write_zeroes = true;
    info.multi_conn = options_.multi_conn;
    info.min_block_bytes = 1;
    info.preferred_block_bytes = std::max<uint32_t>(device_->physical_sector_size(), 4096);
    info.max_block_bytes = kNbdMaxPayloadBytes;
    NbdConnection::Limits limits{options_.max_inflight_requests, options_.max_inflight_bytes,
                                 options_.handshake_timeout};
    const int wake = wake_fd_;
    auto conn = std::make_unique<NbdConnection>(next_id++, fd, device_, std::move(info), limits, &counters_, [wake] {
      const uint64_t one_event = 1;
      (void)!::write(wake, &one_event, sizeof(one_event));
    });
    conn->Start();
    connections_.push_back(std::move(conn));
  }
}

void NbdServer::ReapFinished() {
  std::erase_if(connections_, [](const std::unique_ptr<NbdConnection>& c) { return c->finished(); });
}

void NbdServer::Stop() {
  std::lock_guard<std::mutex> stop_lock(stop_mu_);
  if (stopped_) return;
  stopped_ = true;
  stopping_.store(true);
  const uint64_t one = 1;
  (void)!::write(wake_fd_, &one, sizeof(one));
  if (accept_thread_.joinable()) accept_thread_.join();
  ::close(listen_fd_);
  if (!unix_path_.empty()) ::unlink(unix_path_.c_str());

  std::vector<std::unique_ptr<NbdConnection>> connections;
  {
    std::lock_guard<std::mutex> lock(mu_);
    connections.swap(connections_);
  }
  for (auto& c : connections) c->Shutdown();
  const auto deadline = std::chrono::steady_clock::now() + kStopGrace;
  for (auto& c : connections) {
    if (!c->WaitFinished(deadline)) c->Abort();
  }
  connections.clear();  // joins each connection's thread
  spdlog::info("nbd: stopped serving at {}", address_);
}

NbdServerStats NbdServer::stats() const {
  NbdServerStats s;
  s.connections_accepted = counters_.connections_accepted.load();
  s.connections_refused = counters_.connections_refused.load();
  s.protocol_errors = counters_.protocol_errors.load();
  s.requests = counters_.requests.load();
  s.request_errors = counters_.request_errors.load();
  s.bytes_read = counters_.bytes_read.load();
  s.bytes_written = counters_.bytes_written.load();
  return s;
}

size_t NbdServer::client_count() const {
  std::lock_guard<std::mutex> lock(mu_);
  return std::count_if(connections_.begin(), connections_.end(),
                       [](const std::unique_ptr<NbdConnection>& c) { return !c->finished(); });
}

}  // namespace cowtap::backend
