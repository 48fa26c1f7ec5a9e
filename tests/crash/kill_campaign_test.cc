// SIGKILL campaign: the real cowtapd program on the simulated platform serves
// a qcow2 overlay over a qcow2 middle layer over a raw base, a cowtap_guest
// process runs a verifying workload on it (allocating writes, overwrites,
// discards, flushes, reads checked against its model), and the daemon is
// killed with SIGKILL at a random moment. After every kill, offline:
//
//   1. `qemu-img check` of the overlay finds no corruption. Leaked clusters
//      are allowed and counted: cowtap orders metadata so that a cluster is
//      never referenced while its refcount says free (refcount increment
//      flushed before the L2 entry, L2 unlink before the decrement), so a
//      kill between the two leaves a cluster counted but unreferenced. Leaks
//      must then be repaired by `cowtap check --repair leaks` and recheck
//      clean.
//   2. Every sector holds what the guest's journal (xen-glue/
//      workload_journal.h) allows: the content durable at the last completed
//      flush — so every write acknowledged before that flush was issued
//      reads back — or a write or discard not covered by it; sectors never
//      written keep their content through the chain; anything else (a torn
//      or foreign sector, old data back) fails.
//   3. The base and middle files hash as before.
//
// The next round's guest starts from what is on disk (its initial model is the
// tags just observed, its generations continue above all issued so far), so
// the whole run is one long history checked at every kill.
//
// Knobs: COWTAP_KILLS (kills in the default run), COWTAP_KILL_SEED (the seed;
// printed, so a failure reproduces), COWTAP_KILL_HEAVY=1 enables the long
// run (COWTAP_HEAVY_KILLS, default 250). Each run prints
// "kill campaign: N kills survived, seed S, ...".
#include <fcntl.h>
#include <fmt/format.h>
#include <gtest/gtest.h>
#include <signal.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cstdlib>
#include <fstream>
#include <sstream>
#include <thread>

#include "cow/image.h"
#include "tests/blkif/daemon_process.h"
#include "tests/blkif/guest_process.h"
#include "tests/interop/test_util.h"
#include "xen-glue/blkfront_io.h"
#include "xen-glue/blkfront_workload.h"
#include "xen-glue/workload_journal.h"

namespace cowtap::crash_test {
namespace {

using namespace std::chrono_literals;
using xen::kGuestSectorBytes;
using xen::kTagZero;

constexpr uint64_t kDiskBytes = 32 << 20;
constexpr uint64_t kSectors = kDiskBytes / kGuestSectorBytes;
constexpr uint64_t kInitialSeed = 7;  // the base's pattern (generation 0)
constexpr uint64_t kDataSeed = 11;    // every generation the workload writes
constexpr uint32_t kMidClusterStride = 4;
constexpr int kRoundsPerTop = 10;  // kills before the overlay is replaced by an empty one
constexpr int kHashEvery = 5;      // kills between full hashes of the backing files (stat every kill)

uint64_t EnvU64(const char* name, uint64_t dflt) {
  const char* v = std::getenv(name);
  return v && *v ? std::strtoull(v, nullptr, 0) : dflt;
}

int RunShell(const std::string& command, std::string* out = nullptr) {
  std::string cmd = command + " 2>&1";
  FILE* p = ::popen(cmd.c_str(), "r");
  if (!p) return -1;
  char buf[4096];
  size_t n;
  std::string text;
  while ((n = fread(buf, 1, sizeof(buf), p)) > 0) text.append(buf, n);
  const int status = ::pclose(p);
  if (out) *out = text;
  return WIFEXITED(status) ? WEXITSTATUS(status) : -1;
}

// cowtapd as a child process, its output in a file.
class Daemon : public blkif_test::DaemonProcess {
 public:
  Daemon(const std::vector<std::string>& args, const std::string& log)
      : blkif_test::DaemonProcess(COWTAP_DAEMON_BIN, args, log) {}
};

// Waits until no process holds an OFD lock on path. A SIGKILLed cowtapd's
// io_uring is torn down after the process is reaped, and its in-flight
// writes and file references (so the image lock) go only then. Returns how
// long that took, or -1 ms if it did not happen within timeout.
std::chrono::milliseconds WaitUnlocked(const std::string& path, std::chrono::milliseconds timeout) {
  const auto start = std::chrono::steady_clock::now();
  const int fd = ::open(path.c_str(), O_RDWR | O_CLOEXEC);
  if (fd < 0) return std::chrono::milliseconds(-1);
  while (true) {
    struct flock l = {};
    l.l_type = F_WRLCK;
    l.l_whence = SEEK_SET;
    l.l_start = 0;
    l.l_len = 0;
    const bool free = ::fcntl(fd, F_OFD_GETLK, &l) == 0 && l.l_type == F_UNLCK;
    const auto waited = std::chrono::duration_cast<std::chrono::milliseconds>(std::chrono::steady_clock::now() - start);
    if (free || waited > timeout) {
      ::close(fd);
      return free ? waited : std::chrono::milliseconds(-1);
    }
    std::this_thread::sleep_for(1ms);
  }
}

struct CampaignReport {
  int kills = 0;
  int kills_during_io = 0;   // the guest had issued at least one request
  int kills_at_startup = 0;  // while cowtapd opened the chain
  int leak_rounds = 0;       // qemu-img check reported leaks (all repaired)
  int clean_rounds = 0;
  uint64_t records = 0, flushes_acked = 0, writes_acked = 0, discards_acked = 0;
  uint64_t durable_written_sectors = 0;  // sectors whose flushed write was checked
  double seconds = 0;
  std::string Line(uint64_t seed) const {
    return fmt::format(
        "kill campaign: {} kills survived, seed {}, {} during guest I/O, {} at daemon startup, leaks seen and repaired "
        "after {} kills, "
        "{} clean, journal: {} records, {} writes / {} discards / {} flushes acknowledged, {} flushed sectors "
        "checked, {:.1f} s",
        kills, seed, kills_during_io, kills_at_startup, leak_rounds, clean_rounds, records, writes_acked,
        discards_acked, flushes_acked, durable_written_sectors, seconds);
  }
};

// Size, modification and change times: any write to the file changes them.
std::string StatOf(const std::string& path) {
  struct stat st;
  if (::stat(path.c_str(), &st) != 0) return "missing";
  return fmt::format("{} {}.{} {}.{}", st.st_size, st.st_mtim.tv_sec, st.st_mtim.tv_nsec, st.st_ctim.tv_sec,
                     st.st_ctim.tv_nsec);
}

class KillCampaign {
 public:
  explicit KillCampaign(uint64_t seed) : seed_(seed), rng_(seed) {
    char tmpl[] = "/tmp/cowtap-kill-XXXXXX";
    dir_ = ::mkdtemp(tmpl) ? tmpl : "";
  }
  ~KillCampaign() {
    if (!dir_.empty() && !std::getenv("COWTAP_KEEP_TEST_DIRS")) RunShell("rm -rf '" + dir_ + "'");
  }
  std::string P(const std::string& name) const { return dir_ + "/" + name; }

  // base.raw (the pattern of generation 0), mid.qcow2 (every 4th cluster
  // rewritten, some zeroed), top.qcow2 (empty): the initial model and hashes.
  Status Setup() {
    if (dir_.empty()) return Status::IoError("mkdtemp under /tmp failed");
    std::vector<uint8_t> base(kDiskBytes);
    for (uint64_t s = 0; s < kSectors; ++s) {
      xen::FillWorkloadPattern(s, 0, kInitialSeed, base.data() + s * kGuestSectorBytes);
    }
    COWTAP_RETURN_IF_ERROR(tests::WriteWholeFile(P("base.raw"), base));
    cow::CreateOptions mid;
    mid.backing_file = "base.raw";
    mid.backing_format = cow::ImageFormat::kRaw;
    COWTAP_RETURN_IF_ERROR(cow::CreateImage(P("mid.qcow2"), mid));
    tags_.assign(kSectors, 0);
    {
      COWTAP_ASSIGN_OR_RETURN(std::unique_ptr<cow::Image> image, cow::OpenImage(P("mid.qcow2")));
      const uint64_t cluster_sectors = 65536 / kGuestSectorBytes;
      std::vector<uint8_t> buf(16 * kGuestSectorBytes);
      for (uint64_t c = 0; c * cluster_sectors < kSectors; c += kMidClusterStride) {
        // Sixteen sectors at an unaligned offset in the cluster: the middle
        // layer's copy-up keeps the rest of the cluster from the base.
        const uint64_t first = c * cluster_sectors + 8 + c % 64;
        if ((c / kMidClusterStride) % 5 == 4) {
          COWTAP_RETURN_IF_ERROR(image->WriteZeroes(first * kGuestSectorBytes, buf.size(), false));
          for (uint64_t s = first; s < first + 16; ++s) tags_[s] = kTagZero;
          continue;
        }
        const uint32_t generation = next_generation_++;
        for (uint64_t i = 0; i < 16; ++i) {
          xen::FillWorkloadPattern(first + i, generation, kDataSeed, buf.data() + i * kGuestSectorBytes);
          tags_[first + i] = generation;
        }
        const iovec v = MakeIoVec(buf.data(), buf.size());
        COWTAP_RETURN_IF_ERROR(image->Write(first * kGuestSectorBytes, IoVecs(&v, 1)));
      }
      COWTAP_RETURN_IF_ERROR(image->Flush());
      COWTAP_RETURN_IF_ERROR(image->Close());
    }
    mid_tags_ = tags_;
    COWTAP_RETURN_IF_ERROR(NewTop());
    COWTAP_ASSIGN_OR_RETURN(base_hash_, tests::HashFile(P("base.raw")));
    COWTAP_ASSIGN_OR_RETURN(mid_hash_, tests::HashFile(P("mid.qcow2")));
    base_stat_ = StatOf(P("base.raw"));
    mid_stat_ = StatOf(P("mid.qcow2"));
    return Status::Ok();
  }

  // A fresh, empty top overlay (the disk then holds the middle layer's
  // content again), so allocating writes, new L2 tables and refcount growth
  // keep being exercised as the campaign goes on.
  Status NewTop() {
    ::unlink(P("top.qcow2").c_str());
    cow::CreateOptions top;
    top.backing_file = "mid.qcow2";
    top.backing_format = cow::ImageFormat::kQcow2;
    COWTAP_RETURN_IF_ERROR(cow::CreateImage(P("top.qcow2"), top));
    tags_ = mid_tags_;
    return Status::Ok();
  }

  // One round: cowtapd up, a guest on it, SIGKILL after kill_after (from the
  // guest's start), the guest reaped. Returns the guest's output.
  //
  // With at_startup the daemon is killed kill_after from its own start,
  // while it opens the chain and attaches, before any guest.
  Result<std::string> RunRound(std::chrono::milliseconds kill_after, bool at_startup = false) {
    COWTAP_RETURN_IF_ERROR(xen::WriteModelFile(P("model.bin"), tags_));
    // A fresh log, so the previous daemon's "ready" is not taken for this one's.
    ::unlink(P("cowtapd.log").c_str());
    Daemon d({"--platform", "sim", "--sim-socket", P("sim.sock"), "--control-socket", P("ctl.sock"), "--log-level",
              "info", "--attach", "1:51712:" + P("top.qcow2") + ":qcow2"},
             P("cowtapd.log"));
    if (at_startup) {
      std::this_thread::sleep_for(kill_after);
      d.Kill();
      if (WaitUnlocked(P("top.qcow2"), 10s).count() < 0) return Status::Busy("top.qcow2 still locked");
      return std::string("(killed at startup)");
    }
    if (!d.WaitForLog("cowtapd ready", 10s)) return Status::Internal("cowtapd did not start:\n" + d.Log());
    const uint64_t flush_every = rng_.Between(2, 24);
    const uint64_t op_seed = rng_.Next() | 1;
    auto guest = blkif_test::GuestProcess::Start({"--socket",
                                                  P("sim.sock"),
                                                  "--domid",
                                                  "1",
                                                  "--devid",
                                                  "51712",
                                                  "--ops",
                                                  "0",
                                                  "--duration-ms",
                                                  "30000",
                                                  "--qd",
                                                  "8",
                                                  "--bs",
                                                  "24",
                                                  "--random-sizes",
                                                  "--read-pct",
                                                  "30",
                                                  "--discard-pct",
                                                  "8",
                                                  "--flush-every",
                                                  std::to_string(flush_every),
                                                  "--seed",
                                                  std::to_string(kDataSeed),
                                                  "--op-seed",
                                                  std::to_string(op_seed),
                                                  "--initial",
                                                  "pattern",
                                                  "--initial-seed",
                                                  std::to_string(kInitialSeed),
                                                  "--initial-model",
                                                  P("model.bin"),
                                                  "--first-generation",
                                                  std::to_string(next_generation_),
                                                  "--journal",
                                                  P("journal.bin"),
                                                  "--no-final-verify",
                                                  "--poll-timeout-ms",
                                                  "3000",
                                                  "--log-level",
                                                  "off"});
    if (!guest.ok()) return guest.status();
    std::this_thread::sleep_for(kill_after);
    const bool was_alive = d.Alive();
    d.Kill();
    // The guest's workload fails as soon as the hypervisor connection goes;
    // its journal is complete then. (Its teardown would wait out a timeout for
    // grants a dead backend never unmaps, so it is killed instead.)
    // A guest blocked in poll when the daemon died has nothing left to
    // journal; it is not waited for beyond a short grace.
    guest->WaitForLine("FAIL workload", 300ms);
    blkif_test::GuestOutcome out = guest->Wait(0ms);
    const std::chrono::milliseconds unlock = WaitUnlocked(P("top.qcow2"), 10s);
    if (unlock.count() < 0) return Status::Busy("top.qcow2 still locked 10 s after cowtapd was killed");
    max_unlock_ms_ = std::max<int64_t>(max_unlock_ms_, unlock.count());
    if (!was_alive) return Status::Internal("cowtapd died before it was killed:\n" + d.Log());
    if (out.exited && out.exit_code == 0) {
      return Status::Internal("the guest finished as if its backend had not died:\n" + out.Describe());
    }
    return out.output;
  }

  // Checks the image after a kill and takes what it holds as the next
  // round's model. Non-OK names the first problems.
  Status Verify(CampaignReport* report, bool hash_backing = true) {
    // No journal: the kill came before the guest got its disk.
    std::vector<xen::JournalRecord> records;
    if (::access(P("journal.bin").c_str(), F_OK) == 0) {
      COWTAP_ASSIGN_OR_RETURN(records, xen::ReadJournal(P("journal.bin")));
    }
    for (const xen::JournalRecord& r : records) {
      if (r.type == xen::JournalRecordType::kReadMismatch) {
        return Status::Corrupt(
            fmt::format("the guest read sector {} through cowtapd and found generation {}, which "
                        "its model did not allow",
                        r.sector, r.generation));
      }
    }
    COWTAP_RETURN_IF_ERROR(CheckMetadata(report));
    COWTAP_ASSIGN_OR_RETURN(std::vector<uint8_t> disk, ReadDisk());
    COWTAP_ASSIGN_OR_RETURN(std::vector<xen::SectorAllowance> allow, xen::ReplayJournal(tags_, 0, records));
    std::vector<uint32_t> observed(kSectors);
    std::string problems;
    int bad = 0;
    for (uint64_t s = 0; s < kSectors; ++s) {
      const std::optional<uint32_t> tag =
          xen::ObservedTag(s, disk.data() + s * kGuestSectorBytes, kDataSeed, kInitialSeed);
      const std::string why = xen::CheckSector(s, tag, allow[s]);
      if (!why.empty() && ++bad <= 8) problems += "\n  " + why;
      observed[s] = tag.value_or(0);
      const uint32_t d = allow[s].durable_tag;
      if (why.empty() && d != kTagZero && (d & xen::kTagGenerationMask) >= first_round_generation_ &&
          *tag == (d & xen::kTagGenerationMask)) {
        ++report->durable_written_sectors;
      }
    }
    if (bad > 0) return Status::Corrupt(fmt::format("{} sector(s) hold what the journal forbids:{}", bad, problems));
    if (StatOf(P("base.raw")) != base_stat_ || StatOf(P("mid.qcow2")) != mid_stat_) {
      return Status::Corrupt("a backing file changed: base.raw or mid.qcow2 was modified (size or times)");
    }
    if (hash_backing) {
      COWTAP_ASSIGN_OR_RETURN(uint64_t base_hash, tests::HashFile(P("base.raw")));
      COWTAP_ASSIGN_OR_RETURN(uint64_t mid_hash, tests::HashFile(P("mid.qcow2")));
      if (base_hash != base_hash_ || mid_hash != mid_hash_) {
        return Status::Corrupt("a backing file changed: base.raw or mid.qcow2 no longer hashes as before");
      }
    }
    bool issued = false;
    for (const xen::JournalRecord& r : records) {
      ++report->records;
      switch (r.type) {
        case xen::JournalRecordType::kWriteIssued:
          next_generation_ = std::max(next_generation_, r.generation + 1);
          issued = true;
          break;
        case xen::JournalRecordType::kDiscardIssued:
        case xen::JournalRecordType::kFlushIssued:
          issued = true;
          break;
        case xen::JournalRecordType::kWriteAcked:
          ++report->writes_acked;
          break;
        case xen::JournalRecordType::kDiscardAcked:
          ++report->discards_acked;
          break;
        case xen::JournalRecordType::kFlushAcked:
          ++report->flushes_acked;
          break;
        default:
          break;
      }
    }
    report->kills_during_io += issued;
    tags_ = std::move(observed);
    ::unlink(P("journal.bin").c_str());
    return Status::Ok();
  }

  // Flips one byte inside a sector that the last completed flush made
  // durable and that lives in the overlay. Returns the sector (tests of the
  // checker itself).
  Result<uint64_t> DamageAFlushedSector() {
    COWTAP_ASSIGN_OR_RETURN(std::vector<xen::JournalRecord> records, xen::ReadJournal(P("journal.bin")));
    COWTAP_ASSIGN_OR_RETURN(std::vector<xen::SectorAllowance> allow, xen::ReplayJournal(tags_, 0, records));
    cow::OpenOptions ro;
    ro.read_only = true;
    COWTAP_ASSIGN_OR_RETURN(std::unique_ptr<cow::Image> image, cow::OpenImage(P("top.qcow2"), ro));
    for (uint64_t s = 0; s < kSectors; ++s) {
      const uint32_t d = allow[s].durable_tag;
      if (d == kTagZero || (d & xen::kTagMayBeZero) || d < first_round_generation_ ||
          !allow[s].later_generations.empty()) {
        continue;
      }
      COWTAP_ASSIGN_OR_RETURN(std::vector<cow::Extent> map, image->Map(s * kGuestSectorBytes, kGuestSectorBytes));
      if (map.empty() || map[0].depth != 0 || !map[0].host_offset) continue;
      const uint64_t host = *map[0].host_offset + (s * kGuestSectorBytes - map[0].offset) + 200;
      image.reset();
      const int fd = ::open(P("top.qcow2").c_str(), O_RDWR);
      if (fd < 0) return Status::FromErrno(errno, "open top.qcow2");
      uint8_t byte = 0;
      const bool ok = ::pread(fd, &byte, 1, host) == 1 && (byte ^= 0x40, ::pwrite(fd, &byte, 1, host) == 1);
      ::close(fd);
      if (!ok) return Status::IoError("could not flip a byte of top.qcow2");
      return s;
    }
    return Status::NotFound("no flushed sector in the overlay (the kill came before the first flush)");
  }

  void FlipBaseByte() {
    const int fd = ::open(P("base.raw").c_str(), O_RDWR);
    uint8_t byte = 0;
    if (::pread(fd, &byte, 1, 4096 + 300) == 1) {
      byte ^= 1;
      (void)!::pwrite(fd, &byte, 1, 4096 + 300);
    }
    ::close(fd);
  }

  void Reset() { first_round_generation_ = next_generation_; }
  int64_t max_unlock_ms() const { return max_unlock_ms_; }

 private:
  // qemu-img check (or cowtap check without qemu-img): no corruption; leaks
  // repaired by cowtap check --repair leaks, after which the check is clean.
  Status CheckMetadata(CampaignReport* report) {
    const bool qemu = tests::HaveTool("qemu-img");
    const std::string check = qemu ? "qemu-img check -f qcow2 '" + P("top.qcow2") + "'"
                                   : std::string(COWTAP_CLI_BIN) + " check '" + P("top.qcow2") + "'";
    std::string out;
    const int rc = RunShell(check, &out);
    if (rc == 0) {
      ++report->clean_rounds;
      return Status::Ok();
    }
    if (rc != 3) return Status::Corrupt(fmt::format("`{}` exited {}:\n{}", check, rc, out));
    ++report->leak_rounds;
    std::string repair_out;
    const int repaired =
        RunShell(std::string(COWTAP_CLI_BIN) + " check --repair leaks '" + P("top.qcow2") + "'", &repair_out);
    if (repaired != 0) {
      return Status::Corrupt(
          fmt::format("cowtap check --repair leaks exited {}:\n{}\n(before: {})", repaired, repair_out, out));
    }
    std::string again;
    if (RunShell(check, &again) != 0) {
      return Status::Corrupt(fmt::format("after cowtap check --repair leaks, `{}` still fails:\n{}", check, again));
    }
    return Status::Ok();
  }

  // The guest-visible disk: qemu-img convert when installed (an independent
  // reader of the chain), else cowtap's engine.
  Result<std::vector<uint8_t>> ReadDisk() {
    if (tests::HaveTool("qemu-img")) {
      std::string out;
      const std::string cmd = "qemu-img convert -f qcow2 -O raw '" + P("top.qcow2") + "' '" + P("disk.raw") + "'";
      if (RunShell(cmd, &out) != 0) return Status::IoError(cmd + " failed:\n" + out);
      COWTAP_ASSIGN_OR_RETURN(std::vector<uint8_t> disk, tests::ReadWholeFile(P("disk.raw")));
      ::unlink(P("disk.raw").c_str());
      if (disk.size() != kDiskBytes) return Status::Corrupt(fmt::format("disk of {} bytes", disk.size()));
      return disk;
    }
    cow::OpenOptions ro;
    ro.read_only = true;
    return tests::ReadImageWithCowtap(P("top.qcow2"), ro);
  }

  uint64_t seed_;
  tests::SeededRandom rng_;
  std::string dir_;
  std::vector<uint32_t> tags_;
  uint32_t next_generation_ = 1;
  uint32_t first_round_generation_ = UINT32_MAX;
  uint64_t base_hash_ = 0, mid_hash_ = 0;
  std::string base_stat_, mid_stat_;
  std::vector<uint32_t> mid_tags_;
  int64_t max_unlock_ms_ = 0;
};

void RunCampaign(int kills, uint64_t seed) {
  std::cout << "kill campaign: seed " << seed << " (COWTAP_KILL_SEED=" << seed << " reproduces), " << kills << " kills"
            << std::endl;
  KillCampaign c(seed);
  ASSERT_TRUE(c.Setup().ok());
  c.Reset();
  tests::SeededRandom timing(seed ^ 0x5bd1e995);
  CampaignReport report;
  const auto start = std::chrono::steady_clock::now();
  for (int k = 0; k < kills; ++k) {
    // One kill in ten lands while cowtapd starts (opens the chain, attaches).
    const bool at_startup = timing.OneIn(10);
    const auto delay = std::chrono::milliseconds(at_startup ? timing.Between(0, 60) : timing.Between(20, 400));
    const auto t0 = std::chrono::steady_clock::now();
    auto round = c.RunRound(delay, at_startup);
    report.kills_at_startup += at_startup;
    const auto t1 = std::chrono::steady_clock::now();
    ASSERT_TRUE(round.ok()) << "kill " << k << " (seed " << seed << "): " << round.status().ToString();
    Status v = c.Verify(&report, k % kHashEvery == kHashEvery - 1 || k == kills - 1);
    ASSERT_TRUE(v.ok()) << "after kill " << k << " at " << delay.count() << " ms (seed " << seed
                        << "): " << v.ToString() << "\n--- guest output ---\n"
                        << *round << "\n(keep the files with COWTAP_KEEP_TEST_DIRS=1: " << c.P("") << ")";
    ++report.kills;
    if (k % kRoundsPerTop == kRoundsPerTop - 1) {
      ASSERT_TRUE(c.NewTop().ok());
    }
    if (std::getenv("COWTAP_KILL_VERBOSE")) {
      const auto t2 = std::chrono::steady_clock::now();
      std::cout << fmt::format("kill {}: at {} ms, round {} ms, verify {} ms", k, delay.count(),
                               std::chrono::duration_cast<std::chrono::milliseconds>(t1 - t0).count(),
                               std::chrono::duration_cast<std::chrono::milliseconds>(t2 - t1).count())
                << std::endl;
    }
  }
  report.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  std::cout << report.Line(seed) << ", image unlocked at most " << c.max_unlock_ms() << " ms after the kill"
            << std::endl;
  EXPECT_GE(report.kills_during_io, kills / 2) << "most kills should land while the guest does I/O";
  EXPECT_GT(report.durable_written_sectors, 0u) << "no flushed write was ever checked";
}

uint64_t CampaignSeed() {
  return EnvU64("COWTAP_KILL_SEED",
                static_cast<uint64_t>(std::chrono::system_clock::now().time_since_epoch().count()) % 1000000007);
}

TEST(KillCampaignTest, SigkillAtRandomMomentsLosesNothingAcknowledged) {
  RunCampaign(static_cast<int>(EnvU64("COWTAP_KILLS", 60)), CampaignSeed());
}

TEST(KillCampaignHeavyTest, TwoHundredFiftyKills) {
  if (EnvU64("COWTAP_KILL_HEAVY", 0) == 0) GTEST_SKIP() << "set COWTAP_KILL_HEAVY=1 (ctest -L heavy sets it)";
  RunCampaign(static_cast<int>(EnvU64("COWTAP_HEAVY_KILLS", 250)), CampaignSeed());
}

// The checker fails a run whose image lost a flushed byte, and one whose
// backing file changed: it provably checks something.
TEST(KillCampaignTest, CheckerCatchesAFlippedByteInAFlushedSectorAndAChangedBase) {
  const uint64_t seed = EnvU64("COWTAP_KILL_SEED", 1);
  KillCampaign c(seed);
  ASSERT_TRUE(c.Setup().ok());
  c.Reset();
  CampaignReport report;
  auto round = c.RunRound(900ms);
  ASSERT_TRUE(round.ok()) << round.status().ToString();
  auto damaged = c.DamageAFlushedSector();
  ASSERT_TRUE(damaged.ok()) << damaged.status().ToString() << "\n" << *round;
  Status v = c.Verify(&report);
  EXPECT_FALSE(v.ok()) << "sector " << *damaged << " was damaged and the checker did not notice";
  EXPECT_NE(v.ToString().find(fmt::format("sector {}:", *damaged)), std::string::npos) << v.ToString();

  KillCampaign clean(seed);
  ASSERT_TRUE(clean.Setup().ok());
  clean.Reset();
  ASSERT_TRUE(clean.RunRound(100ms).ok());
  // The flipped byte lies under a range the middle layer overrides, so only
  // the hash can tell.
  clean.FlipBaseByte();
  Status b = clean.Verify(&report);
  EXPECT_NE(b.ToString().find("backing file changed"), std::string::npos) << b.ToString();
}

}  // namespace
}  // namespace cowtap::crash_test
