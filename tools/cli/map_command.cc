// `cowtap map`: where each range of guest bytes lives (which layer of the
// chain, which host offset, or a hole / zeros), as qemu-img map shows it.
// The image is mapped in 1 GiB windows merged at their seams, so the memory
// used follows the number of extents, not one huge Map() call.
#include <fmt/format.h>

#include "base/checked_math.h"
#include "tools/cli/command.h"
#include "tools/cli/report.h"
#include "tools/cli/util.h"

namespace cowtap::cli {
namespace {

constexpr uint64_t kWindowBytes = uint64_t{1} << 30;

class MapCommand final : public Command {
 public:
  std::string_view name() const override { return "map"; }
  std::string_view summary() const override { return "Show where an image's data lives (extents and remaps)"; }

  void Configure(CLI::App& app) override {
    app.add_flag("--json", json_, "Print JSON with qemu-img map --output=json's keys");
    app.add_option("-s,--start-offset", start_, "First guest byte to map (K/M/G suffixes allowed)");
    app.add_option("-l,--max-length", length_, "Map at most this many bytes (default: to the end)");
    AddFormatFlag(app, &format_);
    app.add_option("IMAGE", image_, "The image to map")->required();
    app.footer(
        "Columns: guest offset and length; Data: the bytes are stored (not zeros); Zero:\n"
        "reads as zeros; Depth: 0 = IMAGE, 1 = its backing file, ...; Mapped to: the\n"
        "byte offset in File. Exit status: 0 success, 1 error (message on stderr).");
  }

  int Run() override {
    auto opened = cow::OpenImage(image_, CliOpenOptions(/*read_only=*/true, format_));
    if (!opened.ok()) return ReportError(name(), image_, opened.status());
    cow::Image& image = **opened;
    uint64_t start = 0;
    uint64_t end = image.size_bytes();
    if (!start_.empty()) {
      auto v = ParseSize(start_);
      if (!v.ok()) return ReportError(name(), image_, v.status().Annotate("--start-offset"));
      start = std::min(*v, end);
    }
    if (!length_.empty()) {
      auto v = ParseSize(length_);
      if (!v.ok()) return ReportError(name(), image_, v.status().Annotate("--max-length"));
      end = std::min(end, AddU64(start, *v).value_or(end));
    }
    std::vector<cow::Extent> extents;
    for (uint64_t offset = start; offset < end;) {
      const uint64_t length = std::min(kWindowBytes, end - offset);
      auto window = image.Map(offset, length);
      if (!window.ok()) return ReportError(name(), image_, window.status());
      AppendMerged(*window, &extents);
      offset += length;
    }
    fmt::print("{}", json_ ? MapToJsonText(extents) : MapToText(extents));
    Status s = image.Close();
    if (!s.ok()) return ReportError(name(), image_, s);
    return 0;
  }

 private:
  bool json_ = false;
  std::string start_;
  std::string length_;
  std::string format_;
  std::string image_;
};

}  // namespace

std::unique_ptr<Command> NewMapCommand() { return std::make_unique<MapCommand>(); }

}  // namespace cowtap::cli
