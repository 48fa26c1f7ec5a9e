// The sim's plumbing: an owned file descriptor, the message codec spoken on
// the hypervisor's SOCK_SEQPACKET sockets, and sendmsg/recvmsg with fd
// passing (SCM_RIGHTS). One message = one datagram: a type (u32) then
// little-endian fields and length-prefixed strings. The hypervisor decodes
// what a guest sends with WireReader, which never reads past the message.
//
// Thread-safety: values; a socket is used by one thread at a time.
#pragma once

#include <cstdint>
#include <span>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "base/status.h"
#include "xen-glue/platform.h"

namespace cowtap::xen::sim {

class UniqueFd {
 public:
  UniqueFd() = default;
  explicit UniqueFd(int fd) : fd_(fd) {}
  UniqueFd(UniqueFd&& o) noexcept : fd_(std::exchange(o.fd_, -1)) {}
  UniqueFd& operator=(UniqueFd&& o) noexcept;
  ~UniqueFd() { Reset(); }
  int get() const { return fd_; }
  int release() { return std::exchange(fd_, -1); }
  void Reset(int fd = -1);
  bool valid() const { return fd_ >= 0; }
  // A duplicate (close-on-exec), or an invalid fd on failure.
  UniqueFd Dup() const;

 private:
  int fd_ = -1;
};

inline constexpr size_t kMaxMessageBytes = 64 * 1024;
inline constexpr size_t kMaxMessageFds = 4;

enum class MsgType : uint32_t {
  // Main socket (guest -> hypervisor), one reply each.
  kHello = 1,       // u16 domid, u32 ram_pages, u32 grant_entries + fds [ram, grant table]
  kOpenXs,          // -> fds [request socket, watch eventfd]
  kBindUnbound,     // u16 remote -> u32 port + fds [in, out]
  kBindInterdomain, // u16 remote, u32 remote_port -> u32 port + fds [in, out]
  kUnbind,          // u32 port
  // Xenstore request socket: every request starts with u32 transaction.
  kXsRead = 100,    // str path -> str value
  kXsWrite,         // str path, str value
  kXsMkdir,         // str path
  kXsRemove,        // str path
  kXsDirectory,     // str path -> u32 n, n * str
  kXsGetPerms,      // str path -> u32 n, n * (u16 domid, u8 access)
  kXsSetPerms,      // str path, u32 n, n * (u16 domid, u8 access)
  kXsWatch,         // str path, str token
  kXsUnwatch,       // str path, str token
  kXsReadWatch,     // -> u8 present, str path, str token
  kXsTxStart,       // -> u32 tx
  kXsTxEnd,         // u8 commit
};

class WireWriter {
 public:
  WireWriter& U8(uint8_t v) { return Raw(&v, 1); }
  WireWriter& U16(uint16_t v) { return Raw(&v, 2); }
  WireWriter& U32(uint32_t v) { return Raw(&v, 4); }
  WireWriter& Str(std::string_view s) {
    U32(static_cast<uint32_t>(s.size()));
    return Raw(s.data(), s.size());
  }
  // A reply's leading status: u8 code, str message.
  WireWriter& Put(const Status& s) { return U8(static_cast<uint8_t>(s.code())).Str(s.message()); }
  const std::vector<uint8_t>& bytes() const { return buf_; }

 private:
  WireWriter& Raw(const void* p, size_t n);
  std::vector<uint8_t> buf_;
};

// Every getter returns false (and stays failed) once the message is short.
class WireReader {
 public:
  explicit WireReader(std::span<const uint8_t> data) : data_(data) {}
  bool U8(uint8_t* v) { return Raw(v, 1); }
  bool U16(uint16_t* v) { return Raw(v, 2); }
  bool U32(uint32_t* v) { return Raw(v, 4); }
  bool Str(std::string* s, size_t max_bytes = kMaxMessageBytes);
  // Reads a reply's leading status into *s (false if malformed).
  bool Get(Status* s);
  bool ok() const { return ok_; }

 private:
  bool Raw(void* p, size_t n);
  std::span<const uint8_t> data_;
  size_t pos_ = 0;
  bool ok_ = true;
};

struct Message {
  std::vector<uint8_t> bytes;
  std::vector<UniqueFd> fds;
};

// Sends one datagram; never raises SIGPIPE. dont_wait: fail with kBusy
// instead of blocking when the peer does not read.
Status SendMessage(int sock, std::span<const uint8_t> bytes, std::span<const int> fds,
                   bool dont_wait = false);
// Receives one datagram (blocking unless the socket is non-blocking).
// kCancelled when the peer closed; kInvalidArgument if the datagram or its
// fds exceed the limits (extra fds are closed, never leaked).
Result<Message> ReceiveMessage(int sock);

// The two eventfds of one event-channel port: `in` is signalled when the
// peer notifies this port; `out` is the peer's `in`.
struct PortFds {
  EvtchnPort port = 0;
  UniqueFd in;
  UniqueFd out;
};

}  // namespace cowtap::xen::sim
