// NbdServer: exports one BlockDevice over the NBD protocol (newstyle fixed
// handshake, simple and structured replies) on a Unix socket or a loopback
// TCP port, so that dom0 tools (qemu-img, qemu-io, nbdinfo, nbdcopy, fio,
// pygrub) and the kernel's nbd client can use a disk cowtap serves.
//
// Shape: one accept thread; per client connection a reader thread (handshake,
// then request headers and WRITE data) and a writer thread (replies). The
// reader checks each request (nbd_protocol.h), starts it with
// BlockDevice::Submit and goes on reading, so several requests are in flight
// per connection; completions (on any thread) only queue the reply, and the
// writer sends replies one at a time, so a slow or stalled client blocks only
// its own connection. In-flight requests per connection are bounded in count
// and bytes (a request waits to be read until earlier replies have gone).
//
// Security: NBD has no authentication. The Unix socket is created mode 0600
// (bound with no access, then listened on); TCP is refused on anything but a
// loopback address. A client that breaks the protocol (bad magic, oversized
// option, unknown client flags, stalls in the handshake) is disconnected; a
// well-formed request the export cannot serve gets an NBD error.
//
// Thread-safety: Start, address, stats are thread-safe; Stop may be called
// from any thread except the device's completion callbacks.
#pragma once

#include <atomic>
#include <chrono>
#include <cstdint>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "backend/block_device.h"
#include "base/status.h"

namespace cowtap::backend {

class NbdConnection;

struct NbdServerOptions {
  // "unix:/path/to/socket" or "tcp:127.0.0.1:PORT" (port 0 picks a free one;
  // the host must be a loopback IPv4 address).
  std::string address;
  // The export's name; clients asking for "" (the default export) get it too.
  std::string export_name;
  std::string description;
  // Serve read-only even if the device is writable.
  bool read_only = false;
  // Connections served at once; more are accepted and closed at once.
  size_t max_clients = 16;
  // Per connection: requests and READ/WRITE bytes in flight (admitted and
  // not yet answered). One request is always admitted when none is in flight.
  // Data buffers are at most max_clients x max_inflight_bytes in all (512 MiB
  // with the defaults, reached only if every client keeps 32 MiB in flight).
  uint32_t max_inflight_requests = 32;
  uint64_t max_inflight_bytes = 32u << 20;
  // A client must finish the handshake within this time.
  std::chrono::milliseconds handshake_timeout{10000};
  // Advertise NBD_FLAG_CAN_MULTI_CONN: safe when a flush of the device makes
  // every completed write durable whoever issued it (true of every cowtap
  // device: one Image, one Flush).
  bool multi_conn = true;
};

struct NbdServerStats {
  uint64_t connections_accepted = 0;
  uint64_t connections_refused = 0;  // over max_clients
  uint64_t protocol_errors = 0;      // clients disconnected for breaking the protocol
  uint64_t requests = 0;
  uint64_t request_errors = 0;  // requests answered with an NBD error
  uint64_t bytes_read = 0;
  uint64_t bytes_written = 0;
};

// Counters shared by a server and its connections.
struct NbdCounters {
  std::atomic<uint64_t> connections_accepted{0};
  std::atomic<uint64_t> connections_refused{0};
  std::atomic<uint64_t> protocol_errors{0};
  std::atomic<uint64_t> requests{0};
  std::atomic<uint64_t> request_errors{0};
  std::atomic<uint64_t> bytes_read{0};
  std::atomic<uint64_t> bytes_written{0};
};

class NbdServer {
 public:
  // Binds and listens on options.address and starts accepting. Fails with
  // kInvalidArgument for a malformed or non-loopback address, kBusy if a
  // live server already listens on the Unix socket path (a stale socket file
  // is replaced), kIoError for socket errors.
  static Result<std::unique_ptr<NbdServer>> Start(std::shared_ptr<BlockDevice> device, const NbdServerOptions& options);
  ~NbdServer();  // Stop()
  NbdServer(const NbdServer&) = delete;
  NbdServer& operator=(const NbdServer&) = delete;

  // The address actually bound, in the options' syntax ("tcp:127.0.0.1:40123").
  const std::string& address() const { return address_; }
  // A URI for NBD clients (qemu, libnbd): nbd+unix:///NAME?socket=PATH or
  // nbd://127.0.0.1:PORT/NAME.
  std::string uri() const;

  // Stops accepting, stops reading requests, waits for in-flight requests
  // and sends their replies (a client that does not read them is cut off
  // after a short grace), closes every connection and removes the Unix
  // socket file. Idempotent.
  void Stop();

  NbdServerStats stats() const;
  // Connections currently open (for tests and status).
  size_t client_count() const;

 private:
  NbdServer(std::shared_ptr<BlockDevice> device, const NbdServerOptions& options, int listen_fd, int wake_fd,
            std::string address, std::string unix_path);
  void AcceptLoop();
  void ReapFinished();  // REQUIRES: mu_ held

  const std::shared_ptr<BlockDevice> device_;
  const NbdServerOptions options_;
  const int listen_fd_;
  const int wake_fd_;  // eventfd: Stop() and finished connections wake the accept loop
  const std::string address_;
  const std::string unix_path_;  // empty for TCP
  NbdCounters counters_;
  std::thread accept_thread_;
  std::atomic<bool> stopping_{false};
  std::mutex stop_mu_;  // serializes Stop()
  mutable std::mutex mu_;
  std::vector<std::unique_ptr<NbdConnection>> connections_;  // GUARDED_BY(mu_)
  bool stopped_ = false;                                     // GUARDED_BY(stop_mu_)
};

}  // namespace cowtap::backend
