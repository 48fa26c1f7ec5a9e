// The in-process peers of `cowtap bench`: cowtap's engine alone (a
// BlockDevice over the image, requests through BlockDevice::Submit, no ring),
// a raw file driven with liburing directly, and `qemu-img bench` run as a
// child process. Each replays a row's Workload and returns what it measured;
// a failure to set up is a Status, requests that fail are counted in
// PeerResult::errors. The ring peer (a guest process) is in bench_ring.h.
//
// Thread-safety: run one peer at a time (they measure the whole process).
#pragma once

#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "base/status.h"
#include "cow/image.h"
#include "tools/cli/bench_types.h"

namespace cowtap::cli::bench {

struct EngineRunOptions {
  bool direct_io = true;
  uint64_t remap_cache_entries = cow::OpenOptions{}.remap_cache_entries;
};

// Opens image_path (read-only when the workload only reads) with its chain
// and replays the workload through an ImageBlockDevice, keeping up to
// queue_depth requests submitted (Plug/Unplug around each batch, as the ring
// server does). Reports the top layer's remap-cache hit rate and probe length
// over the run.
Result<PeerResult> RunEnginePeer(const Workload& workload, const std::string& image_path,
                                 const EngineRunOptions& options);

// Replays the workload on a raw file with io_uring (O_DIRECT when direct_io),
// queue_depth requests in flight; the final flush is an fdatasync. Fails if
// io_uring cannot be set up (no fallback: this peer IS io_uring).
Result<PeerResult> RunRawPeer(const Workload& workload, const std::string& raw_path, bool direct_io);

// The qemu-img bench command line for a row: -f qcow2 -c ops -d depth -s
// block [-w] -t none|writeback -i io_uring|threads [--flush-interval=ops].
// qemu-img bench is always sequential (step = block size). Empty when the
// row cannot be expressed (see RowSpec::qemu_unsupported).
std::vector<std::string> QemuBenchArgs(const std::string& qemu_img, const RowSpec& row, const std::string& image_path,
                                       bool direct_io);

// The seconds from qemu-img bench's "Run completed in X seconds." line.
std::optional<double> ParseQemuBenchSeconds(std::string_view output);

// The qemu-img executable: $COWTAP_QEMU_IMG if set (empty: none), else the
// first "qemu-img" on PATH; nullopt if there is none.
std::optional<std::string> FindQemuImg();

// Runs args (a QemuBenchArgs line) as a child process; the CPU time and
// peak RSS are the child's own (wait4).
Result<PeerResult> RunQemuPeer(const RowSpec& row, const std::vector<std::string>& args);

// The remap cache alone at the default capacity and load factor, filled
// with dense cluster numbers: ns per hit and miss lookup, probe lengths,
// memory. lookups: how many of each to time.
RemapMicro MeasureRemapCache(uint64_t entries, uint64_t lookups);

}  // namespace cowtap::cli::bench
