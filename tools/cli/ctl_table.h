// What `cowtap ctl` prints: the VBD table of `list`, one VBD's figures for
// `stats ID`, and the per-interval rates `stats --watch` redraws (from the
// difference of two snapshots: ops/s, MiB/s, latency percentiles from the
// histogram's delta, queue depth, remap-cache hit rate, fast-path share).
// Pure functions of their inputs; thread-safe.
#pragma once

#include <cstdint>
#include <nlohmann/json.hpp>
#include <optional>
#include <span>
#include <string>
#include <vector>

#include "tools/daemon/control.h"

namespace cowtap::cli {

// One row of the watch table: what happened between two snapshots.
struct VbdRates {
  std::string id;
  std::string state;     // "paused" when paused
  double ops_per_s = 0;  // reads + writes + flushes + discards
  double read_mib_per_s = 0;
  double write_mib_per_s = 0;
  std::optional<double> p50_us, p99_us;  // none without completed requests
  uint32_t queue_depth = 0;              // in flight at the second snapshot
  std::optional<double> hit_rate;        // remap hits / lookups, 0..1
  std::optional<double> fast_path;       // fast / (fast + slow), 0..1
  uint64_t errors = 0;                   // new errors
};

// The latency below which `fraction` (0..1) of the histogram's requests
// completed, in microseconds. Bucket i counts requests faster than 2^i us
// (and, for i > 0, not faster than 2^(i-1) us); the value is interpolated
// linearly inside the bucket, and the last bucket, open-ended, reports its
// lower bound. nullopt for an empty histogram.
std::optional<double> HistogramPercentileUs(std::span<const uint64_t> counts, double fraction);

// Rates between before and after, seconds apart. before == nullptr (a VBD
// that appeared within the interval) counts from zero; a counter that went
// backwards (the VBD was detached and attached again) counts from zero too.
VbdRates ComputeRates(const daemon::VbdStatsSnapshot* before, const daemon::VbdStatsSnapshot& after, double seconds);

// "850us", "1.25ms", "2.50s"; "-" for nullopt.
std::string FormatLatencyUs(std::optional<double> us);

// `list`: ID, FORMAT, STATE, OPS, READ, WRITTEN (MiB), HIT%, IMAGE; one line
// per VBD under a header, or a sentence when there are none.
std::string FormatVbdTable(const std::vector<daemon::VbdStatsSnapshot>& vbds);
// `stats ID`: every figure of one VBD, one "key: value" per line.
std::string FormatVbdDetails(const daemon::VbdStatsSnapshot& s);
// `stats --watch`: ID, STATE, OPS/s, READ MiB/s, WRITE MiB/s, P50, P99, QD,
// HIT%, FAST%, ERR.
std::string FormatRatesTable(const std::vector<VbdRates>& rows);
// The same rows for --json --watch.
nlohmann::ordered_json RatesToJson(const std::vector<VbdRates>& rows);

}  // namespace cowtap::cli
