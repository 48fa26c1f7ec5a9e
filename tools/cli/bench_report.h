// How `cowtap bench` presents what it measured: the one table (a block of
// peers per row), the JSON document (for comparing runs over time), and the
// issue-4 targets evaluated against the measured rows. Pure functions of a
// BenchReport; thread-safe.
//
// Ratios are THROUGHPUT ratios (the peer's MiB/s divided by the raw or qemu
// peer's MiB/s of the same row: above 1 is faster). A target stated in time
// ("<= 1.3x the raw row in time") is checked as raw MiB/s / peer MiB/s.
#pragma once

#include <nlohmann/json.hpp>
#include <optional>
#include <string>
#include <vector>

#include "tools/cli/bench_types.h"

namespace cowtap::cli::bench {

enum class TargetStatus : uint8_t { kPass, kMiss, kNotRun, kInfo };
std::string_view TargetStatusName(TargetStatus status);  // "PASS", "MISS", "NOT RUN", "INFO"

struct TargetCheck {
  std::string name;  // what the issue asks
  TargetStatus status = TargetStatus::kNotRun;
  double measured = 0;  // the ratio or value measured
  double limit = 0;     // the bound it is held to
  std::string detail;   // how measured, or why not run
};

// Throughput of `peer` divided by the throughput of `base` on the same row;
// nullopt when either did not run or base measured nothing.
std::optional<double> ThroughputRatio(const RowResult& row, Peer peer, Peer base);

// The issue-4 targets, in the order.
std::vector<TargetCheck> EvaluateTargets(const BenchReport& report);

// The table: a header saying what ran where, a block of peer lines per row,
// a legend, the remap-cache microbenchmark and the targets.
std::string FormatTable(const BenchReport& report);

// The same content as JSON: config, rows[].peers[], remap, targets.
nlohmann::ordered_json ToJson(const BenchReport& report);

// "12.3k", "1.25M", "950": a count in at most 5 characters.
std::string FormatCount(double value);

}  // namespace cowtap::cli::bench
