// `cowtap create`: a new image, or an overlay over a backing image, through
// cow::CreateImage; prints what it made and how long that took.
#include <fmt/format.h>

#include <chrono>

#include "tools/cli/command.h"
#include "tools/cli/util.h"

namespace cowtap::cli {
namespace {

class CreateCommand final : public Command {
 public:
  std::string_view name() const override { return "create"; }
  std::string_view summary() const override { return "Create an image, or an overlay over a backing image"; }

  void Configure(CLI::App& app) override {
    app.add_option("-f,--format", format_, "Format of the new image: qcow2 (default), qcow or raw")
        ->check(CLI::IsMember({"raw", "qcow", "qcow2"}));
    app.add_option("-b,--backing", backing_, "Backing image (recorded as given; relative names resolve "
                                              "against the new image's directory)");
    app.add_option("-F,--backing-format", backing_format_, "Format of the backing image (probed when omitted)")
        ->check(CLI::IsMember({"raw", "qcow", "qcow2"}));
    app.add_option("-o,--options", options_,
                   "Comma-separated creation options; may repeat:\n"
                   "cluster_size=SIZE (512..2M, power of two), refcount_bits=1..64,\n"
                   "compat=0.10|1.1, lazy_refcounts=on|off, extended_l2=on|off,\n"
                   "compression_type=zlib|zstd, data_file=PATH, data_file_raw=on|off")
        ->allow_extra_args(false);
    app.add_flag("--force", force_, "Replace IMAGE if it exists (it is refused otherwise)");
    app.add_option("IMAGE", image_, "Path of the image to create")->required();
    app.add_option("SIZE", size_,
                   "Virtual size in bytes, with an optional K, M, G, T suffix (binary);\n"
                   "with -b it defaults to the backing image's size");
    app.footer("Exit status: 0 created, 1 error (message on stderr).");
  }

  int Run() override {
    cow::CreateOptions o;
    o.format = *cow::ParseFormatName(format_);
    o.backing_file = backing_;
    if (!backing_format_.empty()) o.backing_format = cow::ParseFormatName(backing_format_);
    o.overwrite = force_;
    for (const auto& list : options_) {
      Status s = ApplyCreateOptions(list, &o);
      if (!s.ok()) return ReportError(name(), image_, s);
    }
    if (!backing_format_.empty() && o.backing_file.empty())
      return ReportError(name(), image_, Status::InvalidArgument("-F needs a backing image (-b)"));
    if (!size_.empty()) {
      auto size = ParseSize(size_);
      if (!size.ok()) return ReportError(name(), image_, size.status());
      o.size_bytes = *size;
      if (o.size_bytes == 0 && o.format != cow::ImageFormat::kRaw)
        return ReportError(name(), image_, Status::InvalidArgument("size 0 is only allowed for raw images"));
    } else if (o.backing_file.empty()) {
      return ReportError(name(), image_,
                         Status::InvalidArgument("give a SIZE, or a backing image (-b) to take the size from"));
    }

    const auto start = std::chrono::steady_clock::now();
    Status s = cow::CreateImage(image_, o);
    const auto elapsed = std::chrono::steady_clock::now() - start;
    if (!s.ok()) return ReportError(name(), image_, s);

    // Report the size the image really got (it came from the backing image
    // when none was given).
    uint64_t size_bytes = o.size_bytes;
    std::string backing_fmt = o.backing_format ? std::string(cow::FormatName(*o.backing_format)) : "";
    auto opened = cow::OpenImage(image_, CliOpenOptions(/*read_only=*/true, format_));
    if (opened.ok()) {
      size_bytes = (*opened)->size_bytes();
      if (auto bf = (*opened)->info().backing_format) backing_fmt = std::string(cow::FormatName(*bf));
    }
    std::string line = fmt::format("Created {}: format={} size={} ({} bytes)", image_, format_,
                                   FormatHumanSize(size_bytes), size_bytes);
    if (!o.backing_file.empty()) {
      line += fmt::format(" backing={}", o.backing_file);
      if (!backing_fmt.empty()) line += fmt::format(" backing_fmt={}", backing_fmt);
    }
    if (o.format == cow::ImageFormat::kQcow2) {
      line += fmt::format(" cluster_size={} compat={} refcount_bits={}", o.cluster_size,
                          o.qcow2_version == 2 ? "0.10" : "1.1", o.refcount_bits);
      if (o.lazy_refcounts) line += " lazy_refcounts=on";
      if (o.extended_l2) line += " extended_l2=on";
      if (o.compression_type != "zlib") line += " compression_type=" + o.compression_type;
      if (!o.data_file.empty()) line += " data_file=" + o.data_file;
    }
    const double ms = std::chrono::duration<double, std::milli>(elapsed).count();
    fmt::print("{} in {:.3f} ms\n", line, ms);
    return 0;
  }

 private:
  std::string format_ = "qcow2";
  std::string backing_;
  std::string backing_format_;
  std::vector<std::string> options_;
  bool force_ = false;
  std::string image_;
  std::string size_;
};

}  // namespace

std::unique_ptr<Command> NewCreateCommand() { return std::make_unique<CreateCommand>(); }

}  // namespace cowtap::cli
