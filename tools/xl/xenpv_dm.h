// The pieces of cowtap-xenpv-dm, the stand-in device model that lets xl (Xen
// 4.17's libxl) hand a `backendtype=qdisk` disk of a PV guest to cowtapd.
//
// Why it exists: libxl 4.17 has no way to give a blkif disk to a user-space
// backend other than QEMU (backendtype=standalone is virtio-only, the vbd3
// "tap" backend arrived in 4.19). For backendtype=qdisk it writes
// /local/domain/0/backend/qdisk/<domid>/<devid> (params "qcow2:/path") and,
// for a PV guest, starts a device model: `device_model_override` names the
// program. libxl then waits for device-model/<domid>/state = "running" in
// xenstore and asks the model over QMP (query-chardev, query-vnc) before it
// unpauses the guest; it stops the model with a signal when the domain goes.
// cowtapd --backend-type qdisk serves the backend directory; this program
// checks that it did (every qdisk backend of the domain reached InitWait),
// says "running", answers libxl's QMP questions like a QEMU with no devices
// of its own, and exits on SIGHUP/SIGTERM or a QMP "quit".
//
// Thread-safety: ParseDmArgs and QmpSession are single-threaded values;
// QmpServer runs on the caller's thread.
#pragma once

#include <chrono>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "base/status.h"
#include "xen-glue/platform.h"

namespace cowtap::xl {

// What cowtap-xenpv-dm takes from the command line libxl builds for QEMU.
struct DmArgs {
  xen::DomId domid = 0;
  // QMP monitors: a Unix socket path to listen on, or (dm_restrict) a
  // listening socket libxl opened and passed as fd=N.
  struct Monitor {
    std::string path;
    int fd = -1;
  };
  std::vector<Monitor> monitors;
};

// Parses QEMU's argument list (without argv[0]). Needs -xen-domid; every
// `-chardev socket,...,path=P` or `...,fd=N` becomes a monitor; everything
// else is ignored. kInvalidArgument when -xen-domid is missing or not a
// domain id.
Result<DmArgs> ParseDmArgs(std::span<const std::string> args);

// One QMP connection's replies. Not a JSON-RPC engine: it answers what libxl
// asks a PV device model, and CommandNotFound for the rest.
class QmpSession {
 public:
  // The greeting QEMU sends first (one line, "\r\n"-terminated).
  static std::string Greeting();

  struct Reply {
    std::string text;   // "\r\n"-terminated JSON
    bool quit = false;  // the client asked the model to exit
  };
  // Answers one command line. A line that is not a JSON object with a
  // string "execute" gets a GenericError reply, never an exception.
  Reply Handle(std::string_view line);
};

// Serves QmpSessions on the monitors until stop_fd becomes readable or a
// client sends "quit". Lines longer than kMaxLineBytes close that client.
class QmpServer {
 public:
  static constexpr size_t kMaxLineBytes = 64 * 1024;
  static constexpr size_t kMaxClients = 16;

  // Listens on every monitor (a path is unlinked first, created 0600).
  static Result<QmpServer> Listen(const std::vector<DmArgs::Monitor>& monitors);
  QmpServer(QmpServer&& other) noexcept;
  QmpServer& operator=(QmpServer&&) = delete;
  ~QmpServer();

  // Returns OK when stopped (stop_fd readable or "quit"); an error if
  // poll() fails.
  Status Run(int stop_fd);

 private:
  QmpServer() = default;
  std::vector<int> listen_fds_;
  std::vector<std::string> paths_;
};

// The qdisk backend directories libxl wrote for `domid` under backend
// domain `self`: waits until each has state >= 2 (InitWait: a backend picked
// it up). kNotFound when there are none (nothing for cowtap to serve: wrong
// backendtype?), kBusy naming the first directory still below InitWait after
// `timeout` ("is cowtapd running with --backend-type qdisk?").
Status WaitForQdiskBackends(xen::XenStore& store, xen::DomId self, xen::DomId domid, std::chrono::milliseconds timeout);

// Writes device-model/<domid>/state = "running" under /local/domain/<self>,
// which libxl waits for.
Status MarkRunning(xen::XenStore& store, xen::DomId self, xen::DomId domid);

}  // namespace cowtap::xl
