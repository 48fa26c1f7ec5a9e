#include "tools/cli/ctl_table.h"

#include <fmt/format.h>

#include <algorithm>
#include <cmath>

namespace cowtap::cli {
namespace {

constexpr double kMiB = 1024.0 * 1024.0;

// A text table: a header row and data rows; columns listed in right_aligned
// (numbers) are right-aligned, the others left-aligned; the last column is
// not padded.
class Table {
 public:
  Table(std::vector<std::string> header, std::vector<bool> right_aligned) : right_(std::move(right_aligned)) {
    rows_.push_back(std::move(header));
  }
  void Add(std::vector<std::string> row) { rows_.push_back(std::move(row)); }

  std::string Render() const {
    std::vector<size_t> width(rows_[0].size(), 0);
    for (const auto& row : rows_)
      for (size_t i = 0; i < row.size() && i < width.size(); ++i) width[i] = std::max(width[i], row[i].size());
    std::string out;
    for (const auto& row : rows_) {
      std::string line;
      for (size_t i = 0; i < row.size() && i < width.size(); ++i) {
        if (i) line += "  ";
        const bool last = i + 1 == row.size();
        if (right_[i]) {
          line += fmt::format("{:>{}}", row[i], width[i]);
        } else {
          line += last ? row[i] : fmt::format("{:<{}}", row[i], width[i]);
        }
      }
      out += line + "\n";
    }
    return out;
  }

 private:
  std::vector<bool> right_;
  std::vector<std::vector<std::string>> rows_;
};

uint64_t Delta(uint64_t before, uint64_t after) { return after >= before ? after - before : after; }

std::string Percent(std::optional<double> fraction) {
  if (!fraction) return "-";
  return fmt::format("{:.1f}", *fraction * 100.0);
}

// "97.9%", or "n/a" when nothing was counted.
std::string PercentText(std::optional<double> fraction) { return fraction ? Percent(fraction) + "%" : "n/a"; }

std::optional<double> Ratio(uint64_t part, uint64_t whole) {
  if (whole == 0) return std::nullopt;
  return static_cast<double>(part) / static_cast<double>(whole);
}

std::string StateOf(const daemon::VbdStatsSnapshot& s) { return s.paused ? "paused" : s.state; }

uint64_t Ops(const daemon::VbdStatsSnapshot& s) { return s.reads + s.writes + s.flushes + s.discards; }

std::string Mib(uint64_t bytes) { return fmt::format("{:.1f}", static_cast<double>(bytes) / kMiB); }

}  // namespace

std::optional<double> HistogramPercentileUs(std::span<const uint64_t> counts, double fraction) {
  // Summed in long double: counts are 64-bit and may be huge.
  long double total = 0;
  for (uint64_t c : counts) total += c;
  if (total == 0) return std::nullopt;
  fraction = std::clamp(fraction, 0.0, 1.0);
  const long double target = std::max<long double>(1, std::ceil(total * fraction));
  long double seen = 0;
  for (size_t i = 0; i < counts.size(); ++i) {
    if (counts[i] == 0) continue;
    const double lo = i == 0 ? 0.0 : std::ldexp(1.0, static_cast<int>(i) - 1);
    if (seen + counts[i] >= target) {
      if (i + 1 == counts.size()) return lo;  // open-ended
      const double hi = std::ldexp(1.0, static_cast<int>(i));
      const long double within = (target - seen) / counts[i];
      return lo + (hi - lo) * static_cast<double>(within);
    }
    seen += counts[i];
  }
  return std::nullopt;  // unreachable: target <= total
}

VbdRates ComputeRates(const daemon::VbdStatsSnapshot* before, const daemon::VbdStatsSnapshot& after, double seconds) {
  static const daemon::VbdStatsSnapshot kZero;
  const daemon::VbdStatsSnapshot& b = before ? *before : kZero;
  // A counter that went backwards means a new VBD under the same id: count
  // everything from zero then.
  const bool reset = Ops(after) < Ops(b) || after.bytes_read < b.bytes_read || after.bytes_written < b.bytes_written;
  const daemon::VbdStatsSnapshot& base = reset ? kZero : b;
  const double s = seconds > 0 ? seconds : 1;
  VbdRates r;
  r.id = after.id;
  r.state = StateOf(after);
  r.ops_per_s = static_cast<double>(Delta(Ops(base), Ops(after))) / s;
  r.read_mib_per_s = static_cast<double>(Delta(base.bytes_read, after.bytes_read)) / kMiB / s;
  r.write_mib_per_s = static_cast<double>(Delta(base.bytes_written, after.bytes_written)) / kMiB / s;
  std::vector<uint64_t> hist(after.latency_us_log2.size());
  for (size_t i = 0; i < hist.size(); ++i) {
    const uint64_t was = i < base.latency_us_log2.size() ? base.latency_us_log2[i] : 0;
    hist[i] = Delta(was, after.latency_us_log2[i]);
  }
  r.p50_us = HistogramPercentileUs(hist, 0.50);
  r.p99_us = HistogramPercentileUs(hist, 0.99);
  r.queue_depth = after.queue_depth;
  r.hit_rate = Ratio(Delta(base.remap_hits, after.remap_hits), Delta(base.remap_lookups, after.remap_lookups));
  const uint64_t fast = Delta(base.fast_path_ios, after.fast_path_ios);
  r.fast_path = Ratio(fast, fast + Delta(base.slow_path_ios, after.slow_path_ios));
  r.errors = Delta(base.errors, after.errors);
  return r;
}

std::string FormatLatencyUs(std::optional<double> us) {
  if (!us) return "-";
  if (*us < 1000) return fmt::format("{:.0f}us", *us);
  if (*us < 1e6) return fmt::format("{:.2f}ms", *us / 1e3);
  return fmt::format("{:.2f}s", *us / 1e6);
}

std::string FormatVbdTable(const std::vector<daemon::VbdStatsSnapshot>& vbds) {
  if (vbds.empty()) return "No VBDs attached.\n";
  Table t({"ID", "FORMAT", "STATE", "OPS", "READ MiB", "WRITTEN MiB", "HIT%", "IMAGE"},
          {false, false, false, true, true, true, true, false});
  for (const auto& s : vbds) {
    t.Add({s.id, s.format, StateOf(s), std::to_string(Ops(s)), Mib(s.bytes_read), Mib(s.bytes_written),
           Percent(Ratio(s.remap_hits, s.remap_lookups)), s.image});
  }
  return t.Render();
}

std::string FormatVbdDetails(const daemon::VbdStatsSnapshot& s) {
  std::string out;
  auto line = [&](std::string_view key, const std::string& value) { out += fmt::format("{:<16}{}\n", key, value); };
  line("vbd:", s.id);
  line("image:", s.image);
  line("format:", s.format);
  line("state:", StateOf(s));
  line("reads:", fmt::format("{} ({} MiB)", s.reads, Mib(s.bytes_read)));
  line("writes:", fmt::format("{} ({} MiB)", s.writes, Mib(s.bytes_written)));
  line("flushes:", std::to_string(s.flushes));
  line("discards:", std::to_string(s.discards));
  line("errors:", std::to_string(s.errors));
  line("queues:", fmt::format("{} ({} requests in flight)", s.queues, s.queue_depth));
  line("latency p50:", FormatLatencyUs(HistogramPercentileUs(s.latency_us_log2, 0.50)));
  line("latency p99:", FormatLatencyUs(HistogramPercentileUs(s.latency_us_log2, 0.99)));
  line("remap cache:", fmt::format("{} lookups, {} hits, {:.2f} mean probe", s.remap_lookups,
                                   PercentText(Ratio(s.remap_hits, s.remap_lookups)), s.remap_mean_probe));
  line("fast path:",
       fmt::format("{} of {} I/Os", PercentText(Ratio(s.fast_path_ios, s.fast_path_ios + s.slow_path_ios)),
                   s.fast_path_ios + s.slow_path_ios));
  line("allocations:", std::to_string(s.allocations));
  line("memory:", fmt::format("{} MiB", Mib(s.memory_bytes)));
  line("faults:", fmt::format("{} guest pages leaked (unmap failed), {} event-channel kicks failed (retried)",
                              s.leaked_pages, s.notify_failures));
  return out;
}

std::string FormatRatesTable(const std::vector<VbdRates>& rows) {
  if (rows.empty()) return "No VBDs attached.\n";
  Table t({"ID", "STATE", "OPS/s", "READ MiB/s", "WRITE MiB/s", "P50", "P99", "QD", "HIT%", "FAST%", "ERR"},
          {false, false, true, true, true, true, true, true, true, true, true});
  for (const auto& r : rows) {
    t.Add({r.id, r.state, fmt::format("{:.0f}", r.ops_per_s), fmt::format("{:.2f}", r.read_mib_per_s),
           fmt::format("{:.2f}", r.write_mib_per_s), FormatLatencyUs(r.p50_us), FormatLatencyUs(r.p99_us),
           std::to_string(r.queue_depth), Percent(r.hit_rate), Percent(r.fast_path), std::to_string(r.errors)});
  }
  return t.Render();
}

nlohmann::ordered_json RatesToJson(const std::vector<VbdRates>& rows) {
  nlohmann::ordered_json out = nlohmann::ordered_json::array();
  auto opt = [](std::optional<double> v) { return v ? nlohmann::ordered_json(*v) : nlohmann::ordered_json(); };
  for (const auto& r : rows) {
    nlohmann::ordered_json j;
    j["id"] = r.id;
    j["state"] = r.state;
    j["ops_per_s"] = r.ops_per_s;
    j["read_mib_per_s"] = r.read_mib_per_s;
    j["write_mib_per_s"] = r.write_mib_per_s;
    j["p50_us"] = opt(r.p50_us);
    j["p99_us"] = opt(r.p99_us);
    j["queue_depth"] = r.queue_depth;
    j["hit_rate"] = opt(r.hit_rate);
    j["fast_path"] = opt(r.fast_path);
    j["errors"] = r.errors;
    out.push_back(std::move(j));
  }
  return out;
}

}  // namespace cowtap::cli
