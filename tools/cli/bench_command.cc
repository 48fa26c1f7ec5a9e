// `cowtap bench`: cowtap through the sim guest and ring, the engine alone, a
// raw file with io_uring and qemu-img bench, side by side on the rows of
// issue 4, printed as one table (or JSON). See bench_run.h.
#include <fmt/format.h>
#include <spdlog/sinks/stdout_color_sinks.h>
#include <spdlog/spdlog.h>

#include <memory>

#include "tools/cli/bench_offload.h"
#include "tools/cli/bench_report.h"
#include "tools/cli/bench_run.h"
#include "tools/cli/command.h"
#include "tools/cli/util.h"

namespace cowtap::cli {
namespace {

class BenchCommand final : public Command {
 public:
  std::string_view name() const override { return "bench"; }
  std::string_view summary() const override {
    return "Measure cowtap (ring and engine) against a raw file and qemu-img bench";
  }

  void Configure(CLI::App& app) override {
    app.add_option("--size", size_, "Size of the base images (default 256M; 32M with --quick)");
    app.add_option("--rows", rows_,
                   "Comma-separated rows to run: randread-4k, seqread-64k, allocwrite-64k, cowwrite-4k, copy-20m, "
                   "copy-1g, bootmix (default: all)")
        ->delimiter(',');
    app.add_flag("--json", json_, "Print the results as JSON instead of the table");
    app.add_flag("--quick", quick_, "Few requests per row: a few seconds in all (tests, CI)");
    app.add_flag("--full", full_, "Also run the 1 GiB copy when --size is below 1G");
    app.add_option("--dir", dir_, "Make the images here (default: a new dir under $TMPDIR or /var/tmp)");
    app.add_flag("--keep", keep_, "Keep the images afterwards");
    app.add_flag("--buffered", buffered_, "Use the page cache everywhere instead of O_DIRECT (qemu-img -t writeback)");
    app.add_option("--seconds", seconds_, "Time limit per peer and row (default 10; 3 with --quick)");
    app.add_flag("--offload", offload_,
                 "Only the kernel offload rows: reads through the dm device, the NBD miss device alone and a loop "
                 "device of a raw file (needs device-mapper, loop, nbd and root; default --size 64M, --seconds 3)");
    app.footer(
        "Each row runs on four peers in the same run: cowtap through a simulated guest process and its blkif ring,\n"
        "cowtap's engine alone, a raw file with io_uring, and qemu-img bench on the same kind of image.\n"
        "Progress goes to stderr. Targets that are missed are reported, not fatal.\n"
        "Exit status: 0 when the bench ran, 1 when it could not (bad options, no space for the images).");
  }

  int Run() override {
    // The table or JSON owns stdout: the backend's log lines (a VBD per peer
    // connecting and going) go to stderr with the progress, warnings only.
    auto logger =
        std::make_shared<spdlog::logger>("cowtap-bench", std::make_shared<spdlog::sinks::stderr_color_sink_mt>());
    logger->set_level(spdlog::level::warn);
    spdlog::set_default_logger(logger);
    if (offload_) return RunOffload();
    bench::BenchOptions o;
    if (!size_.empty()) {
      auto size = ParseSize(size_);
      if (!size.ok()) return ReportError(name(), "", size.status());
      o.size_bytes = *size;
    }
    o.rows = rows_;
    o.quick = quick_;
    o.full = full_;
    o.dir = dir_;
    o.keep = keep_;
    o.direct_io = !buffered_;
    o.seconds_per_peer = seconds_;
    auto report = bench::RunBench(o, stderr);
    if (!report.ok()) return ReportError(name(), "", report.status());
    if (json_) {
      fmt::print("{}\n", bench::ToJson(*report).dump(2));
    } else {
      fmt::print("{}", bench::FormatTable(*report));
    }
    return 0;
  }

 private:
  int RunOffload() {
    bench::OffloadBenchOptions o;
    if (!size_.empty()) {
      auto size = ParseSize(size_);
      if (!size.ok()) return ReportError(name(), "", size.status());
      o.size_bytes = *size;
    }
    if (seconds_ > 0) o.seconds_per_device = seconds_;
    o.dir = dir_;
    o.keep = keep_;
    o.direct_io = !buffered_;
    auto report = bench::RunOffloadBench(o, stderr);
    if (!report.ok()) return ReportError(name(), "", report.status());
    if (json_) {
      fmt::print("{}\n", bench::OffloadToJson(*report).dump(2));
    } else {
      fmt::print("{}", bench::FormatOffloadTable(*report));
    }
    return 0;
  }

  bool offload_ = false;
  std::string size_;
  std::vector<std::string> rows_;
  bool json_ = false;
  bool quick_ = false;
  bool full_ = false;
  std::string dir_;
  bool keep_ = false;
  bool buffered_ = false;
  double seconds_ = 0;
};

}  // namespace

std::unique_ptr<Command> NewBenchCommand() { return std::make_unique<BenchCommand>(); }

}  // namespace cowtap::cli
