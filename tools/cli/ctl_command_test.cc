// `cowtap ctl` run in-process (RunCli, as main does) against a ControlServer
// over a fake DaemonControl.
#include <gtest/gtest.h>
#include <signal.h>
#include <spdlog/spdlog.h>
#include <unistd.h>

#include <chrono>
#include <cstdlib>
#include <map>
#include <mutex>
#include <nlohmann/json.hpp>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "tools/cli/cli.h"
#include "tools/daemon/control_protocol.h"
#include "tools/daemon/control_server.h"

namespace cowtap::cli {
namespace {

using daemon::AttachSpec;
using daemon::VbdStatsSnapshot;

// Two VBDs whose counters move on every look: 100 reads of 10 KiB each,
// completed within [16, 32) us, half of them on the fast path.
class MovingDaemon : public daemon::DaemonControl {
 public:
  MovingDaemon() {
    for (const char* id : {"1/51712", "2/51728"}) {
      VbdStatsSnapshot s;
      s.id = id;
      s.image = std::string("/img/vm") + id[0] + ".qcow2";
      s.format = "qcow2";
      s.state = "Connected";
      s.queues = 2;
      s.latency_us_log2.assign(24, 0);
      vbds_[id] = s;
    }
  }
  std::vector<VbdStatsSnapshot> List() override {
    std::lock_guard lock(mu_);
    std::vector<VbdStatsSnapshot> out;
    for (auto& [id, s] : vbds_) out.push_back(Move(s));
    return out;
  }
  Status Attach(const AttachSpec& spec) override {
    std::lock_guard lock(mu_);
    const std::string id = std::to_string(spec.domid) + "/" + std::to_string(spec.devid);
    if (vbds_.count(id)) return Status::Busy("VBD " + id + " is attached already; detach it first");
    VbdStatsSnapshot s;
    s.id = id;
    s.image = spec.image;
    s.format = spec.format.empty() ? "raw" : spec.format;
    s.state = spec.writable ? "Connected" : "Connected (ro)";
    vbds_[id] = s;
    return Status::Ok();
  }
  Status Detach(const std::string& id) override {
    return Change(id, [&] { vbds_.erase(id); });
  }
  Status Pause(const std::string& id) override {
    return Change(id, [&] { vbds_[id].paused = true; });
  }
  Status Resume(const std::string& id) override {
    return Change(id, [&] { vbds_[id].paused = false; });
  }
  Result<VbdStatsSnapshot> Stats(const std::string& id) override {
    std::lock_guard lock(mu_);
    auto it = vbds_.find(id);
    if (it == vbds_.end()) return Status::NotFound("no VBD " + id + "; 'cowtap ctl list' shows the attached ones");
    return Move(it->second);
  }
  Status SetLogLevel(const std::string& level) override {
    if (level == "loud") return Status::InvalidArgument("log level 'loud' is not trace..critical or off");
    std::lock_guard lock(mu_);
    level_ = level;
    return Status::Ok();
  }
  Result<std::string> Export(const std::string& what, const std::string& address, bool read_only) override {
    std::lock_guard lock(mu_);
    export_read_only_ = read_only;
    return std::string("tcp:127.0.0.1:40123");
  }
  Status Unexport(const std::string& address) override { return Status::NotFound("no export at " + address); }
  Result<daemon::OffloadSnapshot> OffloadOn(const std::string& image) override {
    std::lock_guard lock(mu_);
    if (offloads_.count(image)) return Status::Busy("offload of " + image + " is on already");
    daemon::OffloadSnapshot o;
    o.image = image;
    o.device = "/dev/mapper/cowtap-fake";
    o.size_sectors = 2048;
    o.linear_sectors = 512;
    o.segments = 3;
    o.reloads = 2;
    o.reload_time_us = 1500;
    o.miss_requests = 10;
    o.miss_bytes_read = 256 * 512;
    o.device_io_known = true;
    o.device_sectors_read = 1024;
    offloads_[image] = o;
    return o;
  }
  Status OffloadOff(const std::string& image) override {
    std::lock_guard lock(mu_);
    if (!offloads_.erase(image)) return Status::NotFound("no offload of " + image);
    return Status::Ok();
  }
  Result<std::vector<daemon::OffloadSnapshot>> OffloadStatus(const std::string& image) override {
    std::lock_guard lock(mu_);
    std::vector<daemon::OffloadSnapshot> out;
    for (auto& [path, o] : offloads_)
      if (image.empty() || image == path) out.push_back(o);
    if (!image.empty() && out.empty()) return Status::NotFound("no offload of " + image);
    return out;
  }

  bool Has(const std::string& id) {
    std::lock_guard lock(mu_);
    return vbds_.count(id) != 0;
  }
  bool Paused(const std::string& id) {
    std::lock_guard lock(mu_);
    return vbds_[id].paused;
  }
  std::string level() {
    std::lock_guard lock(mu_);
    return level_;
  }
  bool export_read_only() {
    std::lock_guard lock(mu_);
    return export_read_only_;
  }

 private:
  static VbdStatsSnapshot Move(VbdStatsSnapshot& s) {
    s.reads += 100;
    s.bytes_read += 100 * 10240;
    s.remap_lookups += 100;
    s.remap_hits += 80;
    s.fast_path_ios += 50;
    s.slow_path_ios += 50;
    if (s.latency_us_log2.size() > 5) s.latency_us_log2[5] += 100;
    return s;
  }
  template <typename F>
  Status Change(const std::string& id, F f) {
    std::lock_guard lock(mu_);
    if (!vbds_.count(id)) return Status::NotFound("no VBD " + id + "; 'cowtap ctl list' shows the attached ones");
    f();
    return Status::Ok();
  }

  std::mutex mu_;
  std::map<std::string, VbdStatsSnapshot> vbds_;
  std::string level_ = "info";
  bool export_read_only_ = false;
  std::map<std::string, daemon::OffloadSnapshot> offloads_;
};

struct CtlRun {
  int code = -1;
  std::string out;
  std::string err;
};

CtlRun Cowtap(std::vector<std::string> args) {
  args.insert(args.begin(), "cowtap");
  std::vector<char*> argv;
  for (auto& a : args) argv.push_back(a.data());
  argv.push_back(nullptr);
  CtlRun r;
  testing::internal::CaptureStdout();
  testing::internal::CaptureStderr();
  r.code = RunCli(static_cast<int>(args.size()), argv.data());
  std::fflush(stdout);
  std::fflush(stderr);
  r.out = testing::internal::GetCapturedStdout();
  r.err = testing::internal::GetCapturedStderr();
  return r;
}

class CtlCommandTest : public ::testing::Test {
 protected:
  void SetUp() override {
    // The in-process server logs to stdout, which the tests capture.
    spdlog::set_level(spdlog::level::off);
    char tmpl[] = "/tmp/cowtap-ctlcmd-XXXXXX";
    ASSERT_NE(::mkdtemp(tmpl), nullptr);
    dir_ = tmpl;
    socket_ = dir_ + "/cowtapd.sock";
    auto s = daemon::ControlServer::Start(daemon_, socket_);
    ASSERT_TRUE(s.ok()) << s.status().ToString();
    server_ = std::move(s).value();
  }
  void TearDown() override {
    server_.reset();
    ::unsetenv("COWTAP_CONTROL_SOCKET");
    spdlog::set_level(spdlog::level::info);
    EXPECT_EQ(std::system(("rm -rf " + dir_).c_str()), 0);
  }
  CtlRun Ctl(std::vector<std::string> args) {
    args.insert(args.begin(), {"ctl", "--socket", socket_});
    return Cowtap(std::move(args));
  }

  MovingDaemon daemon_;
  std::string dir_;
  std::string socket_;
  std::unique_ptr<daemon::ControlServer> server_;
};

TEST_F(CtlCommandTest, ListPrintsATableOfVbds) {
  CtlRun r = Ctl({"list"});
  ASSERT_EQ(r.code, 0) << r.err;
  EXPECT_EQ(r.out.rfind("ID", 0), 0u) << r.out;
  for (const char* want : {"FORMAT", "STATE", "OPS", "READ MiB", "WRITTEN MiB", "HIT%", "IMAGE", "1/51712", "2/51728",
                           "/img/vm1.qcow2", "Connected", "80.0"}) {
    EXPECT_NE(r.out.find(want), std::string::npos) << want << " in\n" << r.out;
  }
  EXPECT_EQ(r.err, "");
}

TEST_F(CtlCommandTest, ListJsonIsTheDaemonsFigures) {
  CtlRun r = Ctl({"list", "--json"});
  ASSERT_EQ(r.code, 0) << r.err;
  auto j = nlohmann::json::parse(r.out);
  ASSERT_TRUE(j.is_array());
  ASSERT_EQ(j.size(), 2u);
  EXPECT_EQ(j[0]["id"], "1/51712");
  EXPECT_EQ(j[0]["reads"], 100);
  EXPECT_TRUE(j[0]["latency_us_log2"].is_array());
}

TEST_F(CtlCommandTest, AttachPauseResumeDetach) {
  CtlRun a =
      Ctl({"attach", "--domid", "7", "--devid", "51712", "--image", "/img/7.raw", "--format", "raw", "--read-only"});
  ASSERT_EQ(a.code, 0) << a.err;
  EXPECT_NE(a.out.find("attached 7/51712"), std::string::npos) << a.out;
  EXPECT_TRUE(daemon_.Has("7/51712"));
  CtlRun again = Ctl({"attach", "--domid", "7", "--devid", "51712", "--image", "/img/7.raw"});
  EXPECT_EQ(again.code, 1);
  EXPECT_NE(again.err.find("attached already; detach it first (busy)"), std::string::npos) << again.err;

  ASSERT_EQ(Ctl({"pause", "7/51712"}).code, 0);
  EXPECT_TRUE(daemon_.Paused("7/51712"));
  CtlRun list = Ctl({"list"});
  EXPECT_NE(list.out.find("paused"), std::string::npos) << list.out;
  ASSERT_EQ(Ctl({"resume", "7/51712"}).code, 0);
  EXPECT_FALSE(daemon_.Paused("7/51712"));
  CtlRun d = Ctl({"detach", "7/51712"});
  ASSERT_EQ(d.code, 0) << d.err;
  EXPECT_NE(d.out.find("detached 7/51712"), std::string::npos);
  EXPECT_FALSE(daemon_.Has("7/51712"));
}

TEST_F(CtlCommandTest, AnUnknownVbdExitsOneWithTheDaemonsMessage) {
  for (const char* cmd : {"pause", "resume", "detach", "stats"}) {
    CtlRun r = Ctl({cmd, "9/51712"});
    EXPECT_EQ(r.code, 1) << cmd;
    EXPECT_NE(r.err.find("no VBD 9/51712; 'cowtap ctl list' shows the attached ones (not_found)"), std::string::npos)
        << cmd << ": " << r.err;
    EXPECT_EQ(r.out, "");
  }
}

TEST_F(CtlCommandTest, AMalformedIdIsRefusedByTheDaemon) {
  CtlRun r = Ctl({"pause", "xvda"});
  EXPECT_EQ(r.code, 1);
  EXPECT_NE(r.err.find("bad_request"), std::string::npos) << r.err;
  EXPECT_NE(r.err.find("<domid>/<devid>"), std::string::npos) << r.err;
}

TEST_F(CtlCommandTest, MissingArgumentsAreUsageErrors) {
  EXPECT_EQ(Ctl({"pause"}).code, 1);
  EXPECT_EQ(Ctl({"attach", "--domid", "1", "--devid", "2"}).code, 1);
  EXPECT_EQ(Ctl({}).code, 1);
  EXPECT_EQ(Ctl({"attach", "--domid", "1", "--devid", "2", "--image", "/i", "--format", "vmdk"}).code, 1);
}

TEST_F(CtlCommandTest, NoDaemonSaysSo) {
  CtlRun r = Cowtap({"ctl", "--socket", dir_ + "/nothing.sock", "list"});
  EXPECT_EQ(r.code, 1);
  EXPECT_NE(r.err.find("is cowtapd running?"), std::string::npos) << r.err;
}

TEST_F(CtlCommandTest, TheEnvironmentPicksTheSocketAndTheFlagMayFollowTheSubcommand) {
  ::setenv("COWTAP_CONTROL_SOCKET", socket_.c_str(), 1);
  CtlRun r = Cowtap({"ctl", "list"});
  EXPECT_EQ(r.code, 0) << r.err;
  EXPECT_NE(r.out.find("1/51712"), std::string::npos);
  ::setenv("COWTAP_CONTROL_SOCKET", (dir_ + "/nothing.sock").c_str(), 1);
  CtlRun after = Cowtap({"ctl", "list", "--socket", socket_});
  EXPECT_EQ(after.code, 0) << after.err;
}

TEST_F(CtlCommandTest, StatsOfOneVbdShowsItsFigures) {
  CtlRun r = Ctl({"stats", "2/51728"});
  ASSERT_EQ(r.code, 0) << r.err;
  EXPECT_NE(r.out.find("vbd:"), std::string::npos);
  EXPECT_NE(r.out.find("2/51728"), std::string::npos);
  EXPECT_EQ(r.out.find("1/51712"), std::string::npos);
  EXPECT_NE(r.out.find("latency p99:"), std::string::npos);
  CtlRun all = Ctl({"stats"});
  EXPECT_NE(all.out.find("1/51712"), std::string::npos);
  EXPECT_NE(all.out.find("2/51728"), std::string::npos);
  CtlRun json = Ctl({"stats", "2/51728", "--json"});
  EXPECT_EQ(nlohmann::json::parse(json.out).at(0).at("id"), "2/51728");
}

TEST_F(CtlCommandTest, WatchPrintsPerSecondRates) {
  CtlRun r = Ctl({"stats", "--watch", "--interval", "0.2", "--count", "2"});
  ASSERT_EQ(r.code, 0) << r.err;
  size_t tables = 0;
  for (size_t p = r.out.find("OPS/s"); p != std::string::npos; p = r.out.find("OPS/s", p + 1)) ++tables;
  EXPECT_EQ(tables, 2u) << r.out;
  for (const char* want : {"READ MiB/s", "P50", "P99", "QD", "HIT%", "FAST%", "1/51712", "2/51728", "80.0", "50.0"}) {
    EXPECT_NE(r.out.find(want), std::string::npos) << want << " in\n" << r.out;
  }
}

TEST_F(CtlCommandTest, WatchJsonGivesRatesPerInterval) {
  CtlRun r = Ctl({"stats", "1/51712", "--watch", "--json", "--interval", "0.2", "--count", "2"});
  ASSERT_EQ(r.code, 0) << r.err;
  std::istringstream lines(r.out);
  std::string line;
  int n = 0;
  while (std::getline(lines, line)) {
    auto j = nlohmann::json::parse(line);
    ASSERT_EQ(j.size(), 1u);
    EXPECT_EQ(j[0]["id"], "1/51712");
    // 100 reads per look, 0.2 s apart: about 500/s (the machine may be slow).
    const double ops = j[0]["ops_per_s"];
    EXPECT_GT(ops, 50);
    EXPECT_LE(ops, 520);
    const double p50 = j[0]["p50_us"];
    EXPECT_GE(p50, 16);
    EXPECT_LE(p50, 32);
    EXPECT_DOUBLE_EQ(j[0]["hit_rate"].get<double>(), 0.8);
    EXPECT_DOUBLE_EQ(j[0]["fast_path"].get<double>(), 0.5);
    ++n;
  }
  EXPECT_EQ(n, 2);
}

TEST_F(CtlCommandTest, WatchEndsOnCtrlC) {
  // Two stats requests served: the watch loop runs, its handler is in place.
  std::thread interrupter([this] {
    while (server_->requests_served() < 2) std::this_thread::sleep_for(std::chrono::milliseconds(10));
    ::kill(::getpid(), SIGINT);
  });
  const auto start = std::chrono::steady_clock::now();
  CtlRun r = Ctl({"stats", "--watch", "--interval", "0.2"});
  interrupter.join();
  EXPECT_EQ(r.code, 0) << r.err;
  EXPECT_LT(std::chrono::steady_clock::now() - start, std::chrono::seconds(10));
  EXPECT_NE(r.out.find("OPS/s"), std::string::npos);
}

TEST_F(CtlCommandTest, SetLogLevelAndExport) {
  EXPECT_EQ(Ctl({"set-log-level", "debug"}).code, 0);
  EXPECT_EQ(daemon_.level(), "debug");
  CtlRun bad = Ctl({"set-log-level", "loud"});
  EXPECT_EQ(bad.code, 1);
  EXPECT_NE(bad.err.find("(invalid_argument)"), std::string::npos) << bad.err;

  CtlRun e = Ctl({"export", "1/51712", "tcp:127.0.0.1:0", "--read-only"});
  ASSERT_EQ(e.code, 0) << e.err;
  EXPECT_EQ(e.out, "tcp:127.0.0.1:40123\n");
  EXPECT_TRUE(daemon_.export_read_only());
  CtlRun u = Ctl({"unexport", "unix:/nope"});
  EXPECT_EQ(u.code, 1);
  EXPECT_NE(u.err.find("no export at unix:/nope"), std::string::npos);
}

TEST_F(CtlCommandTest, OffloadOnStatusOff) {
  CtlRun on = Ctl({"offload", "on", "/img/vm1.qcow2"});
  ASSERT_EQ(on.code, 0) << on.err;
  EXPECT_NE(on.out.find("/dev/mapper/cowtap-fake"), std::string::npos) << on.out;
  EXPECT_NE(on.out.find("linear           25.0% (512 of 2048 sectors)"), std::string::npos) << on.out;
  EXPECT_NE(on.out.find("reloads          2 (1.5 ms in total)"), std::string::npos) << on.out;
  // 256 of the device's 1024 sectors went through the miss path.
  EXPECT_NE(on.out.find("served by kernel 75.0%"), std::string::npos) << on.out;

  CtlRun again = Ctl({"offload", "on", "/img/vm1.qcow2"});
  EXPECT_EQ(again.code, 1);
  EXPECT_NE(again.err.find("(busy)"), std::string::npos) << again.err;

  CtlRun json = Ctl({"offload", "status", "--json"});
  ASSERT_EQ(json.code, 0) << json.err;
  auto list = nlohmann::json::parse(json.out);
  ASSERT_EQ(list.size(), 1u);
  EXPECT_EQ(list[0]["device"], "/dev/mapper/cowtap-fake");
  EXPECT_EQ(list[0]["reloads"], 2);

  EXPECT_EQ(Ctl({"offload", "off", "/img/vm1.qcow2"}).code, 0);
  CtlRun none = Ctl({"offload", "status"});
  ASSERT_EQ(none.code, 0) << none.err;
  EXPECT_EQ(none.out, "No image is offloaded.\n");
  CtlRun off = Ctl({"offload", "off", "/img/vm1.qcow2"});
  EXPECT_EQ(off.code, 1);
  EXPECT_NE(off.err.find("no offload of /img/vm1.qcow2"), std::string::npos) << off.err;
}

TEST_F(CtlCommandTest, OffloadNeedsAnActionAndOnAnImage) {
  EXPECT_NE(Ctl({"offload"}).code, 0);
  EXPECT_NE(Ctl({"offload", "sideways", "/img/a"}).code, 0);
  CtlRun r = Ctl({"offload", "on"});
  EXPECT_EQ(r.code, 1);
  EXPECT_NE(r.err.find("give the image path"), std::string::npos) << r.err;
}

}  // namespace
}  // namespace cowtap::cli
