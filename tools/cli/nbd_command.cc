// `cowtap serve-nbd`: exports one image (with its backing chain) over NBD on
// a Unix socket or a loopback TCP port until SIGINT/SIGTERM, for tools
// (qemu-img, qemu-io, nbdinfo, nbdcopy, fio) and tests. Once listening it
// prints one line on stdout, "serving IMAGE at ADDRESS (URI)", which scripts
// wait for; on a signal it stops the server (in-flight requests finish),
// closes the image clean and prints the request counters.
#include <fmt/format.h>
#include <signal.h>
#include <spdlog/spdlog.h>

#include <cstdio>

#include "backend/block_device.h"
#include "backend/nbd_server.h"
#include "base/log.h"
#include "tools/cli/command.h"
#include "tools/cli/util.h"

namespace cowtap::cli {
namespace {

class ServeNbdCommand final : public Command {
 public:
  std::string_view name() const override { return "serve-nbd"; }
  std::string_view summary() const override { return "Export an image over NBD (Unix socket or loopback TCP)"; }

  void Configure(CLI::App& app) override {
    auto* socket = app.add_option("--socket", socket_, "Listen on this Unix socket (created mode 0600)");
    auto* tcp = app.add_option("--tcp", tcp_, "Listen on HOST:PORT, HOST a loopback address; PORT 0 picks one");
    socket->excludes(tcp);
    app.add_flag("--read-only", read_only_, "Open the image read-only and export it read-only");
    app.add_option("--export-name", export_name_, "The export's name (clients asking for \"\" get it too)");
    app.add_option("--max-clients", max_clients_, "Connections served at once")->check(CLI::Range(1, 1024));
    app.add_option("--log-level", log_level_, "trace, debug, info, warn, error, critical or off");
    AddFormatFlag(app, &format_);
    app.add_option("IMAGE", image_, "The image to export")->required();
    app.footer(
        "Serves until SIGINT or SIGTERM. Prints 'serving IMAGE at ADDRESS (URI)' on stdout once clients may\n"
        "connect, e.g. qemu-img info 'nbd+unix:///?socket=PATH'.\n"
        "NBD has no authentication: only a Unix socket (owner-only) or loopback TCP is served.\n"
        "Exit status: 0 after a clean stop, 1 error (message on stderr).");
  }

  int Run() override {
    if (socket_.empty() == tcp_.empty()) {
      return ReportError(name(), "", Status::InvalidArgument("give exactly one of --socket PATH or --tcp HOST:PORT"));
    }
    if (!spdlog::get("cowtap")) InitLogging(log_level_);

    // Signals are taken by sigwait below; block them before any thread starts
    // so that the server's threads inherit the mask.
    sigset_t signals;
    sigemptyset(&signals);
    sigaddset(&signals, SIGINT);
    sigaddset(&signals, SIGTERM);
    sigaddset(&signals, SIGHUP);
    pthread_sigmask(SIG_BLOCK, &signals, nullptr);

    cow::OpenOptions open = CliOpenOptions(read_only_, format_);
    open.remap_cache_entries = cow::OpenOptions{}.remap_cache_entries;  // a server gains from it
    auto opened = cow::OpenImage(image_, open);
    if (!opened.ok()) return ReportError(name(), image_, opened.status());
    std::shared_ptr<cow::Image> image = std::move(opened).value();
    backend::ImageDeviceOptions device_options;
    device_options.read_only = read_only_;
    std::shared_ptr<backend::BlockDevice> device = backend::NewImageBlockDevice(image, device_options);

    backend::NbdServerOptions options;
    options.address = socket_.empty() ? "tcp:" + tcp_ : "unix:" + socket_;
    options.export_name = export_name_;
    options.description = image_;
    options.read_only = read_only_;
    options.max_clients = max_clients_;
    auto server = backend::NbdServer::Start(device, options);
    if (!server.ok()) {
      image->Close().IgnoreError();
      return ReportError(name(), image_, server.status());
    }
    fmt::print("serving {} at {} ({})\n", image_, (*server)->address(), (*server)->uri());
    std::fflush(stdout);

    int signal_number = 0;
    sigwait(&signals, &signal_number);
    (*server)->Stop();
    const backend::NbdServerStats st = (*server)->stats();
    server->reset();
    device.reset();
    Status closed = image->Close();
    fmt::print(stderr,
               "cowtap serve-nbd: stopped on signal {}: {} connections ({} refused, {} protocol errors), {} requests "
               "({} failed), {} bytes read, {} bytes written\n",
               signal_number, st.connections_accepted, st.connections_refused, st.protocol_errors, st.requests,
               st.request_errors, st.bytes_read, st.bytes_written);
    if (!closed.ok()) return ReportError(name(), image_, closed);
    return 0;
  }

 private:
  std::string socket_;
  std::string tcp_;
  bool read_only_ = false;
  std::string export_name_;
  size_t max_clients_ = 16;
  std::string log_level_ = "warn";
  std::string format_;
  std::string image_;
};

}  // namespace

std::unique_ptr<Command> NewServeNbdCommand() { return std::make_unique<ServeNbdCommand>(); }

}  // namespace cowtap::cli
