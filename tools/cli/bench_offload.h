// `cowtap bench --offload`: the rows of issue 6 — reads of allocated data
// through the kernel offload's dm device (every cluster linear after
// priming), through the same image's NBD miss device alone (cowtapd's user
// space path), and through a loop device of a raw file with the same data,
// each driven with io_uring (the raw peer's runner) in the same run; dm
// and loop-raw run twice, in both orders, and keep their better run. Needs
// the kernel's device-mapper, loop and nbd and root: run inside the VM of
// tests/vm/run.sh; elsewhere it fails with what is missing.
//
// Thread-safety: one run at a time (it measures the whole process).
#pragma once

#include <cstdint>
#include <cstdio>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "base/status.h"
#include "tools/cli/bench_types.h"

namespace cowtap::cli::bench {

struct OffloadBenchOptions {
  uint64_t size_bytes = 64ull << 20;
  double seconds_per_device = 3;
  std::string dir;  // empty: a new directory under $TMPDIR or /var/tmp
  bool keep = false;
  bool direct_io = true;
};

// The devices a row runs on, in this order.
enum class OffloadDevice : uint8_t { kDm, kNbd, kLoopRaw };
inline constexpr OffloadDevice kOffloadDevices[] = {OffloadDevice::kDm, OffloadDevice::kNbd, OffloadDevice::kLoopRaw};
std::string_view OffloadDeviceName(OffloadDevice device);  // "dm", "nbd-only", "loop-raw"

struct OffloadRowResult {
  std::string name, title;
  std::vector<PeerResult> devices;  // in kOffloadDevices order
  // Requests the miss path (user space) served while the dm device ran the
  // row: 0 when the kernel served it alone.
  uint64_t dm_miss_requests = 0;
  // dm IOPS / loop-raw IOPS and nbd / loop-raw (0 when either did not run).
  double dm_vs_loop = 0, nbd_vs_loop = 0;
};

struct OffloadBenchReport {
  std::string dir;
  uint64_t size_bytes = 0;
  std::string dm_device, nbd_device, loop_device;
  uint64_t linear_sectors = 0, size_sectors = 0, segments = 0;
  std::vector<OffloadRowResult> rows;
  double total_s = 0;
};

// dm within this fraction of the loop device passes the target.
inline constexpr double kOffloadTargetRatio = 0.90;

Result<OffloadBenchReport> RunOffloadBench(const OffloadBenchOptions& options, std::FILE* progress);
std::string FormatOffloadTable(const OffloadBenchReport& report);
nlohmann::ordered_json OffloadToJson(const OffloadBenchReport& report);

}  // namespace cowtap::cli::bench
