// Sustained load on one cowtapd core: 64 VBDs on thin overlays over one
// shared base, each guest running a different mix (random read-heavy,
// sequential writes with flushes, small random writes with barriers and
// discards, large random-size requests on two queues), in rounds. Each round
// attaches every VBD, runs every guest for the round's duration with every
// byte it reads verified against its model, lets the guests go (their death
// detaches the VBDs) and samples the daemon's heap, fds and grants. The heap
// must stay flat after the first round has warmed the caches: a leak per
// request, per attach or per guest shows up as growth across rounds.
//
// COWTAP_LOAD_ROUNDS / COWTAP_LOAD_ROUND_MS size the run: the default is a
// bounded run for `make test`; the heavy label runs the long variant
// (DaemonLoadTest.Heavy*, `make test-heavy`).
#include <gtest/gtest.h>
#include <malloc.h>

#include <chrono>
#include <cstdlib>
#include <regex>
#include <string>
#include <vector>

#include "tests/blkif/guest_process.h"
#include "tests/daemon/daemon_rig.h"

namespace cowtap::daemon_test {
namespace {

using blkif_test::GuestOutcome;
using blkif_test::GuestProcess;
using namespace std::chrono_literals;

constexpr uint32_t kXvda = 51712;
constexpr uint32_t kVbds = 64;
constexpr uint64_t kDiskBytes = 16 << 20;
constexpr uint64_t kRegionSectors = 2048;  // 1 MiB of each disk per round

uint64_t EnvOr(const char* name, uint64_t dflt) {
  const char* v = std::getenv(name);
  return v && *v ? std::strtoull(v, nullptr, 10) : dflt;
}

// The mix guest d runs: four kinds, so neighbouring VBDs load the daemon
// differently at the same moment.
std::vector<std::string> MixArgs(uint32_t d) {
  switch (d % 4) {
    case 0:  // boot-like: read-mostly, random
      return {"--mode", "random", "--read-pct", "90", "--bs", "16", "--qd", "8", "--queues", "1"};
    case 1:  // log-like: sequential writes, frequent flushes
      return {"--mode", "sequential", "--read-pct", "10", "--bs", "32", "--flush-every", "16", "--qd", "4"};
    case 2:  // database-like: small random writes, barriers, discards
      return {"--mode",        "random", "--read-pct", "40", "--bs",          "8", "--barrier-pct", "5",
              "--discard-pct", "5",      "--qd",       "8",  "--flush-every", "64"};
    default:  // large random-size requests on two queues
      return {"--mode", "random", "--read-pct", "50", "--bs", "256", "--random-sizes", "--qd", "4", "--queues", "2"};
  }
}

// Sums key=N over the guest's "workload: ..." summary lines.
uint64_t WorkloadFigure(const std::string& output, const std::string& key) {
  uint64_t sum = 0;
  const std::regex line("workload: .*\\b" + key + "=([0-9]+)");
  for (auto it = std::sregex_iterator(output.begin(), output.end(), line); it != std::sregex_iterator(); ++it) {
    sum += std::stoull((*it)[1].str());
  }
  return sum;
}

// Bytes malloc has handed out and not had back, over every arena. RSS is
// no leak measure here: glibc keeps freed memory in per-thread arenas (one
// per ring thread), so RSS after the same work varies by tens of MiB with
// which arenas the threads happened to use.
size_t HeapInUseKib() {
  const struct mallinfo2 m = ::mallinfo2();
  return (m.uordblks + m.hblkhd) / 1024;
}

struct RoundSample {
  size_t heap_kib = 0;
  size_t rss_kib = 0;
  size_t fds = 0;
  uint64_t guest_ops = 0;
};

void RunLoad(uint64_t rounds, uint64_t round_ms) {
  auto rig = DaemonRig::Create();
  ASSERT_TRUE(rig.ok()) << rig.status().ToString();
  DaemonRig& r = **rig;
  for (uint32_t d = 1; d <= kVbds; ++d) {
    ASSERT_TRUE(r.MakeOverlay("guest" + std::to_string(d) + ".qcow2", kDiskBytes).ok());
  }
  const uint64_t regions = kDiskBytes / 512 / kRegionSectors;
  std::vector<RoundSample> samples;
  uint64_t total_ops = 0, total_verified = 0;
  for (uint64_t round = 0; round < rounds; ++round) {
    for (uint32_t d = 1; d <= kVbds; ++d) {
      // A VBD whose guest just died may still be retiring (its toolstack
      // directory not yet rescanned): Busy says retry, as `cowtap ctl` would.
      Status s;
      WaitFor([&] {
        s = r.daemon().Attach(XvdaSpec(d, r.Path("guest" + std::to_string(d) + ".qcow2"), "qcow2"));
        return s.code() != ErrorCode::kBusy;
      });
      ASSERT_TRUE(s.ok()) << "round " << round << ", VBD " << d << ": " << s.ToString()
                          << " (backend state key: " << r.BackendKey(d, kXvda, "state") << ")";
    }
    // A fresh region per round reads as zeros (the base is empty), so every
    // byte is verified; past the disk's regions, only what the round wrote.
    const bool fresh = round < regions;
    std::vector<GuestProcess> guests;
    for (uint32_t d = 1; d <= kVbds; ++d) {
      std::vector<std::string> args = MixArgs(d);
      const std::vector<std::string> common = {"--ops",
                                               "0",
                                               "--duration-ms",
                                               std::to_string(round_ms),
                                               "--initial",
                                               fresh ? "zero" : "unknown",
                                               "--region-start",
                                               std::to_string((round % regions) * kRegionSectors),
                                               "--region-sectors",
                                               std::to_string(kRegionSectors),
                                               "--seed",
                                               std::to_string(round * 1000 + d)};
      args.insert(args.end(), common.begin(), common.end());
      auto g = GuestProcess::Start(r.GuestArgs(d, kXvda, args));
      ASSERT_TRUE(g.ok()) << g.status().ToString();
      guests.push_back(std::move(g).value());
    }
    int passed = 0;
    uint64_t round_ops = 0;
    for (uint32_t i = 0; i < guests.size(); ++i) {
      GuestOutcome o = guests[i].Wait(std::chrono::milliseconds(round_ms) + 60s);
      EXPECT_TRUE(o.Passed()) << "round " << round << ", guest " << i + 1 << ": " << o.Describe() << "\n" << o.output;
      passed += o.Passed();
      round_ops += WorkloadFigure(o.output, "ops");
      total_verified += WorkloadFigure(o.output, "verified_sectors");
    }
    ASSERT_EQ(passed, static_cast<int>(kVbds)) << "round " << round;
    ASSERT_TRUE(WaitFor([&] { return r.daemon().vbd_count() == 0; }, 20000))
        << "round " << round << ": " << r.daemon().vbd_count() << " VBDs still attached";
    for (uint32_t d = 1; d <= kVbds; ++d) ASSERT_EQ(r.sim().MappedGrantCount(d), 0u) << "round " << round;
    total_ops += round_ops;
    samples.push_back(RoundSample{HeapInUseKib(), RssKib(), OpenFdCount(), round_ops});
    std::printf(
        "load round %llu: %llu guest ops, daemon heap in use %zu KiB, "
        "RSS %zu KiB, %zu fds\n",
        static_cast<unsigned long long>(round), static_cast<unsigned long long>(round_ops), samples.back().heap_kib,
        samples.back().rss_kib, samples.back().fds);
  }
  ASSERT_GE(samples.size(), 2u);
  // Round 0 warms allocator arenas, caches and thread pools; from round 1 on
  // nothing may grow with the work done.
  const RoundSample& warm = samples[1];
  size_t peak_rss = 0;
  for (size_t i = 1; i < samples.size(); ++i) {
    EXPECT_LE(samples[i].fds, warm.fds) << "fds grow across rounds (round " << i << ")";
    peak_rss = std::max(peak_rss, samples[i].rss_kib);
  }
  EXPECT_LE(samples.back().heap_kib, warm.heap_kib + 4 * 1024)
      << "daemon heap grows across rounds: " << warm.heap_kib << " KiB in use after round 1, "
      << samples.back().heap_kib << " KiB after round " << samples.size() - 1;
  // With no VBD attached the daemon holds no per-VBD memory: a bound, not
  // a measure (see HeapInUseKib).
  EXPECT_LE(peak_rss, 256u * 1024) << "daemon RSS between rounds";
  std::printf(
      "load: %u VBDs x %llu rounds of %llu ms: %llu guest ops, %llu "
      "sectors verified, every guest passed; "
      "heap in use after round 1 %zu KiB, last %zu KiB; RSS between "
      "rounds peak %zu KiB\n",
      kVbds, static_cast<unsigned long long>(rounds), static_cast<unsigned long long>(round_ms),
      static_cast<unsigned long long>(total_ops), static_cast<unsigned long long>(total_verified), warm.heap_kib,
      samples.back().heap_kib, peak_rss);
  if (HaveQemuImg()) {
    for (uint32_t d : {1u, 2u, 3u, 4u, 64u}) {
      std::string out;
      EXPECT_EQ(RunShell("qemu-img check " + r.Path("guest" + std::to_string(d) + ".qcow2"), &out), 0) << out;
    }
  }
}

TEST(DaemonLoadTest, SixtyFourMixedVbdsInRoundsKeepDataAndMemoryFlat) {
  RunLoad(EnvOr("COWTAP_LOAD_ROUNDS", 4), EnvOr("COWTAP_LOAD_ROUND_MS", 2500));
}

// The long variant (label heavy): 12 rounds of 20 s, about 5 minutes.
TEST(DaemonLoadTest, HeavySustainedMixedLoad) {
  RunLoad(EnvOr("COWTAP_LOAD_ROUNDS", 12), EnvOr("COWTAP_LOAD_ROUND_MS", 20000));
}

}  // namespace
}  // namespace cowtap::daemon_test
