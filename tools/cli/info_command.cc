// `cowtap info`: what an image is (format, sizes, cluster size, backing file,
// features, snapshots), optionally for its whole backing chain, as text or
// qemu-img-compatible JSON.
#include <fmt/format.h>

#include "tools/cli/command.h"
#include "tools/cli/report.h"
#include "tools/cli/util.h"

namespace cowtap::cli {
namespace {

class InfoCommand final : public Command {
 public:
  std::string_view name() const override { return "info"; }
  std::string_view summary() const override { return "Show an image's format, size, backing chain and features"; }

  void Configure(CLI::App& app) override {
    app.add_flag("--json", json_, "Print JSON with qemu-img info --output=json's keys");
    app.add_flag("--backing-chain", chain_, "Describe every image of the backing chain, top first");
    AddFormatFlag(app, &format_);
    app.add_option("IMAGE", image_, "The image to describe")->required();
    app.footer("Opens IMAGE read-only with its backing chain.\nExit status: 0 success, 1 error (message on stderr).");
  }

  int Run() override {
    auto opened = cow::OpenImage(image_, CliOpenOptions(/*read_only=*/true, format_));
    if (!opened.ok()) return ReportError(name(), image_, opened.status());
    std::vector<LayerReport> layers;
    const cow::Image* layer = opened->get();
    std::shared_ptr<cow::Image> hold;  // keeps the current backing layer alive
    while (layer) {
      LayerReport r{layer->info(), DiskUsageBytes(layer->info().path)};
      layers.push_back(std::move(r));
      if (!chain_) break;
      hold = layer->backing();
      layer = hold.get();
    }
    if (json_) {
      if (chain_) {
        nlohmann::ordered_json all = nlohmann::ordered_json::array();
        for (const auto& l : layers) all.push_back(InfoToJson(l));
        fmt::print("{}\n", all.dump(4));
      } else {
        fmt::print("{}\n", InfoToJson(layers.front()).dump(4));
      }
    } else {
      for (size_t i = 0; i < layers.size(); ++i) fmt::print("{}{}", i ? "\n" : "", InfoToText(layers[i]));
    }
    Status s = (*opened)->Close();
    if (!s.ok()) return ReportError(name(), image_, s);
    return 0;
  }

 private:
  bool json_ = false;
  bool chain_ = false;
  std::string format_;
  std::string image_;
};

}  // namespace

std::unique_ptr<Command> NewInfoCommand() { return std::make_unique<InfoCommand>(); }

}  // namespace cowtap::cli
