// Tests of the QEMU-compatible image locks: the exact lock bytes, the
// refusals between two opens in this process (OFD locks make two opens of
// one file behave like two processes), release on close, and interop with
// QEMU 7.2's qemu-io / qemu-img as the oracle (skipped when not installed).
#include "cow/image_lock.h"

#include <fcntl.h>
#include <gtest/gtest.h>
#include <signal.h>
#include <spawn.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <thread>

#include "cow/file.h"

extern char** environ;

namespace cowtap::cow {
namespace {

constexpr uint32_t Bit(ImagePermission p) { return 1u << static_cast<uint32_t>(p); }

int Shell(const std::string& cmd, std::string* out = nullptr) {
  FILE* p = ::popen((cmd + " 2>&1").c_str(), "r");
  if (!p) return -1;
  char buf[4096];
  std::string text;
  size_t n;
  while ((n = std::fread(buf, 1, sizeof buf, p)) > 0) text.append(buf, n);
  int rc = ::pclose(p);
  if (out) *out = text;
  return WIFEXITED(rc) ? WEXITSTATUS(rc) : -1;
}

class ImageLockTest : public ::testing::Test {
 protected:
  void SetUp() override {
    const char* base = std::getenv("TMPDIR");
    std::string tmpl = std::string(base && *base ? base : "/tmp") + "/cowtap-lock-XXXXXX";
    ASSERT_NE(::mkdtemp(tmpl.data()), nullptr);
    dir_ = tmpl;
    path_ = dir_ + "/disk.img";
    int fd = ::open(path_.c_str(), O_RDWR | O_CREAT | O_CLOEXEC, 0644);
    ASSERT_GE(fd, 0);
    ASSERT_EQ(::ftruncate(fd, 1 << 20), 0);
    ::close(fd);
  }
  void TearDown() override { std::system(("rm -rf '" + dir_ + "'").c_str()); }

  Result<std::unique_ptr<File>> OpenLocked(bool writable, const std::string& path = "") {
    FileOpenOptions o;
    o.writable = writable;
    o.lock = true;
    return DefaultFileSystem()->Open(path.empty() ? path_ : path, o);
  }

  std::string dir_;
  std::string path_;
};

// Which of bytes 100..104 and 200..204 someone holds, as "100 101 ...".
std::string HeldBytes(const std::string& path) {
  int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  std::string held;
  for (int base : {100, 200}) {
    for (int i = 0; i < 5; ++i) {
      struct flock fl = {};
      fl.l_type = F_WRLCK;
      fl.l_whence = SEEK_SET;
      fl.l_start = base + i;
      fl.l_len = 1;
      if (::fcntl(fd, F_OFD_GETLK, &fl) == 0 && fl.l_type != F_UNLCK)
        held += (held.empty() ? "" : " ") + std::to_string(base + i);
    }
  }
  ::close(fd);
  return held;
}

TEST_F(ImageLockTest, WritableOpenHoldsQemusBytesForAWritableImage) {
  auto f = OpenLocked(true);
  ASSERT_TRUE(f.ok()) << f.status().ToString();
  // What qemu-io holds on a qcow2 image it opened read-write.
  EXPECT_EQ(HeldBytes(path_), "100 101 103 201 203");
  auto probe = ProbeImageLocks(path_);
  ASSERT_TRUE(probe.ok());
  EXPECT_EQ(probe->held, ImageLockPermsFor(true).held);
  EXPECT_EQ(probe->not_shared, ImageLockPermsFor(true).not_shared);
}

TEST_F(ImageLockTest, ReadOnlyOpenHoldsQemusBytesForASharedBase) {
  auto f = OpenLocked(false);
  ASSERT_TRUE(f.ok()) << f.status().ToString();
  EXPECT_EQ(HeldBytes(path_), "100 201 203");
}

TEST_F(ImageLockTest, SecondWritableOpenIsRefusedAsBusy) {
  auto first = OpenLocked(true);
  ASSERT_TRUE(first.ok());
  auto second = OpenLocked(true);
  ASSERT_FALSE(second.ok());
  EXPECT_EQ(second.status().code(), ErrorCode::kBusy);
  EXPECT_NE(second.status().message().find("image " + path_ + " is in use by another process"), std::string::npos)
      << second.status().message();
  // The refused open left no lock behind.
  EXPECT_EQ(HeldBytes(path_), "100 101 103 201 203");
  first->reset();
  EXPECT_EQ(HeldBytes(path_), "");
}

TEST_F(ImageLockTest, ReaderIsRefusedWhileAWriterHoldsTheImage) {
  auto writer = OpenLocked(true);
  ASSERT_TRUE(writer.ok());
  auto reader = OpenLocked(false);
  ASSERT_FALSE(reader.ok());
  EXPECT_EQ(reader.status().code(), ErrorCode::kBusy);
  EXPECT_NE(reader.status().message().find("\"write\""), std::string::npos) << reader.status().message();
}

TEST_F(ImageLockTest, WriterIsRefusedWhileAReaderHoldsTheImage) {
  auto reader = OpenLocked(false);
  ASSERT_TRUE(reader.ok());
  auto writer = OpenLocked(true);
  ASSERT_FALSE(writer.ok());
  EXPECT_EQ(writer.status().code(), ErrorCode::kBusy);
}

TEST_F(ImageLockTest, ReadersShareABase) {
  auto a = OpenLocked(false);
  auto b = OpenLocked(false);
  auto c = OpenLocked(false);
  EXPECT_TRUE(a.ok() && b.ok() && c.ok());
}

TEST_F(ImageLockTest, ClosingReleasesTheLocks) {
  {
    auto f = OpenLocked(true);
    ASSERT_TRUE(f.ok());
  }
  EXPECT_TRUE(OpenLocked(true).ok());
}

TEST_F(ImageLockTest, OpensWithoutTheOptionTakeAndCheckNothing) {
  auto locked = OpenLocked(true);
  ASSERT_TRUE(locked.ok());
  FileOpenOptions o;
  o.writable = true;
  auto plain = DefaultFileSystem()->Open(path_, o);
  EXPECT_TRUE(plain.ok());
  EXPECT_EQ(HeldBytes(path_), "100 101 103 201 203");
}

TEST_F(ImageLockTest, UnlockReleasesEveryByte) {
  int fd = ::open(path_.c_str(), O_RDWR | O_CLOEXEC);
  ASSERT_TRUE(LockImageFile(fd, path_, true).ok());
  ASSERT_TRUE(UnlockImageFile(fd, path_).ok());
  EXPECT_EQ(HeldBytes(path_), "");
  ::close(fd);
}

TEST_F(ImageLockTest, CustomPermsLockExactlyTheirBytes) {
  int fd = ::open(path_.c_str(), O_RDWR | O_CLOEXEC);
  ImageLockPerms perms;
  perms.held = Bit(ImagePermission::kWriteUnchanged);
  perms.not_shared = Bit(ImagePermission::kConsistentRead);
  ASSERT_TRUE(LockImageFile(fd, path_, perms).ok());
  EXPECT_EQ(HeldBytes(path_), "102 200");
  // Nobody may now hold consistent read.
  EXPECT_EQ(OpenLocked(false).status().code(), ErrorCode::kBusy);
  ::close(fd);
}

// ---------------------------------------------------------------- QEMU interop

class ImageLockQemuTest : public ImageLockTest {
 protected:
  void SetUp() override {
    if (Shell("qemu-io --version") != 0 || Shell("qemu-img --version") != 0)
      GTEST_SKIP() << "qemu-io/qemu-img not installed (apt-get install qemu-utils)";
    ImageLockTest::SetUp();
    image_ = dir_ + "/disk.qcow2";
    std::string out;
    ASSERT_EQ(Shell("qemu-img create -q -f qcow2 '" + image_ + "' 1M", &out), 0) << out;
  }

  int QemuIo(const std::string& flags, std::string* out) {
    return Shell("qemu-io " + flags + " -f qcow2 -c 'read 0 512' '" + image_ + "'", out);
  }

  // Starts qemu-io holding the image for a while; returns its pid once its
  // locks are visible (or -1).
  pid_t StartQemuHolder(bool read_only) {
    std::vector<std::string> args = {"qemu-io"};
    if (read_only) args.push_back("-r");
    for (const char* a : {"-f", "qcow2", "-c", "sleep 20000"}) args.emplace_back(a);
    args.push_back(image_);
    std::vector<char*> argv;
    for (auto& a : args) argv.push_back(a.data());
    argv.push_back(nullptr);
    pid_t pid = -1;
    if (::posix_spawnp(&pid, "qemu-io", nullptr, nullptr, argv.data(), environ) != 0) return -1;
    const std::string want = read_only ? "100 201 203" : "100 101 103 201 203";
    for (int i = 0; i < 500 && HeldBytes(image_) != want; ++i)
      std::this_thread::sleep_for(std::chrono::milliseconds(10));
    return HeldBytes(image_) == want ? pid : -1;
  }

  void StopQemuHolder(pid_t pid) {
    if (pid <= 0) return;
    ::kill(pid, SIGTERM);
    int status;
    ::waitpid(pid, &status, 0);
  }

  std::string image_;
};

TEST_F(ImageLockQemuTest, QemuCannotOpenAnImageWeHoldWritable) {
  auto f = OpenLocked(true, image_);
  ASSERT_TRUE(f.ok()) << f.status().ToString();
  std::string out;
  EXPECT_NE(QemuIo("", &out), 0) << out;
  EXPECT_NE(out.find("Failed to get \"write\" lock"), std::string::npos) << out;
  EXPECT_NE(QemuIo("-r", &out), 0) << out;
  EXPECT_NE(out.find("Failed to get shared \"write\" lock"), std::string::npos) << out;
  // qemu-img's force-share (-U) skips the locks, as it does with QEMU's own.
  EXPECT_EQ(Shell("qemu-img info -U '" + image_ + "'", &out), 0) << out;
}

TEST_F(ImageLockQemuTest, QemuSharesABaseWeHoldReadOnlyButCannotWriteIt) {
  auto f = OpenLocked(false, image_);
  ASSERT_TRUE(f.ok()) << f.status().ToString();
  std::string out;
  EXPECT_EQ(QemuIo("-r", &out), 0) << out;
  EXPECT_EQ(Shell("qemu-img info '" + image_ + "'", &out), 0) << out;
  EXPECT_NE(QemuIo("", &out), 0) << out;
  EXPECT_NE(out.find("lock"), std::string::npos) << out;
}

TEST_F(ImageLockQemuTest, WeCannotOpenAnImageQemuHoldsWritable) {
  pid_t pid = StartQemuHolder(false);
  ASSERT_GT(pid, 0) << "qemu-io did not take its locks";
  auto rw = OpenLocked(true, image_);
  auto ro = OpenLocked(false, image_);
  StopQemuHolder(pid);
  ASSERT_FALSE(rw.ok());
  EXPECT_EQ(rw.status().code(), ErrorCode::kBusy);
  EXPECT_NE(rw.status().message().find("cowtapd or QEMU"), std::string::npos);
  ASSERT_FALSE(ro.ok());
  EXPECT_EQ(ro.status().code(), ErrorCode::kBusy);
  // Once QEMU is gone the image is ours.
  EXPECT_TRUE(OpenLocked(true, image_).ok());
}

TEST_F(ImageLockQemuTest, WeShareABaseQemuReadsButCannotWriteIt) {
  pid_t pid = StartQemuHolder(true);
  ASSERT_GT(pid, 0) << "qemu-io -r did not take its locks";
  auto ro = OpenLocked(false, image_);
  auto rw = OpenLocked(true, image_);
  StopQemuHolder(pid);
  EXPECT_TRUE(ro.ok()) << ro.status().ToString();
  ASSERT_FALSE(rw.ok());
  EXPECT_EQ(rw.status().code(), ErrorCode::kBusy);
}

}  // namespace
}  // namespace cowtap::cow
