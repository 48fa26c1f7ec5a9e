#include "tools/cli/ctl_client.h"

#include <fcntl.h>
#include <fmt/format.h>
#include <poll.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdlib>
#include <cstring>
#include <utility>

namespace cowtap::cli {
namespace {

int MillisLeft(std::chrono::steady_clock::time_point deadline) {
  const auto left = std::chrono::duration_cast<std::chrono::milliseconds>(deadline - std::chrono::steady_clock::now());
  return left.count() <= 0 ? 0 : static_cast<int>(std::min<int64_t>(left.count(), 1 << 30));
}

}  // namespace

std::string DefaultControlSocketPath() {
  const char* env = std::getenv("COWTAP_CONTROL_SOCKET");
  if (env && *env) return env;
  return std::string(daemon::kDefaultControlSocket);
}

Result<std::unique_ptr<ControlClient>> ControlClient::Connect(const std::string& path,
                                                              std::chrono::milliseconds timeout) {
  sockaddr_un addr{};
  addr.sun_family = AF_UNIX;
  if (path.empty() || path.size() >= sizeof(addr.sun_path)) {
    return Status::InvalidArgument(
        fmt::format("control socket path '{}' must be 1 to {} bytes long", path, sizeof(addr.sun_path) - 1));
  }
  path.copy(addr.sun_path, path.size());
  const int fd = ::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (fd < 0) return Status::FromErrno(errno, "creating a socket");
  if (::connect(fd, reinterpret_cast<const sockaddr*>(&addr), sizeof(addr)) != 0) {
    const int err = errno;
    ::close(fd);
    switch (err) {
      case ENOENT:
        return Status::NotFound(fmt::format(
            "no control socket at {}: is cowtapd running? (--socket or COWTAP_CONTROL_SOCKET name another)", path));
      case ECONNREFUSED:
        return Status(ErrorCode::kIoError,
                      fmt::format("nobody listens on {}: cowtapd is not running (the socket is stale)", path), err);
      case EACCES:
      case EPERM:
        return Status(
            ErrorCode::kInvalidArgument,
            fmt::format("permission denied on {}: the control socket is root-only; run cowtap ctl as root", path), err);
      default:
        return Status::FromErrno(err, fmt::format("connecting to cowtapd at {}", path));
    }
  }
  // Non-blocking from here on: every wait is a poll with the deadline.
  const int flags = ::fcntl(fd, F_GETFL);
  if (flags < 0 || ::fcntl(fd, F_SETFL, flags | O_NONBLOCK) != 0) {
    const int err = errno;
    ::close(fd);
    return Status::FromErrno(err, "making the control connection non-blocking");
  }
  return std::unique_ptr<ControlClient>(new ControlClient(fd, path, timeout));
}

ControlClient::~ControlClient() {
  if (fd_ >= 0) ::close(fd_);
}

Status ControlClient::SendAll(const std::string& line, std::chrono::steady_clock::time_point deadline) {
  size_t done = 0;
  while (done < line.size()) {
    const ssize_t n = ::send(fd_, line.data() + done, line.size() - done, MSG_NOSIGNAL);
    if (n > 0) {
      done += static_cast<size_t>(n);
      continue;
    }
    if (n < 0 && errno == EINTR) continue;
    if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) {
      pollfd p{fd_, POLLOUT, 0};
      const int left = MillisLeft(deadline);
      if (left == 0 || ::poll(&p, 1, left) == 0) {
        return Status::IoError(
            fmt::format("cowtapd at {} did not take the request within {} ms", path_, timeout_.count()));
      }
      continue;
    }
    return Status::FromErrno(errno, fmt::format("sending to cowtapd at {}", path_));
  }
  return Status::Ok();
}

Result<std::string> ControlClient::ReadLine(std::chrono::steady_clock::time_point deadline) {
  while (true) {
    const size_t nl = buffer_.find('\n');
    if (nl != std::string::npos) {
      std::string line = buffer_.substr(0, nl);
      buffer_.erase(0, nl + 1);
      return line;
    }
    if (buffer_.size() > daemon::kMaxControlReplyBytes) {
      return Status::IoError(fmt::format("cowtapd at {} sent a reply over {} bytes; not a control reply", path_,
                                         daemon::kMaxControlReplyBytes));
    }
    char chunk[64 * 1024];
    const ssize_t n = ::recv(fd_, chunk, sizeof(chunk), 0);
    if (n > 0) {
      buffer_.append(chunk, static_cast<size_t>(n));
      continue;
    }
    if (n == 0) {
      return Status::IoError(fmt::format("cowtapd at {} closed the connection without replying", path_));
    }
    if (errno == EINTR) continue;
    if (errno != EAGAIN && errno != EWOULDBLOCK) {
      return Status::FromErrno(errno, fmt::format("reading cowtapd's reply on {}", path_));
    }
    pollfd p{fd_, POLLIN, 0};
    const int left = MillisLeft(deadline);
    if (left == 0 || ::poll(&p, 1, left) == 0) {
      return Status::IoError(
          fmt::format("cowtapd at {} did not reply within {} ms (--timeout waits longer)", path_, timeout_.count()));
    }
  }
}

Result<std::string> ControlClient::CallRaw(std::string line) {
  if (line.empty() || line.back() != '\n') line += '\n';
  const auto deadline = std::chrono::steady_clock::now() + timeout_;
  Status sent = SendAll(line, deadline);
  // A daemon that refuses the connection (too many clients, not root) has
  // written why before closing: that reply is worth more than EPIPE.
  Result<std::string> reply = ReadLine(sent.ok() ? deadline : std::chrono::steady_clock::now() + timeout_ / 10);
  if (!sent.ok() && !reply.ok()) return sent;
  return reply;
}

Result<daemon::ControlReply> ControlClient::Call(const daemon::ControlRequest& request) {
  COWTAP_ASSIGN_OR_RETURN(std::string line, CallRaw(daemon::EncodeRequest(request)));
  Result<daemon::ControlReply> reply = daemon::DecodeReply(line);
  if (!reply.ok()) return reply.status().Annotate(fmt::format("cowtapd at {}", path_));
  return reply;
}

}  // namespace cowtap::cli
