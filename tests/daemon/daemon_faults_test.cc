// cowtapd's core when things go wrong: a VBD whose image is missing or
// corrupt gets <backend>/error and Closing while others keep serving; a
// guest that dies mid-I/O has everything released; a second daemon cannot
// open an image another one serves read-write.
#include <fcntl.h>
#include <gtest/gtest.h>
#include <unistd.h>

#include <chrono>

#include "cow/image.h"
#include "tests/blkif/guest_process.h"
#include "tests/daemon/daemon_rig.h"
#include "tools/daemon/locking_fs.h"
#include "tools/daemon/toolstack.h"

namespace cowtap::daemon_test {
namespace {

using blkif_test::GuestOutcome;
using namespace std::chrono_literals;

constexpr uint32_t kXvda = 51712;

TEST(DaemonFaultsTest, BrokenImagesGetAnErrorAndOthersKeepServing) {
  auto rig = DaemonRig::Create();
  ASSERT_TRUE(rig.ok()) << rig.status().ToString();
  DaemonRig& r = **rig;
  ASSERT_TRUE(r.MakeOverlay("good.qcow2").ok());
  // A qcow2 header whose L1 table points far past the end of the file.
  ASSERT_TRUE(r.MakeOverlay("corrupt.qcow2").ok());
  {
    const int fd = ::open(r.Path("corrupt.qcow2").c_str(), O_WRONLY);
    ASSERT_GE(fd, 0);
    const uint8_t huge_l1_offset[8] = {0x7f, 0, 0, 0, 0, 0, 0x02, 0};  // offset 40: l1_table_offset
    ASSERT_EQ(::pwrite(fd, huge_l1_offset, 8, 40), 8);
    ::close(fd);
  }
  // The toolstack writes the directories (as xl would), the daemon finds them.
  auto xs = r.daemon().platform().OpenXenStore();
  ASSERT_TRUE(xs.ok());
  daemon::ToolstackDisk missing;
  missing.domid = 11;
  missing.image = r.Path("no-such.qcow2");
  daemon::ToolstackDisk corrupt;
  corrupt.domid = 12;
  corrupt.image = r.Path("corrupt.qcow2");
  ASSERT_TRUE(daemon::ToolstackWriteDisk(**xs, missing).ok());
  ASSERT_TRUE(daemon::ToolstackWriteDisk(**xs, corrupt).ok());
  ASSERT_TRUE(r.daemon().Attach(XvdaSpec(13, r.Path("good.qcow2"))).ok());
  for (uint32_t d : {11u, 12u}) {
    EXPECT_TRUE(WaitFor([&] { return r.BackendKey(d, kXvda, "error") != "<absent>"; })) << d;
    // The error key is written before the state moves to Closing.
    EXPECT_TRUE(WaitFor([&] { return r.BackendKey(d, kXvda, "state") == "5"; })) << d;
    auto s = r.daemon().Stats(std::to_string(d) + "/51712");
    ASSERT_TRUE(s.ok());
    EXPECT_EQ(s->state.rfind("error: ", 0), 0u) << s->state;
  }
  EXPECT_NE(r.BackendKey(11, kXvda, "error").find("no-such.qcow2"), std::string::npos)
      << r.BackendKey(11, kXvda, "error");
  GuestOutcome o = blkif_test::RunGuest(r.GuestArgs(13, kXvda, {"--ops", "300", "--initial", "zero"}), 30s);
  EXPECT_TRUE(o.Passed()) << o.Describe() << "\n" << o.output;
  // Attach through the control interface reports the failure and takes the
  // directories away again.
  Status s = r.daemon().Attach(XvdaSpec(14, r.Path("no-such.qcow2")));
  EXPECT_EQ(s.code(), ErrorCode::kNotFound) << s.ToString();
  EXPECT_TRUE(WaitFor([&] { return r.BackendKey(14, kXvda, "state") == "<absent>"; }));
  // When the toolstack removes a failed device, the daemon forgets it.
  ASSERT_TRUE(daemon::ToolstackRemoveDisk(**xs, missing).ok());
  EXPECT_TRUE(WaitFor([&] { return r.daemon().Stats("11/51712").status().code() == ErrorCode::kNotFound; }));
}

TEST(DaemonFaultsTest, GuestDeathMidIoReleasesEverythingAndClosesTheImage) {
  auto rig = DaemonRig::Create();
  ASSERT_TRUE(rig.ok()) << rig.status().ToString();
  DaemonRig& r = **rig;
  ASSERT_TRUE(r.MakeOverlay("d.qcow2").ok());
  ASSERT_TRUE(r.daemon().Attach(XvdaSpec(21, r.Path("d.qcow2"))).ok());
  GuestOutcome o =
      blkif_test::RunGuest(r.GuestArgs(21, kXvda, {"--scenario", "die-mid-io", "--qd", "32", "--bs", "64"}), 30s);
  EXPECT_NE(o.output.find("DYING"), std::string::npos) << o.output;
  EXPECT_TRUE(WaitFor([&] { return r.daemon().vbd_count() == 0; })) << "the dead guest's VBD is still there";
  EXPECT_EQ(r.sim().MappedGrantCount(21), 0u);
  // The image was closed and unlocked: it opens read-write again, clean.
  cow::OpenOptions open;
  open.fs = daemon::LockingFileSystem();
  auto image = cow::OpenImage(r.Path("d.qcow2"), open);
  ASSERT_TRUE(image.ok()) << image.status().ToString();
  EXPECT_FALSE((*image)->info().dirty);
  ASSERT_TRUE((*image)->Close().ok());
  image->reset();  // the file (and its lock) goes with the object
  if (HaveQemuImg()) {
    std::string out;
    EXPECT_EQ(RunShell("qemu-img check " + r.Path("d.qcow2"), &out), 0) << out;
  }
}

TEST(DaemonFaultsTest, AnImageServedReadWriteIsRefusedToASecondDaemon) {
  auto first = DaemonRig::Create();
  auto second = DaemonRig::Create();
  ASSERT_TRUE(first.ok() && second.ok());
  ASSERT_TRUE((*first)->MakeOverlay("shared.qcow2").ok());
  const std::string image = (*first)->Path("shared.qcow2");
  ASSERT_TRUE((*first)->daemon().Attach(XvdaSpec(31, image)).ok());
  Status s = (*second)->daemon().Attach(XvdaSpec(31, image));
  EXPECT_EQ(s.code(), ErrorCode::kBusy) << s.ToString();
  // Read-only, the shared base under it stays usable by anyone: a second
  // overlay over the same base is served by the second daemon.
  ASSERT_TRUE((*second)->MakeOverlay("other.qcow2").ok());
  cow::CreateOptions o;
  o.backing_file = (*first)->Path("base.qcow2");
  ASSERT_TRUE(cow::CreateImage((*second)->Path("over-shared-base.qcow2"), o).ok());
  EXPECT_TRUE((*second)->daemon().Attach(XvdaSpec(32, (*second)->Path("over-shared-base.qcow2"))).ok());
  ASSERT_TRUE((*first)->daemon().Detach("31/51712").ok());
  EXPECT_TRUE((*second)->daemon().Attach(XvdaSpec(31, image)).ok()) << "the lock goes with the first daemon's detach";
}

}  // namespace
}  // namespace cowtap::daemon_test
