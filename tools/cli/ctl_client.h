// ControlClient: the `cowtap ctl` end of cowtapd's control socket. Connects
// to the Unix socket, sends one request line at a time and waits (bounded by
// a timeout) for its reply line (tools/daemon/control_protocol.h).
//
// Thread-safety: one thread at a time per client.
#pragma once

#include <chrono>
#include <memory>
#include <string>

#include "base/status.h"
#include "tools/daemon/control_protocol.h"

namespace cowtap::cli {

// $COWTAP_CONTROL_SOCKET when set and not empty, else /run/cowtap/cowtapd.sock.
std::string DefaultControlSocketPath();

class ControlClient {
 public:
  // Connects to the daemon at path. Fails with a message that says what to
  // do: kNotFound (no socket: is cowtapd running?), kIoError (nobody
  // listens: a stale socket), kInvalidArgument (path too long), and
  // permission errors (the socket is root-only).
  static Result<std::unique_ptr<ControlClient>> Connect(const std::string& path, std::chrono::milliseconds timeout);

  ControlClient(const ControlClient&) = delete;
  ControlClient& operator=(const ControlClient&) = delete;
  ~ControlClient();

  // Sends request and returns the daemon's reply, which may be a refusal
  // (ok == false, with code and message). Errors are transport failures: the
  // daemon closed the connection, did not answer within the timeout, or sent
  // something that is not a reply (or a line over kMaxControlReplyBytes).
  Result<daemon::ControlReply> Call(const daemon::ControlRequest& request);
  // Sends one raw line (a '\n' is added if missing) and returns the raw reply
  // line, without its '\n'. For --json output and tests.
  Result<std::string> CallRaw(std::string line);

  const std::string& path() const { return path_; }

 private:
  ControlClient(int fd, std::string path, std::chrono::milliseconds timeout)
      : fd_(fd), path_(std::move(path)), timeout_(timeout) {}
  Status SendAll(const std::string& line, std::chrono::steady_clock::time_point deadline);
  Result<std::string> ReadLine(std::chrono::steady_clock::time_point deadline);

  int fd_;
  const std::string path_;
  const std::chrono::milliseconds timeout_;
  std::string buffer_;  // bytes after the last reply line read
};

}  // namespace cowtap::cli
