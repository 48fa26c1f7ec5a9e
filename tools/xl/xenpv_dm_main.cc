// cowtap-xenpv-dm: named by `device_model_override` in an xl config so that
// libxl's device model for a PV guest's backendtype=qdisk disks is cowtapd
// (see tools/xl/xenpv_dm.h and docs/xl.md). libxl starts it with QEMU's
// arguments and its stdout/stderr in /var/log/xen/qemu-dm-<name>.log.
// Thin: arguments -> wait for the backends -> "running" -> QMP until told to
// stop. Exit 0 on SIGHUP/SIGTERM/SIGINT or QMP quit, 1 on any error.
#include <signal.h>
#include <sys/signalfd.h>
#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <vector>

#include "tools/xl/xenpv_dm.h"

namespace {

int Fail(const cowtap::Status& s) {
  std::fprintf(stderr, "cowtap-xenpv-dm: %s\n", s.ToString().c_str());
  return 1;
}

}  // namespace

int main(int argc, char** argv) {
  using namespace cowtap;
  std::vector<std::string> args(argv + 1, argv + argc);
  Result<xl::DmArgs> parsed = xl::ParseDmArgs(args);
  if (!parsed.ok()) return Fail(parsed.status());

  // Signals first, so libxl's SIGHUP is never lost between "running" and
  // the QMP loop.
  sigset_t mask;
  sigemptyset(&mask);
  for (int sig : {SIGHUP, SIGTERM, SIGINT}) sigaddset(&mask, sig);
  sigprocmask(SIG_BLOCK, &mask, nullptr);
  int stop_fd = signalfd(-1, &mask, SFD_CLOEXEC);
  if (stop_fd < 0) return Fail(Status::FromErrno(errno, "signalfd"));

  Result<std::unique_ptr<xen::XenPlatform>> platform = xen::NewLibxenPlatform();
  if (!platform.ok()) return Fail(platform.status());
  Result<std::unique_ptr<xen::XenStore>> store = (*platform)->OpenXenStore();
  if (!store.ok()) return Fail(store.status());
  const xen::DomId self = (*platform)->self_domid();

  int wait_seconds = 20;
  if (const char* env = std::getenv("COWTAP_DM_WAIT_SECONDS")) wait_seconds = std::atoi(env);
  Status s = xl::WaitForQdiskBackends(**store, self, parsed->domid, std::chrono::seconds(wait_seconds));
  if (!s.ok()) return Fail(s);
  Result<xl::QmpServer> server = xl::QmpServer::Listen(parsed->monitors);
  if (!server.ok()) return Fail(server.status());
  s = xl::MarkRunning(**store, self, parsed->domid);
  if (!s.ok()) return Fail(s);
  std::fprintf(stderr, "cowtap-xenpv-dm: domain %u: qdisk backends served by cowtapd; device model running\n",
               parsed->domid);
  s = server->Run(stop_fd);
  if (!s.ok()) return Fail(s);
  std::fprintf(stderr, "cowtap-xenpv-dm: domain %u: stopping\n", parsed->domid);
  return 0;
}
