// NbdConnection: one NBD client of an NbdServer (nbd_server.h), from the
// handshake to the close of its socket. Internal to the server; a separate
// file so each stays readable.
//
// Threads: the reader thread (started by Start) runs the handshake, then
// reads request headers and WRITE data, checks each request and starts it
// on the device; the writer thread sends replies in the order completions
// queued them. In-flight requests (admitted, not yet answered on the wire)
// are bounded in count and bytes, so a client that does not read its
// replies stops having its requests read. When the reader stops (NBD_CMD_DISC,
// EOF, a protocol error, Shutdown), it waits for every in-flight request to
// complete and be answered, joins the writer, closes the socket and calls
// on_finished.
//
// Thread-safety: Shutdown, Abort, finished and WaitFinished may be called
// from any thread; the destructor REQUIRES the connection to have finished
// (or never started) and joins its thread.
#pragma once

#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <deque>
#include <functional>
#include <memory>
#include <mutex>
#include <span>
#include <string>
#include <thread>

#include "backend/block_device.h"
#include "backend/nbd_protocol.h"
#include "backend/nbd_server.h"

namespace cowtap::backend {

class NbdConnection {
 public:
  struct Limits {
    uint32_t max_inflight_requests = 32;
    uint64_t max_inflight_bytes = 32u << 20;
    std::chrono::milliseconds handshake_timeout{10000};
  };

  // Takes ownership of fd (a connected stream socket).
  NbdConnection(uint64_t id, int fd, std::shared_ptr<BlockDevice> device, NbdExportInfo info, Limits limits,
                NbdCounters* counters, std::function<void()> on_finished);
  ~NbdConnection();
  NbdConnection(const NbdConnection&) = delete;
  NbdConnection& operator=(const NbdConnection&) = delete;

  void Start();
  // Stops reading requests; those in flight complete and are answered.
  void Shutdown();
  // Cuts the socket both ways: unblocks a writer stuck on a client that
  // does not read. In-flight device I/O still completes before the close.
  void Abort();
  bool finished() const;
  // Waits until finished or the deadline; returns finished().
  bool WaitFinished(std::chrono::steady_clock::time_point deadline);

 private:
  struct Pending;
  enum class ReadResult { kOk, kEof, kError };

  void Run();
  bool Handshake(NbdNegotiator* negotiator);
  void ServeRequests(const NbdNegotiator& negotiator);
  bool Admit(uint64_t cost_bytes);
  void StartIo(const std::shared_ptr<Pending>& p);
  void OnDone(const std::shared_ptr<Pending>& p, Status status);
  void QueueReply(const std::shared_ptr<Pending>& p);
  void Release(uint64_t cost_bytes);
  void WriterLoop();

  // Socket helpers. With a deadline, a read that does not finish in time fails.
  ReadResult ReadFull(void* buf, size_t length, std::chrono::steady_clock::time_point deadline);
  ReadResult ReadFull(void* buf, size_t length) { return ReadFull(buf, length, {}); }
  bool Drain(uint64_t length);
  bool SendAll(std::span<const uint8_t> a, std::span<const uint8_t> b = {});
  void ShutdownSocket(int how);
  void ProtocolError(const std::string& what);

  const uint64_t id_;
  const int fd_;
  const std::shared_ptr<BlockDevice> device_;
  const NbdExportInfo info_;
  const Limits limits_;
  NbdCounters* const counters_;
  const std::function<void()> on_finished_;
  bool structured_ = false;  // set by the reader before the writer starts

  std::mutex fd_mu_;
  bool fd_closed_ = false;  // GUARDED_BY(fd_mu_)

  mutable std::mutex mu_;
  std::condition_variable cv_;
  uint32_t inflight_requests_ = 0;                // GUARDED_BY(mu_)
  uint64_t inflight_bytes_ = 0;                   // GUARDED_BY(mu_)
  std::deque<std::shared_ptr<Pending>> replies_;  // GUARDED_BY(mu_)
  bool stop_reading_ = false;                     // GUARDED_BY(mu_)
  bool writer_exit_ = false;                      // GUARDED_BY(mu_)
  bool finished_ = false;                         // GUARDED_BY(mu_)
  bool send_failed_ = false;                      // writer thread only

  std::thread thread_;
  std::thread writer_;
};

}  // namespace cowtap::backend
