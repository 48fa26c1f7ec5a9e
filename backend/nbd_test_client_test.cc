// The implementation of the tests' NBD client (nbd_test_client.h). Named
// *_test.cc so it is built only into the backend test binary.
#include "backend/nbd_test_client.h"

#include <arpa/inet.h>
#include <netinet/in.h>
#include <poll.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>

#include "backend/nbd_protocol.h"
#include "base/endian.h"

namespace cowtap::backend::testing {

NbdTestClient::~NbdTestClient() { Close(); }

void NbdTestClient::Close() {
  if (fd_ >= 0) ::close(fd_);
  fd_ = -1;
}

bool NbdTestClient::Connect(const std::string& address) {
  Close();
  if (address.rfind("unix:", 0) == 0) {
    sockaddr_un sa{};
    sa.sun_family = AF_UNIX;
    const std::string path = address.substr(5);
    if (path.size() >= sizeof(sa.sun_path)) return false;
    std::memcpy(sa.sun_path, path.data(), path.size());
    fd_ = ::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (::connect(fd_, reinterpret_cast<sockaddr*>(&sa), sizeof(sa)) != 0) return false;
  } else if (address.rfind("tcp:", 0) == 0) {
    const std::string hp = address.substr(4);
    const size_t colon = hp.rfind(':');
    sockaddr_in sa{};
    sa.sin_family = AF_INET;
    sa.sin_port = htons(static_cast<uint16_t>(std::stoi(hp.substr(colon + 1))));
    if (::inet_pton(AF_INET, hp.substr(0, colon).c_str(), &sa.sin_addr) != 1) return false;
    fd_ = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (::connect(fd_, reinterpret_cast<sockaddr*>(&sa), sizeof(sa)) != 0) return false;
  } else {
    return false;
  }
  timeval tv{5, 0};
  ::setsockopt(fd_, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(tv));
  ::setsockopt(fd_, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof(tv));
  return true;
}

bool NbdTestClient::ReadFull(void* buf, size_t length) {
  auto* p = static_cast<uint8_t*>(buf);
  while (length > 0) {
    const ssize_t n = ::recv(fd_, p, length, 0);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) return false;
    p += n;
    length -= static_cast<size_t>(n);
  }
  return true;
}

bool NbdTestClient::SendRaw(std::span<const uint8_t> bytes) {
  size_t done = 0;
  while (done < bytes.size()) {
    const ssize_t n = ::send(fd_, bytes.data() + done, bytes.size() - done, MSG_NOSIGNAL);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) return false;
    done += static_cast<size_t>(n);
  }
  return true;
}

bool NbdTestClient::Greet(uint32_t client_flags) {
  uint8_t g[18];
  if (!ReadFull(g, sizeof(g))) return false;
  if (LoadBe64(g) != kNbdMagic || LoadBe64(g + 8) != kNbdOptionMagic) return false;
  uint8_t f[4];
  StoreBe32(f, client_flags);
  return SendRaw(f);
}

bool NbdTestClient::SendOption(uint32_t option, std::span<const uint8_t> data) {
  std::vector<uint8_t> b(16 + data.size());
  StoreBe64(b.data(), kNbdOptionMagic);
  StoreBe32(b.data() + 8, option);
  StoreBe32(b.data() + 12, static_cast<uint32_t>(data.size()));
  std::copy(data.begin(), data.end(), b.begin() + 16);
  return SendRaw(b);
}

std::optional<NbdTestClient::OptionReply> NbdTestClient::ReadOptionReply() {
  uint8_t h[20];
  if (!ReadFull(h, sizeof(h)) || LoadBe64(h) != kNbdOptionReplyMagic) return std::nullopt;
  OptionReply r;
  r.option = LoadBe32(h + 8);
  r.type = LoadBe32(h + 12);
  r.data.resize(LoadBe32(h + 16));
  if (!r.data.empty() && !ReadFull(r.data.data(), r.data.size())) return std::nullopt;
  return r;
}

bool NbdTestClient::Handshake(const std::string& name, bool structured) {
  if (!Greet()) return false;
  if (structured) {
    if (!SendOption(kNbdOptStructuredReply, {})) return false;
    auto r = ReadOptionReply();
    if (!r || r->type != kNbdRepAck) return false;
    structured_ = true;
  }
  std::vector<uint8_t> go(4 + name.size() + 2);
  StoreBe32(go.data(), static_cast<uint32_t>(name.size()));
  std::copy(name.begin(), name.end(), go.begin() + 4);
  StoreBe16(go.data() + 4 + name.size(), 0);
  if (!SendOption(kNbdOptGo, go)) return false;
  while (true) {
    auto r = ReadOptionReply();
    if (!r) return false;
    if (r->type == kNbdRepAck) return true;
    if (r->type != kNbdRepInfo || r->data.size() < 2) return false;
    if (LoadBe16(r->data.data()) == kNbdInfoExport && r->data.size() == 12) {
      size_ = LoadBe64(r->data.data() + 2);
      flags_ = LoadBe16(r->data.data() + 10);
    }
  }
}

bool NbdTestClient::SendRequest(uint16_t flags, uint16_t type, uint64_t handle, uint64_t offset, uint32_t length,
                                std::span<const uint8_t> payload) {
  std::vector<uint8_t> b(kNbdRequestBytes + payload.size());
  StoreBe32(b.data(), kNbdRequestMagic);
  StoreBe16(b.data() + 4, flags);
  StoreBe16(b.data() + 6, type);
  StoreBe64(b.data() + 8, handle);
  StoreBe64(b.data() + 16, offset);
  StoreBe32(b.data() + 24, length);
  std::copy(payload.begin(), payload.end(), b.begin() + kNbdRequestBytes);
  return SendRaw(b);
}

std::optional<NbdTestReply> NbdTestClient::ReadReply(uint32_t read_length) {
  uint8_t m[4];
  if (!ReadFull(m, 4)) return std::nullopt;
  NbdTestReply r;
  if (LoadBe32(m) == kNbdSimpleReplyMagic) {
    uint8_t h[12];
    if (!ReadFull(h, sizeof(h))) return std::nullopt;
    r.error = LoadBe32(h);
    r.handle = LoadBe64(h + 4);
    if (r.error == 0 && read_length > 0) {
      r.data.resize(read_length);
      if (!ReadFull(r.data.data(), read_length)) return std::nullopt;
    }
    return r;
  }
  if (LoadBe32(m) != kNbdStructuredReplyMagic) return std::nullopt;
  uint8_t h[16];
  if (!ReadFull(h, sizeof(h))) return std::nullopt;
  r.structured = true;
  r.flags = LoadBe16(h);
  r.type = LoadBe16(h + 2);
  r.handle = LoadBe64(h + 4);
  std::vector<uint8_t> payload(LoadBe32(h + 12));
  if (!payload.empty() && !ReadFull(payload.data(), payload.size())) return std::nullopt;
  if (r.type == kNbdReplyTypeOffsetData && payload.size() >= 8) {
    r.offset = LoadBe64(payload.data());
    r.data.assign(payload.begin() + 8, payload.end());
  } else if (r.type == kNbdReplyTypeError && payload.size() >= 6) {
    r.error = LoadBe32(payload.data());
    const uint16_t len = LoadBe16(payload.data() + 4);
    if (len <= payload.size() - 6) r.message.assign(payload.begin() + 6, payload.begin() + 6 + len);
  }
  return r;
}

bool NbdTestClient::WaitClosed() {
  pollfd pfd{fd_, POLLIN, 0};
  if (::poll(&pfd, 1, 5000) <= 0) return false;
  uint8_t b[256];
  while (true) {
    const ssize_t n = ::recv(fd_, b, sizeof(b), 0);
    if (n == 0) return true;
    if (n < 0) return errno == ECONNRESET;
  }
}

}  // namespace cowtap::backend::testing
