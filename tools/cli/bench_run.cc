#include "tools/cli/bench_run.h"

#include <fmt/format.h>
#include <stdlib.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <memory>
#include <thread>

#include "tools/cli/bench_ring.h"
#include "tools/cli/bench_runners.h"
#include "tools/cli/bench_setup.h"
#include "tools/cli/bench_stats.h"

namespace cowtap::cli::bench {
namespace {

// The work dir: --dir (created if missing, kept) or a new temp dir.
struct WorkDir {
  std::string path;
  bool remove = false;
  ~WorkDir() {
    if (remove && !path.empty()) ::rmdir(path.c_str());
  }
};

Status MakeWorkDir(const BenchOptions& o, WorkDir* dir) {
  if (!o.dir.empty()) {
    if (::mkdir(o.dir.c_str(), 0755) != 0 && errno != EEXIST) return Status::FromErrno(errno, "bench: mkdir " + o.dir);
    dir->path = o.dir;
    return Status::Ok();
  }
  const char* tmp = std::getenv("TMPDIR");
  std::string tmpl = fmt::format("{}/cowtap-bench-XXXXXX", tmp && *tmp ? tmp : "/var/tmp");
  if (::mkdtemp(tmpl.data()) == nullptr) return Status::FromErrno(errno, "bench: mkdtemp " + tmpl);
  dir->path = tmpl;
  dir->remove = !o.keep;
  return Status::Ok();
}

// Runs one peer of a row on the images it needs; never fails: a failure is
// the result's note.
PeerResult RunPeer(Peer peer, const RowSpec& row, BenchImages& images, RingBench* ring, const std::string& qemu_img,
                   const BenchOptions& o, bool keep) {
  PeerResult skipped;
  skipped.peer = peer;
  EngineRunOptions engine;
  engine.direct_io = o.direct_io;
  const std::string scratch = fmt::format("{}-{}", row.name, PeerName(peer));
  std::string image;
  bool fresh = false;
  Result<PeerResult> r = Status::Internal("not run");
  if (peer == Peer::kRaw) {
    if (row.raw_sparse) {
      auto made = images.SparseRaw(scratch, row.image_bytes);
      if (!made.ok()) r = made.status();
      image = made.ok() ? *made : "";
      fresh = true;
    } else {
      image = images.base_raw();
    }
    if (!image.empty()) r = RunRawPeer(row.workload, image, o.direct_io);
  } else {
    if (peer == Peer::kQemu && qemu_img.empty()) {
      skipped.note = "not run: qemu-img not found";
      return skipped;
    }
    if (peer == Peer::kQemu && !row.qemu_unsupported.empty()) {
      skipped.note = row.qemu_unsupported;
      return skipped;
    }
    if (row.image == ImageKind::kFreshOverlay) {
      auto made = images.FreshOverlay(scratch, row.image_bytes);
      if (!made.ok()) r = made.status();
      image = made.ok() ? *made : "";
      fresh = true;
    } else {
      image = images.base_qcow2();
    }
    if (!image.empty()) {
      switch (peer) {
        case Peer::kRing:
          r = ring ? ring->Run(row.workload, image, engine) : Result<PeerResult>(Status::NotSupported("no guest"));
          break;
        case Peer::kEngine:
          r = RunEnginePeer(row.workload, image, engine);
          break;
        case Peer::kQemu:
          r = RunQemuPeer(row, QemuBenchArgs(qemu_img, row, image, o.direct_io));
          break;
        case Peer::kRaw:
          break;
      }
    }
  }
  if (fresh && !image.empty() && !keep) BenchImages::Remove(image);
  if (!r.ok()) {
    skipped.note = "failed: " + r.status().ToString();
    return skipped;
  }
  return *r;
}

}  // namespace

Result<BenchReport> RunBench(const BenchOptions& o, std::FILE* progress) {
  const uint64_t t_start = NowNs();
  RowPlan plan;
  plan.quick = o.quick;
  plan.full = o.full;
  plan.size_bytes = o.size_bytes ? o.size_bytes : (o.quick ? 32ull << 20 : 256ull << 20);
  if (plan.size_bytes < (1 << 20) || plan.size_bytes % (1 << 20) != 0) {
    return Status::InvalidArgument(fmt::format("bench: --size must be a whole number of MiB, at least 1 MiB"));
  }
  const double seconds = o.seconds_per_peer > 0 ? o.seconds_per_peer : (o.quick ? 3.0 : 10.0);
  plan.time_limit_ms = static_cast<uint64_t>(seconds * 1000);
  std::vector<std::string> skipped;
  std::vector<RowSpec> rows = BuildRows(plan, &skipped);
  for (const std::string& name : o.rows) {
    const std::vector<std::string> names = RowNames();
    if (std::find(names.begin(), names.end(), name) == names.end()) {
      return Status::InvalidArgument(fmt::format("bench: unknown row '{}' (rows: {})", name, fmt::join(names, ", ")));
    }
  }
  for (const RowSpec& row : rows) {
    if (std::string why = ValidateWorkload(row.workload); !why.empty()) {
      return Status::InvalidArgument(fmt::format("bench: row {}: {}", row.name, why));
    }
  }

  WorkDir dir;
  COWTAP_RETURN_IF_ERROR(MakeWorkDir(o, &dir));
  // Fork the guest process before anything here starts a thread.
  auto ring = RingBench::Start(dir.path);
  if (!ring.ok()) fmt::print(progress, "bench: no ring peer: {}\n", ring.status().ToString());

  BenchReport report;
  report.dir = dir.path;
  report.size_bytes = plan.size_bytes;
  report.direct_io = o.direct_io;
  report.quick = o.quick;
  report.full = o.full;
  report.cpus = std::thread::hardware_concurrency();
  report.qemu_img = FindQemuImg().value_or("");
  report.remap_cache_entries = EngineRunOptions{}.remap_cache_entries;

  auto images = BenchImages::Prepare(dir.path, plan.size_bytes, progress);
  if (!images.ok()) return images.status();
  for (size_t i = 0; i < rows.size(); ++i) {
    if (!o.rows.empty() && std::find(o.rows.begin(), o.rows.end(), rows[i].name) == o.rows.end()) continue;
    RowResult result;
    result.spec = rows[i];
    result.note = skipped[i];
    if (result.note.empty()) {
      for (Peer peer : kAllPeers) {
        fmt::print(progress, "bench: {} {} ...\n", rows[i].name, PeerName(peer));
        std::fflush(progress);
        PeerResult p = RunPeer(peer, rows[i], *images, ring.ok() ? ring->get() : nullptr, report.qemu_img, o, o.keep);
        if (p.ran) {
          fmt::print(progress, "bench: {} {}: {:.1f} MiB/s, {:.0f} IOPS in {:.2f} s\n", rows[i].name, PeerName(peer),
                     p.mib_per_s(), p.iops(), p.elapsed_s);
        } else {
          fmt::print(progress, "bench: {} {}: {}\n", rows[i].name, PeerName(peer), p.note);
        }
        result.peers.push_back(std::move(p));
      }
    }
    report.rows.push_back(std::move(result));
  }
  report.remap = MeasureRemapCache(report.remap_cache_entries, o.quick ? 200000 : 2000000);

  if (ring.ok()) ring->reset();
  if (!o.keep) {
    BenchImages::Remove(images->base_qcow2());
    BenchImages::Remove(images->base_raw());
  }
  report.total_s = static_cast<double>(NowNs() - t_start) / 1e9;
  return report;
}

}  // namespace cowtap::cli::bench
