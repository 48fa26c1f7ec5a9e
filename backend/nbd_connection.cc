#include "backend/nbd_connection.h"

#include <fmt/format.h>
#include <poll.h>
#include <spdlog/spdlog.h>
#include <sys/socket.h>
#include <unistd.h>

#include <array>
#include <cerrno>
#include <vector>

#include "base/endian.h"
#include "base/log.h"

namespace cowtap::backend {
namespace {

// Client-triggered messages are rate-limited: a hostile client must not
// flood dom0's log.
RateLimiter& ClientLogLimiter() {
  static RateLimiter limiter(20, std::chrono::seconds(1));
  return limiter;
}

constexpr size_t kDrainChunkBytes = 64 << 10;

}  // namespace

// One request from admission until its reply has been sent (or dropped).
struct NbdConnection::Pending {
  NbdRequest request;
  uint64_t cost_bytes = 0;  // counted against max_inflight_bytes
  std::unique_ptr<uint8_t[]> buffer;
  iovec iov{};
  bool flush_pending = false;  // TRIM/WRITE_ZEROES with FUA: flush after
  NbdCheck refusal;            // error != 0: refused before reaching the device
  // The reply: header, then data_bytes of buffer.
  std::vector<uint8_t> header;
  size_t data_bytes = 0;
};

NbdConnection::NbdConnection(uint64_t id, int fd, std::shared_ptr<BlockDevice> device, NbdExportInfo info,
                             Limits limits, NbdCounters* counters, std::function<void()> on_finished)
    : id_(id),
      fd_(fd),
      device_(std::move(device)),
      info_(std::move(info)),
      limits_(limits),
      counters_(counters),
      on_finished_(std::move(on_finished)) {}

NbdConnection::~NbdConnection() {
  if (thread_.joinable()) thread_.join();
  std::lock_guard<std::mutex> lock(fd_mu_);
  if (!fd_closed_) ::close(fd_);
}

void NbdConnection::Start() { thread_ = std::thread(&NbdConnection::Run, this); }

void NbdConnection::Shutdown() {
  {
    std::lock_guard<std::mutex> lock(mu_);
    stop_reading_ = true;
    cv_.notify_all();
  }
  ShutdownSocket(SHUT_RD);
}

void NbdConnection::Abort() { ShutdownSocket(SHUT_RDWR); }

bool NbdConnection::finished() const {
  std::lock_guard<std::mutex> lock(mu_);
  return finished_;
}

bool NbdConnection::WaitFinished(std::chrono::steady_clock::time_point deadline) {
  std::unique_lock<std::mutex> lock(mu_);
  return cv_.wait_until(lock, deadline, [&] { return finished_; });
}

void NbdConnection::ShutdownSocket(int how) {
  std::lock_guard<std::mutex> lock(fd_mu_);
  if (!fd_closed_) ::shutdown(fd_, how);
}

void NbdConnection::ProtocolError(const std::string& what) {
  counters_->protocol_errors.fetch_add(1, std::memory_order_relaxed);
  if (ClientLogLimiter().Allow()) spdlog::warn("nbd client {}: {}; disconnecting", id_, what);
}

void NbdConnection::Run() {
  NbdNegotiator negotiator(info_);
  if (Handshake(&negotiator)) {
    structured_ = negotiator.structured_replies();
    writer_ = std::thread(&NbdConnection::WriterLoop, this);
    ServeRequests(negotiator);
    {
      std::unique_lock<std::mutex> lock(mu_);
      stop_reading_ = true;
      cv_.wait(lock, [&] { return inflight_requests_ == 0; });
      writer_exit_ = true;
      cv_.notify_all();
    }
    writer_.join();
  }
  {
    std::lock_guard<std::mutex> lock(fd_mu_);
    ::close(fd_);
    fd_closed_ = true;
  }
  {
    std::lock_guard<std::mutex> lock(mu_);
    finished_ = true;
    cv_.notify_all();
  }
  on_finished_();
}

bool NbdConnection::Handshake(NbdNegotiator* negotiator) {
  const auto deadline = std::chrono::steady_clock::now() + limits_.handshake_timeout;
  const auto greeting = EncodeNbdGreeting();
  if (!SendAll(greeting)) return false;
  std::array<uint8_t, 4> flags;
  if (ReadFull(flags.data(), flags.size(), deadline) != ReadResult::kOk) return false;
  if (Status s = negotiator->AcceptClientFlags(LoadBe32(flags.data())); !s.ok()) {
    ProtocolError(s.message());
    return false;
  }
  std::vector<uint8_t> data, out;
  while (true) {
    std::array<uint8_t, kNbdOptionHeaderBytes> header;
    const ReadResult r = ReadFull(header.data(), header.size(), deadline);
    if (r != ReadResult::kOk) {
      if (r == ReadResult::kError) ProtocolError("handshake not finished in time or cut short");
      return false;
    }
    Result<NbdOptionHeader> h = DecodeNbdOptionHeader(header);
    if (!h.ok()) {
      ProtocolError(h.status().message());
      return false;
    }
    data.resize(h->length);
    if (!data.empty() && ReadFull(data.data(), data.size(), deadline) != ReadResult::kOk) {
      ProtocolError("option data cut short");
      return false;
    }
    out.clear();
    const NbdNegotiator::Outcome outcome = negotiator->HandleOption(h->option, data, &out);
    if (!out.empty() && !SendAll(out)) return false;
    if (outcome == NbdNegotiator::Outcome::kTransmission) return true;
    if (outcome == NbdNegotiator::Outcome::kClose) return false;
  }
}

void NbdConnection::ServeRequests(const NbdNegotiator& negotiator) {
  NbdTransmissionState state;
  state.transmission_flags = negotiator.transmission_flags();
  state.structured_replies = negotiator.structured_replies();
  std::array<uint8_t, kNbdRequestBytes> header;
  while (true) {
    const ReadResult r = ReadFull(header.data(), header.size());
    if (r != ReadResult::kOk) {
      if (r == ReadResult::kError) ProtocolError("connection lost in the middle of a request header");
      return;
    }
    Result<NbdRequest> request = DecodeNbdRequest(header);
    if (!request.ok()) {
      ProtocolError(request.status().message());
      return;
    }
    if (request->type == kNbdCmdDisc) return;
    counters_->requests.fetch_add(1, std::memory_order_relaxed);
    state.size_bytes = device_->size_bytes();
    NbdCheck check = CheckNbdRequest(*request, state);
    const bool has_data = check.error == 0 && (request->type == kNbdCmdRead || request->type == kNbdCmdWrite);
    const uint64_t cost = has_data ? request->length : 0;
    if (!Admit(cost)) return;

    auto p = std::make_shared<Pending>();
    p->request = *request;
    p->cost_bytes = cost;
    if (has_data && request->length > 0) {
      // Bounded by CheckNbdRequest (kNbdMaxPayloadBytes) and by Admit.
      p->buffer.reset(new (std::nothrow) uint8_t[request->length]);
      if (!p->buffer) check = {kNbdEnomem, fmt::format("no memory for {} bytes", request->length)};
      p->iov = MakeIoVec(p->buffer.get(), request->length);
    }
    if (request->type == kNbdCmdWrite) {
      // The data follows the header whether or not the request is served.
      const bool read_ok =
          p->buffer ? ReadFull(p->buffer.get(), request->length) == ReadResult::kOk : Drain(request->length);
      if (!read_ok) {
        ProtocolError("connection lost in the middle of NBD_CMD_WRITE data");
        Release(cost);
        return;
      }
    }
    if (check.error != 0) {
      if (ClientLogLimiter().Allow()) spdlog::info("nbd client {}: refused: {}", id_, check.why);
      p->buffer.reset();
      p->refusal = std::move(check);
      OnDone(p, Status::InvalidArgument(p->refusal.why));
      continue;
    }
    StartIo(p);
  }
}

bool NbdConnection::Admit(uint64_t cost_bytes) {
  std::unique_lock<std::mutex> lock(mu_);
  cv_.wait(lock, [&] {
    return stop_reading_ || inflight_requests_ == 0 ||
           (inflight_requests_ < limits_.max_inflight_requests &&
            inflight_bytes_ + cost_bytes <= limits_.max_inflight_bytes);
  });
  if (stop_reading_) return false;
  ++inflight_requests_;
  inflight_bytes_ += cost_bytes;
  return true;
}

void NbdConnection::Release(uint64_t cost_bytes) {
  std::lock_guard<std::mutex> lock(mu_);
  --inflight_requests_;
  inflight_bytes_ -= cost_bytes;
  cv_.notify_all();
}

void NbdConnection::StartIo(const std::shared_ptr<Pending>& p) {
  const NbdRequest& r = p->request;
  BlockIo io;
  io.offset_bytes = r.offset;
  io.length_bytes = r.length;
  switch (r.type) {
    case kNbdCmdRead:
      io.kind = BlockIoKind::kRead;
      io.iov = IoVecs(&p->iov, 1);
      break;
    case kNbdCmdWrite:
      io.kind = BlockIoKind::kWrite;
      io.iov = IoVecs(&p->iov, 1);
      io.flush_after = r.flags & kNbdCmdFlagFua;
      break;
    case kNbdCmdFlush:
      io.kind = BlockIoKind::kFlush;
      io.offset_bytes = io.length_bytes = 0;
      break;
    case kNbdCmdTrim:
      io.kind = BlockIoKind::kDiscard;
      p->flush_pending = r.flags & kNbdCmdFlagFua;
      break;
    case kNbdCmdWriteZeroes:
      io.kind = BlockIoKind::kWriteZeroes;
      p->flush_pending = r.flags & kNbdCmdFlagFua;
      break;
    default:
      OnDone(p, Status::Internal(fmt::format("{} reached StartIo", NbdCommandName(r.type))));
      return;
  }
  // A zero-length transfer has nothing to do (the protocol leaves it
  // unspecified; devices need not accept it).
  if (r.length == 0 && io.kind != BlockIoKind::kFlush) {
    p->flush_pending = false;
    OnDone(p, Status::Ok());
    return;
  }
  device_->Submit(io, [this, p](Status s) { OnDone(p, std::move(s)); });
}

void NbdConnection::OnDone(const std::shared_ptr<Pending>& p, Status status) {
  const NbdRequest& r = p->request;
  if (status.ok() && p->flush_pending) {
    p->flush_pending = false;
    BlockIo flush;
    flush.kind = BlockIoKind::kFlush;
    device_->Submit(flush, [this, p](Status s) { OnDone(p, std::move(s)); });
    return;
  }
  uint32_t error = 0;
  if (!status.ok()) {
    error = p->refusal.error != 0 ? p->refusal.error : NbdErrorFromStatus(status);
    counters_->request_errors.fetch_add(1, std::memory_order_relaxed);
    if (p->refusal.error == 0 && ClientLogLimiter().Allow()) {
      spdlog::warn("nbd client {}: {} of [{}, +{}) failed: {}", id_, NbdCommandName(r.type), r.offset, r.length,
                   status.ToString());
    }
    p->buffer.reset();
  } else if (r.type == kNbdCmdRead) {
    counters_->bytes_read.fetch_add(r.length, std::memory_order_relaxed);
  } else if (r.type == kNbdCmdWrite) {
    counters_->bytes_written.fetch_add(r.length, std::memory_order_relaxed);
    p->buffer.reset();
  }

  if (structured_ && error != 0) {
    p->header = EncodeNbdStructuredError(r.handle, error, status.message());
  } else if (structured_ && r.type == kNbdCmdRead) {
    if (r.length == 0) {
      const auto done = EncodeNbdStructuredDone(r.handle);
      p->header.assign(done.begin(), done.end());
    } else {
      p->header = EncodeNbdReadChunkHeader(r.handle, r.offset, r.length);
      p->data_bytes = r.length;
    }
  } else {
    const auto simple = EncodeNbdSimpleReply(r.handle, error);
    p->header.assign(simple.begin(), simple.end());
    if (error == 0 && r.type == kNbdCmdRead) p->data_bytes = r.length;
  }
  QueueReply(p);
}

void NbdConnection::QueueReply(const std::shared_ptr<Pending>& p) {
  // Notify under the lock: once it is released the reader may destroy this
  // connection, and the completing thread must not touch it after that.
  std::lock_guard<std::mutex> lock(mu_);
  replies_.push_back(p);
  cv_.notify_all();
}

void NbdConnection::WriterLoop() {
  while (true) {
    std::shared_ptr<Pending> p;
    {
      std::unique_lock<std::mutex> lock(mu_);
      cv_.wait(lock, [&] { return !replies_.empty() || writer_exit_; });
      if (replies_.empty()) return;
      p = std::move(replies_.front());
      replies_.pop_front();
    }
    if (!send_failed_ &&
        !SendAll(p->header, std::span<const uint8_t>(p->buffer.get(), p->buffer ? p->data_bytes : 0))) {
      // The client is gone: drop the remaining replies and stop the reader.
      send_failed_ = true;
      Shutdown();
    }
    const uint64_t cost = p->cost_bytes;
    p.reset();
    Release(cost);
  }
}

NbdConnection::ReadResult NbdConnection::ReadFull(void* buf, size_t length,
                                                  std::chrono::steady_clock::time_point deadline) {
  auto* at = static_cast<uint8_t*>(buf);
  size_t done = 0;
  while (done < length) {
    if (deadline != std::chrono::steady_clock::time_point{}) {
      const auto left =
          std::chrono::duration_cast<std::chrono::milliseconds>(deadline - std::chrono::steady_clock::now());
      if (left.count() <= 0) return ReadResult::kError;
      pollfd pfd{fd_, POLLIN, 0};
      const int n = ::poll(&pfd, 1, static_cast<int>(std::min<int64_t>(left.count(), 1 << 30)));
      if (n < 0 && errno == EINTR) continue;
      if (n <= 0) return ReadResult::kError;
    }
    const ssize_t n = ::recv(fd_, at + done, length - done, 0);
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) return ReadResult::kError;
    if (n == 0) return done == 0 ? ReadResult::kEof : ReadResult::kError;
    done += static_cast<size_t>(n);
  }
  return ReadResult::kOk;
}

bool NbdConnection::Drain(uint64_t length) {
  std::vector<uint8_t> scratch(std::min<uint64_t>(length, kDrainChunkBytes));
  while (length > 0) {
    const size_t n = std::min<uint64_t>(length, scratch.size());
    if (ReadFull(scratch.data(), n) != ReadResult::kOk) return false;
    length -= n;
  }
  return true;
}

bool NbdConnection::SendAll(std::span<const uint8_t> a, std::span<const uint8_t> b) {
  iovec iov[2] = {MakeIoVec(a.data(), a.size()), MakeIoVec(b.data(), b.size())};
  size_t first = 0;
  while (first < 2) {
    if (iov[first].iov_len == 0) {
      ++first;
      continue;
    }
    msghdr msg{};
    msg.msg_iov = &iov[first];
    msg.msg_iovlen = 2 - first;
    const ssize_t n = ::sendmsg(fd_, &msg, MSG_NOSIGNAL);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) return false;
    size_t left = static_cast<size_t>(n);
    while (left > 0 && first < 2) {
      const size_t step = std::min(left, iov[first].iov_len);
      iov[first].iov_base = static_cast<uint8_t*>(iov[first].iov_base) + step;
      iov[first].iov_len -= step;
      left -= step;
      if (iov[first].iov_len == 0) ++first;
    }
  }
  return true;
}

}  // namespace cowtap::backend
