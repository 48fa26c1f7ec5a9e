// ControlServer: cowtapd's control socket. Listens on a Unix stream socket
// (mode 0600: only root, and the daemon's own user, may talk to it; peers
// are checked again with SO_PEERCRED), reads newline-delimited JSON requests
// (control_protocol.h), turns each into a DaemonControl call and writes the
// reply back on the same connection.
//
// Design notes:
// - One thread of its own, poll() over the listening socket, a stop eventfd
//   and at most max_clients connections. Every socket is non-blocking, so no
//   client can stall the thread on a read or a write; the daemon's I/O
//   threads never wait for it.
// - Requests are served one at a time, in arrival order per connection. A
//   slow DaemonControl call (attaching a big image, pausing a busy VBD)
//   delays other control clients, never guest I/O.
// - Per client: the input buffer holds at most one request
//   (kMaxControlRequestBytes); a longer line gets a too_large reply and the
//   connection is closed once that reply is written. Replies wait in an
//   output buffer bounded by max_output_bytes; a client that sends requests
//   but never reads its replies is dropped when the buffer would overflow.
// - Bad input (not JSON, wrong types, unknown command or VBD) gets an error
//   reply and the connection stays usable.
//
// Thread-safety: Start/Stop and the destructor are called from one thread
// (the daemon's main); the accessors are thread-safe.
#pragma once

#include <sys/types.h>

#include <atomic>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>
#include <thread>

#include "base/status.h"
#include "tools/daemon/control.h"

namespace cowtap::daemon {

struct ControlServerOptions {
  size_t max_clients = 32;
  // Bytes of replies queued for one client before it is dropped.
  size_t max_output_bytes = 8 * 1024 * 1024;
};

class ControlServer {
 public:
  // Creates the socket at socket_path (its parent directory too, mode 0755,
  // when that is missing), mode 0600, and starts serving. A stale socket
  // file (nobody listening) is replaced; a live one is kBusy; a path that is
  // not a socket is kInvalidArgument and left alone. control must outlive
  // the server.
  static Result<std::unique_ptr<ControlServer>> Start(DaemonControl& control, const std::string& socket_path);
  static Result<std::unique_ptr<ControlServer>> Start(DaemonControl& control, const std::string& socket_path,
                                                      const ControlServerOptions& options);

  ControlServer(const ControlServer&) = delete;
  ControlServer& operator=(const ControlServer&) = delete;
  // Stop().
  ~ControlServer();

  // Stops the thread, closes every connection (pending replies are dropped)
  // and removes the socket file if it is still the one this server created.
  // Idempotent; returns once no DaemonControl call is running.
  void Stop();

  const std::string& socket_path() const { return path_; }
  // Connections open now.
  size_t client_count() const { return clients_now_.load(std::memory_order_relaxed); }
  // Requests answered (well-formed or not) since Start.
  uint64_t requests_served() const { return requests_.load(std::memory_order_relaxed); }
  // Connections closed by the server: refused peers, too many clients,
  // oversize requests, clients that did not read their replies.
  uint64_t clients_dropped() const { return dropped_.load(std::memory_order_relaxed); }

 private:
  class Loop;

  ControlServer(DaemonControl& control, std::string path, const ControlServerOptions& options);
  Status Listen();
  void Run();

  DaemonControl& control_;
  const std::string path_;
  const ControlServerOptions options_;
  int listen_fd_ = -1;
  int stop_fd_ = -1;
  dev_t socket_dev_ = 0;
  ino_t socket_ino_ = 0;
  std::thread thread_;
  bool stopped_ = false;
  std::atomic<size_t> clients_now_{0};
  std::atomic<uint64_t> requests_{0};
  std::atomic<uint64_t> dropped_{0};
};

}  // namespace cowtap::daemon
