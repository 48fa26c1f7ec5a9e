// DaemonRig: a cowtapd core (daemon::Daemon on the simulated platform) in
// the test process, a temp dir for its images and sockets, and helpers to
// make images, read xenstore and count this process's file descriptors.
// Guests run as cowtap_guest processes (tests/blkif/guest_process.h).
//
// Thread-safety: used from the test thread.
#pragma once

#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "base/status.h"
#include "tools/daemon/daemon.h"

namespace cowtap::daemon_test {

class DaemonRig {
 public:
  // A fresh temp dir and a Daemon serving backend type "cowtap" on a sim
  // socket inside it.
  static Result<std::unique_ptr<DaemonRig>> Create(daemon::DaemonOptions options = {});
  ~DaemonRig();

  daemon::Daemon& daemon() { return *daemon_; }
  xen::SimHypervisor& sim() { return *daemon_->sim(); }
  const std::string& dir() const { return dir_; }
  std::string socket() const { return dir_ + "/sim.sock"; }
  std::string Path(const std::string& name) const { return dir_ + "/" + name; }

  // An empty qcow2 base (once) and a qcow2 overlay `name` over it.
  Status MakeOverlay(const std::string& name, uint64_t size_bytes = 16 << 20);
  // Reads a key of the backend directory of (domid, devid) ("<absent>").
  std::string BackendKey(xen::DomId domid, uint32_t devid, const std::string& key);
  // cowtap_guest arguments for (domid, devid) plus extra.
  std::vector<std::string> GuestArgs(xen::DomId domid, uint32_t devid, std::vector<std::string> extra = {}) const;
  // Stops the daemon (as SIGTERM would).
  void Shutdown() { daemon_->Shutdown(); }

 private:
  DaemonRig() = default;
  std::string dir_;
  std::unique_ptr<daemon::Daemon> daemon_;
  std::unique_ptr<xen::XenStore> xs_;
  bool have_base_ = false;
};

// An attach of `image` as xvda of domid; format "" probes.
inline daemon::AttachSpec XvdaSpec(uint32_t domid, const std::string& image, const std::string& format = "") {
  daemon::AttachSpec s;
  s.domid = domid;
  s.image = image;
  s.format = format;
  return s;
}

// Open file descriptors of this process.
size_t OpenFdCount();
// This process's resident set, KiB.
size_t RssKib();
// Runs a shell command; exit code, stdout+stderr in *out.
int RunShell(const std::string& command, std::string* out = nullptr);
bool HaveQemuImg();
// Polls cond every 5 ms up to timeout.
bool WaitFor(const std::function<bool()>& cond, int timeout_ms = 5000);

}  // namespace cowtap::daemon_test
