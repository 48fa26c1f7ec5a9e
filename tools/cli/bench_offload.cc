#include "tools/cli/bench_offload.h"

#include <fmt/format.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cstdlib>
#include <memory>

#include "cow/image.h"
#include "dm/device_mapper.h"
#include "dm/loop_device.h"
#include "dm/offload_attachment.h"
#include "tools/cli/bench_runners.h"
#include "tools/cli/bench_setup.h"
#include "tools/cli/bench_stats.h"
#include "tools/offload/kernel_offload.h"

namespace cowtap::cli::bench {

std::string_view OffloadDeviceName(OffloadDevice device) {
  switch (device) {
    case OffloadDevice::kDm:
      return "dm";
    case OffloadDevice::kNbd:
      return "nbd-only";
    case OffloadDevice::kLoopRaw:
      return "loop-raw";
  }
  return "?";
}

namespace {

struct OffloadRowSpec {
  std::string name, title;
  Workload workload;
};

std::vector<OffloadRowSpec> OffloadRows(const OffloadBenchOptions& o) {
  Workload base;
  base.region_bytes = o.size_bytes;
  base.ops = UINT64_MAX / 2;  // the time limit ends each run
  base.time_limit_ms = static_cast<uint64_t>(o.seconds_per_device * 1000);
  std::vector<OffloadRowSpec> rows;
  {
    OffloadRowSpec r{"randread-4k", "4 KiB random reads, QD32, allocated data", base};
    r.workload.queue_depth = 32;
    rows.push_back(r);
  }
  {
    OffloadRowSpec r{"seqread-64k", "64 KiB sequential reads, QD32, allocated data", base};
    r.workload.read_block_bytes = r.workload.write_block_bytes = 64 << 10;
    r.workload.sequential = true;
    r.workload.queue_depth = 32;
    rows.push_back(r);
  }
  {
    OffloadRowSpec r{"seqread-1m", "1 MiB sequential reads, QD4, allocated data", base};
    r.workload.read_block_bytes = r.workload.write_block_bytes = 1 << 20;
    r.workload.sequential = true;
    r.workload.queue_depth = 4;
    rows.push_back(r);
  }
  return rows;
}

Status MakeDir(const OffloadBenchOptions& o, std::string* dir, bool* remove) {
  if (!o.dir.empty()) {
    if (::mkdir(o.dir.c_str(), 0755) != 0 && errno != EEXIST) return Status::FromErrno(errno, "bench: mkdir " + o.dir);
    *dir = o.dir;
    *remove = false;
    return Status::Ok();
  }
  const char* tmp = std::getenv("TMPDIR");
  std::string tmpl = fmt::format("{}/cowtap-bench-XXXXXX", tmp && *tmp ? tmp : "/var/tmp");
  if (::mkdtemp(tmpl.data()) == nullptr) return Status::FromErrno(errno, "bench: mkdtemp " + tmpl);
  *dir = tmpl;
  *remove = !o.keep;
  return Status::Ok();
}

}  // namespace

Result<OffloadBenchReport> RunOffloadBench(const OffloadBenchOptions& o, std::FILE* progress) {
  if (o.size_bytes < (1 << 20) || o.size_bytes % (1 << 20) != 0) {
    return Status::InvalidArgument("bench --offload: --size must be a whole number of MiB, at least 1M");
  }
  if (o.seconds_per_device <= 0) return Status::InvalidArgument("bench --offload: --seconds must be positive");
  COWTAP_RETURN_IF_ERROR(offload::CheckOffloadKernel().Annotate("bench --offload"));
  const uint64_t t0 = NowNs();
  OffloadBenchReport report;
  report.size_bytes = o.size_bytes;
  bool remove_dir = false;
  COWTAP_RETURN_IF_ERROR(MakeDir(o, &report.dir, &remove_dir));
  auto images = BenchImages::Prepare(report.dir, o.size_bytes, progress);
  if (!images.ok()) return images.status();
  auto cleanup = [&] {
    if (o.keep) return;
    BenchImages::Remove(images->base_qcow2());
    BenchImages::Remove(images->base_raw());
    ::unlink((report.dir + "/offload.nbd").c_str());
    if (remove_dir) ::rmdir(report.dir.c_str());
  };

  Status failed;
  {
    cow::OpenOptions open;
    open.direct_io = o.direct_io;
    auto image = cow::OpenImage(images->base_qcow2(), open);
    if (!image.ok()) {
      cleanup();
      return image.status().Annotate("bench --offload: opening " + images->base_qcow2());
    }
    std::shared_ptr<cow::Image> img = std::move(image).value();
    auto mapper = dm::NewKernelDeviceMapper();
    if (!mapper.ok()) {
      cleanup();
      return mapper.status().Annotate("bench --offload");
    }
    dm::OffloadAttachmentOptions ao;
    ao.dm_name = fmt::format("cowtap-bench-{}", ::getpid());
    ao.socket_path = report.dir + "/offload.nbd";
    ao.loop_direct_io = o.direct_io;
    fmt::print(progress, "bench: offloading {} as /dev/mapper/{}\n", images->base_qcow2(), ao.dm_name);
    auto attachment = dm::OffloadAttachment::Attach(img, images->base_qcow2(), **mapper, ao);
    if (!attachment.ok()) {
      img->Close().IgnoreError();
      cleanup();
      return attachment.status().Annotate("bench --offload: attaching the offload");
    }
    dm::OffloadAttachment& a = **attachment;
    auto loop = dm::LoopDevice::Attach(images->base_raw(), {.direct_io = o.direct_io});
    if (!loop.ok()) {
      a.Detach().IgnoreError();
      img->Close().IgnoreError();
      cleanup();
      return loop.status().Annotate("bench --offload: a loop device of " + images->base_raw());
    }
    const dm::DmTable table = a.controller().live_table();
    report.dm_device = a.device_path();
    report.nbd_device = a.devices().miss_device;
    report.loop_device = (*loop)->path();
    report.linear_sectors = table.linear_sectors();
    report.size_sectors = table.size_sectors();
    report.segments = table.segments().size();
    fmt::print(progress, "bench: {} of {} sectors linear in {} segment(s) after priming\n", report.linear_sectors,
               report.size_sectors, report.segments);
    const std::string paths[] = {report.dm_device, report.nbd_device, report.loop_device};
    for (const OffloadRowSpec& spec : OffloadRows(o)) {
      OffloadRowResult row;
      row.name = spec.name;
      row.title = spec.title;
      row.devices.resize(std::size(kOffloadDevices));
      // dm and loop-raw twice, in both orders, keeping each one's better
      // run: what runs first on a cold host is not favoured. nbd-only once.
      const OffloadDevice order[] = {OffloadDevice::kDm, OffloadDevice::kLoopRaw, OffloadDevice::kNbd,
                                     OffloadDevice::kLoopRaw, OffloadDevice::kDm};
      for (OffloadDevice d : order) {
        const size_t i = static_cast<size_t>(d);
        fmt::print(progress, "bench: {} on {} ({})\n", spec.name, OffloadDeviceName(d), paths[i]);
        const uint64_t miss_before = a.miss_stats().requests;
        auto r = RunRawPeer(spec.workload, paths[i], o.direct_io);
        if (d == OffloadDevice::kDm) row.dm_miss_requests += a.miss_stats().requests - miss_before;
        PeerResult& best = row.devices[i];
        if (!r.ok()) {
          if (!best.ran) best.note = r.status().ToString();
        } else if (!best.ran || r->iops() > best.iops()) {
          best = *r;
        }
      }
      const double loop_iops = row.devices[2].ran ? row.devices[2].iops() : 0;
      if (loop_iops > 0) {
        if (row.devices[0].ran) row.dm_vs_loop = row.devices[0].iops() / loop_iops;
        if (row.devices[1].ran) row.nbd_vs_loop = row.devices[1].iops() / loop_iops;
      }
      report.rows.push_back(std::move(row));
    }
    failed = (*loop)->Detach();
    Status s = a.Detach();
    if (failed.ok()) failed = s;
    s = img->Close();
    if (failed.ok()) failed = s;
  }
  cleanup();
  if (!failed.ok()) return failed.Annotate("bench --offload: tearing down");
  report.total_s = static_cast<double>(NowNs() - t0) / 1e9;
  return report;
}

std::string FormatOffloadTable(const OffloadBenchReport& r) {
  std::string out = fmt::format(
      "cowtap bench --offload: {} MiB image, {}: {} of {} sectors linear ({} segments); nbd-only: {}; "
      "loop-raw: {}\n\n",
      r.size_bytes >> 20, r.dm_device, r.linear_sectors, r.size_sectors, r.segments, r.nbd_device, r.loop_device);
  out += fmt::format("{:<13} {:<9} {:>10} {:>9} {:>9} {:>9} {:>8}  {}\n", "row", "device", "IOPS", "MiB/s", "p50 us",
                     "p99 us", "x loop", "note");
  for (const auto& row : r.rows) {
    for (size_t i = 0; i < row.devices.size(); ++i) {
      const PeerResult& p = row.devices[i];
      const double loop_iops = row.devices.size() > 2 && row.devices[2].ran ? row.devices[2].iops() : 0;
      std::string note = p.note;
      if (i == 0)
        note += (note.empty() ? "" : "; ") + fmt::format("{} requests reached user space", row.dm_miss_requests);
      if (!p.ran) {
        out += fmt::format("{:<13} {:<9} {:>10} {:>9} {:>9} {:>9} {:>8}  {}\n", i ? "" : row.name,
                           OffloadDeviceName(kOffloadDevices[i]), "-", "-", "-", "-", "-", note);
        continue;
      }
      out += fmt::format("{:<13} {:<9} {:>10.0f} {:>9.1f} {:>9.0f} {:>9.0f} {:>8}  {}\n", i ? "" : row.name,
                         OffloadDeviceName(kOffloadDevices[i]), p.iops(), p.mib_per_s(), p.p50_us, p.p99_us,
                         loop_iops > 0 ? fmt::format("{:.2f}", p.iops() / loop_iops) : "-", note);
    }
  }
  out += "\ntargets (issue 6: reads of allocated data through dm within 10% of the loop device of a raw file):\n";
  for (const auto& row : r.rows) {
    out += fmt::format("  {:<4} {:<13} dm/loop {:.2f} (need >= {:.2f})\n",
                       row.dm_vs_loop >= kOffloadTargetRatio ? "PASS" : "MISS", row.name, row.dm_vs_loop,
                       kOffloadTargetRatio);
  }
  out += fmt::format("total {:.1f} s\n", r.total_s);
  return out;
}

nlohmann::ordered_json OffloadToJson(const OffloadBenchReport& r) {
  nlohmann::ordered_json j;
  j["size_bytes"] = r.size_bytes;
  j["dm_device"] = r.dm_device;
  j["nbd_device"] = r.nbd_device;
  j["loop_device"] = r.loop_device;
  j["linear_sectors"] = r.linear_sectors;
  j["size_sectors"] = r.size_sectors;
  j["segments"] = r.segments;
  j["target_ratio"] = kOffloadTargetRatio;
  nlohmann::ordered_json rows = nlohmann::ordered_json::array();
  for (const auto& row : r.rows) {
    nlohmann::ordered_json jr;
    jr["row"] = row.name;
    jr["title"] = row.title;
    jr["dm_miss_requests"] = row.dm_miss_requests;
    jr["dm_vs_loop"] = row.dm_vs_loop;
    jr["nbd_vs_loop"] = row.nbd_vs_loop;
    jr["target_met"] = row.dm_vs_loop >= kOffloadTargetRatio;
    for (size_t i = 0; i < row.devices.size(); ++i) {
      const PeerResult& p = row.devices[i];
      nlohmann::ordered_json d;
      d["ran"] = p.ran;
      d["note"] = p.note;
      d["ops"] = p.ops;
      d["errors"] = p.errors;
      d["iops"] = p.iops();
      d["mib_per_s"] = p.mib_per_s();
      d["p50_us"] = p.p50_us;
      d["p99_us"] = p.p99_us;
      d["cpu_s"] = p.cpu_s;
      jr[std::string(OffloadDeviceName(kOffloadDevices[i]))] = d;
    }
    rows.push_back(jr);
  }
  j["rows"] = rows;
  j["total_s"] = r.total_s;
  return j;
}

}  // namespace cowtap::cli::bench
