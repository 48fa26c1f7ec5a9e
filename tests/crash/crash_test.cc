// Crash consistency: a seeded workload of writes, write-zeroes, discards and
// periodic flushes runs on an image whose file is a FaultInjectingFile in
// power-loss mode. The k-th write to the image file fails (the power cut
// hits it); the controller then drops every change since the last flush of
// the file (or keeps a seeded random subset of 512-byte sectors: torn
// writes). The test reopens the real file underneath and checks:
//   - CheckImage finds no corruption (leaks are allowed, and repair_leaks
//     fixes them; lazy-refcount images are rebuilt on a read-write open
//     first), and `qemu-img check` agrees the image is clean;
//   - every byte obeys CrashModel (flushed data reads back, never-written
//     bytes read as the backing file or zeros);
//   - the backing file is untouched;
//   - the recovered image takes a further workload and stays clean.
// Images live in a temporary directory on real files (tmpfs when present).
#include <gtest/gtest.h>

#include <atomic>
#include <cstdlib>
#include <mutex>
#include <ostream>
#include <string>
#include <vector>

#include "base/log.h"
#include "cow/check.h"
#include "cow/fault_file.h"
#include "cow/image.h"
#include "tests/crash/crash_model.h"
#include "tests/interop/test_util.h"
#include "tests/interop/workload.h"

namespace cowtap::tests {
namespace {

constexpr uint64_t kMiB = 1024 * 1024;

struct CrashKind {
  std::string name;
  cow::CreateOptions create;
  bool backing = false;  // over a raw backing file a little smaller than the image
  bool discards = true;
  // "snapshot": QEMU makes the image with data and an internal snapshot, so
  // writes copy shared clusters; "compressed": QEMU makes it with qemu-img
  // convert -c, so writes replace compressed clusters. Empty: CreateImage.
  std::string start_from;
  bool data_file = false;  // external data file, power-cut together with the image
};

struct CrashCase {
  CrashKind kind;
  double survive_probability = 0.0;  // 0: drop every unsynced change
  int crash_points = 8;              // roughly; every k-th write with k = writes / crash_points
  int ops = 40;
  std::string name;
};

void PrintTo(const CrashCase& c, std::ostream* os) { *os << c.name; }

CrashKind Qcow2Kind(std::string name, int version, uint32_t cluster, uint64_t size, int refcount_bits = 16,
                    bool lazy = false, bool extended_l2 = false, bool backing = false) {
  CrashKind k;
  k.name = std::move(name);
  k.create.format = cow::ImageFormat::kQcow2;
  k.create.qcow2_version = version;
  k.create.cluster_size = cluster;
  k.create.size_bytes = size;
  k.create.refcount_bits = refcount_bits;
  k.create.lazy_refcounts = lazy;
  k.create.extended_l2 = extended_l2;
  k.backing = backing;
  return k;
}

std::vector<CrashKind> Kinds() {
  std::vector<CrashKind> kinds;
  kinds.push_back(Qcow2Kind("v3_cluster64k", 3, 65536, 8 * kMiB));
  kinds.push_back(Qcow2Kind("v2_cluster64k", 2, 65536, 8 * kMiB));
  kinds.push_back(Qcow2Kind("v3_lazy_refcounts", 3, 65536, 8 * kMiB, 16, true));
  kinds.push_back(Qcow2Kind("v3_extended_l2", 3, 65536, 8 * kMiB, 16, false, true, true));
  // 512-byte clusters: many L2 tables and refcount blocks get allocated, and
  // the refcount table has to grow.
  kinds.push_back(Qcow2Kind("v3_cluster512", 3, 512, 2 * kMiB));
  kinds.push_back(Qcow2Kind("v3_cluster512_refcount64", 3, 512, 2 * kMiB, 64));
  kinds.push_back(Qcow2Kind("v3_cluster4k_over_backing", 3, 4096, 4 * kMiB, 16, false, false, true));
  // Discard is refused on v2 over a backing file (as QEMU refuses it): no
  // discards in that workload.
  kinds.push_back(Qcow2Kind("v2_cluster4k_over_backing", 2, 4096, 4 * kMiB, 16, false, false, true));
  kinds.back().discards = false;
  kinds.push_back(Qcow2Kind("v3_with_snapshot", 3, 65536, 4 * kMiB));
  kinds.back().start_from = "snapshot";
  kinds.push_back(Qcow2Kind("v3_cluster4k_with_snapshot", 3, 4096, 2 * kMiB));
  kinds.back().start_from = "snapshot";
  kinds.push_back(Qcow2Kind("v3_compressed", 3, 65536, 4 * kMiB));
  kinds.back().start_from = "compressed";
  kinds.push_back(Qcow2Kind("v3_data_file", 3, 65536, 4 * kMiB));
  kinds.back().data_file = true;
  CrashKind v1;
  v1.name = "qcow1";
  v1.create.format = cow::ImageFormat::kQcow;
  v1.create.size_bytes = 4 * kMiB;
  kinds.push_back(v1);
  v1.name = "qcow1_over_backing";
  v1.backing = true;
  kinds.push_back(v1);
  return kinds;
}

std::vector<CrashCase> Cases(bool heavy) {
  std::vector<CrashCase> cases;
  for (const CrashKind& kind : Kinds()) {
    for (double survive : {0.0, 0.5}) {
      CrashCase c;
      c.kind = kind;
      c.survive_probability = survive;
      c.name = kind.name + (survive > 0 ? "_torn_subset" : "_drop_all");
      if (heavy) {
        c.crash_points = 1 << 30;  // every write
        c.ops = 120;
      }
      cases.push_back(c);
    }
  }
  return cases;
}

uint64_t SeedOf(const std::string& name) {
  uint64_t h = 0xcbf29ce484222325ull;
  for (char ch : name) h = (h ^ static_cast<uint8_t>(ch)) * 0x100000001b3ull;
  return h;
}

// Counts crash points across the binary and prints the final line.
struct Tally {
  std::mutex mu;
  uint64_t points = 0;
  std::vector<std::string> failures;
};
Tally& GlobalTally() {
  static Tally t;
  return t;
}

class TallyEnvironment : public ::testing::Environment {
 public:
  // Every crash point makes the dead image's Close() log an error; quiet
  // that unless COWTAP_TEST_LOG_LEVEL asks for more.
  void SetUp() override {
    const char* level = std::getenv("COWTAP_TEST_LOG_LEVEL");
    InitLogging(level ? level : "off");
  }
  void TearDown() override {
    Tally& t = GlobalTally();
    std::lock_guard lock(t.mu);
    if (t.failures.empty()) {
      std::printf("crash tests: %llu crash points, all consistent\n", static_cast<unsigned long long>(t.points));
    } else {
      std::printf("crash tests: %llu crash points, %zu inconsistent\n", static_cast<unsigned long long>(t.points),
                  t.failures.size());
      for (const std::string& f : t.failures) std::printf("  %s\n", f.c_str());
    }
    std::fflush(stdout);
  }
};
const bool kTally = (::testing::AddGlobalTestEnvironment(new TallyEnvironment), true);

class CrashHarness {
 public:
  CrashHarness(const CrashCase& c, const TempDir& dir) : c_(c), dir_(dir), image_(dir.File("image")) {}

  // Makes the backing file (if any) and the content the image starts with.
  ::testing::AssertionResult Prepare() {
    before_.assign(c_.kind.create.size_bytes, 0);
    if (c_.kind.backing) {
      backing_ = dir_.File("base.raw");
      std::vector<uint8_t> base(c_.kind.create.size_bytes - 4096 - 512);
      SeededRandom rng(SeedOf(c_.name) ^ 0x5eed);
      for (auto& b : base) b = static_cast<uint8_t>(rng.Next());
      Status s = WriteWholeFile(backing_, base);
      if (!s.ok()) return ::testing::AssertionFailure() << s.ToString();
      std::copy(base.begin(), base.end(), before_.begin());
      auto h = HashFile(backing_);
      if (!h.ok()) return ::testing::AssertionFailure() << h.status().ToString();
      backing_hash_ = *h;
    }
    if (!c_.kind.start_from.empty()) {
      ::testing::AssertionResult made = MakeTemplate();
      if (!made) return made;
    }
    WorkloadOptions wo;
    wo.size_bytes = c_.kind.create.size_bytes;
    wo.cluster_bytes = c_.kind.create.format == cow::ImageFormat::kQcow ? 4096 : c_.kind.create.cluster_size;
    wo.ops = c_.ops;
    wo.max_ops_between_flushes = 5;
    wo.discards = c_.kind.discards;
    ops_ = GenerateWorkload(SeedOf(c_.name), wo);
    return ::testing::AssertionSuccess();
  }

  // Runs the workload with the fail_write-th write to the image failing and
  // the power cut right after (fail_write 0: no fault; the run just counts
  // the writes into *writes). Returns problems found, empty if consistent.
  // With on_data_file the fault hits the external data file's writes instead
  // (and *writes counts those).
  std::string RunPoint(uint64_t fail_write, uint64_t* writes, bool on_data_file = false) {
    std::remove(image_.c_str());
    std::remove(data_.c_str());
    if (!template_.empty()) {
      Status s = WriteWholeFile(image_, template_);
      if (!s.ok()) return "copying the template image: " + s.ToString();
    } else {
      cow::CreateOptions create = c_.kind.create;
      if (c_.kind.backing) {
        create.backing_file = "base.raw";
        create.backing_format = cow::ImageFormat::kRaw;
      }
      if (c_.kind.data_file) create.data_file = data_;
      Status s = cow::CreateImage(image_, create);
      if (!s.ok()) return "CreateImage: " + s.ToString();
    }

    cow::FaultInjectingFileSystem fs(cow::DefaultFileSystem());
    std::shared_ptr<cow::FaultController> controller = fs.Target(image_);
    controller->SetPowerLossMode(true);
    if (c_.kind.data_file) fs.Target(data_)->SetPowerLossMode(true);
    std::shared_ptr<cow::FaultController> faulty = on_data_file ? fs.Target(data_) : controller;
    if (fail_write) faulty->AddFault(cow::Fault{cow::FaultOp::kWrite, cow::FaultTrigger::kNth, fail_write, EIO, 0});
    CrashModel model(before_);
    std::string where = "no crash";
    {
      cow::OpenOptions oo;
      oo.fs = &fs;
      auto image = cow::OpenImage(image_, oo);
      if (!image.ok()) {
        if (!faulty->counters().faults_fired) return "OpenImage: " + image.status().ToString();
        where = "during open";
      } else {
        for (size_t i = 0; i < ops_.size(); ++i) {
          model.Begin(ops_[i]);
          Status op = ApplyOp(**image, ops_[i]);
          if (op.ok()) {
            model.Done(ops_[i]);
            continue;
          }
          if (!faulty->counters().faults_fired)
            return "op #" + std::to_string(i) + " (" + DescribeOp(ops_[i]) + ") failed with no fault: " + op.ToString();
          where = "in op #" + std::to_string(i) + " (" + DescribeOp(ops_[i]) + ")";
          break;
        }
      }
      *writes = faulty->counters().writes;
      // The runs are deterministic, so a cut chosen from the dry run's count
      // must land; if it did not, this point would prove nothing.
      if (fail_write && !faulty->counters().faults_fired)
        return "the power cut at write " + std::to_string(fail_write) + " never happened (only " +
               std::to_string(*writes) + " writes): the workload is not deterministic";
      cow::CrashOptions co;
      co.survive_probability = c_.survive_probability;
      co.seed = fail_write * 7919 + 1;
      // The cut comes before the image is destroyed: its Close() then fails
      // on a dead file instead of making anything durable.
      Status crashed = fs.Crash(image_, co);
      if (!crashed.ok()) return "Crash: " + crashed.ToString();
      if (c_.kind.data_file) {
        crashed = fs.Crash(data_, co);
        if (!crashed.ok()) return "Crash of the data file: " + crashed.ToString();
      }
    }
    std::string problems = Verify(model);
    if (!problems.empty())
      return "crash at write " + std::to_string(fail_write) + (on_data_file ? " to the data file " : " ") + where +
             ": " + problems;
    return "";
  }

 private:
  bool IsQcow2() const { return c_.kind.create.format == cow::ImageFormat::kQcow2; }

  // Reopens the real file and checks it (see the file comment).
  std::string Verify(const CrashModel& model) {
    if (IsQcow2()) {
      if (c_.kind.create.lazy_refcounts) {
        // Refcounts of a dirty lazy image are rebuilt on a read-write open.
        auto image = cow::OpenImage(image_, cow::OpenOptions{});
        if (!image.ok()) return "read-write reopen (refcount rebuild): " + image.status().ToString();
        Status s = (*image)->Close();
        if (!s.ok()) return "Close after rebuild: " + s.ToString();
      }
      auto check = cow::CheckImage(image_);
      if (!check.ok()) return "CheckImage could not run: " + check.status().ToString();
      if (check->corruptions) return "CheckImage found corruptions: " + Join(check->messages);
      if (check->leaks) {
        cow::CheckOptions repair;
        repair.repair_leaks = true;
        auto repaired = cow::CheckImage(image_, repair);
        if (!repaired.ok()) return "CheckImage repair_leaks: " + repaired.status().ToString();
        if (repaired->ExitCode() != 0) return "leaks left after repair: " + Join(repaired->messages);
      }
      if (MissingQemuToolsReason().empty()) {
        CommandResult r = RunCommand({"qemu-img", "check", "-f", "qcow2", image_});
        if (r.exit_code != 0) return "qemu-img check exit " + std::to_string(r.exit_code) + ":\n" + r.output;
      }
    }
    cow::OpenOptions ro;
    ro.read_only = true;
    auto actual = ReadImageWithCowtap(image_, ro);
    if (!actual.ok()) return "reading the reopened image: " + actual.status().ToString();
    std::string bad = model.Verify(*actual, /*strict_unflushed=*/c_.survive_probability == 0.0);
    if (!bad.empty()) return bad;
    if (c_.kind.backing) {
      auto h = HashFile(backing_);
      if (!h.ok() || *h != backing_hash_) return "the backing file was modified";
    }
    if (!snapshot_.empty()) {
      cow::OpenOptions so;
      so.read_only = true;
      so.snapshot = "snap1";
      auto snap = ReadImageWithCowtap(image_, so);
      if (!snap.ok()) return "reading snapshot snap1: " + snap.status().ToString();
      std::string sdiff = DescribeDifference(snapshot_, *snap);
      if (!sdiff.empty()) return "snapshot snap1 changed: " + sdiff;
    }
    return AfterRecovery(*actual);
  }

  // The recovered image must keep working: more writes, then clean and exact.
  std::string AfterRecovery(std::vector<uint8_t> content) {
    WorkloadOptions wo;
    wo.size_bytes = content.size();
    wo.cluster_bytes = IsQcow2() ? c_.kind.create.cluster_size : 4096;
    wo.ops = 8;
    wo.discards = c_.kind.discards;
    std::vector<WorkloadOp> more = GenerateWorkload(SeedOf(c_.name) + 1, wo);
    {
      auto image = cow::OpenImage(image_, cow::OpenOptions{});
      if (!image.ok()) return "reopen after recovery: " + image.status().ToString();
      for (const WorkloadOp& op : more) {
        Status s = ApplyOp(**image, op);
        if (!s.ok()) return "write after recovery (" + DescribeOp(op) + "): " + s.ToString();
        ApplyOpToModel(op, &content);
      }
      Status s = (*image)->Close();
      if (!s.ok()) return "Close after recovery writes: " + s.ToString();
    }
    if (IsQcow2()) {
      auto check = cow::CheckImage(image_);
      if (!check.ok()) return "CheckImage after recovery writes: " + check.status().ToString();
      if (check->ExitCode() != 0) return "CheckImage after recovery writes: " + Join(check->messages);
    }
    cow::OpenOptions ro;
    ro.read_only = true;
    auto actual = ReadImageWithCowtap(image_, ro);
    if (!actual.ok()) return "reading after recovery writes: " + actual.status().ToString();
    std::string diff = DescribeDifference(content, *actual);
    return diff.empty() ? "" : "after recovery writes: " + diff;
  }

  static std::string Join(const std::vector<std::string>& lines) {
    std::string out;
    for (size_t i = 0; i < lines.size() && i < 8; ++i) out += "\n    " + lines[i];
    if (lines.size() > 8) out += "\n    ... " + std::to_string(lines.size() - 8) + " more";
    return out;
  }

  // Builds the starting image with QEMU, keeps its bytes, and records what
  // the guest (and the snapshot) see in it.
  ::testing::AssertionResult MakeTemplate() {
    std::string missing = MissingQemuToolsReason();
    if (!missing.empty()) return ::testing::AssertionFailure() << missing;
    const std::string size = std::to_string(c_.kind.create.size_bytes);
    const std::string opts = "cluster_size=" + std::to_string(c_.kind.create.cluster_size);
    const std::string t = dir_.File("template.qcow2");
    std::vector<std::vector<std::string>> steps;
    std::vector<std::string> fill = {"qemu-io", "-f", "qcow2", t};
    SeededRandom rng(SeedOf(c_.name) ^ 0xf111);
    for (int i = 0; i < 25; ++i) {
      uint64_t off = rng.Between(0, c_.kind.create.size_bytes - 1);
      uint64_t len = std::min<uint64_t>(rng.Between(1, 200000), c_.kind.create.size_bytes - off);
      fill.insert(fill.end(), {"-c", "write -q -P " + std::to_string(rng.Between(1, 255)) + " " + std::to_string(off) +
                                         " " + std::to_string(len)});
    }
    if (c_.kind.start_from == "compressed") {
      const std::string src = dir_.File("template.raw");
      std::vector<std::string> src_fill = fill;
      src_fill[2] = "raw";
      src_fill[3] = src;
      steps = {{"qemu-img", "create", "-q", "-f", "raw", src, size},
               src_fill,
               {"qemu-img", "convert", "-c", "-f", "raw", "-O", "qcow2", "-o", opts, src, t}};
    } else {
      // A write after the snapshot keeps the snapshot table from being the
      // last thing in the file (that case is an interop test of its own).
      steps = {
          {"qemu-img", "create", "-q", "-f", "qcow2", "-o", opts, t, size},
          fill,
          {"qemu-img", "snapshot", "-c", "snap1", t},
          {"qemu-io", "-f", "qcow2", t, "-c", "write -q -P 0x66 12345 70000"},
          {"qemu-img", "convert", "-l", "snapshot.name=snap1", "-f", "qcow2", "-O", "raw", t, dir_.File("snap1.raw")}};
    }
    steps.push_back({"qemu-img", "convert", "-f", "qcow2", "-O", "raw", t, dir_.File("template_view.raw")});
    for (const auto& argv : steps) {
      CommandResult r = RunCommand(argv);
      if (r.exit_code != 0)
        return ::testing::AssertionFailure() << CommandLine(argv) << " exited " << r.exit_code << ":\n" << r.output;
    }
    auto bytes = ReadWholeFile(t);
    auto view = ReadWholeFile(dir_.File("template_view.raw"));
    if (!bytes.ok() || !view.ok()) return ::testing::AssertionFailure() << "reading the template back";
    template_ = *bytes;
    before_ = *view;
    if (c_.kind.start_from == "snapshot") {
      auto snap = ReadWholeFile(dir_.File("snap1.raw"));
      if (!snap.ok()) return ::testing::AssertionFailure() << snap.status().ToString();
      snapshot_ = *snap;
    }
    return ::testing::AssertionSuccess();
  }

  const CrashCase& c_;
  const TempDir& dir_;
  const std::string image_;
  const std::string data_ = dir_.File("image.data");
  std::vector<uint8_t> template_;  // starting image bytes, when QEMU made it
  std::vector<uint8_t> snapshot_;  // what snapshot snap1 holds, if any
  std::string backing_;
  uint64_t backing_hash_ = 0;
  std::vector<uint8_t> before_;
  std::vector<WorkloadOp> ops_;
};

void RunSweep(const CrashCase& c) {
  TempDir dir("crash-" + c.name);
  CrashHarness harness(c, dir);
  ASSERT_TRUE(harness.Prepare());
  // Each run goes in a child process (RunIsolated): an engine crash fails
  // this case with the signal instead of killing the binary.
  auto isolated = [&](uint64_t fail_write, bool on_data_file, uint64_t* writes) -> std::string {
    std::string out = RunIsolated([&]() -> std::string {
      uint64_t n = 0;
      std::string problem = harness.RunPoint(fail_write, &n, on_data_file);
      return problem.empty() ? "writes=" + std::to_string(n) : problem;
    });
    if (out.rfind("writes=", 0) != 0) return out.empty() ? "no result from the child" : out;
    *writes = std::stoull(out.substr(7));
    return "";
  };
  uint64_t total_writes = 0;
  std::string dry = isolated(0, false, &total_writes);
  if (!dry.empty()) {
    Tally& t = GlobalTally();
    std::lock_guard lock(t.mu);
    t.failures.push_back(c.name + ": the workload fails with no crash at all: " + dry);
  }
  ASSERT_TRUE(dry.empty()) << "the workload fails with no crash at all: " << dry;
  ASSERT_GT(total_writes, 0u);
  uint64_t points = 0;
  std::vector<std::string> failures;
  auto sweep = [&](uint64_t writes, bool on_data_file) {
    const uint64_t step = std::max<uint64_t>(1, writes / static_cast<uint64_t>(c.crash_points));
    for (uint64_t w = step; w <= writes; w += step) {
      uint64_t ignored = 0;
      std::string problem = isolated(w, on_data_file, &ignored);
      ++points;
      if (!problem.empty()) failures.push_back(c.name + ": " + problem);
    }
  };
  sweep(total_writes, false);
  if (c.kind.data_file) {
    uint64_t data_writes = 0;
    std::string dry_data = isolated(0, true, &data_writes);
    ASSERT_TRUE(dry_data.empty()) << dry_data;
    sweep(data_writes, true);
    total_writes += data_writes;
  }
  {
    Tally& t = GlobalTally();
    std::lock_guard lock(t.mu);
    t.points += points;
    t.failures.insert(t.failures.end(), failures.begin(), failures.end());
  }
  std::printf("%s: %llu writes, %llu crash points, %zu inconsistent\n", c.name.c_str(),
              static_cast<unsigned long long>(total_writes), static_cast<unsigned long long>(points), failures.size());
  for (size_t i = 0; i < failures.size() && i < 5; ++i) ADD_FAILURE() << failures[i];
  EXPECT_TRUE(failures.empty()) << failures.size() << " of " << points << " crash points inconsistent";
}

class CrashConsistency : public ::testing::TestWithParam<CrashCase> {};

TEST_P(CrashConsistency, EveryCrashPointLeavesAConsistentImage) { RunSweep(GetParam()); }

INSTANTIATE_TEST_SUITE_P(Sweep, CrashConsistency, ::testing::ValuesIn(Cases(false)),
                         [](const ::testing::TestParamInfo<CrashCase>& p) { return p.param.name; });

// Every write of a longer workload is a crash point. Slow; opt in with
// COWTAP_CRASH_HEAVY=1 (COWTAP_CRASH_HEAVY=1 ctest -L heavy).
class CrashConsistencyHeavy : public ::testing::TestWithParam<CrashCase> {};

TEST_P(CrashConsistencyHeavy, EveryWriteIsACrashPoint) {
  if (!std::getenv("COWTAP_CRASH_HEAVY"))
    GTEST_SKIP() << "heavy sweep: export COWTAP_CRASH_HEAVY=1 to run it (label heavy)";
  RunSweep(GetParam());
}

INSTANTIATE_TEST_SUITE_P(Sweep, CrashConsistencyHeavy, ::testing::ValuesIn(Cases(true)),
                         [](const ::testing::TestParamInfo<CrashCase>& p) { return p.param.name; });

}  // namespace
}  // namespace cowtap::tests
