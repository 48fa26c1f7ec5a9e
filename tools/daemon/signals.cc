#include "tools/daemon/signals.h"

#include <signal.h>
#include <spdlog/spdlog.h>
#include <systemd/sd-daemon.h>

#include <cstring>

namespace cowtap::daemon {

void BlockTerminationSignals() {
  sigset_t set;
  sigemptyset(&set);
  sigaddset(&set, SIGTERM);
  sigaddset(&set, SIGINT);
  sigaddset(&set, SIGHUP);
  pthread_sigmask(SIG_BLOCK, &set, nullptr);
  ::signal(SIGPIPE, SIG_IGN);
}

int WaitForTerminationSignal() {
  sigset_t set;
  sigemptyset(&set);
  sigaddset(&set, SIGTERM);
  sigaddset(&set, SIGINT);
  sigaddset(&set, SIGHUP);
  while (true) {
    int sig = 0;
    if (sigwait(&set, &sig) != 0) continue;
    if (sig == SIGHUP) {
      spdlog::info("SIGHUP ignored (send SIGTERM to stop cowtapd)");
      continue;
    }
    return sig;
  }
}

bool NotifySystemd(const std::string& state) {
  const int r = sd_notify(0, state.c_str());
  if (r < 0) {
    spdlog::warn("sd_notify(\"{}\") failed: {}", state, std::strerror(-r));
    return false;
  }
  return true;
}

}  // namespace cowtap::daemon
