#include "xen-glue/sim_wire.h"

#include <fcntl.h>
#include <sys/socket.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>

namespace cowtap::xen::sim {

UniqueFd& UniqueFd::operator=(UniqueFd&& o) noexcept {
  if (this != &o) Reset(o.release());
  return *this;
}

void UniqueFd::Reset(int fd) {
  if (fd_ >= 0) close(fd_);
  fd_ = fd;
}

UniqueFd UniqueFd::Dup() const {
  if (fd_ < 0) return UniqueFd();
  return UniqueFd(fcntl(fd_, F_DUPFD_CLOEXEC, 0));
}

WireWriter& WireWriter::Raw(const void* p, size_t n) {
  const auto* b = static_cast<const uint8_t*>(p);
  buf_.insert(buf_.end(), b, b + n);
  return *this;
}

bool WireReader::Raw(void* p, size_t n) {
  if (!ok_ || data_.size() - pos_ < n) return ok_ = false;
  std::memcpy(p, data_.data() + pos_, n);
  pos_ += n;
  return true;
}

bool WireReader::Str(std::string* s, size_t max_bytes) {
  uint32_t n = 0;
  if (!U32(&n)) return false;
  if (n > max_bytes || data_.size() - pos_ < n) return ok_ = false;
  s->assign(reinterpret_cast<const char*>(data_.data() + pos_), n);
  pos_ += n;
  return true;
}

bool WireReader::Get(Status* s) {
  uint8_t code = 0;
  std::string message;
  if (!U8(&code) || !Str(&message)) return false;
  if (code > static_cast<uint8_t>(ErrorCode::kCancelled)) return ok_ = false;
  *s = code == 0 ? Status::Ok() : Status(static_cast<ErrorCode>(code), std::move(message));
  return true;
}

Status SendMessage(int sock, std::span<const uint8_t> bytes, std::span<const int> fds, bool dont_wait) {
  if (bytes.size() > kMaxMessageBytes || fds.size() > kMaxMessageFds) {
    return Status::Internal("sim: message too large to send");
  }
  iovec iov{const_cast<uint8_t*>(bytes.data()), bytes.size()};
  msghdr msg{};
  msg.msg_iov = &iov;
  msg.msg_iovlen = 1;
  alignas(cmsghdr) char control[CMSG_SPACE(sizeof(int) * kMaxMessageFds)] = {};
  if (!fds.empty()) {
    msg.msg_control = control;
    msg.msg_controllen = CMSG_SPACE(sizeof(int) * fds.size());
    cmsghdr* c = CMSG_FIRSTHDR(&msg);
    c->cmsg_level = SOL_SOCKET;
    c->cmsg_type = SCM_RIGHTS;
    c->cmsg_len = CMSG_LEN(sizeof(int) * fds.size());
    std::memcpy(CMSG_DATA(c), fds.data(), sizeof(int) * fds.size());
  }
  int flags = MSG_NOSIGNAL | (dont_wait ? MSG_DONTWAIT : 0);
  while (true) {
    ssize_t n = sendmsg(sock, &msg, flags);
    if (n >= 0) return Status::Ok();
    if (errno == EINTR) continue;
    if (errno == EPIPE || errno == ECONNRESET) return Status::Cancelled("sim: peer closed the socket");
    return Status::FromErrno(errno, "sim: sendmsg");
  }
}

Result<Message> ReceiveMessage(int sock) {
  Message out;
  out.bytes.resize(kMaxMessageBytes);
  iovec iov{out.bytes.data(), out.bytes.size()};
  msghdr msg{};
  msg.msg_iov = &iov;
  msg.msg_iovlen = 1;
  alignas(cmsghdr) char control[CMSG_SPACE(sizeof(int) * kMaxMessageFds)];
  msg.msg_control = control;
  msg.msg_controllen = sizeof(control);
  ssize_t n;
  do {
    n = recvmsg(sock, &msg, MSG_CMSG_CLOEXEC);
  } while (n < 0 && errno == EINTR);
  if (n < 0) {
    if (errno == ECONNRESET) return Status::Cancelled("sim: peer closed the socket");
    return Status::FromErrno(errno, "sim: recvmsg");
  }
  // Take ownership of every fd received first, so none leaks on any error.
  for (cmsghdr* c = CMSG_FIRSTHDR(&msg); c != nullptr; c = CMSG_NXTHDR(&msg, c)) {
    if (c->cmsg_level != SOL_SOCKET || c->cmsg_type != SCM_RIGHTS) continue;
    size_t count = (c->cmsg_len - CMSG_LEN(0)) / sizeof(int);
    for (size_t i = 0; i < count; ++i) {
      int fd;
      std::memcpy(&fd, CMSG_DATA(c) + i * sizeof(int), sizeof(int));
      out.fds.emplace_back(fd);
    }
  }
  if (n == 0) return Status::Cancelled("sim: peer closed the socket");
  if (msg.msg_flags & (MSG_TRUNC | MSG_CTRUNC)) {
    return Status::InvalidArgument("sim: message or its file descriptors exceed the limits");
  }
  out.bytes.resize(static_cast<size_t>(n));
  return out;
}

}  // namespace cowtap::xen::sim
