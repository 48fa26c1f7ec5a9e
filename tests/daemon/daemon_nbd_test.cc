// NBD exports through the daemon's control interface: an image path and a
// serving VBD, read by qemu-img (the oracle) over the Unix socket.
#include <gtest/gtest.h>

#include <chrono>

#include "tests/daemon/daemon_rig.h"

namespace cowtap::daemon_test {
namespace {

TEST(DaemonNbdTest, ExportsAnImageAndAServingVbdToQemuImg) {
  auto rig = DaemonRig::Create();
  ASSERT_TRUE(rig.ok()) << rig.status().ToString();
  DaemonRig& r = **rig;
  ASSERT_TRUE(r.MakeOverlay("n.qcow2").ok());
  auto bound = r.daemon().Export(r.Path("base.qcow2"), "unix:" + r.Path("nbd.sock"), /*read_only=*/true);
  ASSERT_TRUE(bound.ok()) << bound.status().ToString();
  EXPECT_EQ(*bound, "unix:" + r.Path("nbd.sock"));
  EXPECT_EQ(r.daemon().Export(r.Path("base.qcow2"), "unix:" + r.Path("nbd.sock"), true).status().code(),
            ErrorCode::kBusy);
  daemon::AttachSpec spec;
  spec.domid = 41;
  spec.image = r.Path("n.qcow2");
  ASSERT_TRUE(r.daemon().Attach(spec).ok());
  auto vbd_bound = r.daemon().Export("41/51712", "unix:" + r.Path("vbd.sock"), true);
  ASSERT_TRUE(vbd_bound.ok()) << vbd_bound.status().ToString();
  EXPECT_EQ(r.daemon().Export("42/51712", "unix:" + r.Path("x.sock"), true).status().code(), ErrorCode::kNotFound);
  EXPECT_FALSE(r.daemon().Export(r.Path("missing.qcow2"), "unix:" + r.Path("y.sock"), true).ok());
  if (HaveQemuImg()) {
    std::string out;
    EXPECT_EQ(RunShell("qemu-img info -f raw 'nbd+unix:///?socket=" + r.Path("nbd.sock") + "'", &out), 0) << out;
    EXPECT_NE(out.find("16 MiB"), std::string::npos) << out;
    // The empty base and the VBD's untouched overlay read the same.
    EXPECT_EQ(RunShell("qemu-img compare -f raw -F raw 'nbd+unix:///?socket=" + r.Path("nbd.sock") +
                           "' 'nbd+unix:///?socket=" + r.Path("vbd.sock") + "'",
                       &out),
              0)
        << out;
  }
  EXPECT_TRUE(r.daemon().Unexport(*bound).ok());
  EXPECT_EQ(r.daemon().Unexport(*bound).code(), ErrorCode::kNotFound);
  EXPECT_TRUE(r.daemon().Unexport(*vbd_bound).ok());
}

}  // namespace
}  // namespace cowtap::daemon_test
