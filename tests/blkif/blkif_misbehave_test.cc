// Every misbehaviour mode of the simulated guest against the backend, each
// while a second, healthy guest runs a verified workload on its own VBD: the
// backend answers the bad requests (or halts only the broken ring), the
// healthy guest sees no error or mismatch, and no grant stays mapped once
// the misbehaving guest has gone.
#include <gtest/gtest.h>

#include <chrono>
#include <csignal>

#include "backend/mem_block_device.h"
#include "tests/blkif/blkif_rig.h"
#include "tests/blkif/guest_process.h"

namespace cowtap::blkif_test {
namespace {

using namespace std::chrono_literals;
constexpr xen::DomId kBad = 2;
constexpr xen::DomId kGood = 3;
constexpr uint32_t kDev = 51712;

std::shared_ptr<backend::MemBlockDevice> MemDisk(uint64_t mib) {
  backend::MemBlockDeviceOptions o;
  o.size_bytes = mib << 20;
  o.discard_granularity_bytes = 4096;
  return std::make_shared<backend::MemBlockDevice>(o);
}

enum class Expect {
  kGuestPasses,       // every bad request answered as expected, ring still serves
  kAnsweredOrHalted,  // the backend answered the junk or halted that ring
  kRingHalted,        // the backend must halt the ring
  kGuestDies,         // the guest is killed with requests in flight
};

struct Mode {
  const char* name;
  std::vector<std::string> flags;
  Expect expect;
};

class MisbehaviourTest : public ::testing::TestWithParam<Mode> {};

TEST_P(MisbehaviourTest, BackendContainsItAndKeepsServingAHealthyGuest) {
  const Mode& mode = GetParam();
  auto rig = BlkifRig::Create();
  ASSERT_TRUE(rig.ok()) << rig.status().ToString();
  BlkifRig& r = **rig;
  ASSERT_TRUE(r.AddVbd(kBad, kDev, MemDisk(8)).ok());
  ASSERT_TRUE(r.AddVbd(kGood, kDev, MemDisk(8)).ok());

  auto healthy = GuestProcess::Start(r.GuestArgs(
      kGood, kDev, {"--scenario", "workload", "--duration-ms", "1500", "--ops", "0", "--qd", "8", "--bs", "64",
                    "--random-sizes", "--initial", "zero", "--region-sectors", "8192", "--poll-timeout-ms", "5000"}));
  ASSERT_TRUE(healthy.ok());

  std::vector<std::string> args = {"--scenario", mode.name, "--misbehave-wait-ms", "800", "--seed", "9"};
  args.insert(args.end(), mode.flags.begin(), mode.flags.end());
  GuestOutcome bad = RunGuest(r.GuestArgs(kBad, kDev, args), 20s);
  VbdStatus st = r.GetStatus(kBad, kDev);

  switch (mode.expect) {
    case Expect::kGuestPasses:
      EXPECT_TRUE(bad.Passed()) << bad.Describe();
      EXPECT_FALSE(st.any_ring_halted) << st.halt_reason;
      break;
    case Expect::kAnsweredOrHalted:
      EXPECT_TRUE(bad.exited && bad.failed == 0) << bad.Describe();
      EXPECT_TRUE(st.any_ring_halted || st.errors + st.eopnotsupp > 0)
          << "neither answered nor halted; " << bad.Describe();
      break;
    case Expect::kRingHalted:
      EXPECT_TRUE(bad.exited && bad.failed == 0) << bad.Describe();
      EXPECT_TRUE(st.any_ring_halted) << bad.Describe();
      EXPECT_EQ(bad.InfoInt("answers_after_race"), 0) << bad.Describe();
      break;
    case Expect::kGuestDies:
      EXPECT_FALSE(bad.exited) << bad.Describe();
      EXPECT_EQ(bad.signal, SIGKILL) << bad.Describe();
      EXPECT_NE(bad.output.find("DYING inflight="), std::string::npos) << bad.Describe();
      EXPECT_TRUE(r.WaitState(kBad, kDev, 6)) << "backend did not tear down the dead guest's VBD";
      break;
  }
  // Whatever the bad guest did, once it is gone nothing of it stays mapped.
  bool released = false;
  for (int i = 0; i < 300 && !released; ++i) {
    released = r.hv().MappedGrantCount(kBad) == 0;
    if (!released) usleep(10000);
  }
  EXPECT_TRUE(released) << r.hv().MappedGrantCount(kBad) << " grants of the bad guest still mapped";

  GuestOutcome good = healthy->Wait(20s);
  EXPECT_TRUE(good.Passed()) << "the healthy guest suffered: " << good.Describe();
  EXPECT_FALSE(r.GetStatus(kGood, kDev).any_ring_halted);
}

INSTANTIATE_TEST_SUITE_P(
    Modes, MisbehaviourTest,
    ::testing::Values(Mode{"garbage", {}, Expect::kAnsweredOrHalted},
                      Mode{"out-of-range", {}, Expect::kGuestPasses},
                      Mode{"bad-gref", {}, Expect::kGuestPasses},
                      Mode{"bad-segments", {}, Expect::kGuestPasses},
                      Mode{"unknown-op", {}, Expect::kGuestPasses},
                      Mode{"revoke-before-push", {"--no-persistent", "--queues", "1"}, Expect::kGuestPasses},
                      Mode{"revoke-after-push", {"--queues", "1"}, Expect::kGuestPasses},
                      Mode{"race-req-prod", {"--queues", "1"}, Expect::kRingHalted},
                      Mode{"notify-flood", {"--ops", "300", "--initial", "zero"}, Expect::kGuestPasses},
                      Mode{"die-mid-io", {"--qd", "32", "--bs", "64"}, Expect::kGuestDies}),
    [](const auto& p) {
      std::string n = p.param.name;
      for (char& c : n) {
        if (c == '-') c = '_';
      }
      return n;
    });

}  // namespace
}  // namespace cowtap::blkif_test
