// The cowtapd program: SIGTERM under load finishes in-flight I/O and leaves
// a clean image (qemu-img check, dirty bit clear) and no control socket; a
// second cowtapd on the same control socket refuses to start.
#include <fcntl.h>
#include <gtest/gtest.h>
#include <signal.h>
#include <stdlib.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <fstream>
#include <sstream>
#include <thread>

#include "cow/image.h"
#include "tests/blkif/daemon_process.h"
#include "tests/blkif/guest_process.h"
#include "tests/daemon/daemon_rig.h"

namespace cowtap::daemon_test {
namespace {

using namespace std::chrono_literals;

// cowtapd as a child process, its output in a file.
class DaemonProcess : public blkif_test::DaemonProcess {
 public:
  DaemonProcess(const std::vector<std::string>& args, const std::string& log)
      : blkif_test::DaemonProcess(COWTAP_DAEMON_BIN, args, log) {}
};

class CowtapdProcessTest : public ::testing::Test {
 protected:
  void SetUp() override {
    char tmpl[] = "/tmp/cowtapd-proc-XXXXXX";
    ASSERT_NE(::mkdtemp(tmpl), nullptr);
    dir_ = tmpl;
  }
  void TearDown() override { RunShell("rm -rf '" + dir_ + "'"); }
  std::string P(const std::string& name) const { return dir_ + "/" + name; }
  bool Exists(const std::string& path) const {
    struct stat st;
    return ::stat(path.c_str(), &st) == 0;
  }
  std::string dir_;
};

TEST_F(CowtapdProcessTest, SecondDaemonOnTheSameControlSocketRefusesToStart) {
  DaemonProcess first({"--platform", "sim", "--sim-socket", P("sim1.sock"), "--control-socket", P("ctl.sock")},
                      P("first.log"));
  ASSERT_TRUE(WaitFor([&] { return Exists(P("ctl.sock")); }, 10000)) << first.Log();
  DaemonProcess second({"--platform", "sim", "--sim-socket", P("sim2.sock"), "--control-socket", P("ctl.sock")},
                       P("second.log"));
  EXPECT_EQ(second.Wait(10s), 1);
  EXPECT_NE(second.Log().find("another cowtapd"), std::string::npos) << second.Log();
  EXPECT_TRUE(Exists(P("ctl.sock"))) << "the refused daemon must not touch the first one's socket";
  first.Signal(SIGTERM);
  EXPECT_EQ(first.Wait(10s), 0) << first.Log();
  EXPECT_FALSE(Exists(P("ctl.sock"))) << "the control socket is removed on SIGTERM";
}

TEST_F(CowtapdProcessTest, SigtermUnderLoadDrainsAndLeavesACleanImage) {
  cow::CreateOptions base;
  base.size_bytes = 32 << 20;
  ASSERT_TRUE(cow::CreateImage(P("base.qcow2"), base).ok());
  cow::CreateOptions over;
  over.backing_file = "base.qcow2";
  over.lazy_refcounts = true;  // the dirty bit is set while serving
  ASSERT_TRUE(cow::CreateImage(P("vm.qcow2"), over).ok());
  DaemonProcess d({"--platform", "sim", "--sim-socket", P("sim.sock"), "--control-socket", P("ctl.sock"), "--attach",
                   "3:51712:" + P("vm.qcow2") + ":qcow2"},
                  P("d.log"));
  ASSERT_TRUE(WaitFor([&] { return d.Log().find("cowtapd ready") != std::string::npos; }, 10000)) << d.Log();
  auto guest = blkif_test::GuestProcess::Start({"--socket", P("sim.sock"), "--domid", "3", "--devid", "51712", "--ops",
                                                "0", "--duration-ms", "20000", "--qd", "16", "--initial", "zero"});
  ASSERT_TRUE(guest.ok());
  ASSERT_TRUE(WaitFor([&] { return d.Log().find("connected (") != std::string::npos; }, 10000)) << d.Log();
  std::this_thread::sleep_for(700ms);  // under load
  d.Signal(SIGTERM);
  EXPECT_EQ(d.Wait(20s), 0) << d.Log();
  EXPECT_NE(d.Log().find("stopped cleanly"), std::string::npos) << d.Log();
  EXPECT_FALSE(Exists(P("ctl.sock")));
  guest->Wait(20s);  // it sees its backend go away; its verdict does not matter here
  cow::OpenOptions read_only;
  read_only.read_only = true;
  auto image = cow::OpenImage(P("vm.qcow2"), read_only);
  ASSERT_TRUE(image.ok()) << image.status().ToString();
  EXPECT_FALSE((*image)->info().dirty) << "closed without clearing the dirty bit";
  image->reset();
  if (!HaveQemuImg()) GTEST_SKIP() << "qemu-img (qemu-utils) missing: cannot check the image with the oracle";
  std::string out;
  EXPECT_EQ(RunShell("qemu-img check " + P("vm.qcow2"), &out), 0) << out;
  EXPECT_EQ(RunShell("qemu-img info --output=json " + P("vm.qcow2") + " | grep -q '\"dirty-flag\": false'", &out), 0)
      << out;
}

}  // namespace
}  // namespace cowtap::daemon_test
