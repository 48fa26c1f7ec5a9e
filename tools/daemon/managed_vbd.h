// ManagedVbd: one VBD of the daemon, from the toolstack's directory to a
// closed image. Its own worker thread reads the directory (backend_params.h),
// opens the image chain (cow::OpenImage; the top writable unless mode "r"),
// wraps it in an ImageBlockDevice and attaches a backend::Vbd (which runs the
// xenbus handshake and the rings on threads of its own); then waits for
// RequestStop(), detaches (in-flight I/O answered, every grant and port
// released, state Closed) and closes the image clean (flushed, dirty bit
// cleared). A failure on the way (missing or corrupt image, bad keys) goes to
// <backend>/error and the log, the backend state goes Closing, and the VBD
// stays in phase kFailed until the daemon drops it.
//
// Opening a big image, draining a slow device and closing it all happen on
// the worker, so none of it holds up the daemon's watch thread or other VBDs.
//
// Thread-safety: every public method may be called from any thread.
#pragma once

#include <chrono>
#include <condition_variable>
#include <memory>
#include <mutex>
#include <string>
#include <thread>

#include "backend/block_device.h"
#include "backend/vbd.h"
#include "base/status.h"
#include "cow/image.h"
#include "tools/daemon/control.h"
#include "xen-glue/platform.h"

namespace cowtap::daemon {

struct ManagedVbdConfig {
  std::string id;            // "<domid>/<devid>"
  std::string backend_path;  // /local/domain/0/backend/<type>/<domid>/<devid>
  backend::VbdOptions vbd;   // frontend_domid, devid, backend_type, features
  cow::OpenOptions open;     // cache sizes etc.; read_only and format are set from the directory
};

class ManagedVbd {
 public:
  enum class Phase { kOpening, kServing, kStopping, kDone, kFailed };

  // Starts the worker. `platform` must outlive this object.
  ManagedVbd(xen::XenPlatform& platform, ManagedVbdConfig config);
  // RequestStop() and Join().
  ~ManagedVbd();
  ManagedVbd(const ManagedVbd&) = delete;
  ManagedVbd& operator=(const ManagedVbd&) = delete;

  const std::string& id() const { return config_.id; }
  const ManagedVbdConfig& config() const { return config_; }
  Phase phase() const;
  // kDone or kFailed: the worker has finished (Join() returns at once).
  bool finished() const;
  // Why the VBD failed (kFailed), else OK.
  Status error() const;
  // Waits until the phase is no longer kOpening (false on timeout).
  bool WaitOpened(std::chrono::milliseconds timeout);

  // Asks the worker to detach and close; returns at once.
  void RequestStop();
  // Waits for the worker to finish.
  void Join();

  // The Vbd's domain died (or never came); the daemon then detaches.
  bool domain_gone() const;
  backend::XenbusState vbd_state() const;

  // kNotFound unless serving. See backend::Vbd::Pause.
  Status Pause();
  Status Resume();
  VbdStatsSnapshot Snapshot() const;
  // The device the VBD serves (for an NBD export), or null unless serving.
  // After the VBD detaches, the image is closed and I/O through a device
  // still held fails.
  std::shared_ptr<backend::BlockDevice> device() const;

 private:
  void Run();
  Status Open();
  void Fail(const Status& why);
  std::shared_ptr<backend::Vbd> vbd() const;

  xen::XenPlatform& platform_;
  const ManagedVbdConfig config_;
  std::string tag_;  // "[vbd 5/51712]"

  mutable std::mutex mu_;
  std::condition_variable cv_;
  Phase phase_ = Phase::kOpening;                 // GUARDED_BY(mu_)
  bool stop_ = false;                             // GUARDED_BY(mu_)
  Status error_;                                  // GUARDED_BY(mu_)
  std::string image_path_, format_;               // GUARDED_BY(mu_)
  std::shared_ptr<cow::Image> image_;             // GUARDED_BY(mu_)
  std::shared_ptr<backend::BlockDevice> device_;  // GUARDED_BY(mu_)
  std::shared_ptr<backend::Vbd> vbd_;             // GUARDED_BY(mu_)
  VbdStatsSnapshot final_;                        // GUARDED_BY(mu_): figures at detach
  std::thread thread_;
};

// "Closed", "Connected", ... (io/xenbus.h names without the prefix).
const char* XenbusStateName(backend::XenbusState state);

}  // namespace cowtap::daemon
