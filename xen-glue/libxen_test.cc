// The libxen platform's pure helpers, and its refusal to open on a machine
// without Xen (this one, unless /dev/xen exists).
#include "xen-glue/libxen_util.h"

#include <stdint.h>
#include <sys/stat.h>
#include <unistd.h>
#include <xen/grant_table.h>
#include <xenstore_lib.h>

#include <cerrno>
#include <filesystem>
#include <fstream>

#include <gmock/gmock.h>
#include <gtest/gtest.h>

namespace cowtap::xen::libxen {
namespace {

using ::testing::HasSubstr;

bool MachineHasXen() { return access("/dev/xen/privcmd", F_OK) == 0 || access("/proc/xen/privcmd", F_OK) == 0; }

TEST(LibxenTest, NewPlatformWithoutXenFailsWithClearStatus) {
  if (MachineHasXen()) GTEST_SKIP() << "this machine has Xen; the no-Xen path cannot be observed";
  auto p = NewLibxenPlatform();
  ASSERT_FALSE(p.ok());
  EXPECT_EQ(p.status().code(), ErrorCode::kNotSupported);
  EXPECT_THAT(p.status().message(), HasSubstr("no Xen here"));
  EXPECT_THAT(p.status().message(), HasSubstr("/dev/xen/privcmd missing"));
  EXPECT_THAT(p.status().message(), HasSubstr("dom0"));
}

TEST(LibxenTest, RequireXenDeviceLooksUnderRoot) {
  std::filesystem::path root = std::filesystem::temp_directory_path() /
                               ("cowtap-fakeroot-" + std::to_string(getpid()));
  std::filesystem::create_directories(root / "dev/xen");
  Status missing = RequireXenDevice(root.string(), kGntdev, "the grant-table driver");
  EXPECT_EQ(missing.code(), ErrorCode::kNotSupported);
  EXPECT_THAT(missing.message(), HasSubstr(root.string() + "/dev/xen/gntdev missing"));
  std::ofstream(root / "dev/xen/gntdev").put('x');
  EXPECT_TRUE(RequireXenDevice(root.string(), kGntdev, "x").ok());
  // Any one candidate is enough (xenstore: socket or device).
  std::filesystem::create_directories(root / "run/xenstored");
  std::ofstream(root / "run/xenstored/socket").put('x');
  EXPECT_TRUE(RequireXenDevice(root.string(), kXenstore, "x").ok());
  EXPECT_FALSE(RequireXenDevice(root.string(), kEvtchn, "x").ok());
  std::filesystem::remove_all(root);
}

TEST(LibxenTest, ErrnoMapping) {
  EXPECT_EQ(XenErrno(ESRCH, "x").code(), ErrorCode::kNotFound);
  EXPECT_EQ(XenErrno(ENOENT, "x").code(), ErrorCode::kNotFound);
  EXPECT_EQ(XenErrno(EACCES, "x").code(), ErrorCode::kReadOnly);
  EXPECT_EQ(XenErrno(EPERM, "x").code(), ErrorCode::kReadOnly);
  EXPECT_EQ(XenErrno(EAGAIN, "commit").code(), ErrorCode::kBusy);
  EXPECT_EQ(XenErrno(EEXIST, "x").code(), ErrorCode::kInvalidArgument);
  EXPECT_EQ(XenErrno(E2BIG, "x").code(), ErrorCode::kInvalidArgument);
  EXPECT_EQ(XenErrno(EIO, "x").code(), ErrorCode::kIoError);
  Status s = XenErrno(EAGAIN, "xenstore transaction commit");
  EXPECT_THAT(s.message(), HasSubstr("xenstore transaction commit"));
  EXPECT_EQ(s.errno_value(), EAGAIN);
}

TEST(LibxenTest, GrantCopyStatusMapping) {
  EXPECT_TRUE(GrantCopyStatus(GNTST_okay, 8, 5).ok());
  EXPECT_EQ(GrantCopyStatus(GNTST_bad_gntref, 8, 5).code(), ErrorCode::kInvalidArgument);
  EXPECT_THAT(GrantCopyStatus(GNTST_bad_gntref, 8, 5).message(), HasSubstr("ref 8 of domain 5"));
  EXPECT_EQ(GrantCopyStatus(GNTST_permission_denied, 8, 5).code(), ErrorCode::kReadOnly);
  EXPECT_EQ(GrantCopyStatus(GNTST_bad_domain, 8, 5).code(), ErrorCode::kNotFound);
  EXPECT_EQ(GrantCopyStatus(GNTST_bad_copy_arg, 8, 5).code(), ErrorCode::kInvalidArgument);
  EXPECT_EQ(GrantCopyStatus(GNTST_eagain, 8, 5).code(), ErrorCode::kBusy);
  EXPECT_EQ(GrantCopyStatus(GNTST_general_error, 8, 5).code(), ErrorCode::kIoError);
}

TEST(LibxenTest, PermissionBitsRoundTrip) {
  for (XsAccess a : {XsAccess::kNone, XsAccess::kRead, XsAccess::kWrite, XsAccess::kReadWrite}) {
    EXPECT_EQ(FromXsPermBits(ToXsPermBits(a)), a);
  }
  EXPECT_EQ(ToXsPermBits(XsAccess::kReadWrite), unsigned{XS_PERM_READ | XS_PERM_WRITE});
  EXPECT_EQ(FromXsPermBits(XS_PERM_OWNER | XS_PERM_READ), XsAccess::kRead);
}

}  // namespace
}  // namespace cowtap::xen::libxen
