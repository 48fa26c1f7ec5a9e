// End to end over blkif: backend in this process, guest (cowtap_guest) in
// another. Handshake with each feature on and off from either side, every
// op, data integrity of a random workload on qcow2 / qcow / raw images (a
// qcow2 and a qcow overlay over a raw base)
// (checked by the guest against its model, then by qemu-img check and
// qemu-img compare against a twin rebuilt from the model), flush
// durability, discard's effect on the image, resize, reconnect.
#include <gtest/gtest.h>

#include <chrono>
#include <iostream>
#include <fstream>
#include <vector>

#include "backend/mem_block_device.h"
#include "base/endian.h"
#include "tests/blkif/blkif_rig.h"
#include "tests/blkif/guest_process.h"
#include "xen-glue/blkfront_workload.h"

namespace cowtap::blkif_test {
namespace {

using namespace std::chrono_literals;
constexpr xen::DomId kDom = 5;
constexpr uint32_t kDev = 51712;

std::shared_ptr<backend::MemBlockDevice> MemDisk(uint64_t mib, bool discard = true) {
  backend::MemBlockDeviceOptions o;
  o.size_bytes = mib << 20;
  o.discard = discard;
  o.discard_granularity_bytes = 4096;
  return std::make_shared<backend::MemBlockDevice>(o);
}

bool HaveQemuImg() { return RunCommand("qemu-img --version") == 0; }

class BlkifE2eTest : public ::testing::Test {
 protected:
  void SetUp() override {
    auto rig = BlkifRig::Create();
    ASSERT_TRUE(rig.ok()) << rig.status().ToString();
    rig_ = std::move(*rig);
  }
  GuestOutcome Guest(std::vector<std::string> extra, std::chrono::milliseconds timeout = 20s) {
    return RunGuest(rig_->GuestArgs(kDom, kDev, std::move(extra)), timeout);
  }
  std::unique_ptr<BlkifRig> rig_;
};

TEST_F(BlkifE2eTest, DefaultHandshakeNegotiatesEveryFeatureAndEveryOpWorks) {
  ASSERT_TRUE(rig_->AddVbd(kDom, kDev, MemDisk(16)).ok());
  GuestOutcome g = Guest({"--scenario", "ops"});
  ASSERT_TRUE(g.Passed()) << g.Describe();
  EXPECT_EQ(g.info["queues"], "4");
  EXPECT_EQ(g.info["ring_page_order"], "4");
  EXPECT_EQ(g.info["ring_entries"], "512");
  EXPECT_EQ(g.info["persistent"], "true");
  EXPECT_EQ(g.info["indirect_segments"], "256");
  EXPECT_EQ(g.info["flush"], "true");
  EXPECT_EQ(g.info["barrier"], "true");
  EXPECT_EQ(g.info["discard"], "true");
  EXPECT_EQ(g.info["sectors"], std::to_string(16 * 2048));
  EXPECT_GT(g.InfoInt("indirect_requests"), 0);
  VbdStatus s = rig_->GetStatus(kDom, kDev);
  EXPECT_GT(s.requests, 10u);
  EXPECT_FALSE(s.any_ring_halted);
  EXPECT_EQ(rig_->hv().MappedGrantCount(kDom), 0u);
}

struct FrontendSwitch {
  const char* name;
  std::vector<std::string> flags;
  const char* info_key;
  const char* info_value;
};

class FrontendFeatureOffTest : public BlkifE2eTest, public ::testing::WithParamInterface<FrontendSwitch> {};

TEST_P(FrontendFeatureOffTest, BackendFallsBackAndEveryOpStillWorks) {
  ASSERT_TRUE(rig_->AddVbd(kDom, kDev, MemDisk(8)).ok());
  std::vector<std::string> args = {"--scenario", "ops"};
  args.insert(args.end(), GetParam().flags.begin(), GetParam().flags.end());
  GuestOutcome g = Guest(args);
  ASSERT_TRUE(g.Passed()) << g.Describe();
  EXPECT_EQ(g.info[GetParam().info_key], GetParam().info_value) << g.output;
  EXPECT_EQ(rig_->hv().MappedGrantCount(kDom), 0u);
}

INSTANTIATE_TEST_SUITE_P(
    Switches, FrontendFeatureOffTest,
    ::testing::Values(FrontendSwitch{"NoPersistentGrants", {"--no-persistent"}, "persistent", "false"},
                      FrontendSwitch{"NoIndirect", {"--indirect", "0"}, "indirect_segments", "0"},
                      FrontendSwitch{"SingleQueue", {"--queues", "1"}, "queues", "1"},
                      FrontendSwitch{"SinglePageRingRef", {"--legacy-ring-ref"}, "ring_page_order", "0"},
                      FrontendSwitch{"TwoPageRing", {"--ring-order", "1", "--queues", "2"}, "ring_entries", "64"},
                      FrontendSwitch{"X86_32Abi", {"--abi", "x86_32", "--queues", "2"}, "queues", "2"},
                      FrontendSwitch{"NoProtocolKey", {"--no-protocol"}, "queues", "4"},
                      FrontendSwitch{"NoWaitForInitWait", {"--no-wait-initwait"}, "persistent", "true"},
                      FrontendSwitch{"NoFlushBarrierDiscard",
                                     {"--no-flush", "--no-barrier", "--no-discard"},
                                     "discard",
                                     "false"}),
    [](const auto& p) { return std::string(p.param.name); });

TEST_F(BlkifE2eTest, BackendOfferingNothingStillServesEveryBasicOp) {
  VbdFeatures none;
  none.max_ring_page_order = 0;
  none.max_queues = 1;
  none.persistent = false;
  none.max_indirect_segments = 0;
  none.flush = none.barrier = false;
  ASSERT_TRUE(rig_->AddVbd(kDom, kDev, MemDisk(8, /*discard=*/false), none).ok());
  GuestOutcome g = Guest({"--scenario", "ops"});
  ASSERT_TRUE(g.Passed()) << g.Describe();
  EXPECT_EQ(g.info["queues"], "1");
  EXPECT_EQ(g.info["ring_page_order"], "0");
  EXPECT_EQ(g.info["persistent"], "false");
  EXPECT_EQ(g.info["indirect_segments"], "0");
  EXPECT_EQ(g.info["flush"], "false");
  EXPECT_EQ(g.info["discard"], "false");
}

TEST_F(BlkifE2eTest, ReadOnlyVbdRefusesWrites) {
  ASSERT_TRUE(rig_->AddVbd(kDom, kDev, MemDisk(4), {}, /*writable=*/false).ok());
  GuestOutcome g = Guest({"--scenario", "ops"});
  ASSERT_TRUE(g.Passed()) << g.Describe();
  EXPECT_EQ(g.info["read_only"], "true");
  EXPECT_EQ(g.info["info"], "4");
}

// Writes a raw base of `sectors` holding the generation-0 pattern of seed.
void WritePatternBase(const std::string& path, uint64_t sectors, uint64_t seed) {
  std::ofstream f(path, std::ios::binary | std::ios::trunc);
  std::vector<uint8_t> buf(512 * 2048);
  for (uint64_t s = 0; s < sectors; s += 2048) {
    for (uint64_t i = 0; i < 2048; ++i) xen::FillWorkloadPattern(s + i, 0, seed, buf.data() + i * 512);
    f.write(reinterpret_cast<const char*>(buf.data()), static_cast<std::streamsize>(buf.size()));
  }
}

struct ImageKind {
  const char* name;
  const char* create;  // qemu-img create arguments after the path; {base} is replaced
  bool qemu_check;     // qemu-img check supports the format
  const char* format;  // for qemu-img compare -f
};

class ImageWorkloadTest : public BlkifE2eTest, public ::testing::WithParamInterface<ImageKind> {};

TEST_P(ImageWorkloadTest, RandomWorkloadMatchesModelQemuCheckAndTwin) {
  if (!HaveQemuImg()) GTEST_SKIP() << "qemu-img not installed (apt-get install qemu-utils)";
  const ImageKind& kind = GetParam();
  const uint64_t sectors = 32 * 2048;
  const std::string base = rig_->dir() + "/base.raw";
  const std::string image = rig_->dir() + "/disk." + kind.format;
  const std::string model = rig_->dir() + "/model.bin";
  const std::string twin = rig_->dir() + "/twin.raw";
  WritePatternBase(base, sectors, 11);
  std::string create = kind.create;
  if (size_t at = create.find("{base}"); at != std::string::npos) create.replace(at, 6, base);
  std::string out;
  ASSERT_EQ(RunCommand("qemu-img create -q " + image + " " + create, &out), 0) << out;
  const bool has_base = create.find(base) != std::string::npos;
  {
    auto dev = OpenImageDevice(image);
    ASSERT_TRUE(dev.ok()) << dev.status().ToString();
    ASSERT_TRUE(rig_->AddVbd(kDom, kDev, *dev).ok());
  }
  GuestOutcome g = Guest({"--scenario", "workload", "--ops", "3000", "--qd", "16", "--bs", "128", "--random-sizes",
                          "--read-pct", "40", "--flush-every", "200", "--barrier-pct", "5", "--seed", "3",
                          "--initial", has_base ? "pattern" : "zero", "--initial-seed", "11", "--model-out", model},
                         40s);
  ASSERT_TRUE(g.Passed()) << g.Describe();
  EXPECT_NE(g.output.find("mismatches=0"), std::string::npos);
  // The guest's figures, for the record (not asserted: shared machines vary).
  if (size_t at = g.output.find("workload: "); at != std::string::npos) {
    std::cout << "[ figures  ] " << kind.name << " " << g.output.substr(at, g.output.find('\n', at) - at) << "\n";
  }
  ASSERT_TRUE(rig_->RemoveVbd(kDom, kDev).ok());  // closes the image

  if (kind.qemu_check) {
    EXPECT_EQ(RunCommand("qemu-img check -q " + image, &out), 0) << out;
  }
  // The twin: the initial content where the model says "never written",
  // else the pattern of the generation the model recorded.
  std::ifstream m(model, std::ios::binary);
  std::vector<uint8_t> tags((std::istreambuf_iterator<char>(m)), std::istreambuf_iterator<char>());
  ASSERT_EQ(tags.size(), sectors * 4);
  std::ofstream t(twin, std::ios::binary | std::ios::trunc);
  std::vector<uint8_t> sector(512);
  uint64_t written = 0;
  for (uint64_t s = 0; s < sectors; ++s) {
    const uint32_t gen = LoadLe32(tags.data() + s * 4);
    if (gen == 0 && !has_base) {
      std::fill(sector.begin(), sector.end(), 0);
    } else {
      xen::FillWorkloadPattern(s, gen, gen == 0 ? 11 : 3, sector.data());
    }
    written += gen != 0;
    t.write(reinterpret_cast<const char*>(sector.data()), 512);
  }
  t.close();
  EXPECT_GT(written, 1000u);
  EXPECT_EQ(RunCommand(std::string("qemu-img compare -f ") + kind.format + " -F raw " + image + " " + twin, &out), 0)
      << out;
  EXPECT_EQ(rig_->hv().MappedGrantCount(kDom), 0u);
}

INSTANTIATE_TEST_SUITE_P(
    Formats, ImageWorkloadTest,
    ::testing::Values(ImageKind{"Qcow2OverlayOverRawBase", "-f qcow2 -o cluster_size=65536 -b {base} -F raw", true,
                                "qcow2"},
                      ImageKind{"Qcow2SmallClusters", "-f qcow2 -o cluster_size=4096 32M", true, "qcow2"},
                      ImageKind{"QcowV1OverlayOverRawBase", "-f qcow -b {base} -F raw", false, "qcow"},
                      ImageKind{"Raw", "-f raw 32M", false, "raw"}),
    [](const auto& p) { return std::string(p.param.name); });

TEST_F(BlkifE2eTest, SecureDiscardReadsZero) {
  backend::MemBlockDeviceOptions o;
  o.size_bytes = 8 << 20;
  o.secure_discard = true;
  o.discard_granularity_bytes = 4096;
  ASSERT_TRUE(rig_->AddVbd(kDom, kDev, std::make_shared<backend::MemBlockDevice>(o)).ok());
  GuestOutcome g = Guest({"--scenario", "ops"});
  ASSERT_TRUE(g.Passed()) << g.Describe();
  EXPECT_EQ(g.info["discard_secure"], "true");
  EXPECT_NE(g.output.find("PASS secure-discard-reads-zero"), std::string::npos) << g.output;
}

TEST_F(BlkifE2eTest, DiscardOnQcow2ReadsZeroInQemu) {
  if (!HaveQemuImg()) GTEST_SKIP() << "qemu-img not installed (apt-get install qemu-utils)";
  const std::string img = rig_->dir() + "/disk.qcow2";
  std::string out;
  ASSERT_EQ(RunCommand("qemu-img create -q -f qcow2 " + img + " 16M", &out), 0) << out;
  {
    auto dev = OpenImageDevice(img);
    ASSERT_TRUE(dev.ok()) << dev.status().ToString();
    ASSERT_TRUE(rig_->AddVbd(kDom, kDev, *dev).ok());
  }
  GuestOutcome g = Guest({"--scenario", "ops"});
  ASSERT_TRUE(g.Passed()) << g.Describe();
  ASSERT_EQ(g.info["discard"], "true");
  const uint64_t unit = std::max<uint64_t>(std::stoull(g.info["discard_granularity"]) / 512, 8);
  ASSERT_TRUE(rig_->RemoveVbd(kDom, kDev).ok());
  EXPECT_EQ(RunCommand("qemu-img check -q " + img, &out), 0) << out;
  // The ops scenario wrote then discarded [8 * unit, +2 * unit) sectors.
  const std::string cmd = "qemu-io -f qcow2 -r -c 'read -P 0 " + std::to_string(8 * unit * 512) + " " +
                          std::to_string(2 * unit * 512) + "' " + img;
  ASSERT_EQ(RunCommand(cmd, &out), 0) << out;
  EXPECT_EQ(out.find("Pattern verification failed"), std::string::npos) << out;
  // And data written elsewhere is in the image (sector 64, 88 sectors, gen 3).
  RunCommand("qemu-io -f qcow2 -r -c 'read -P 0 32768 45056' " + img, &out);
  EXPECT_NE(out.find("Pattern verification failed"), std::string::npos) << out;
}

TEST_F(BlkifE2eTest, FlushedWritesAreDurableWhenTheGuestDies) {
  auto mem = MemDisk(8);
  ASSERT_TRUE(rig_->AddVbd(kDom, kDev, mem).ok());
  GuestOutcome g = Guest({"--scenario", "flush-then-die", "--region-sectors", "4096", "--initial-seed", "5"});
  EXPECT_FALSE(g.exited) << g.Describe();
  ASSERT_NE(g.output.find("FLUSHED"), std::string::npos) << g.Describe();
  std::vector<uint8_t> durable = mem->DurableContents();
  std::vector<uint8_t> expect(512);
  for (uint64_t s = 0; s < 4096; ++s) {
    xen::FillWorkloadPattern(s, 0, 5, expect.data());
    ASSERT_EQ(0, memcmp(expect.data(), durable.data() + s * 512, 512)) << "sector " << s << " not durable";
  }
  // The dead guest's VBD is torn down and every grant released.
  EXPECT_TRUE(rig_->WaitState(kDom, kDev, 6));
  EXPECT_EQ(rig_->hv().MappedGrantCount(kDom), 0u);
}

TEST_F(BlkifE2eTest, OnlineResizeIsSeenByTheGuest) {
  auto mem = MemDisk(8);
  ASSERT_TRUE(rig_->AddVbd(kDom, kDev, mem).ok());
  auto p = GuestProcess::Start(rig_->GuestArgs(kDom, kDev, {"--scenario", "resize"}));
  ASSERT_TRUE(p.ok());
  ASSERT_TRUE(p->WaitForLine("READY", 10s));
  mem->Resize(16 << 20);
  ASSERT_TRUE(rig_->Resize(kDom, kDev).ok());
  GuestOutcome g = p->Wait(20s);
  ASSERT_TRUE(g.Passed()) << g.Describe();
  EXPECT_EQ(g.InfoInt("new_sectors"), 16 * 2048);
}

TEST_F(BlkifE2eTest, ReconnectKeepsDataAndServesAgain) {
  ASSERT_TRUE(rig_->AddVbd(kDom, kDev, MemDisk(8)).ok());
  GuestOutcome g = Guest({"--scenario", "reconnect", "--reconnects", "2", "--region-sectors", "2048", "--initial-seed",
                          "21", "--ops", "500", "--qd", "8"});
  ASSERT_TRUE(g.Passed()) << g.Describe();
  // Each handshake after a disconnect succeeded, and data written before
  // the first one was read back intact after the last.
  EXPECT_NE(g.output.find("PASS reconnect-1"), std::string::npos) << g.output;
  EXPECT_NE(g.output.find("PASS workload-after-reconnect"), std::string::npos) << g.output;
  EXPECT_EQ(rig_->hv().MappedGrantCount(kDom), 0u);
}

}  // namespace
}  // namespace cowtap::blkif_test
