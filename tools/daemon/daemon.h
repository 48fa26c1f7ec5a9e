// Daemon: cowtapd's core. Serves every VBD the toolstack creates under the
// backend types it owns (/local/domain/<self>/backend/<type>/<domid>/<devid>
// for each --backend-type), each as a ManagedVbd with its own image chain,
// device, rings and caches, and implements DaemonControl for the control
// socket.
//
// One watch thread follows xenstore (the backend directories, @releaseDomain,
// and a 1 s rescan as a safety net for coalesced events). For every directory
// it has not seen it starts a ManagedVbd (which opens and attaches on its own
// thread); it asks a VBD to detach when its directory is removed, when the
// backend's `online` is 0 and the VBD is Closed, or when its frontend domain
// died; it drops VBDs whose worker finished. A VBD that detached or failed is
// not started again until its directory goes away. The daemon's lock guards
// only the table of VBDs and is never held across I/O, opening or draining.
//
// Platforms: "sim" starts a SimHypervisor on sim_socket (guests are
// cowtap_guest processes) and Attach/Detach play the toolstack; "xen" uses
// libxen in dom0, where xl is the toolstack and Attach says so.
//
// Thread-safety: DaemonControl methods from any thread; Shutdown once.
#pragma once

#include <chrono>
#include <map>
#include <memory>
#include <mutex>
#include <set>
#include <string>
#include <thread>
#include <tuple>
#include <vector>

#include "backend/nbd_server.h"
#include "backend/vbd.h"
#include "cow/image.h"
#include "tools/daemon/control.h"
#include "tools/daemon/managed_vbd.h"
#include "tools/daemon/offload.h"
#include "tools/daemon/toolstack.h"
#include "xen-glue/platform.h"
#include "xen-glue/sim.h"

namespace cowtap::daemon {

struct DaemonOptions {
  std::string platform = "sim";  // "sim" | "xen"
  std::string sim_socket;        // sim: where guests connect
  std::vector<std::string> backend_types = {"cowtap"};
  // Defaults for every VBD (frontend_domid, devid and backend_type are set
  // per VBD).
  backend::VbdOptions vbd;
  cow::OpenOptions open;
  // How long Attach waits for the image to be opened and the VBD attached.
  std::chrono::milliseconds attach_timeout{30000};
  // Kernel offload (`cowtap ctl offload`); null: offload on is refused.
  std::shared_ptr<OffloadProvider> offload;
};

class Daemon final : public DaemonControl {
 public:
  // Opens the platform (starting the sim hypervisor for "sim"), watches the
  // backend directories and serves what is already there. kInvalidArgument
  // for a bad option, the platform's error otherwise (libxen outside dom0).
  static Result<std::unique_ptr<Daemon>> Start(const DaemonOptions& options);
  // Shutdown().
  ~Daemon() override;

  // Stops watching, then detaches every VBD in parallel (in-flight I/O
  // answered and flushed, images closed clean, grants and ports released)
  // and waits for them. Idempotent.
  void Shutdown();

  // The simulated hypervisor (platform "sim"), else null.
  xen::SimHypervisor* sim() { return sim_.get(); }
  xen::XenPlatform& platform() { return *platform_; }
  // VBDs holding resources: in the table (serving, opening, failed) or
  // still detaching (their image not closed yet).
  size_t vbd_count();

  // DaemonControl.
  std::vector<VbdStatsSnapshot> List() override;
  Status Attach(const AttachSpec& spec) override;
  Status Detach(const std::string& id) override;
  Status Pause(const std::string& id) override;
  Status Resume(const std::string& id) override;
  Result<VbdStatsSnapshot> Stats(const std::string& id) override;
  Status SetLogLevel(const std::string& level) override;
  Result<std::string> Export(const std::string& what, const std::string& address, bool read_only) override;
  Status Unexport(const std::string& address) override;
  Result<OffloadSnapshot> OffloadOn(const std::string& image) override;
  Status OffloadOff(const std::string& image) override;
  Result<std::vector<OffloadSnapshot>> OffloadStatus(const std::string& image) override;

 private:
  struct Key {
    std::string type;
    xen::DomId domid;
    uint32_t devid;
    std::string id() const { return std::to_string(domid) + "/" + std::to_string(devid); }
    bool operator<(const Key& o) const { return std::tie(type, domid, devid) < std::tie(o.type, o.domid, o.devid); }
  };
  struct Entry {
    Key key;
    std::shared_ptr<ManagedVbd> vbd;
    bool sim_owned = false;  // created by Attach: Detach/death also removes the directories
  };

  explicit Daemon(const DaemonOptions& options) : options_(options) {}
  Status Init();
  void WatchLoop();
  void Rescan();
  // The directories present now, per key.
  std::set<Key> ListDirectories();
  void StartVbd(const Key& key, bool sim_owned);
  std::shared_ptr<ManagedVbd> Find(const std::string& id);
  void Wake();

  const DaemonOptions options_;
  std::unique_ptr<xen::SimHypervisor> sim_;
  std::unique_ptr<xen::XenPlatform> platform_;
  std::unique_ptr<xen::XenStore> watch_store_;    // watch thread only
  std::unique_ptr<xen::XenStore> control_store_;  // under control_mu_
  std::mutex control_mu_;                         // serializes toolstack writes of Attach/Detach
  int wake_fd_ = -1;
  std::thread watcher_;
  bool shut_down_ = false;  // under mu_

  std::mutex mu_;
  std::map<Key, Entry> vbds_;  // GUARDED_BY(mu_)
  // Detached or failed for good: not restarted while the directory stays.
  std::set<Key> retired_;  // GUARDED_BY(mu_)
  // Directories Attach wrote (we are the toolstack for those).
  std::set<Key> sim_owned_;  // GUARDED_BY(mu_)
  // NBD exports by the address they are bound to; the image is ours when
  // an image path (not a VBD) was exported.
  struct ExportEntry {
    std::unique_ptr<backend::NbdServer> server;
    std::shared_ptr<cow::Image> image;
  };
  std::mutex exports_mu_;
  std::map<std::string, ExportEntry> exports_;  // GUARDED_BY(exports_mu_)
  // Offloads by the canonical path of their image (the path as given is
  // kept for replies). The daemon opened the image and closes it.
  struct OffloadEntry {
    std::string given_path;
    std::string dm_name;
    std::shared_ptr<cow::Image> image;
    std::unique_ptr<ImageOffload> offload;
  };
  Result<std::string> OffloadKey(const std::string& image);
  // Held across a whole OffloadOn (opening and priming), so two offloads of
  // one image cannot race; never taken with mu_ or exports_mu_ held.
  std::mutex offloads_mu_;
  std::map<std::string, OffloadEntry> offloads_;  // GUARDED_BY(offloads_mu_)
  // Entries out of the table whose worker is still finishing.
  std::vector<std::shared_ptr<ManagedVbd>> stopping_;  // GUARDED_BY(mu_)
  // Directories of sim-owned VBDs to remove once their worker has finished
  // (a worker that is still tearing down writes its last state there, which
  // would recreate a directory removed earlier).
  std::vector<std::pair<std::shared_ptr<ManagedVbd>, ToolstackDisk>> remove_when_stopped_;  // GUARDED_BY(mu_)
};

// Parses "<domid>/<devid>".
Result<std::pair<xen::DomId, uint32_t>> ParseVbdId(const std::string& id);

}  // namespace cowtap::daemon
