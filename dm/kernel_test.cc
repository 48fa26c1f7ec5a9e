// The real-kernel parts: NBD client handshake (runs anywhere, against the
// real NbdServer), and LoopDevice, NbdDevice, the libdevmapper DeviceMapper
// end to end (skipped with the reason where the kernel lacks loop, nbd or
// dm_mod, or we are not root: they run in the VM harness).
#include <fcntl.h>
#include <gtest/gtest.h>
#include <sys/socket.h>
#include <unistd.h>

#include <cstring>
#include <filesystem>
#include <fstream>
#include <random>

#include "backend/mem_block_device.h"
#include "backend/nbd_protocol.h"
#include "backend/nbd_server.h"
#include "base/endian.h"
#include "dm/device_mapper.h"
#include "dm/loop_device.h"
#include "dm/nbd_device.h"

namespace cowtap::dm {
namespace {

class TempDir {
 public:
  TempDir() {
    char tmpl[] = "/tmp/cowtap_dm_kernel_XXXXXX";
    if (mkdtemp(tmpl)) path_ = tmpl;
  }
  ~TempDir() {
    if (!path_.empty()) std::filesystem::remove_all(path_);
  }
  const std::string& path() const { return path_; }

 private:
  std::string path_;
};

std::unique_ptr<backend::NbdServer> StartServer(const std::string& dir, uint64_t size,
                                                std::shared_ptr<backend::MemBlockDevice>* dev_out = nullptr) {
  auto dev = std::make_shared<backend::MemBlockDevice>(backend::MemBlockDeviceOptions{.size_bytes = size});
  if (dev_out) *dev_out = dev;
  backend::NbdServerOptions o;
  o.address = "unix:" + dir + "/nbd.sock";
  o.export_name = "disk";
  auto s = backend::NbdServer::Start(dev, o);
  EXPECT_TRUE(s.ok()) << s.status().ToString();
  return s.ok() ? std::move(s).value() : nullptr;
}

TEST(NbdHandshakeTest, NegotiatesSizeAndFlagsWithTheRealServer) {
  TempDir dir;
  auto server = StartServer(dir.path(), 8 << 20);
  ASSERT_NE(server, nullptr);
  auto fd = ConnectUnixSocket(dir.path() + "/nbd.sock");
  ASSERT_TRUE(fd.ok()) << fd.status().ToString();
  auto e = NbdClientHandshake(*fd, "disk");
  ASSERT_TRUE(e.ok()) << e.status().ToString();
  EXPECT_EQ(e->size_bytes, 8u << 20);
  EXPECT_TRUE(e->transmission_flags & backend::kNbdFlagHasFlags);
  EXPECT_TRUE(e->transmission_flags & backend::kNbdFlagSendFlush);
  // Transmission works on the socket now: a READ of 512 bytes at 0.
  uint8_t req[28] = {};
  StoreBe32(req, backend::kNbdRequestMagic);
  StoreBe16(req + 6, backend::kNbdCmdRead);
  StoreBe64(req + 8, 42);
  StoreBe32(req + 24, 512);
  ASSERT_EQ(write(*fd, req, sizeof(req)), 28);
  uint8_t reply[16 + 512];
  size_t got = 0;
  while (got < sizeof(reply)) {
    ssize_t r = read(*fd, reply + got, sizeof(reply) - got);
    ASSERT_GT(r, 0);
    got += static_cast<size_t>(r);
  }
  EXPECT_EQ(LoadBe32(reply), backend::kNbdSimpleReplyMagic);
  EXPECT_EQ(LoadBe32(reply + 4), 0u);  // no error
  EXPECT_EQ(LoadBe64(reply + 8), 42u);
  close(*fd);
}

TEST(NbdHandshakeTest, RefusesWhatIsNotAnNbdServer) {
  int sv[2];
  ASSERT_EQ(socketpair(AF_UNIX, SOCK_STREAM, 0, sv), 0);
  const char junk[] = "HTTP/1.1 200 OK\r\n\r\n";
  ASSERT_GT(write(sv[1], junk, sizeof(junk)), 0);
  EXPECT_EQ(NbdClientHandshake(sv[0], "disk").status().code(), ErrorCode::kCorrupt);
  close(sv[1]);  // EOF mid-handshake
  EXPECT_EQ(NbdClientHandshake(sv[0], "disk").status().code(), ErrorCode::kIoError);
  close(sv[0]);
  EXPECT_FALSE(ConnectUnixSocket("/nonexistent/cowtap.sock").ok());
}

bool IsRoot() { return geteuid() == 0; }

TEST(LoopDeviceTest, AttachedFileReadsThroughTheDevice) {
  if (!LoopAvailable() || !IsRoot()) GTEST_SKIP() << "no /dev/loop-control or not root (runs in the VM harness)";
  TempDir dir;
  const std::string file = dir.path() + "/img.raw";
  std::vector<char> data(1 << 20);
  std::mt19937 rng(1);
  for (auto& c : data) c = static_cast<char>(rng());
  std::ofstream(file, std::ios::binary).write(data.data(), data.size());
  auto loop = LoopDevice::Attach(file, {.read_only = true});
  ASSERT_TRUE(loop.ok()) << loop.status().ToString();
  std::vector<char> back(data.size());
  std::ifstream((*loop)->path(), std::ios::binary).read(back.data(), back.size());
  EXPECT_EQ(back, data);
  EXPECT_TRUE((*loop)->Detach().ok());
}

TEST(NbdDeviceTest, KernelClientReadsWhatTheServerServes) {
  if (!NbdAvailable() || !IsRoot()) GTEST_SKIP() << "no /dev/nbd0 or not root (runs in the VM harness)";
  TempDir dir;
  std::shared_ptr<backend::MemBlockDevice> mem;
  auto server = StartServer(dir.path(), 4 << 20, &mem);
  ASSERT_NE(server, nullptr);
  std::vector<uint8_t> pattern(4096, 0x3c);
  iovec v{pattern.data(), pattern.size()};
  ASSERT_TRUE(mem->Write(8192, {&v, 1}).ok());
  auto fd = ConnectUnixSocket(dir.path() + "/nbd.sock");
  ASSERT_TRUE(fd.ok());
  auto nbd = NbdDevice::Connect(*fd, "disk");
  ASSERT_TRUE(nbd.ok()) << nbd.status().ToString();
  EXPECT_EQ((*nbd)->size_bytes(), 4u << 20);
  // At once, no sleep: Connect returns only once the kernel started the device.
  int dev = open((*nbd)->path().c_str(), O_RDONLY | O_DIRECT);
  ASSERT_GE(dev, 0);
  void* buf = nullptr;
  ASSERT_EQ(posix_memalign(&buf, 4096, 4096), 0);
  EXPECT_EQ(pread(dev, buf, 4096, 8192), 4096);
  EXPECT_EQ(std::memcmp(buf, pattern.data(), 4096), 0);
  free(buf);
  close(dev);
  EXPECT_TRUE((*nbd)->Disconnect().ok());
}

TEST(KernelDeviceMapperTest, LoadsSuspendsResumesAndRemovesALinearTable) {
  auto dm = NewKernelDeviceMapper();
  if (!dm.ok() || !LoopAvailable() || !IsRoot()) {
    GTEST_SKIP() << "no device-mapper or loop here, or not root (runs in the VM harness): "
                 << dm.status().ToString();
  }
  TempDir dir;
  const std::string file = dir.path() + "/img.raw";
  std::vector<char> data(1 << 20);
  std::mt19937 rng(2);
  for (auto& c : data) c = static_cast<char>(rng());
  std::ofstream(file, std::ios::binary).write(data.data(), data.size());
  auto loop = LoopDevice::Attach(file);
  ASSERT_TRUE(loop.ok()) << loop.status().ToString();
  const std::string name = "cowtap-dm-test-" + std::to_string(getpid());
  ASSERT_TRUE((*dm)->Create(name).ok());
  // Second half of the file first, then the first half: a swap.
  auto t = DmTable::Make(2048, {{0, 1024, DmSegment::Kind::kLinear, 1024}, {1024, 1024, DmSegment::Kind::kLinear, 0}});
  ASSERT_TRUE(t.ok());
  const DmDevices devs{(*loop)->path(), (*loop)->path()};
  ASSERT_TRUE(ReloadTable(**dm, name, *t, devs).ok());
  auto st = (*dm)->GetStatus(name);
  ASSERT_TRUE(st.ok()) << st.status().ToString();
  EXPECT_TRUE(st->has_live_table);
  EXPECT_FALSE(st->suspended);
  EXPECT_EQ(st->live_size_sectors, 2048u);
  EXPECT_EQ(st->live_target_count, 2u);
  std::vector<char> back(data.size());
  const std::string node = "/dev/mapper/" + name;
  ASSERT_TRUE(std::ifstream(node, std::ios::binary).read(back.data(), back.size()))
      << node << " is absent or short after the first resume";
  EXPECT_TRUE(std::equal(back.begin(), back.begin() + 512 * 1024, data.begin() + 512 * 1024));
  EXPECT_TRUE(std::equal(back.begin() + 512 * 1024, back.end(), data.begin()));
  // Reload to the identity mapping.
  ASSERT_TRUE(ReloadTable(**dm, name, *DmTable::Make(2048, {{0, 2048, DmSegment::Kind::kLinear, 0}}), devs).ok());
  ASSERT_TRUE(std::ifstream(node, std::ios::binary).read(back.data(), back.size()));
  EXPECT_EQ(back, data);
  EXPECT_TRUE((*dm)->Remove(name).ok());
  EXPECT_FALSE((*dm)->GetStatus(name).ok());
  EXPECT_NE(access(node.c_str(), F_OK), 0) << node << " still exists after Remove";
}

TEST(KernelDeviceMapperTest, SaysWhyWhenDeviceMapperIsAbsent) {
  if (access("/dev/mapper/control", F_OK) == 0) GTEST_SKIP() << "device-mapper is present here";
  auto dm = NewKernelDeviceMapper();
  ASSERT_FALSE(dm.ok());
  EXPECT_EQ(dm.status().code(), ErrorCode::kNotSupported);
  EXPECT_NE(dm.status().ToString().find("dm_mod"), std::string::npos);
}

}  // namespace
}  // namespace cowtap::dm
