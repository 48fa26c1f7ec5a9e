// `cowtap serve-nbd` against real NBD clients: qemu-img compare / qemu-io
// (qemu-utils) and nbdinfo / nbdcopy (libnbd-bin). Each case builds a qcow2
// overlay over a qcow2 base with qemu-img, serves it, drives a client, stops
// the server with SIGTERM and checks the image with qemu-img. Cases skip with
// a reason when a client tool is missing.
#include <fcntl.h>
#include <gtest/gtest.h>
#include <poll.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cstring>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "tests/interop/test_util.h"

namespace cowtap::tests {
namespace {

const bool kSummary = RegisterSummary("nbd");

// A `cowtap serve-nbd` child process: started, waited for until it prints
// its "serving ... at ADDRESS (URI)" line, stopped with SIGTERM.
class ServeNbd {
 public:
  ~ServeNbd() {
    if (pid_ > 0) {
      ::kill(pid_, SIGKILL);
      ::waitpid(pid_, nullptr, 0);
    }
    if (out_fd_ >= 0) ::close(out_fd_);
  }

  // Returns "" on success, else what went wrong (with the server's output).
  std::string Start(const std::vector<std::string>& args) {
    int fds[2];
    if (::pipe2(fds, O_CLOEXEC) != 0) return "pipe failed";
    std::vector<std::string> argv = {COWTAP_BIN, "serve-nbd"};
    argv.insert(argv.end(), args.begin(), args.end());
    std::vector<char*> cargs;
    for (auto& a : argv) cargs.push_back(a.data());
    cargs.push_back(nullptr);
    pid_ = ::fork();
    if (pid_ == 0) {
      ::dup2(fds[1], 1);
      ::dup2(fds[1], 2);
      ::execv(cargs[0], cargs.data());
      ::_exit(127);
    }
    ::close(fds[1]);
    out_fd_ = fds[0];
    // Wait up to 10 s for the ready line.
    while (output_.find('\n') == std::string::npos) {
      pollfd pfd{out_fd_, POLLIN, 0};
      if (::poll(&pfd, 1, 10000) <= 0) return "no ready line within 10 s: " + output_;
      char buf[512];
      const ssize_t n = ::read(out_fd_, buf, sizeof(buf));
      if (n <= 0) return "serve-nbd exited before serving: " + output_;
      output_.append(buf, static_cast<size_t>(n));
    }
    const size_t open = output_.find(" (");
    const size_t close = output_.find(")\n");
    if (output_.rfind("serving ", 0) != 0 || open == std::string::npos || close == std::string::npos) {
      return "unexpected first line: " + output_;
    }
    uri_ = output_.substr(open + 2, close - open - 2);
    return "";
  }

  // SIGTERM, then the exit status (-1 if it did not exit within 20 s).
  int Stop() {
    if (pid_ <= 0) return -1;
    ::kill(pid_, SIGTERM);
    int status = 0;
    for (int i = 0; i < 2000; ++i) {
      const pid_t r = ::waitpid(pid_, &status, WNOHANG);
      if (r == pid_) {
        pid_ = -1;
        char buf[4096];
        ssize_t n;
        while ((n = ::read(out_fd_, buf, sizeof(buf))) > 0) output_.append(buf, static_cast<size_t>(n));
        return WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
      }
      ::usleep(10000);
    }
    return -1;
  }

  const std::string& uri() const { return uri_; }
  const std::string& output() const { return output_; }

 private:
  pid_t pid_ = -1;
  int out_fd_ = -1;
  std::string output_;
  std::string uri_;
};

class NbdClientsTest : public ::testing::Test {
 protected:
  void SetUp() override {
    if (std::string why = MissingQemuToolsReason(); !why.empty()) GTEST_SKIP() << why;
    dir_ = std::make_unique<TempDir>("nbd");
    base_ = dir_->File("base.qcow2");
    top_ = dir_->File("top.qcow2");
    socket_ = dir_->File("nbd.sock");
    Run({"qemu-img", "create", "-q", "-f", "qcow2", base_, "64M"});
    Run({"qemu-io", "-f", "qcow2", "-c", "write -P 0x11 0 8M", "-c", "write -P 0x22 20M 3M", "-c",
         "write -P 0x44 63M 1M", base_});
    Run({"qemu-img", "create", "-q", "-f", "qcow2", "-b", base_, "-F", "qcow2", top_});
    Run({"qemu-io", "-f", "qcow2", "-c", "write -P 0x33 4M 2M", "-c", "write -z 21M 512k", top_});
  }

  void Run(const std::vector<std::string>& argv, int expected_exit = 0) {
    const CommandResult r = RunCommand(argv);
    ASSERT_EQ(r.exit_code, expected_exit) << CommandLine(argv) << "\n" << r.output;
  }
  static void RequireTool(const std::string& tool) {
    if (!HaveTool(tool)) GTEST_SKIP() << tool << " is needed (Debian package libnbd-bin)";
  }

  std::unique_ptr<TempDir> dir_;
  std::string base_, top_, socket_;
};

TEST_F(NbdClientsTest, QemuImgCompareFindsTheExportEqualToARawTwin) {
  const std::string twin = dir_->File("twin.raw");
  Run({"qemu-img", "convert", "-O", "raw", top_, twin});
  ServeNbd server;
  ASSERT_EQ(server.Start({top_, "--socket", socket_, "--read-only"}), "");
  EXPECT_EQ(server.uri(), "nbd+unix:///?socket=" + socket_);
  Run({"qemu-img", "compare", "-f", "raw", "-F", "raw", twin, server.uri()});
  // A byte changed in the twin is seen as a difference (the compare is real).
  Run({"qemu-io", "-f", "raw", "-c", "write -P 0x99 5M 1", twin});
  Run({"qemu-img", "compare", "-f", "raw", "-F", "raw", twin, server.uri()}, 1);
  EXPECT_EQ(server.Stop(), 0) << server.output();
}

TEST_F(NbdClientsTest, QemuImgCompareOverLoopbackTcp) {
  const std::string twin = dir_->File("twin.raw");
  Run({"qemu-img", "convert", "-O", "raw", top_, twin});
  ServeNbd server;
  ASSERT_EQ(server.Start({top_, "--tcp", "127.0.0.1:0", "--read-only", "--export-name", "vm1"}), "");
  ASSERT_EQ(server.uri().rfind("nbd://127.0.0.1:", 0), 0u) << server.uri();
  Run({"qemu-img", "compare", "-f", "raw", "-F", "raw", twin, server.uri()});
  EXPECT_EQ(server.Stop(), 0) << server.output();
}

TEST_F(NbdClientsTest, QemuIoWritesLandInTheOverlayAndTheBaseIsUntouched) {
  const Result<uint64_t> base_hash = HashFile(base_);
  ASSERT_TRUE(base_hash.ok());
  ServeNbd server;
  ASSERT_EQ(server.Start({top_, "--socket", socket_}), "");
  Run({"qemu-io", "-f", "raw", server.uri(), "-c", "write -P 0xab 0 1M", "-c", "read -P 0xab 0 1M", "-c",
       "write -f -P 0xcd 50M 64k", "-c", "write -z 20M 256k", "-c", "discard 4M 1M", "-c", "flush"});
  EXPECT_EQ(server.Stop(), 0) << server.output();
  Run({"qemu-img", "check", top_});
  Run({"qemu-io", "-f",
       "qcow2",   "-r",
       "-c",      "read -P 0xab 0 1M",
       "-c",      "read -P 0x11 1M 3M",
       "-c",      "read -P 0xcd 50M 64k",
       "-c",      "read -P 0 20M 256k",
       "-c",      "read -P 0x22 20992k 256k",
       "-c",      "read -P 0 4M 1M",
       "-c",      "read -P 0x33 5M 1M",
       "-c",      "read -P 0x44 63M 1M",
       top_});
  const Result<uint64_t> after = HashFile(base_);
  ASSERT_TRUE(after.ok());
  EXPECT_EQ(*after, *base_hash) << "the backing file changed";
}

TEST_F(NbdClientsTest, NbdinfoShowsSizeAndFlags) {
  RequireTool("nbdinfo");
  ServeNbd server;
  ASSERT_EQ(server.Start({top_, "--socket", socket_}), "");
  const CommandResult r = RunCommand({"nbdinfo", "--json", server.uri()});
  ASSERT_EQ(r.exit_code, 0) << r.output;
  const auto json = nlohmann::json::parse(r.output, nullptr, /*allow_exceptions=*/false);
  ASSERT_FALSE(json.is_discarded()) << r.output;
  EXPECT_EQ(json["protocol"], "newstyle-fixed");
  ASSERT_EQ(json["exports"].size(), 1u) << r.output;
  const auto& e = json["exports"][0];
  EXPECT_EQ(e["export-size"], 64u << 20);
  EXPECT_EQ(e["is_read_only"], false);
  EXPECT_EQ(e["can_flush"], true);
  EXPECT_EQ(e["can_fua"], true);
  EXPECT_EQ(e["can_trim"], true);
  EXPECT_EQ(e["can_zero"], true);
  EXPECT_EQ(e["can_multi_conn"], true);
  EXPECT_EQ(e["block_size_maximum"], 32u << 20);
  EXPECT_EQ(server.Stop(), 0) << server.output();

  ServeNbd read_only;
  ASSERT_EQ(read_only.Start({top_, "--socket", socket_, "--read-only"}), "");
  const CommandResult ro = RunCommand({"nbdinfo", "--json", read_only.uri()});
  ASSERT_EQ(ro.exit_code, 0) << ro.output;
  const auto ro_json = nlohmann::json::parse(ro.output, nullptr, false);
  ASSERT_FALSE(ro_json.is_discarded());
  EXPECT_EQ(ro_json["exports"][0]["is_read_only"], true);
  EXPECT_EQ(ro_json["exports"][0]["can_trim"], false);
  EXPECT_EQ(read_only.Stop(), 0) << read_only.output();
}

TEST_F(NbdClientsTest, NbdcopyOfTheExportEqualsQemuImgConvert) {
  RequireTool("nbdcopy");
  const std::string converted = dir_->File("converted.raw");
  const std::string copied = dir_->File("copied.raw");
  Run({"qemu-img", "convert", "-O", "raw", top_, converted});
  ServeNbd server;
  ASSERT_EQ(server.Start({top_, "--socket", socket_, "--read-only"}), "");
  Run({"nbdcopy", server.uri(), copied});
  EXPECT_EQ(server.Stop(), 0) << server.output();
  const auto a = ReadWholeFile(converted);
  const auto b = ReadWholeFile(copied);
  ASSERT_TRUE(a.ok() && b.ok());
  EXPECT_EQ(DescribeDifference(*a, *b), "");
}

TEST_F(NbdClientsTest, NbdcopyIntoTheExportWithParallelConnections) {
  RequireTool("nbdcopy");
  // Random data with holes, copied in with 4 connections x 16 requests in
  // flight: exercises pipelined writes, multi-conn and zeroing.
  const std::string source = dir_->File("source.raw");
  std::vector<uint8_t> bytes(64u << 20, 0);
  SeededRandom rng(5);
  for (size_t at = 0; at < bytes.size(); at += 1 << 20) {
    if (rng.OneIn(3)) continue;  // leave a 1 MiB hole of zeros
    for (size_t i = 0; i < (1u << 20); i += 8) {
      const uint64_t v = rng.Next();
      std::memcpy(&bytes[at + i], &v, 8);
    }
  }
  ASSERT_TRUE(WriteWholeFile(source, bytes).ok());
  ServeNbd server;
  ASSERT_EQ(server.Start({top_, "--socket", socket_}), "");
  Run({"nbdcopy", "--connections=4", "--requests=16", "--flush", source, server.uri()});
  EXPECT_EQ(server.Stop(), 0) << server.output();
  Run({"qemu-img", "check", top_});
  Run({"qemu-img", "compare", "-f", "raw", "-F", "qcow2", source, top_});
}

TEST_F(NbdClientsTest, ServeNbdRefusesBadArguments) {
  const CommandResult both = RunCommand({COWTAP_BIN, "serve-nbd", top_, "--socket", socket_, "--tcp", "127.0.0.1:0"});
  EXPECT_NE(both.exit_code, 0) << both.output;
  const CommandResult neither = RunCommand({COWTAP_BIN, "serve-nbd", top_});
  EXPECT_EQ(neither.exit_code, 1) << neither.output;
  const CommandResult open_to_all = RunCommand({COWTAP_BIN, "serve-nbd", top_, "--tcp", "0.0.0.0:10809"});
  EXPECT_EQ(open_to_all.exit_code, 1);
  EXPECT_NE(open_to_all.output.find("loopback"), std::string::npos) << open_to_all.output;
  const CommandResult missing = RunCommand({COWTAP_BIN, "serve-nbd", dir_->File("nope.qcow2"), "--socket", socket_});
  EXPECT_EQ(missing.exit_code, 1) << missing.output;
}

}  // namespace
}  // namespace cowtap::tests
