// `cowtap ctl`: talks to a running cowtapd over its control socket: list the
// VBDs, attach / detach / pause / resume one, show its figures (once, or as a
// live table of per-second rates with --watch), change the log level, and
// export a VBD or image over NBD, turn an image's kernel offload (dm/) on or
// off and show its figures. Errors exit 1 with the daemon's message.
#include <fmt/format.h>
#include <poll.h>
#include <unistd.h>

#include <chrono>
#include <csignal>
#include <ctime>
#include <map>

#include "tools/cli/command.h"
#include "tools/cli/ctl_client.h"
#include "tools/cli/ctl_table.h"
#include "tools/cli/util.h"

namespace cowtap::cli {
namespace {

using daemon::ControlCommand;
using daemon::ControlReply;
using daemon::ControlRequest;
using daemon::VbdStatsSnapshot;

volatile std::sig_atomic_t g_interrupted = 0;

void OnInterrupt(int) { g_interrupted = 1; }

// SIGINT/SIGTERM end a --watch loop instead of the process, while in scope.
class InterruptGuard {
 public:
  InterruptGuard() {
    g_interrupted = 0;
    struct sigaction sa {};
    sa.sa_handler = OnInterrupt;
    sigemptyset(&sa.sa_mask);
    sa.sa_flags = 0;  // no SA_RESTART: the sleep returns at once
    ::sigaction(SIGINT, &sa, &old_int_);
    ::sigaction(SIGTERM, &sa, &old_term_);
  }
  ~InterruptGuard() {
    ::sigaction(SIGINT, &old_int_, nullptr);
    ::sigaction(SIGTERM, &old_term_, nullptr);
  }

 private:
  struct sigaction old_int_ {};
  struct sigaction old_term_ {};
};

class CtlCommand final : public Command {
 public:
  std::string_view name() const override { return "ctl"; }
  std::string_view summary() const override {
    return "Control a running cowtapd: list, attach, detach, pause, resume, stats, log level, NBD export, "
           "kernel offload";
  }

  void Configure(CLI::App& app) override {
    app.add_option("--socket", socket_,
                   "cowtapd's control socket (default $COWTAP_CONTROL_SOCKET or " +
                       std::string(daemon::kDefaultControlSocket) + ")");
    app.add_option("--timeout", timeout_s_, "Seconds to wait for the daemon's answer (default 60)")
        ->check(CLI::Range(0.1, 86400.0));
    app.require_subcommand(1);

    auto sub = [&](const char* name, const char* help) {
      CLI::App* s = app.add_subcommand(name, help);
      s->fallthrough();  // --socket / --timeout after the subcommand too
      return s;
    };
    list_ = sub("list", "One line per VBD: id, format, state, ops, MiB read/written, cache hit rate, image");
    list_->add_flag("--json", json_, "Print the daemon's figures as JSON");

    attach_ = sub("attach", "Attach an image to a guest (simulated platform; on Xen, xl attaches)");
    attach_->add_option("--domid", request_.attach.domid, "Guest domain id")->required();
    attach_->add_option("--devid", request_.attach.devid, "Virtual device number (51712 = xvda)")->required();
    attach_->add_option("--image", request_.attach.image, "Top image of the chain")->required();
    attach_->add_option("--format", request_.attach.format, "qcow2, qcow or raw (probed when omitted)")
        ->check(CLI::IsMember({"qcow2", "qcow", "raw"}));
    attach_->add_flag("--read-only", read_only_, "Give the guest a read-only disk");

    for (auto [field, name, help] : {std::tuple{&detach_, "detach", "Disconnect a VBD cleanly (flush, close, release)"},
                                     std::tuple{&pause_, "pause", "Stop taking requests, drain in-flight I/O, flush"},
                                     std::tuple{&resume_, "resume", "Take requests again after pause"}}) {
      *field = sub(name, help);
      (*field)->add_option("ID", request_.id, "The VBD, <domid>/<devid> as list shows")->required();
    }

    stats_ = sub("stats", "A VBD's figures (all VBDs without ID); --watch for a live table of rates");
    stats_->add_option("ID", request_.id, "The VBD, <domid>/<devid>");
    stats_->add_flag("--json", json_, "Print JSON");
    stats_->add_flag("--watch", watch_, "Redraw a table of per-second rates until Ctrl-C");
    stats_->add_option("--interval", interval_s_, "Seconds between --watch samples (default 1)")
        ->check(CLI::Range(0.1, 3600.0));
    stats_->add_option("--count", count_, "Stop --watch after this many tables");

    level_ = sub("set-log-level", "Change the daemon's log level");
    level_->add_option("LEVEL", request_.level, "trace, debug, info, warn, err, critical or off")->required();

    export_ = sub("export", "Serve a VBD or an image over NBD; prints the address bound");
    export_->add_option("WHAT", request_.what, "A VBD id (<domid>/<devid>) or an image path")->required();
    export_->add_option("ADDRESS", request_.address, "unix:/path or tcp:127.0.0.1:port (port 0: any free)")->required();
    export_->add_flag("--read-only", request_.read_only, "Refuse writes through the export");

    unexport_ = sub("unexport", "Stop an NBD export");
    unexport_->add_option("ADDRESS", request_.address, "The address export printed")->required();

    offload_ = sub("offload",
                   "Kernel offload of an image: on (creates /dev/mapper/cowtap-..., the guest's phy: disk), off, "
                   "status");
    offload_->add_option("ACTION", offload_action_, "on, off or status")
        ->required()
        ->check(CLI::IsMember({"on", "off", "status"}));
    offload_->add_option("IMAGE", request_.what, "The image path (status: every offload when omitted)");
    offload_->add_flag("--json", json_, "status, on: print the daemon's figures as JSON");

    app.footer(
        "Talks to cowtapd over its root-only Unix socket.\nExit status: 0 success, 1 error (message on stderr).");
  }

  int Run() override {
    const std::string path = socket_.empty() ? DefaultControlSocketPath() : socket_;
    const auto timeout = std::chrono::milliseconds(static_cast<int64_t>(timeout_s_ * 1000));
    auto client = ControlClient::Connect(path, timeout);
    if (!client.ok()) return ReportError("ctl", "", client.status());
    client_ = std::move(client).value();

    if (list_->parsed()) return List();
    if (stats_->parsed()) return watch_ ? Watch() : Stats();
    if (offload_->parsed()) return Offload();
    request_.attach.writable = !read_only_;
    if (attach_->parsed()) request_.cmd = ControlCommand::kAttach;
    if (detach_->parsed()) request_.cmd = ControlCommand::kDetach;
    if (pause_->parsed()) request_.cmd = ControlCommand::kPause;
    if (resume_->parsed()) request_.cmd = ControlCommand::kResume;
    if (level_->parsed()) request_.cmd = ControlCommand::kSetLogLevel;
    if (export_->parsed()) request_.cmd = ControlCommand::kExport;
    if (unexport_->parsed()) request_.cmd = ControlCommand::kUnexport;
    auto reply = Call(request_);
    if (!reply) return 1;
    switch (request_.cmd) {
      case ControlCommand::kAttach:
        fmt::print("attached {}/{} ({})\n", request_.attach.domid, request_.attach.devid, request_.attach.image);
        break;
      case ControlCommand::kDetach:
        fmt::print("detached {}\n", request_.id);
        break;
      case ControlCommand::kPause:
        fmt::print("paused {}: in-flight I/O drained, image flushed\n", request_.id);
        break;
      case ControlCommand::kResume:
        fmt::print("resumed {}\n", request_.id);
        break;
      case ControlCommand::kSetLogLevel:
        fmt::print("log level: {}\n", request_.level);
        break;
      case ControlCommand::kExport:
        fmt::print("{}\n", reply->address);
        break;
      case ControlCommand::kUnexport:
        fmt::print("unexported {}\n", request_.address);
        break;
      default:
        break;
    }
    return 0;
  }

 private:
  // The daemon's reply, or nullopt after printing why there is none (exit 1).
  std::optional<ControlReply> Call(const ControlRequest& request) {
    const std::string what = fmt::format("ctl {}", daemon::ControlCommandName(request.cmd));
    auto reply = client_->Call(request);
    if (!reply.ok()) {
      ReportError(what, "", reply.status());
      return std::nullopt;
    }
    if (!reply->ok) {
      fmt::print(stderr, "cowtap {}: {} ({})\n", what, reply->error, reply->code);
      return std::nullopt;
    }
    return std::move(reply).value();
  }

  static void PrintJson(const std::vector<VbdStatsSnapshot>& vbds) {
    daemon::ControlReply r;
    r.ok = true;
    r.vbds = vbds;
    // The wire encoding is the JSON layout; pretty-print its list.
    auto j = nlohmann::json::parse(daemon::EncodeReply(r));
    nlohmann::json list = j.contains("vbds") ? j["vbds"] : nlohmann::json::array();
    fmt::print("{}\n", list.dump(2, ' ', false, nlohmann::json::error_handler_t::replace));
  }

  int List() {
    ControlRequest r;
    r.cmd = ControlCommand::kList;
    auto reply = Call(r);
    if (!reply) return 1;
    if (json_) {
      PrintJson(reply->vbds);
    } else {
      fmt::print("{}", FormatVbdTable(reply->vbds));
    }
    return 0;
  }

  int Stats() {
    ControlRequest r;
    r.cmd = ControlCommand::kStats;
    r.id = request_.id;
    auto reply = Call(r);
    if (!reply) return 1;
    if (json_) {
      PrintJson(reply->vbds);
      return 0;
    }
    if (reply->vbds.empty()) fmt::print("No VBDs attached.\n");
    for (size_t i = 0; i < reply->vbds.size(); ++i) fmt::print("{}{}", i ? "\n" : "", FormatVbdDetails(reply->vbds[i]));
    return 0;
  }

  int Offload() {
    ControlRequest r;
    r.cmd = ControlCommand::kOffload;
    r.what = request_.what;
    r.offload = offload_action_ == "on"    ? daemon::OffloadAction::kOn
                : offload_action_ == "off" ? daemon::OffloadAction::kOff
                                           : daemon::OffloadAction::kStatus;
    if (r.offload != daemon::OffloadAction::kStatus && r.what.empty()) {
      fmt::print(stderr, "cowtap ctl offload {}: give the image path\n", offload_action_);
      return 1;
    }
    auto reply = Call(r);
    if (!reply) return 1;
    if (r.offload == daemon::OffloadAction::kOff) {
      fmt::print("offload of {} off\n", r.what);
      return 0;
    }
    if (json_) {
      auto j = nlohmann::json::parse(daemon::EncodeReply(*reply));
      nlohmann::json list = j.contains("offloads") ? j["offloads"] : nlohmann::json::array();
      fmt::print("{}\n", list.dump(2, ' ', false, nlohmann::json::error_handler_t::replace));
      return 0;
    }
    if (reply->offloads.empty()) fmt::print("No image is offloaded.\n");
    for (size_t i = 0; i < reply->offloads.size(); ++i) {
      fmt::print("{}{}", i ? "\n" : "", FormatOffload(reply->offloads[i]));
    }
    return 0;
  }

  static std::string FormatOffload(const daemon::OffloadSnapshot& o) {
    const double kernel = daemon::OffloadKernelFraction(o);
    const uint64_t miss_bytes = o.miss_bytes_read + o.miss_bytes_written;
    std::string out = fmt::format("{}\n", o.image);
    out += fmt::format("  device           {}\n", o.device);
    out += fmt::format("  segments         {}\n", o.segments);
    out += fmt::format("  linear           {:.1f}% ({} of {} sectors)\n", 100 * daemon::OffloadLinearFraction(o),
                       o.linear_sectors, o.size_sectors);
    out += fmt::format("  reloads          {} ({:.1f} ms in total)\n", o.reloads, o.reload_time_us / 1000.0);
    out += fmt::format("  revokes          {}\n", o.revokes);
    out += fmt::format("  primed clusters  {}\n", o.primed_clusters);
    out += fmt::format("  miss path        {} requests, {:.1f} MiB\n", o.miss_requests, miss_bytes / 1048576.0);
    out +=
        fmt::format("  discard/zeroes   {} zeroed in place, {} to the engine\n", o.zeroes_in_place, o.zeroes_to_engine);
    if (o.device_io_known) {
      out += fmt::format("  device I/O       {:.1f} MiB\n",
                         (o.device_sectors_read + o.device_sectors_written) * 512 / 1048576.0);
    }
    out +=
        kernel < 0 ? std::string("  served by kernel -\n") : fmt::format("  served by kernel {:.1f}%\n", 100 * kernel);
    return out;
  }

  // Sleeps up to ms; false when interrupted.
  static bool Sleep(int64_t ms) {
    const auto end = std::chrono::steady_clock::now() + std::chrono::milliseconds(ms);
    while (!g_interrupted) {
      const auto left = std::chrono::duration_cast<std::chrono::milliseconds>(end - std::chrono::steady_clock::now());
      if (left.count() <= 0) return true;
      ::poll(nullptr, 0, static_cast<int>(left.count()));
    }
    return false;
  }

  int Watch() {
    InterruptGuard guard;
    ControlRequest r;
    r.cmd = ControlCommand::kStats;
    r.id = request_.id;
    const bool tty = ::isatty(STDOUT_FILENO) == 1;
    std::map<std::string, VbdStatsSnapshot> before;
    auto t_before = std::chrono::steady_clock::now();
    auto first = Call(r);
    if (!first) return 1;
    for (auto& s : first->vbds) before[s.id] = std::move(s);
    for (uint64_t shown = 0; count_ == 0 || shown < count_;) {
      if (!Sleep(static_cast<int64_t>(interval_s_ * 1000))) break;
      auto reply = Call(r);
      if (!reply) return 1;
      const auto t_now = std::chrono::steady_clock::now();
      const double seconds = std::chrono::duration<double>(t_now - t_before).count();
      std::vector<VbdRates> rows;
      std::map<std::string, VbdStatsSnapshot> now;
      for (auto& s : reply->vbds) {
        auto it = before.find(s.id);
        rows.push_back(ComputeRates(it == before.end() ? nullptr : &it->second, s, seconds));
        now[s.id] = std::move(s);
      }
      ++shown;
      if (json_) {
        fmt::print("{}\n", RatesToJson(rows).dump(-1, ' ', false, nlohmann::json::error_handler_t::replace));
      } else {
        const std::time_t wall = std::time(nullptr);
        char clock[16] = "";
        std::strftime(clock, sizeof(clock), "%H:%M:%S", std::localtime(&wall));
        fmt::print("{}cowtapd at {}: rates over {:.1f} s at {}{}\n{}{}", tty ? "\x1b[H\x1b[2J" : "", client_->path(),
                   seconds, clock, tty ? " (Ctrl-C to stop)" : "", FormatRatesTable(rows), tty ? "" : "\n");
      }
      std::fflush(stdout);
      before = std::move(now);
      t_before = t_now;
    }
    return 0;
  }

  std::string socket_;
  double timeout_s_ = 60;
  std::unique_ptr<ControlClient> client_;
  ControlRequest request_;
  bool read_only_ = false;
  bool json_ = false;
  bool watch_ = false;
  double interval_s_ = 1;
  uint64_t count_ = 0;
  CLI::App* list_ = nullptr;
  CLI::App* attach_ = nullptr;
  CLI::App* detach_ = nullptr;
  CLI::App* pause_ = nullptr;
  CLI::App* resume_ = nullptr;
  CLI::App* stats_ = nullptr;
  CLI::App* level_ = nullptr;
  CLI::App* export_ = nullptr;
  CLI::App* unexport_ = nullptr;
  CLI::App* offload_ = nullptr;
  std::string offload_action_;
};

}  // namespace

std::unique_ptr<Command> NewCtlCommand() { return std::make_unique<CtlCommand>(); }

}  // namespace cowtap::cli
