// DaemonControl: what the control socket (control_server.h) can ask of the
// running daemon. The daemon (daemon.h) implements it; the control server
// turns JSON messages into these calls and their results into JSON replies.
// Kept as an interface so the server is tested against a fake.
//
// Naming: a VBD is identified as "<domid>/<devid>" (e.g. "5/51712"), the way
// xenstore names its backend directory.
//
// Thread-safety: implementations are thread-safe; the control server may
// call from its own thread while the daemon serves I/O.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "base/status.h"

namespace cowtap::daemon {

// A VBD for the toolstack to create (on the simulated platform the daemon
// plays the toolstack and writes the xenstore directories itself; on real
// Xen, libxl/xl does, and attach is refused with kUnimplemented).
struct AttachSpec {
  uint32_t domid = 0;
  uint32_t devid = 51712;  // xvda
  std::string image;       // path of the top image
  std::string format;      // "qcow2", "qcow", "raw" or "" (probe)
  bool writable = true;
};

// Per-VBD figures. Counters are totals since attach.
struct VbdStatsSnapshot {
  std::string id;      // "<domid>/<devid>"
  std::string image;   // top image path
  std::string format;  // qcow2 | qcow | raw
  std::string state;   // xenbus state name, or "paused"
  bool paused = false;
  uint64_t reads = 0, writes = 0, flushes = 0, discards = 0, errors = 0;
  uint64_t bytes_read = 0, bytes_written = 0;
  uint32_t queues = 0, queue_depth = 0;  // queue_depth: requests in flight now
  // Latency histogram: counts of requests whose service time was below
  // 2^i microseconds (i = 0..latency_us_log2.size()-1; the last bucket is
  // open-ended).
  std::vector<uint64_t> latency_us_log2;
  uint64_t remap_lookups = 0, remap_hits = 0;
  double remap_mean_probe = 0;
  uint64_t fast_path_ios = 0, slow_path_ios = 0, allocations = 0;
  uint64_t memory_bytes = 0;  // caches and mapped pages this VBD holds
  // Faults the guest cannot see: guest pages whose unmap failed (kept
  // mapped, never reused) and event-channel kicks that failed (retried).
  uint64_t leaked_pages = 0, notify_failures = 0;
};

// One image's kernel offload (dm/): the guest's disk is the dm device
// (`phy:/dev/mapper/<dm_name>` in the xl disk line, served by blkback);
// clusters the image owns in place go to the image file through a loop
// device, everything else to cowtapd over nbd (the miss device). Counters
// are totals since offload on.
struct OffloadSnapshot {
  std::string image;   // the image path as given to offload on
  std::string device;  // /dev/mapper/<dm_name>
  uint64_t size_sectors = 0;
  uint64_t segments = 0;        // of the live table
  uint64_t linear_sectors = 0;  // of the live table, served by the kernel alone
  uint64_t reloads = 0;
  uint64_t reload_time_us = 0;  // total time in table loads (suspend/resume)
  uint64_t revokes = 0;
  uint64_t primed_clusters = 0;
  // What the miss device (cowtapd, user space) served.
  uint64_t miss_requests = 0, miss_bytes_read = 0, miss_bytes_written = 0;
  // Discards and write-zeroes the miss path split by the table: zeroed in
  // the image file in place (linear clusters) or changed by the engine.
  uint64_t zeroes_in_place = 0, zeroes_to_engine = 0;
  // All I/O the dm device completed (its /sys/block/dm-N/stat), in 512-byte
  // sectors; device_io_known is false where the kernel does not say.
  bool device_io_known = false;
  uint64_t device_sectors_read = 0, device_sectors_written = 0;
};

// linear_sectors / size_sectors (0 for an empty device).
double OffloadLinearFraction(const OffloadSnapshot& s);
// The fraction of the dm device's bytes the kernel served without cowtapd:
// 1 - miss bytes / device bytes, clamped to [0, 1]; -1 when unknown (no
// device I/O yet, or device_io_known false).
double OffloadKernelFraction(const OffloadSnapshot& s);

class DaemonControl {
 public:
  virtual ~DaemonControl() = default;

  virtual std::vector<VbdStatsSnapshot> List() = 0;
  virtual Status Attach(const AttachSpec& spec) = 0;
  // Disconnects the guest cleanly (flush, close image, release grants).
  virtual Status Detach(const std::string& id) = 0;
  // Pause stops taking requests, waits for in-flight I/O, flushes; returns
  // when the image is consistent on disk (snapshot/migration point).
  virtual Status Pause(const std::string& id) = 0;
  virtual Status Resume(const std::string& id) = 0;
  virtual Result<VbdStatsSnapshot> Stats(const std::string& id) = 0;
  // "trace".."critical", "off"; kInvalidArgument for anything else.
  virtual Status SetLogLevel(const std::string& level) = 0;
  // Exports a VBD ("<domid>/<devid>") or an image path over NBD at
  // `address` ("unix:/path" or "tcp:127.0.0.1:port"); returns the address
  // actually bound (tcp port 0 picks a free port).
  virtual Result<std::string> Export(const std::string& what, const std::string& address, bool read_only) = 0;
  virtual Status Unexport(const std::string& address) = 0;
  // Kernel offload of an image path (not of a VBD cowtapd serves itself: in
  // offload mode the guest's disk is the dm device). kNotSupported, saying
  // what is missing, where the kernel lacks dm/loop/nbd; kBusy if already on.
  virtual Result<OffloadSnapshot> OffloadOn(const std::string& image) = 0;
  // Removes the dm device (REQUIRES: nothing uses it any more), stops the
  // miss path, flushes and closes the image.
  virtual Status OffloadOff(const std::string& image) = 0;
  // The offload of image, or of every image when image is "".
  virtual Result<std::vector<OffloadSnapshot>> OffloadStatus(const std::string& image) = 0;
};

}  // namespace cowtap::daemon
