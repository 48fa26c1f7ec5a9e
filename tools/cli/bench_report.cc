#include "tools/cli/bench_report.h"

#include <fmt/format.h>

#include <algorithm>

namespace cowtap::cli::bench {
namespace {

constexpr double kMiB = 1024.0 * 1024.0;

std::string Dash() { return "-"; }

std::string Fixed(double v, int decimals) { return fmt::format("{:.{}f}", v, decimals); }

std::string Latency(double us) { return us < 10 ? Fixed(us, 1) : Fixed(us, 0); }

std::string RatioText(std::optional<double> r) { return r ? Fixed(*r, 2) + "x" : Dash(); }

const RowResult* FindRow(const BenchReport& report, std::string_view name) {
  for (const RowResult& row : report.rows)
    if (row.spec.name == name) return &row;
  return nullptr;
}

// A check of peer/base throughput >= limit (or, for time targets, of
// base/peer throughput <= limit).
TargetCheck RatioTarget(const BenchReport& report, std::string name, std::string_view row_name, Peer peer, Peer base,
                        double limit, bool in_time) {
  TargetCheck t;
  t.name = std::move(name);
  t.limit = limit;
  const RowResult* row = FindRow(report, row_name);
  std::optional<double> r = row ? ThroughputRatio(*row, peer, base) : std::nullopt;
  if (!r || *r <= 0) {
    t.status = TargetStatus::kNotRun;
    if (row == nullptr) {
      t.detail = fmt::format("row {} not run (not in --rows)", row_name);
    } else if (!row->note.empty()) {
      t.detail = row->note;
    } else {
      t.detail = fmt::format("row {} has no {} and {} result", row_name, PeerName(peer), PeerName(base));
    }
    return t;
  }
  t.measured = in_time ? 1.0 / *r : *r;
  const bool pass = in_time ? t.measured <= limit : t.measured >= limit;
  t.status = pass ? TargetStatus::kPass : TargetStatus::kMiss;
  t.detail = in_time ? fmt::format("{}: {} time / {} time = {:.2f}x (limit {:.2f}x)", row_name, PeerName(peer),
                                   PeerName(base), t.measured, limit)
                     : fmt::format("{}: {} MiB/s / {} MiB/s = {:.2f}x (need {:.2f}x)", row_name, PeerName(peer),
                                   PeerName(base), t.measured, limit);
  return t;
}

}  // namespace

std::string_view PeerName(Peer peer) {
  switch (peer) {
    case Peer::kRing:
      return "cowtap-ring";
    case Peer::kEngine:
      return "cowtap-engine";
    case Peer::kRaw:
      return "raw-uring";
    case Peer::kQemu:
      return "qemu-img";
  }
  return "?";
}

const PeerResult* RowResult::Find(Peer peer) const {
  for (const PeerResult& p : peers)
    if (p.peer == peer && p.ran) return &p;
  return nullptr;
}

std::string_view TargetStatusName(TargetStatus status) {
  switch (status) {
    case TargetStatus::kPass:
      return "PASS";
    case TargetStatus::kMiss:
      return "MISS";
    case TargetStatus::kNotRun:
      return "NOT RUN";
    case TargetStatus::kInfo:
      return "INFO";
  }
  return "?";
}

std::optional<double> ThroughputRatio(const RowResult& row, Peer peer, Peer base) {
  const PeerResult* p = row.Find(peer);
  const PeerResult* b = row.Find(base);
  if (p == nullptr || b == nullptr || b->mib_per_s() <= 0) return std::nullopt;
  return p->mib_per_s() / b->mib_per_s();
}

std::string FormatCount(double value) {
  if (value >= 1e6) return Fixed(value / 1e6, 2) + "M";
  if (value >= 1e4) return Fixed(value / 1e3, 1) + "k";
  return Fixed(value, 0);
}

std::vector<TargetCheck> EvaluateTargets(const BenchReport& report) {
  std::vector<TargetCheck> out;
  out.push_back(RatioTarget(report, "allocated-data 4 KiB random reads via ring >= 0.9x raw", "randread-4k",
                            Peer::kRing, Peer::kRaw, 0.9, false));
  out.push_back(RatioTarget(report, "allocated-data 64 KiB sequential reads via ring >= 0.9x raw", "seqread-64k",
                            Peer::kRing, Peer::kRaw, 0.9, false));
  out.push_back(RatioTarget(report, "allocating 64 KiB writes >= 2x QEMU's qcow2 row", "allocwrite-64k", Peer::kRing,
                            Peer::kQemu, 2.0, false));
  out.push_back(RatioTarget(report, "allocating 64 KiB writes <= 1.3x the raw sparse row in time", "allocwrite-64k",
                            Peer::kRing, Peer::kRaw, 1.3, true));
  out.push_back(RatioTarget(report, "1 GiB copy into a fresh overlay <= 1.3x the raw row in time", "copy-1g",
                            Peer::kRing, Peer::kRaw, 1.3, true));

  TargetCheck lookup{"remap lookup < 100 ns at the default load factor", TargetStatus::kNotRun, 0, 100, ""};
  TargetCheck probe{"remap mean probe length < 1.5 at the default load factor", TargetStatus::kNotRun, 0, 1.5, ""};
  if (report.remap.entries > 0) {
    lookup.measured = report.remap.lookup_hit_ns;
    lookup.status = lookup.measured < lookup.limit ? TargetStatus::kPass : TargetStatus::kMiss;
    lookup.detail = fmt::format("{} entries: hit {:.1f} ns, miss {:.1f} ns per lookup", report.remap.entries,
                                report.remap.lookup_hit_ns, report.remap.lookup_miss_ns);
    probe.measured = report.remap.mean_probe_hit;
    probe.status = probe.measured < probe.limit ? TargetStatus::kPass : TargetStatus::kMiss;
    probe.detail = fmt::format("full cache: {:.2f} slots per hit, {:.2f} per miss (RemapCacheStats.probes/lookups)",
                               report.remap.mean_probe_hit, report.remap.mean_probe_miss);
  } else {
    lookup.detail = probe.detail = "remap microbenchmark not run";
  }
  out.push_back(lookup);
  out.push_back(probe);

  TargetCheck memory{"memory per VBD bounded by the configured caches, reported", TargetStatus::kInfo, 0, 0, ""};
  uint64_t peak = 0;
  for (const RowResult& row : report.rows)
    if (const PeerResult* p = row.Find(Peer::kRing)) peak = std::max(peak, p->peak_rss_bytes);
  memory.measured = static_cast<double>(peak) / kMiB;
  memory.detail = fmt::format(
      "backend process peak RSS over the ring rows {:.1f} MiB (one VBD at a time, incl. the sim hypervisor and the "
      "guest's shared RAM it maps); remap cache {} entries = {:.2f} MiB per image layer",
      memory.measured, report.remap_cache_entries, static_cast<double>(report.remap.memory_bytes) / kMiB);
  out.push_back(memory);
  return out;
}

std::string FormatTable(const BenchReport& report) {
  std::string out;
  out += fmt::format("cowtap bench: {} images in {}, {}, {} CPUs{}{}\n", fmt::format("{} MiB", report.size_bytes >> 20),
                     report.dir, report.direct_io ? "O_DIRECT (qemu-img -t none)" : "buffered (qemu-img -t writeback)",
                     report.cpus, report.quick ? ", --quick" : "", report.full ? ", --full" : "");
  out += fmt::format("qemu-img: {}\n\n", report.qemu_img.empty() ? "not found (its peer is skipped)" : report.qemu_img);
  const std::string header =
      fmt::format("  {:<14} {:>7} {:>8} {:>8} {:>8} {:>9} {:>6} {:>6} {:>6} {:>5} {:>7}  {}", "peer", "IOPS", "MiB/s",
                  "p50 us", "p99 us", "CPU s/GiB", "xraw", "xqemu", "hit%", "probe", "RSS MiB", "note");
  for (const RowResult& row : report.rows) {
    out += fmt::format("{}: {}\n", row.spec.name, row.spec.title);
    if (!row.note.empty()) {
      out += fmt::format("  {}\n\n", row.note);
      continue;
    }
    out += header + "\n";
    for (const PeerResult& p : row.peers) {
      if (!p.ran) {
        out += fmt::format("  {:<14} {:>7}  {}\n", PeerName(p.peer), "-", p.note.empty() ? "not run" : p.note);
        continue;
      }
      out += fmt::format(
          "  {:<14} {:>7} {:>8} {:>8} {:>8} {:>9} {:>6} {:>6} {:>6} {:>5} {:>7}  {}\n", PeerName(p.peer),
          FormatCount(p.iops()), Fixed(p.mib_per_s(), 1), p.has_latency ? Latency(p.p50_us) : Dash(),
          p.has_latency ? Latency(p.p99_us) : Dash(), Fixed(p.cpu_s_per_gib(), 2),
          RatioText(ThroughputRatio(row, p.peer, Peer::kRaw)), RatioText(ThroughputRatio(row, p.peer, Peer::kQemu)),
          p.has_remap ? Fixed(p.remap_hit_rate * 100, 1) : Dash(), p.has_remap ? Fixed(p.remap_mean_probe, 2) : Dash(),
          Fixed(static_cast<double>(p.peak_rss_bytes) / kMiB, 0), p.note);
    }
    out += "\n";
  }
  out +=
      "xraw, xqemu: throughput (MiB/s) divided by the raw-uring / qemu-img peer's on the same row; above 1 is faster.\n"
      "p50/p99: per-request latency, submit to completion (the ring peer measures in the guest). qemu-img bench\n"
      "reports only its run time. CPU s/GiB: user+system CPU of the serving process(es) per GiB moved (ring: backend\n"
      "+ guest process). hit%, probe: the image's remap cache over this peer's run (lookups that hit; slots examined\n"
      "per lookup). RSS: peak resident set of the serving process during the peer (ring: the backend).\n\n";
  out += fmt::format(
      "remap cache alone ({} entries, default load factor): lookup hit {:.1f} ns, miss {:.1f} ns; mean probe hit "
      "{:.2f}, miss {:.2f}; {:.2f} MiB\n\n",
      report.remap.entries, report.remap.lookup_hit_ns, report.remap.lookup_miss_ns, report.remap.mean_probe_hit,
      report.remap.mean_probe_miss, static_cast<double>(report.remap.memory_bytes) / kMiB);
  out += "targets (issue 4; measured, not gated):\n";
  for (const TargetCheck& t : EvaluateTargets(report)) {
    out += fmt::format("  {:<7} {}\n          {}\n", TargetStatusName(t.status), t.name, t.detail);
  }
  out += fmt::format("\ntotal {:.1f} s\n", report.total_s);
  return out;
}

nlohmann::ordered_json ToJson(const BenchReport& report) {
  nlohmann::ordered_json j;
  j["version"] = 1;
  j["config"] = {{"dir", report.dir},
                 {"size_bytes", report.size_bytes},
                 {"direct_io", report.direct_io},
                 {"quick", report.quick},
                 {"full", report.full},
                 {"cpus", report.cpus},
                 {"qemu_img", report.qemu_img},
                 {"remap_cache_entries", report.remap_cache_entries}};
  nlohmann::ordered_json rows = nlohmann::ordered_json::array();
  for (const RowResult& row : report.rows) {
    const Workload& w = row.spec.workload;
    nlohmann::ordered_json r;
    r["name"] = row.spec.name;
    r["title"] = row.spec.title;
    r["workload"] = {{"read_block_bytes", w.read_block_bytes},
                     {"write_block_bytes", w.write_block_bytes},
                     {"queue_depth", w.queue_depth},
                     {"sequential", w.sequential},
                     {"read_percent", w.read_percent},
                     {"region_bytes", w.region_bytes},
                     {"ops", w.ops},
                     {"flush_at_end", w.flush_at_end}};
    r["note"] = row.note;
    nlohmann::ordered_json peers = nlohmann::ordered_json::array();
    for (const PeerResult& p : row.peers) {
      nlohmann::ordered_json e;
      e["peer"] = PeerName(p.peer);
      e["ran"] = p.ran;
      e["note"] = p.note;
      if (p.ran) {
        e["ops"] = p.ops;
        e["bytes"] = p.bytes;
        e["errors"] = p.errors;
        e["elapsed_s"] = p.elapsed_s;
        e["iops"] = p.iops();
        e["mib_per_s"] = p.mib_per_s();
        if (p.has_latency) e["latency_us"] = {{"p50", p.p50_us}, {"p99", p.p99_us}};
        e["cpu_s"] = p.cpu_s;
        e["guest_cpu_s"] = p.guest_cpu_s;
        e["cpu_s_per_gib"] = p.cpu_s_per_gib();
        if (auto x = ThroughputRatio(row, p.peer, Peer::kRaw)) e["throughput_vs_raw"] = *x;
        if (auto x = ThroughputRatio(row, p.peer, Peer::kQemu)) e["throughput_vs_qemu"] = *x;
        if (p.has_remap) {
          e["remap"] = {
              {"lookups", p.remap_lookups}, {"hit_rate", p.remap_hit_rate}, {"mean_probe_length", p.remap_mean_probe}};
        }
        e["peak_rss_bytes"] = p.peak_rss_bytes;
      }
      peers.push_back(std::move(e));
    }
    r["peers"] = std::move(peers);
    rows.push_back(std::move(r));
  }
  j["rows"] = std::move(rows);
  j["remap"] = {{"entries", report.remap.entries},
                {"lookup_hit_ns", report.remap.lookup_hit_ns},
                {"lookup_miss_ns", report.remap.lookup_miss_ns},
                {"mean_probe_hit", report.remap.mean_probe_hit},
                {"mean_probe_miss", report.remap.mean_probe_miss},
                {"memory_bytes", report.remap.memory_bytes}};
  nlohmann::ordered_json targets = nlohmann::ordered_json::array();
  for (const TargetCheck& t : EvaluateTargets(report)) {
    targets.push_back({{"name", t.name},
                       {"status", TargetStatusName(t.status)},
                       {"measured", t.measured},
                       {"limit", t.limit},
                       {"detail", t.detail}});
  }
  j["targets"] = std::move(targets);
  j["total_s"] = report.total_s;
  return j;
}

}  // namespace cowtap::cli::bench
