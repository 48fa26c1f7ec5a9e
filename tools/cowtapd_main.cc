// cowtapd: the cowtap disk backend daemon. Serves every VBD the toolstack
// creates under its backend type(s), takes commands on a control socket
// (`cowtap ctl`), stops cleanly on SIGTERM. Thin: flags -> Daemon,
// ControlServer, InstanceLock (tools/daemon/).
#include <signal.h>

#include <CLI/CLI.hpp>
#include <cstdlib>
#include <filesystem>
#include <iostream>

#include "base/log.h"
#include "tools/daemon/control_server.h"
#include "tools/daemon/daemon.h"
#include "tools/daemon/instance_lock.h"
#include "tools/daemon/signals.h"
#include "tools/offload/kernel_offload.h"

namespace {

// "domid:devid:image[:format]".
cowtap::Result<cowtap::daemon::AttachSpec> ParseAttach(const std::string& text) {
  cowtap::daemon::AttachSpec spec;
  const size_t a = text.find(':');
  const size_t b = a == std::string::npos ? a : text.find(':', a + 1);
  if (b == std::string::npos) {
    return cowtap::Status::InvalidArgument("--attach \"" + text + "\" is not domid:devid:image[:format]");
  }
  auto id = cowtap::daemon::ParseVbdId(text.substr(0, a) + "/" + text.substr(a + 1, b - a - 1));
  if (!id.ok()) return id.status().Annotate("--attach " + text);
  spec.domid = id->first;
  spec.devid = id->second;
  spec.image = text.substr(b + 1);
  for (const char* f : {"qcow2", "qcow", "raw"}) {
    const std::string suffix = std::string(":") + f;
    if (spec.image.size() > suffix.size() && spec.image.ends_with(suffix)) {
      spec.format = f;
      spec.image.resize(spec.image.size() - suffix.size());
      break;
    }
  }
  return spec;
}

}  // namespace

int main(int argc, char** argv) {
  using namespace cowtap::daemon;
  DaemonOptions options;
  options.backend_types.clear();
  std::string log_level = "info";
  const char* env_socket = std::getenv("COWTAP_CONTROL_SOCKET");
  std::string control_socket = env_socket && *env_socket ? env_socket : "/run/cowtap/cowtapd.sock";
  std::vector<std::string> attach;
  uint32_t domain_wait_ms = 30000;
  std::string cache = "none";
  std::string offload_dir;
  uint32_t offload_reload_ms = 1000;
  CLI::App app{"cowtapd: Xen disk backend daemon serving qcow2/qcow/raw images with copy-on-write"};
  app.add_option("--platform", options.platform, "sim (simulated hypervisor) or xen (libxen, in dom0)")
      ->check(CLI::IsMember({"sim", "xen"}));
  app.add_option("--sim-socket", options.sim_socket, "sim: Unix socket the simulated guests connect to");
  app.add_option("--backend-type", options.backend_types,
                 "xenstore backend type to serve (repeatable): cowtap (default), qdisk, vbd");
  app.add_option("--control-socket", control_socket,
                 "control socket for `cowtap ctl` (env COWTAP_CONTROL_SOCKET; default /run/cowtap/cowtapd.sock)");
  app.add_option("--log-level", log_level, "trace, debug, info, warn, err, critical, off");
  app.add_option("--attach", attach, "sim: attach domid:devid:image[:format] at start (repeatable)");
  app.add_option("--max-queues", options.vbd.max_queues, "queues offered per VBD");
  app.add_option("--domain-wait-ms", domain_wait_ms, "how long a VBD waits for its guest domain to appear");
  app.add_option("--cache", cache,
                 "none (default): top images with O_DIRECT, backing files through the page cache (cached once for "
                 "all VBDs); writeback: everything through the page cache")
      ->check(CLI::IsMember({"none", "writeback"}));
  app.add_option("--offload-dir", offload_dir,
                 "kernel offload: where the miss path's NBD sockets live (default: the control socket's directory)");
  app.add_option("--offload-reload-ms", offload_reload_ms,
                 "kernel offload: how often an offloaded image's dm table is replanned (at most one reload each)")
      ->check(CLI::Range(50u, 60000u));
  CLI11_PARSE(app, argc, argv);
  options.open.direct_io = cache == "none";
  if (options.backend_types.empty()) options.backend_types = {"cowtap"};
  options.vbd.domain_wait = std::chrono::milliseconds(domain_wait_ms);
  {
    // `cowtap ctl offload on` is always offered; where the kernel lacks
    // device-mapper, loop or nbd, it answers what is missing.
    cowtap::offload::KernelOffloadOptions ko;
    ko.socket_dir = offload_dir.empty() ? std::filesystem::path(control_socket).parent_path().string() : offload_dir;
    if (ko.socket_dir.empty()) ko.socket_dir = ".";
    ko.reload_interval = std::chrono::milliseconds(offload_reload_ms);
    options.offload = std::make_shared<cowtap::offload::KernelOffloadProvider>(ko);
  }

  cowtap::InitLogging(log_level);
  BlockTerminationSignals();  // before any thread starts
  auto lock = InstanceLock::Acquire(control_socket);
  if (!lock.ok()) {
    std::cerr << "cowtapd: " << lock.status().ToString() << std::endl;
    return 1;
  }
  auto daemon = Daemon::Start(options);
  if (!daemon.ok()) {
    std::cerr << "cowtapd: " << daemon.status().ToString() << std::endl;
    return 1;
  }
  auto control = ControlServer::Start(**daemon, control_socket);
  if (!control.ok()) {
    std::cerr << "cowtapd: control socket " << control_socket << ": " << control.status().ToString() << std::endl;
    return 1;
  }
  for (const auto& a : attach) {
    auto spec = ParseAttach(a);
    cowtap::Status s = spec.ok() ? (*daemon)->Attach(*spec) : spec.status();
    if (!s.ok()) spdlog::error("--attach {}: {}", a, s.ToString());
  }
  NotifySystemd("READY=1\nSTATUS=serving");
  spdlog::info("cowtapd ready: control socket {}{}", control_socket,
               options.platform == "sim" ? ", sim socket " + options.sim_socket : "");
  const int sig = WaitForTerminationSignal();
  spdlog::info("cowtapd: {} received; stopping", sig == SIGTERM ? "SIGTERM" : "SIGINT");
  NotifySystemd("STOPPING=1");
  (*control)->Stop();
  (*daemon)->Shutdown();
  spdlog::info("cowtapd: stopped cleanly");
  return 0;
}
