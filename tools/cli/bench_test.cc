// Tests of `cowtap bench`: the end-to-end --quick run comes first in this
// file (the guest process is forked from the test process, which should not
// have picked up threads from other tests yet), then the pure parts: the
// request pattern, the latency histogram, the guest's request loop over a
// fake target, qemu-img command lines and output parsing, ratios, targets,
// the table and the JSON.
#include <fcntl.h>
#include <gtest/gtest.h>
#include <liburing.h>
#include <unistd.h>

#include <cstdlib>
#include <map>
#include <nlohmann/json.hpp>
#include <set>

#include "tools/cli/bench_guest.h"
#include "tools/cli/bench_report.h"
#include "tools/cli/bench_run.h"
#include "tools/cli/bench_runners.h"
#include "tools/cli/bench_setup.h"
#include "tools/cli/bench_stats.h"
#include "tools/cli/cli.h"

namespace cowtap::cli::bench {
namespace {

bool IoUringWorks() {
  io_uring ring;
  if (io_uring_queue_init(4, &ring, 0) != 0) return false;
  io_uring_queue_exit(&ring);
  return true;
}

std::string TempDir() {
  const char* tmp = std::getenv("TMPDIR");
  std::string tmpl = std::string(tmp && *tmp ? tmp : "/tmp") + "/cowtap-bench-test-XXXXXX";
  EXPECT_NE(::mkdtemp(tmpl.data()), nullptr);
  return tmpl;
}

TEST(BenchEndToEnd, QuickRunMeasuresEveryRowOnEveryPeerAndTheJsonParses) {
  if (!IoUringWorks()) GTEST_SKIP() << "io_uring is not available here (the raw peer needs it)";
  const std::string dir = TempDir();
  BenchOptions o;
  o.quick = true;
  o.dir = dir;
  std::FILE* progress = std::tmpfile();
  ASSERT_NE(progress, nullptr);
  auto report = RunBench(o, progress);
  std::fclose(progress);
  ::rmdir(dir.c_str());
  ASSERT_TRUE(report.ok()) << report.status().ToString();
  const bool have_qemu = !report->qemu_img.empty();

  ASSERT_EQ(report->rows.size(), RowNames().size());
  for (const RowResult& row : report->rows) {
    SCOPED_TRACE(row.spec.name);
    if (row.spec.name == "copy-1g") {
      EXPECT_NE(row.note.find("--full"), std::string::npos) << row.note;
      EXPECT_TRUE(row.peers.empty());
      continue;
    }
    EXPECT_TRUE(row.note.empty()) << row.note;
    ASSERT_EQ(row.peers.size(), 4u);
    for (const PeerResult& p : row.peers) {
      SCOPED_TRACE(std::string(PeerName(p.peer)));
      const bool qemu_expected = have_qemu && row.spec.qemu_unsupported.empty();
      if (p.peer == Peer::kQemu && !qemu_expected) {
        EXPECT_FALSE(p.ran);
        EXPECT_FALSE(p.note.empty());
        continue;
      }
      ASSERT_TRUE(p.ran) << p.note;
      EXPECT_GT(p.ops, 0u);
      EXPECT_EQ(p.errors, 0u) << p.note;
      EXPECT_GT(p.bytes, 0u);
      EXPECT_GT(p.elapsed_s, 0);
      EXPECT_GT(p.iops(), 0);
      EXPECT_GT(p.mib_per_s(), 0);
      EXPECT_GT(p.cpu_s, 0);
      EXPECT_GT(p.peak_rss_bytes, 0u);
      if (p.peer != Peer::kQemu) {
        // Every pattern request was issued and answered (nothing hit the time limit in a quick run).
        EXPECT_EQ(p.ops, row.spec.workload.ops);
        EXPECT_TRUE(p.has_latency);
        EXPECT_GT(p.p50_us, 0);
        EXPECT_GE(p.p99_us, p.p50_us);
      }
      if (p.peer == Peer::kRing) {
        EXPECT_GT(p.guest_cpu_s, 0);
      }
      if (p.peer == Peer::kRing || p.peer == Peer::kEngine) {
        EXPECT_TRUE(p.has_remap);
        EXPECT_GT(p.remap_lookups, 0u);
      }
    }
  }
  EXPECT_GT(report->remap.entries, 0u);
  EXPECT_GT(report->remap.lookup_hit_ns, 0);
  EXPECT_GE(report->remap.mean_probe_hit, 1.0);

  const nlohmann::json j = nlohmann::json::parse(ToJson(*report).dump());
  ASSERT_TRUE(j["rows"].is_array());
  EXPECT_EQ(j["rows"].size(), RowNames().size());
  for (const auto& row : j["rows"]) {
    for (const auto& peer : row["peers"]) {
      if (!peer["ran"].get<bool>()) continue;
      EXPECT_GT(peer["iops"].get<double>(), 0) << row["name"] << " " << peer["peer"];
      EXPECT_GT(peer["mib_per_s"].get<double>(), 0) << row["name"] << " " << peer["peer"];
    }
  }
  EXPECT_EQ(j["targets"].size(), EvaluateTargets(*report).size());
  const std::string table = FormatTable(*report);
  for (const std::string& name : RowNames()) EXPECT_NE(table.find(name + ":"), std::string::npos) << name;
  EXPECT_NE(table.find("targets"), std::string::npos);
}

int RunCliArgs(std::vector<std::string> args) {
  std::vector<char*> argv;
  for (std::string& a : args) argv.push_back(a.data());
  return RunCli(static_cast<int>(argv.size()), argv.data());
}

TEST(BenchCommand, RefusesBadOptionsBeforeMakingAnything) {
  const std::string dir = TempDir() + "/not-made";
  EXPECT_EQ(RunCliArgs({"cowtap", "bench", "--quick", "--dir", dir, "--rows", "randread-4k,nosuch"}), 1);
  EXPECT_EQ(RunCliArgs({"cowtap", "bench", "--quick", "--dir", dir, "--size", "1000"}), 1);
  EXPECT_EQ(RunCliArgs({"cowtap", "bench", "--quick", "--dir", dir, "--size", "lots"}), 1);
  EXPECT_NE(::access(dir.c_str(), F_OK), 0) << "bad options still made " << dir;
  ::rmdir(dir.substr(0, dir.rfind('/')).c_str());
}

TEST(BenchPattern, SequentialWrapsAtTheEndOfTheRegion) {
  Workload w;
  w.read_block_bytes = w.write_block_bytes = 4096;
  w.sequential = true;
  w.region_bytes = 3 * 4096;
  OpPattern p(w);
  std::vector<uint64_t> offsets;
  for (int i = 0; i < 5; ++i) offsets.push_back(p.Next().offset);
  EXPECT_EQ(offsets, (std::vector<uint64_t>{0, 4096, 8192, 0, 4096}));
}

TEST(BenchPattern, RandomOffsetsAreAlignedInsideTheRegionAndRepeatable) {
  Workload w;
  w.read_block_bytes = 32768;
  w.write_block_bytes = 4096;
  w.read_percent = 90;
  w.region_bytes = 1 << 20;
  w.seed = 7;
  OpPattern a(w), b(w);
  int writes = 0;
  std::set<uint64_t> distinct;
  for (int i = 0; i < 10000; ++i) {
    const PatternOp op = a.Next();
    const PatternOp again = b.Next();
    ASSERT_EQ(op.offset, again.offset);
    ASSERT_EQ(op.write, again.write);
    ASSERT_EQ(op.length, op.write ? 4096u : 32768u);
    ASSERT_EQ(op.offset % op.length, 0u);
    ASSERT_LE(op.offset + op.length, w.region_bytes);
    writes += op.write;
    distinct.insert(op.offset);
  }
  EXPECT_NEAR(writes, 1000, 150);
  EXPECT_GT(distinct.size(), 100u);
}

TEST(BenchPattern, ValidateRejectsWhatNoRunnerCanDo) {
  Workload w;
  w.region_bytes = 1 << 20;
  EXPECT_EQ(ValidateWorkload(w), "");
  Workload odd = w;
  odd.read_block_bytes = 1000;
  EXPECT_NE(ValidateWorkload(odd), "");
  Workload huge = w;
  huge.write_block_bytes = 2 << 20;
  EXPECT_NE(ValidateWorkload(huge), "");
  Workload deep = w;
  deep.queue_depth = 0;
  EXPECT_NE(ValidateWorkload(deep), "");
  Workload small = w;
  small.region_bytes = 2048;
  EXPECT_NE(ValidateWorkload(small), "");
}

TEST(BenchHistogram, PercentilesAreWithinThePrecisionOfTheBuckets) {
  LatencyHistogram h;
  EXPECT_EQ(h.PercentileUs(50), 0);
  for (uint64_t us = 1; us <= 1000; ++us) h.Record(us * 1000);
  EXPECT_EQ(h.count(), 1000u);
  EXPECT_NEAR(h.PercentileUs(50), 500, 500 * 0.04);
  EXPECT_NEAR(h.PercentileUs(99), 990, 990 * 0.04);
  EXPECT_NEAR(h.PercentileUs(100), 1000, 1000 * 0.04);
  LatencyHistogram tiny;
  tiny.Record(3);
  EXPECT_NEAR(tiny.PercentileUs(50), 0.003, 1e-9);
  LatencyHistogram big;
  big.Record(UINT64_MAX);
  EXPECT_GT(big.PercentileUs(50), 1e12);
}

// Completes everything submitted at the next Poll; refuses submissions
// beyond `slots` with kBusy, as a full ring does.
class FakeTarget : public xen::BlockTarget {
 public:
  explicit FakeTarget(uint32_t slots) : slots_(slots) {}
  uint64_t sectors() const override { return 1 << 20; }
  uint32_t max_sectors_per_io() const override { return 2048; }
  bool Supports(xen::BlkOp op) const override { return true; }
  Status Submit(const xen::BlkIo& io) override {
    if (pending_.size() >= slots_) return Status::Busy("full");
    pending_.push_back({io.cookie, io.op, 0});
    max_in_flight_ = std::max<size_t>(max_in_flight_, pending_.size());
    ++by_op_[io.op];
    bytes_ += uint64_t{io.nr_sectors} * 512;
    return Status::Ok();
  }
  Result<size_t> Poll(std::vector<xen::BlkCompletion>* out, int) override {
    const size_t n = pending_.size();
    out->insert(out->end(), pending_.begin(), pending_.end());
    pending_.clear();
    return n;
  }
  uint32_t InFlight() const override { return static_cast<uint32_t>(pending_.size()); }

  uint32_t slots_;
  std::vector<xen::BlkCompletion> pending_;
  size_t max_in_flight_ = 0;
  std::map<xen::BlkOp, int> by_op_;
  uint64_t bytes_ = 0;
};

TEST(BenchGuestLoop, IssuesEveryRequestAtTheQueueDepthAndFlushesAtTheEnd) {
  Workload w;
  w.read_block_bytes = 8192;
  w.write_block_bytes = 4096;
  w.read_percent = 50;
  w.queue_depth = 16;
  w.region_bytes = 1 << 20;
  w.ops = 1000;
  w.flush_at_end = true;
  FakeTarget target(/*slots=*/10);  // fewer slots than the depth: kBusy must not lose requests
  GuestReply reply;
  ASSERT_TRUE(DriveTarget(target, w, 1000, &reply).ok());
  EXPECT_EQ(reply.ops, 1000u);
  EXPECT_EQ(reply.errors, 0u);
  EXPECT_EQ(target.by_op_[xen::BlkOp::kRead] + target.by_op_[xen::BlkOp::kWrite], 1000);
  EXPECT_EQ(target.by_op_[xen::BlkOp::kFlush], 1);
  EXPECT_EQ(reply.bytes, target.bytes_);
  EXPECT_EQ(target.max_in_flight_, 10u);
  EXPECT_GT(reply.elapsed_s, 0);
}

TEST(BenchQemu, ParsesTheRunTimeLine) {
  EXPECT_EQ(ParseQemuBenchSeconds("Sending 1000 read requests, 4096 bytes each, 32 in parallel (starting at offset 0, "
                                  "step size 4096)\nRun completed in 0.123 seconds.\n"),
            0.123);
  EXPECT_EQ(ParseQemuBenchSeconds("Run completed in 12 seconds."), 12.0);
  EXPECT_FALSE(ParseQemuBenchSeconds("qemu-img: Could not open 'x': No such file").has_value());
  EXPECT_FALSE(ParseQemuBenchSeconds("Run completed in  seconds.").has_value());
  EXPECT_FALSE(ParseQemuBenchSeconds("Run completed in 1.2x seconds.").has_value());
  EXPECT_FALSE(ParseQemuBenchSeconds("Run completed in -1 seconds.").has_value());
}

TEST(BenchQemu, CommandLineMatchesTheRow) {
  std::vector<std::string> skipped;
  RowPlan plan;
  plan.size_bytes = 64 << 20;
  std::map<std::string, RowSpec> rows;
  for (const RowSpec& r : BuildRows(plan, &skipped)) rows[r.name] = r;

  EXPECT_EQ(QemuBenchArgs("/q", rows["randread-4k"], "/i.qcow2", true),
            (std::vector<std::string>{"/q", "bench", "-f", "qcow2", "-c", "16384", "-d", "32", "-s", "4096", "-t",
                                      "none", "-i", "io_uring", "/i.qcow2"}));
  EXPECT_EQ(QemuBenchArgs("/q", rows["allocwrite-64k"], "/o.qcow2", false),
            (std::vector<std::string>{"/q", "bench", "-f", "qcow2", "-c", "1024", "-d", "32", "-s", "65536", "-w", "-t",
                                      "writeback", "-i", "threads", "/o.qcow2"}));
  EXPECT_EQ(QemuBenchArgs("/q", rows["copy-20m"], "/c.qcow2", true),
            (std::vector<std::string>{"/q", "bench", "-f", "qcow2", "-c", "20", "-d", "4", "-s", "1048576", "-w", "-t",
                                      "none", "-i", "io_uring", "--flush-interval=20", "/c.qcow2"}));
  EXPECT_TRUE(QemuBenchArgs("/q", rows["bootmix"], "/b.qcow2", true).empty());
}

TEST(BenchRows, SequentialWriteRowsNeverWrapSoEveryWriteAllocates) {
  std::vector<std::string> skipped;
  for (const bool quick : {false, true}) {
    RowPlan plan;
    plan.quick = quick;
    plan.size_bytes = quick ? 32 << 20 : 256 << 20;
    const std::vector<RowSpec> rows = BuildRows(plan, &skipped);
    ASSERT_EQ(rows.size(), RowNames().size());
    for (const RowSpec& r : rows) {
      SCOPED_TRACE(r.name);
      EXPECT_EQ(ValidateWorkload(r.workload), "");
      EXPECT_GT(r.workload.ops, 0u);
      EXPECT_LE(r.workload.region_bytes, r.image_bytes);
      if (r.workload.sequential) {
        EXPECT_LE(r.workload.ops * r.workload.write_block_bytes, r.workload.region_bytes);
      }
    }
    EXPECT_NE(skipped[5], "");  // copy-1g below 1 GiB without --full
  }
  RowPlan full;
  full.full = true;
  BuildRows(full, &skipped);
  EXPECT_EQ(skipped[5], "");
}

RowResult Row(std::string name, std::map<Peer, double> mib_per_s) {
  RowResult row;
  row.spec.name = std::move(name);
  row.spec.title = "t";
  for (Peer peer : kAllPeers) {
    PeerResult p;
    p.peer = peer;
    if (mib_per_s.count(peer)) {
      p.ran = true;
      p.ops = 1000;
      p.bytes = static_cast<uint64_t>(mib_per_s[peer] * (1 << 20));
      p.elapsed_s = 1.0;
      p.cpu_s = 0.5;
      p.has_latency = peer != Peer::kQemu;
      p.p50_us = 7.5;
      p.p99_us = 80;
    } else {
      p.note = "not run: because";
    }
    row.peers.push_back(p);
  }
  return row;
}

BenchReport SampleReport() {
  BenchReport r;
  r.dir = "/d";
  r.size_bytes = 256 << 20;
  r.cpus = 2;
  r.qemu_img = "/usr/bin/qemu-img";
  r.rows.push_back(Row("randread-4k", {{Peer::kRing, 95}, {Peer::kEngine, 120}, {Peer::kRaw, 100}, {Peer::kQemu, 50}}));
  r.rows.push_back(Row("seqread-64k", {{Peer::kRing, 80}, {Peer::kRaw, 100}}));
  r.rows.push_back(Row("allocwrite-64k", {{Peer::kRing, 100}, {Peer::kRaw, 140}, {Peer::kQemu, 40}}));
  RowResult skipped;
  skipped.spec.name = "copy-1g";
  skipped.note = "not run: the 1 GiB copy runs with --full";
  r.rows.push_back(skipped);
  r.remap = RemapMicro{65536, 42.0, 30.0, 1.2, 2.0, 1 << 20};
  r.remap_cache_entries = 65536;
  return r;
}

TEST(BenchReport, RatiosAreThroughputRatiosOfTheSameRow) {
  const BenchReport r = SampleReport();
  EXPECT_DOUBLE_EQ(*ThroughputRatio(r.rows[0], Peer::kRing, Peer::kRaw), 0.95);
  EXPECT_DOUBLE_EQ(*ThroughputRatio(r.rows[0], Peer::kEngine, Peer::kQemu), 2.4);
  EXPECT_FALSE(ThroughputRatio(r.rows[1], Peer::kRing, Peer::kQemu).has_value());  // qemu did not run
  EXPECT_FALSE(ThroughputRatio(r.rows[1], Peer::kEngine, Peer::kRaw).has_value());
}

TEST(BenchReport, TargetsPassMissAndNotRunAsMeasured) {
  std::map<std::string, TargetCheck> t;
  for (const TargetCheck& c : EvaluateTargets(SampleReport())) t[c.name] = c;
  const auto& reads = t["allocated-data 4 KiB random reads via ring >= 0.9x raw"];
  EXPECT_EQ(reads.status, TargetStatus::kPass);
  EXPECT_DOUBLE_EQ(reads.measured, 0.95);
  EXPECT_EQ(t["allocated-data 64 KiB sequential reads via ring >= 0.9x raw"].status, TargetStatus::kMiss);
  const auto& qemu = t["allocating 64 KiB writes >= 2x QEMU's qcow2 row"];
  EXPECT_EQ(qemu.status, TargetStatus::kPass);
  EXPECT_DOUBLE_EQ(qemu.measured, 2.5);
  const auto& raw_time = t["allocating 64 KiB writes <= 1.3x the raw sparse row in time"];
  EXPECT_EQ(raw_time.status, TargetStatus::kMiss);
  EXPECT_DOUBLE_EQ(raw_time.measured, 1.4);
  const auto& copy = t["1 GiB copy into a fresh overlay <= 1.3x the raw row in time"];
  EXPECT_EQ(copy.status, TargetStatus::kNotRun);
  EXPECT_NE(copy.detail.find("--full"), std::string::npos);
  EXPECT_EQ(t["remap lookup < 100 ns at the default load factor"].status, TargetStatus::kPass);
  EXPECT_EQ(t["remap mean probe length < 1.5 at the default load factor"].status, TargetStatus::kPass);
}

TEST(BenchReport, TableShowsEveryPeerWithItsRatiosAndNotes) {
  const std::string table = FormatTable(SampleReport());
  EXPECT_NE(table.find("randread-4k: t"), std::string::npos) << table;
  EXPECT_NE(table.find("0.95x"), std::string::npos) << table;  // ring vs raw
  EXPECT_NE(table.find("2.40x"), std::string::npos) << table;  // engine vs qemu
  EXPECT_NE(table.find("not run: because"), std::string::npos) << table;
  EXPECT_NE(table.find("not run: the 1 GiB copy runs with --full"), std::string::npos) << table;
  EXPECT_NE(table.find("MISS"), std::string::npos) << table;
  EXPECT_NE(table.find("    7.5 "), std::string::npos) << table;  // p50 under 10 us keeps a decimal
}

TEST(BenchReport, JsonCarriesTheNumbersAndParses) {
  const nlohmann::json j = nlohmann::json::parse(ToJson(SampleReport()).dump());
  EXPECT_EQ(j["version"], 1);
  EXPECT_EQ(j["config"]["size_bytes"], 256 << 20);
  const auto& ring = j["rows"][0]["peers"][0];
  EXPECT_EQ(ring["peer"], "cowtap-ring");
  EXPECT_DOUBLE_EQ(ring["mib_per_s"].get<double>(), 95.0);
  EXPECT_DOUBLE_EQ(ring["iops"].get<double>(), 1000.0);
  EXPECT_DOUBLE_EQ(ring["throughput_vs_raw"].get<double>(), 0.95);
  EXPECT_DOUBLE_EQ(ring["latency_us"]["p99"].get<double>(), 80.0);
  EXPECT_FALSE(j["rows"][1]["peers"][1]["ran"].get<bool>());
  EXPECT_EQ(j["rows"][3]["note"], "not run: the 1 GiB copy runs with --full");
  EXPECT_EQ(j["targets"][4]["status"], "NOT RUN");
  EXPECT_DOUBLE_EQ(j["remap"]["lookup_hit_ns"].get<double>(), 42.0);
}

TEST(BenchReport, FormatCountStaysShort) {
  EXPECT_EQ(FormatCount(950), "950");
  EXPECT_EQ(FormatCount(12345), "12.3k");
  EXPECT_EQ(FormatCount(1250000), "1.25M");
}

TEST(BenchPeers, RawAndEngineReplayTheSameRequests) {
  if (!IoUringWorks()) GTEST_SKIP() << "io_uring is not available here";
  const std::string dir = TempDir();
  auto images = BenchImages::Prepare(dir, 4 << 20, std::tmpfile());
  ASSERT_TRUE(images.ok()) << images.status().ToString();
  Workload w;
  w.read_percent = 50;
  w.queue_depth = 8;
  w.region_bytes = 4 << 20;
  w.ops = 500;
  w.flush_at_end = true;
  auto raw = RunRawPeer(w, images->base_raw(), /*direct_io=*/true);
  ASSERT_TRUE(raw.ok()) << raw.status().ToString();
  auto overlay = images->FreshOverlay("o", 4 << 20);
  ASSERT_TRUE(overlay.ok()) << overlay.status().ToString();
  auto engine = RunEnginePeer(w, *overlay, EngineRunOptions{});
  ASSERT_TRUE(engine.ok()) << engine.status().ToString();
  for (const PeerResult* p : {&*raw, &*engine}) {
    EXPECT_EQ(p->ops, 500u);
    EXPECT_EQ(p->errors, 0u);
    EXPECT_EQ(p->bytes, 500u * 4096);
  }
  EXPECT_TRUE(engine->has_remap);
  BenchImages::Remove(*overlay);
  BenchImages::Remove(images->base_qcow2());
  BenchImages::Remove(images->base_raw());
  ::rmdir(dir.c_str());
}

}  // namespace
}  // namespace cowtap::cli::bench
