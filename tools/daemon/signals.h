// Process plumbing for cowtapd's main: termination signals delivered
// synchronously (blocked in every thread, taken with sigwait on the main
// thread, so no handler runs in the middle of I/O) and systemd readiness
// (sd_notify, a no-op when NOTIFY_SOCKET is unset).
//
// Thread-safety: BlockTerminationSignals before any thread starts; the rest
// from the main thread.
#pragma once

#include <string>

namespace cowtap::daemon {

// Blocks SIGTERM, SIGINT and SIGHUP in the calling thread (threads created
// afterwards inherit the mask) and ignores SIGPIPE (a control client that
// goes away must not kill the daemon).
void BlockTerminationSignals();
// Waits for SIGTERM or SIGINT (SIGHUP is taken and ignored) and returns it.
int WaitForTerminationSignal();
// sd_notify(0, state); false if systemd was asked and refused.
bool NotifySystemd(const std::string& state);

}  // namespace cowtap::daemon
