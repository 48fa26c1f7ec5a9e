// `cowtap check`: cow::CheckImage with qemu-img check's output and exit codes.
#include <fmt/format.h>

#include "tools/cli/command.h"
#include "tools/cli/report.h"
#include "tools/cli/util.h"

namespace cowtap::cli {
namespace {

// The format name for the JSON report; the check itself opens the file again.
std::string ProbedFormatName(const std::string& path) {
  auto file = cow::DefaultFileSystem()->Open(path, cow::FileOpenOptions{});
  if (!file.ok()) return "unknown";
  auto format = cow::ProbeFormat(**file);
  return format.ok() ? std::string(cow::FormatName(*format)) : "unknown";
}

class CheckCommand final : public Command {
 public:
  std::string_view name() const override { return "check"; }
  std::string_view summary() const override { return "Check an image's metadata for corruption and leaks"; }

  void Configure(CLI::App& app) override {
    app.add_option("-r,--repair", repair_,
                   "Repair what is found: 'leaks' frees leaked clusters (safe);\n"
                   "'all' also fixes errors, which may lose data")
        ->check(CLI::IsMember({"leaks", "all"}));
    app.add_flag("--json", json_, "Print JSON with qemu-img check --output=json's keys");
    app.add_option("IMAGE", image_, "The image to check (must not be in use read-write elsewhere)")->required();
    app.footer(
        "Exit status (as qemu-img check):\n"
        "  0   no errors or leaks found (or all were repaired)\n"
        "  1   the check could not run (missing file, unreadable header, I/O error)\n"
        "  2   corruptions remain\n"
        "  3   only leaked clusters remain (wasted space, data intact)\n"
        "  63  the format has no check (raw, qcow)");
  }

  int Run() override {
    cow::CheckOptions o;
    o.repair_leaks = repair_ == "leaks" || repair_ == "all";
    o.repair_all = repair_ == "all";
    auto result = cow::CheckImage(image_, o);
    if (!result.ok()) return ReportError(name(), image_, result.status());
    if (!result->supported) {
      fmt::print(stderr, "cowtap check: {}: this image format does not support checks\n", image_);
      return result->ExitCode();
    }
    if (json_) {
      fmt::print("{}\n", CheckToJson(image_, ProbedFormatName(image_), *result).dump(4));
    } else {
      fmt::print("{}", CheckToText(*result));
    }
    return result->ExitCode();
  }

 private:
  std::string repair_;
  bool json_ = false;
  std::string image_;
};

}  // namespace

std::unique_ptr<Command> NewCheckCommand() { return std::make_unique<CheckCommand>(); }

}  // namespace cowtap::cli
