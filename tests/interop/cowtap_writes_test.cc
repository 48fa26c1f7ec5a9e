// Interop B: cowtap writes, QEMU checks. For each writable image kind, one
// seeded random workload (unaligned writes, overwrites, partial clusters over
// a backing file, write-zeroes with and without unmap, discards, flushes) goes
// through cowtap into one image and through qemu-io into a twin. Then
// `qemu-img check` must find cowtap's image clean, `qemu-img compare` must
// find the twins identical, the backing file and any internal snapshot must be
// unchanged, and cowtap's own CheckImage must agree with qemu-img check.
#include <gtest/gtest.h>

#include <cstdio>
#include <ostream>
#include <string>
#include <vector>

#include "cow/check.h"
#include "cow/image.h"
#include "tests/interop/test_util.h"
#include "tests/interop/workload.h"

namespace cowtap::tests {
namespace {

constexpr uint64_t kMiB = 1024 * 1024;

enum class Backing { kNone, kRaw, kQcow2, kChain2 };

struct WriteCase {
  std::string name;
  cow::CreateOptions create;  // format, size and qcow2 knobs of the image under test
  Backing backing = Backing::kNone;
  bool with_snapshot = false;  // QEMU creates the image and an internal snapshot first
  // QEMU creates the image some other way first (both twins start as byte
  // copies): "compressed" (qemu-img convert -c, so writes hit compressed
  // clusters), "dirty" (lazy refcounts, qemu-io aborted: refcounts must be
  // rebuilt on the read-write open), "bitmap" (a persistent dirty bitmap
  // that cowtap must invalidate), "snapshot_last" (no write after the
  // snapshot, so the snapshot table ends the file).
  std::string start_from;
  bool data_file = false;  // external data file (data_file_raw per create)
};

std::string FormatOf(const WriteCase& c) { return std::string(cow::FormatName(c.create.format)); }

// The qemu-img -o string equivalent to c.create.
std::string QemuCreateOptions(const cow::CreateOptions& o) {
  if (o.format != cow::ImageFormat::kQcow2) return "";
  std::string s = o.qcow2_version == 2 ? "compat=0.10" : "compat=1.1";
  s += ",cluster_size=" + std::to_string(o.cluster_size);
  if (o.qcow2_version == 3) s += ",refcount_bits=" + std::to_string(o.refcount_bits);
  if (o.lazy_refcounts) s += ",lazy_refcounts=on";
  if (o.extended_l2) s += ",extended_l2=on";
  if (o.compression_type != "zlib") s += ",compression_type=" + o.compression_type;
  return s;
}

WriteCase Qcow2Case(int version, uint32_t cluster, int refcount_bits, bool lazy, bool extended_l2, Backing backing,
                    bool with_snapshot = false) {
  WriteCase c;
  c.create.format = cow::ImageFormat::kQcow2;
  c.create.qcow2_version = version;
  c.create.cluster_size = cluster;
  c.create.refcount_bits = refcount_bits;
  c.create.lazy_refcounts = lazy;
  c.create.extended_l2 = extended_l2;
  c.create.size_bytes = cluster <= 512 ? 2 * kMiB : cluster >= 2 * kMiB ? 16 * kMiB : 8 * kMiB;
  c.backing = backing;
  c.with_snapshot = with_snapshot;
  c.name = "v" + std::to_string(version) + "_cluster" + std::to_string(cluster) + "_refcount" +
           std::to_string(refcount_bits);
  if (lazy) c.name += "_lazy";
  if (extended_l2) c.name += "_extl2";
  static const char* const kBackingNames[] = {"", "_over_raw", "_over_qcow2", "_over_chain2"};
  c.name += kBackingNames[static_cast<int>(backing)];
  if (with_snapshot) c.name += "_with_snapshot";
  return c;
}

std::vector<WriteCase> AllCases() {
  std::vector<WriteCase> cases;
  for (int version : {3, 2})
    for (uint32_t cluster : {512u, 4096u, 65536u, 2u * 1024 * 1024})
      for (Backing backing : {Backing::kNone, Backing::kRaw})
        cases.push_back(Qcow2Case(version, cluster, 16, false, false, backing));
  for (int bits : {1, 8, 64}) cases.push_back(Qcow2Case(3, 4096, bits, false, false, Backing::kNone));
  cases.push_back(Qcow2Case(3, 512, 1, false, false, Backing::kRaw));
  cases.push_back(Qcow2Case(3, 65536, 64, false, false, Backing::kQcow2));
  for (Backing backing : {Backing::kNone, Backing::kRaw}) {
    cases.push_back(Qcow2Case(3, 65536, 16, true, false, backing));
    cases.push_back(Qcow2Case(3, 4096, 1, true, false, backing));
  }
  for (uint32_t cluster : {32768u, 65536u, 2u * 1024 * 1024})
    for (Backing backing : {Backing::kNone, Backing::kRaw})
      cases.push_back(Qcow2Case(3, cluster, 16, false, true, backing));
  cases.push_back(Qcow2Case(3, 65536, 16, true, true, Backing::kQcow2));
  cases.push_back(Qcow2Case(3, 65536, 16, false, false, Backing::kChain2));
  cases.push_back(Qcow2Case(3, 65536, 16, false, false, Backing::kNone, true));
  cases.push_back(Qcow2Case(2, 65536, 16, false, false, Backing::kNone, true));
  cases.push_back(Qcow2Case(3, 4096, 16, false, false, Backing::kRaw, true));
  cases.push_back(Qcow2Case(3, 65536, 16, false, true, Backing::kNone, true));
  for (std::string type : {"zlib", "zstd"}) {
    WriteCase c = Qcow2Case(3, 65536, 16, false, false, Backing::kNone);
    c.create.compression_type = type;
    c.start_from = "compressed";
    c.name = "compressed_" + type + "_cluster65536";
    cases.push_back(c);
  }
  {
    WriteCase c = Qcow2Case(3, 4096, 16, false, false, Backing::kNone);
    c.start_from = "compressed";
    c.name = "compressed_zlib_cluster4096";
    cases.push_back(c);
  }
  for (Backing backing : {Backing::kNone, Backing::kRaw}) {
    WriteCase c = Qcow2Case(3, 65536, 16, true, false, backing);
    c.start_from = "dirty";
    c.name += "_dirty_from_qemu_abort";
    cases.push_back(c);
  }
  {
    // The snapshot table is the last thing in the file when cowtap opens it.
    WriteCase c = Qcow2Case(3, 65536, 16, false, false, Backing::kNone, true);
    c.start_from = "snapshot_last";
    c.name += "_table_last_in_file";
    cases.push_back(c);
  }
  {
    WriteCase c = Qcow2Case(3, 65536, 16, false, false, Backing::kNone);
    c.start_from = "bitmap";
    c.name += "_with_persistent_bitmap";
    cases.push_back(c);
  }
  for (bool raw : {false, true}) {
    WriteCase c = Qcow2Case(3, 65536, 16, false, false, Backing::kNone);
    c.data_file = true;
    c.create.data_file_raw = raw;
    c.name = raw ? "data_file_raw_on" : "data_file_raw_off";
    cases.push_back(c);
  }
  for (Backing backing : {Backing::kNone, Backing::kRaw}) {
    WriteCase c;
    c.create.format = cow::ImageFormat::kQcow;
    c.create.size_bytes = 8 * kMiB;
    c.backing = backing;
    c.name = backing == Backing::kNone ? "qcow1" : "qcow1_over_raw";
    cases.push_back(c);
  }
  return cases;
}

uint64_t SeedOf(const std::string& name) {
  uint64_t h = 0xcbf29ce484222325ull;
  for (char ch : name) h = (h ^ static_cast<uint8_t>(ch)) * 0x100000001b3ull;
  return h;
}

const bool kSummary = RegisterSummary("interop matrix");

void PrintTo(const WriteCase& c, std::ostream* os) { *os << c.name; }

class CowtapWritesQemuChecks : public ::testing::TestWithParam<WriteCase> {
 protected:
  // Runs argv and fails the test (returning false) unless it exits with one of ok.
  bool Run(const std::vector<std::string>& argv, std::vector<int> ok = {0}, CommandResult* out = nullptr) {
    CommandResult r = RunCommand(argv);
    if (out) *out = r;
    for (int code : ok)
      if (r.exit_code == code) return true;
    ADD_FAILURE() << "`" << CommandLine(argv) << "` exited " << r.exit_code << ":\n" << r.output;
    return false;
  }

  bool Fill(const std::string& path, const std::string& format, uint64_t seed, uint64_t size) {
    SeededRandom rng(seed);
    std::vector<std::string> argv = {"qemu-io", "-f", format, path};
    for (int i = 0; i < 30; ++i) {
      uint64_t off = rng.Between(0, size - 1);
      uint64_t len = std::min(rng.Between(1, 300000), size - off);
      argv.insert(argv.end(), {"-c", "write -q -P " + std::to_string(rng.Between(1, 255)) + " " + std::to_string(off) +
                                         " " + std::to_string(len)});
    }
    return Run(argv);
  }

  // Creates the backing chain the case asks for; returns the name of the
  // file to use as backing ("" for none) and its format.
  bool MakeBacking(const TempDir& dir, const WriteCase& c, std::string* name, std::string* format,
                   std::vector<std::string>* files) {
    const uint64_t size = c.create.size_bytes;
    switch (c.backing) {
      case Backing::kNone:
        return true;
      case Backing::kRaw:
        *name = "base.raw";
        *format = "raw";
        files->push_back(dir.File("base.raw"));
        // A little smaller than the overlay: the tail reads as zeros.
        return Run({"qemu-img", "create", "-q", "-f", "raw", dir.File("base.raw"),
                    std::to_string(size - 4096 - 512)}) &&
               Fill(dir.File("base.raw"), "raw", 7, size - 4096 - 512);
      case Backing::kQcow2:
        *name = "base.qcow2";
        *format = "qcow2";
        files->push_back(dir.File("base.qcow2"));
        // Larger than the overlay, and with another cluster size.
        return Run({"qemu-img", "create", "-q", "-f", "qcow2", "-o", "cluster_size=4096", dir.File("base.qcow2"),
                    std::to_string(size + kMiB)}) &&
               Fill(dir.File("base.qcow2"), "qcow2", 8, size + kMiB);
      case Backing::kChain2:
        *name = "mid.qcow2";
        *format = "qcow2";
        files->push_back(dir.File("base.raw"));
        files->push_back(dir.File("mid.qcow2"));
        return Run({"qemu-img", "create", "-q", "-f", "raw", dir.File("base.raw"), std::to_string(size)}) &&
               Fill(dir.File("base.raw"), "raw", 9, size) &&
               Run({"qemu-img", "create", "-q", "-f", "qcow2", "-o", "compat=0.10,cluster_size=32768", "-b", "base.raw",
                    "-F", "raw", dir.File("mid.qcow2")}) &&
               Fill(dir.File("mid.qcow2"), "qcow2", 10, size);
    }
    return false;
  }
};

TEST_P(CowtapWritesQemuChecks, QemuFindsImageCleanAndIdenticalToTwin) {
  std::string missing = MissingQemuToolsReason();
  if (!missing.empty()) GTEST_SKIP() << missing;
  const WriteCase& c = GetParam();
  const std::string fmt = FormatOf(c);
  TempDir dir("interop-write-" + c.name);
  const std::string img = dir.File("cowtap." + fmt);
  const std::string twin = dir.File("twin." + fmt);

  std::string backing, backing_format;
  std::vector<std::string> backing_files;
  ASSERT_TRUE(MakeBacking(dir, c, &backing, &backing_format, &backing_files));
  std::vector<uint64_t> backing_hashes;
  for (const std::string& f : backing_files) {
    auto h = HashFile(f);
    ASSERT_TRUE(h.ok()) << h.status().ToString();
    backing_hashes.push_back(*h);
  }

  std::vector<std::string> qemu_create = {"qemu-img", "create", "-q", "-f", fmt};
  std::string qopts = QemuCreateOptions(c.create);
  if (!qopts.empty()) qemu_create.insert(qemu_create.end(), {"-o", qopts});
  if (!backing.empty()) qemu_create.insert(qemu_create.end(), {"-b", backing, "-F", backing_format});

  std::string snapshot_before;
  if (c.with_snapshot || !c.start_from.empty()) {
    // QEMU makes the image; both twins start as byte copies of it.
    if (c.start_from == "compressed") {
      ASSERT_TRUE(
          Run({"qemu-img", "create", "-q", "-f", "raw", dir.File("src.raw"), std::to_string(c.create.size_bytes)}));
      ASSERT_TRUE(Fill(dir.File("src.raw"), "raw", 22, c.create.size_bytes));
      ASSERT_TRUE(
          Run({"qemu-img", "convert", "-c", "-f", "raw", "-O", "qcow2", "-o", qopts, dir.File("src.raw"), img}));
    } else {
      std::vector<std::string> argv = qemu_create;
      argv.insert(argv.end(), {img, std::to_string(c.create.size_bytes)});
      ASSERT_TRUE(Run(argv));
      ASSERT_TRUE(Fill(img, fmt, 20, c.create.size_bytes));
    }
    if (c.start_from == "bitmap") {
      ASSERT_TRUE(Run({"qemu-img", "bitmap", "--add", img, "b0"}));
    }
    if (c.start_from == "dirty") {
      ASSERT_TRUE(Run({"qemu-io", "-f", fmt, img, "-c", "write -q -P 0x77 100000 300000", "-c", "flush", "-c", "abort"},
                      {134}));
    }
    if (c.with_snapshot) {
      ASSERT_TRUE(Run({"qemu-img", "snapshot", "-c", "snap1", img}));
      if (c.start_from != "snapshot_last") {
        ASSERT_TRUE(Fill(img, fmt, 21, c.create.size_bytes));
      }
      ASSERT_TRUE(Run({"qemu-img", "convert", "-l", "snapshot.name=snap1", "-f", fmt, "-O", "raw", img,
                       dir.File("snap_before.raw")}));
    }
    auto bytes = ReadWholeFile(img);
    ASSERT_TRUE(bytes.ok()) << bytes.status().ToString();
    ASSERT_TRUE(WriteWholeFile(twin, *bytes).ok());
  } else {
    cow::CreateOptions create = c.create;
    create.backing_file = backing;
    if (!backing_format.empty()) create.backing_format = cow::ParseFormatName(backing_format);
    std::vector<std::string> argv = qemu_create;
    if (c.data_file) {
      // Absolute names: QEMU resolves a relative data file name against its
      // working directory.
      create.data_file = dir.File("cowtap.data");
      argv.insert(argv.end(),
                  {"-o", "data_file=" + dir.File("twin.data") + (c.create.data_file_raw ? ",data_file_raw=on" : "")});
    }
    Status s = cow::CreateImage(img, create);
    ASSERT_TRUE(s.ok()) << "cowtap CreateImage " << img << ": " << s.ToString();
    argv.insert(argv.end(), {twin, std::to_string(c.create.size_bytes)});
    ASSERT_TRUE(Run(argv));
  }

  // The workload, through cowtap (in a child process: an engine crash fails
  // this case only). The child sends back the ops so that both twins get
  // the same sequence even though it depends on the opened image's geometry.
  std::vector<WorkloadOp> ops;
  {
    WorkloadOptions wo;
    // QEMU turns discard into a no-op on qcow v1 and on qcow2 v2 over a
    // backing file (it cannot express "reads as zero" there), while cowtap
    // refuses it or zeroes: not comparable.
    wo.discards =
        !(c.create.format == cow::ImageFormat::kQcow || (c.create.qcow2_version == 2 && c.backing != Backing::kNone));
    wo.ops = 40;
    wo.size_bytes = c.create.size_bytes;
    // Geometry as the image has it (qcow v1 picks its own cluster size).
    std::string geometry = RunIsolated([&]() -> std::string {
      cow::OpenOptions ro;
      ro.read_only = true;
      auto probe = cow::OpenImage(img, ro);
      if (!probe.ok()) return "ERROR cowtap OpenImage " + img + ": " + probe.status().ToString();
      return std::to_string((*probe)->size_bytes()) + " " + std::to_string((*probe)->info().cluster_size);
    });
    if (geometry.rfind("ERROR", 0) == 0 ||
        std::sscanf(geometry.c_str(), "%lu %lu", &wo.size_bytes, &wo.cluster_bytes) != 2) {
      // Carry on with the created geometry: the read-write open below may
      // fail differently (or crash), which is worth reporting too.
      ADD_FAILURE() << "read-only probe: " << geometry;
      wo.size_bytes = c.create.size_bytes;
      wo.cluster_bytes = c.create.format == cow::ImageFormat::kQcow2 ? c.create.cluster_size : 4096;
    }
    ops = GenerateWorkload(SeedOf(c.name), wo);
  }
  std::string written = RunIsolated([&]() -> std::string {
    auto image = cow::OpenImage(img, cow::OpenOptions{});
    if (!image.ok()) return "cowtap OpenImage " + img + ": " + image.status().ToString();
    for (size_t i = 0; i < ops.size(); ++i) {
      Status s = ApplyOp(**image, ops[i]);
      if (!s.ok())
        return "cowtap op #" + std::to_string(i) + " (" + DescribeOp(ops[i]) + ") on " + img + ": " + s.ToString();
    }
    Status closed = (*image)->Close();
    return closed.ok() ? "" : "cowtap Close " + img + ": " + closed.ToString();
  });
  ASSERT_TRUE(written.empty()) << written;

  // The same workload, through qemu-io on the twin.
  auto io_args = QemuIoArgs(ops, dir.path());
  ASSERT_TRUE(io_args.ok()) << io_args.status().ToString();
  std::vector<std::string> io = {"qemu-io", "-f", fmt, twin};
  io.insert(io.end(), io_args->begin(), io_args->end());
  ASSERT_TRUE(Run(io));

  // Backing files untouched.
  for (size_t i = 0; i < backing_files.size(); ++i) {
    auto h = HashFile(backing_files[i]);
    ASSERT_TRUE(h.ok()) << h.status().ToString();
    EXPECT_EQ(*h, backing_hashes[i]) << backing_files[i] << " was modified by writes to the overlay";
  }

  // qemu-img check: clean (qcow v1 has no check: 63).
  const int expected_check = c.create.format == cow::ImageFormat::kQcow ? 63 : 0;
  CommandResult check;
  if (c.start_from == "bitmap") {
    // cowtap does not maintain bitmaps, so it must clear autoclear bit 0 on
    // its first write; QEMU then ignores the bitmap extension and sees the
    // bitmap's clusters as leaked (exit 3), never as errors.
    auto header = ReadWholeFile(img);
    ASSERT_TRUE(header.ok() && header->size() >= 96);
    EXPECT_EQ((*header)[95] & 1, 0) << "autoclear bit 0 (bitmaps) still set after cowtap wrote to " << img;
    Run({"qemu-img", "check", "-f", fmt, img}, {0, 3}, &check);
  } else {
    Run({"qemu-img", "check", "-f", fmt, img}, {expected_check}, &check);
  }

  // Same guest contents as the twin, seen by QEMU...
  Run({"qemu-img", "compare", "-f", fmt, "-F", fmt, twin, img});
  // ...and by cowtap.
  ASSERT_TRUE(Run({"qemu-img", "convert", "-f", fmt, "-O", "raw", twin, dir.File("twin.raw")}));
  auto expected = ReadWholeFile(dir.File("twin.raw"));
  ASSERT_TRUE(expected.ok()) << expected.status().ToString();
  cow::OpenOptions ro;
  ro.read_only = true;
  auto actual = ReadImageWithCowtapIsolated(img, ro, dir.File("cowtap.raw"));
  ASSERT_TRUE(actual.ok()) << actual.status().ToString();
  std::string diff = DescribeDifference(*expected, *actual);
  EXPECT_TRUE(diff.empty()) << "cowtap reading its own image differs from the qemu-io twin: " << diff;

  // With data_file_raw the data file alone is a valid raw image of the disk.
  if (c.data_file && c.create.data_file_raw) {
    auto raw = ReadWholeFile(dir.File("cowtap.data"));
    ASSERT_TRUE(raw.ok()) << raw.status().ToString();
    raw->resize(expected->size(), 0);
    std::string rdiff = DescribeDifference(*expected, *raw);
    EXPECT_TRUE(rdiff.empty()) << "with data_file_raw=on the data file differs from the guest view: " << rdiff;
  }

  // The snapshot still holds what it held.
  if (c.with_snapshot) {
    if (Run({"qemu-img", "convert", "-l", "snapshot.name=snap1", "-f", fmt, "-O", "raw", img,
             dir.File("snap_after.raw")})) {
      auto before = ReadWholeFile(dir.File("snap_before.raw"));
      auto after = ReadWholeFile(dir.File("snap_after.raw"));
      ASSERT_TRUE(before.ok() && after.ok());
      std::string sdiff = DescribeDifference(*before, *after);
      EXPECT_TRUE(sdiff.empty()) << "snapshot snap1 changed under cowtap's writes: " << sdiff;
    }
  }

  // cowtap's own check agrees with qemu-img check.
  std::string ours = RunIsolated([&]() -> std::string {
    auto r = cow::CheckImage(img);
    if (!r.ok()) return "ERROR " + r.status().ToString();
    std::string lines;
    for (const std::string& m : r->messages) lines += "\n  " + m;
    return std::to_string(r->ExitCode()) + " " + std::to_string(r->corruptions) + " " + std::to_string(r->leaks) +
           lines;
  });
  ASSERT_NE(ours.rfind("ERROR", 0), 0u) << "CheckImage " << img << ": " << ours;
  int our_exit = -1;
  unsigned long corruptions = 0, leaks = 0;
  ASSERT_EQ(std::sscanf(ours.c_str(), "%d %lu %lu", &our_exit, &corruptions, &leaks), 3) << ours;
  EXPECT_EQ(our_exit, check.exit_code) << "CheckImage and qemu-img check disagree on " << img
                                       << "\nqemu-img check said:\n"
                                       << check.output << "\nCheckImage said: " << ours;
  EXPECT_EQ(corruptions, 0u) << ours;
  if (c.start_from != "bitmap") {
    EXPECT_EQ(leaks, 0u) << ours;
  }
}

INSTANTIATE_TEST_SUITE_P(Matrix, CowtapWritesQemuChecks, ::testing::ValuesIn(AllCases()),
                         [](const ::testing::TestParamInfo<WriteCase>& p) { return p.param.name; });

}  // namespace
}  // namespace cowtap::tests
