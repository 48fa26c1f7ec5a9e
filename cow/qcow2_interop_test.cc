// Conformance against QEMU 7.2 (qemu-img / qemu-io as the oracle), in a temp
// directory on the real file system:
// - images QEMU writes (compressed zlib/zstd, extended L2, refcount widths,
//   cluster sizes 512 B and 2 MiB, v2, zero clusters, internal snapshots,
//   external data file) read back byte-identical to `qemu-img convert -O raw`;
// - images cowtap writes pass `qemu-img check` and `qemu-img compare` equal
//   to a twin QEMU wrote with the same operations, and `qemu-img info`
//   agrees with what cowtap created.
// Skips (with the reason) when qemu-img / qemu-io are not installed.
#include <gtest/gtest.h>
#include <unistd.h>

#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <random>

#include "cow/check.h"
#include "cow/image.h"

namespace cowtap::cow {
namespace {

namespace fsys = std::filesystem;

int Shell(const std::string& cmd, std::string* out = nullptr) {
  std::string full = cmd + " 2>&1";
  FILE* p = popen(full.c_str(), "r");
  if (!p) return -1;
  std::string text;
  char buf[4096];
  size_t n;
  while ((n = fread(buf, 1, sizeof(buf), p)) > 0) text.append(buf, n);
  int rc = pclose(p);
  if (out) *out = text;
  return WIFEXITED(rc) ? WEXITSTATUS(rc) : -1;
}

std::vector<uint8_t> ReadFileBytes(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  return std::vector<uint8_t>(std::istreambuf_iterator<char>(f), {});
}

class Qcow2InteropTest : public ::testing::Test {
 protected:
  void SetUp() override {
    if (Shell("qemu-img --version") != 0 || Shell("qemu-io --version") != 0)
      GTEST_SKIP() << "qemu-img/qemu-io not installed (apt-get install qemu-utils)";
    char tmpl[] = "/tmp/cowtap-qcow2-interop-XXXXXX";
    ASSERT_NE(mkdtemp(tmpl), nullptr);
    dir_ = tmpl;
  }
  void TearDown() override {
    if (!dir_.empty()) fsys::remove_all(dir_);
  }
  std::string P(const std::string& name) const { return dir_ + "/" + name; }

  // A 4 MiB raw source mixing random, zero and compressible regions.
  std::string MakeSource(uint64_t size = 4 << 20) {
    std::mt19937_64 rng(size);
    std::vector<uint8_t> b(size, 0);
    for (uint64_t off = 0; off < size; off += 65536) {
      int kind = (off / 65536) % 4;
      for (uint64_t i = 0; i < 65536 && off + i < size; ++i) {
        if (kind == 0) b[off + i] = static_cast<uint8_t>(rng());
        if (kind == 1) b[off + i] = static_cast<uint8_t>("cowtap compressible text "[i % 25]);
        if (kind == 3 && i < 3000) b[off + i] = static_cast<uint8_t>(rng());
      }
    }
    std::string path = P("src.raw");
    std::ofstream(path, std::ios::binary).write(reinterpret_cast<const char*>(b.data()), b.size());
    return path;
  }

  // Reads a whole image through cowtap.
  std::vector<uint8_t> CowtapRead(const std::string& path, const std::string& snapshot = "") {
    OpenOptions oo;
    oo.read_only = true;
    oo.snapshot = snapshot;
    auto img = OpenImage(path, oo);
    EXPECT_TRUE(img.ok()) << img.status().ToString();
    if (!img.ok()) return {};
    std::vector<uint8_t> b((*img)->size_bytes());
    iovec v = MakeIoVec(b.data(), b.size());
    Status s = (*img)->Read(0, {&v, 1});
    EXPECT_TRUE(s.ok()) << s.ToString();
    return b;
  }

  // What QEMU says the image contains.
  std::vector<uint8_t> QemuRead(const std::string& path, const std::string& snapshot = "") {
    std::string out = P("oracle.raw");
    std::string snap = snapshot.empty() ? "" : " -l snapshot.name=" + snapshot;
    std::string msg;
    EXPECT_EQ(Shell("qemu-img convert -O raw" + snap + " '" + path + "' '" + out + "'", &msg), 0) << msg;
    return ReadFileBytes(out);
  }

  void ExpectQemuCheckClean(const std::string& path) {
    std::string msg;
    EXPECT_EQ(Shell("qemu-img check '" + path + "'", &msg), 0) << msg;
  }

  // Map() against `qemu-img map --output=json`, per 4 KiB block: data and
  // zero flags, the depth of data, and the host offset of this layer's data.
  void ExpectMapMatchesQemu(const std::string& path) {
    std::string msg;
    ASSERT_EQ(Shell("qemu-img map --output=json '" + path + "'", &msg), 0) << msg;
    auto j = nlohmann::json::parse(msg, nullptr, false);
    ASSERT_TRUE(j.is_array()) << msg;
    OpenOptions oo;
    oo.read_only = true;
    auto img = OpenImage(path, oo);
    ASSERT_TRUE(img.ok());
    auto ours = (*img)->Map(0, (*img)->size_bytes());
    ASSERT_TRUE(ours.ok()) << ours.status().ToString();
    struct Block {
      bool data = false, zero = false;
      int depth = 0;
      int64_t offset = -1;
    };
    const uint64_t n = (*img)->size_bytes() / 4096;
    std::vector<Block> want(n), got(n);
    for (const auto& e : j) {
      for (uint64_t b = e["start"].get<uint64_t>() / 4096;
           b < (e["start"].get<uint64_t>() + e["length"].get<uint64_t>()) / 4096 && b < n; ++b) {
        want[b].data = e["data"];
        want[b].zero = e["zero"];
        want[b].depth = want[b].data ? e["depth"].get<int>() : 0;
        if (want[b].data && want[b].depth == 0 && e.contains("offset"))
          want[b].offset = e["offset"].get<int64_t>() + static_cast<int64_t>(b * 4096 - e["start"].get<uint64_t>());
      }
    }
    for (const auto& e : *ours) {
      for (uint64_t b = e.offset / 4096; b < (e.offset + e.length) / 4096 && b < n; ++b) {
        got[b].data = e.data;
        got[b].zero = e.zero;
        got[b].depth = e.data ? e.depth : 0;
        if (e.data && e.depth == 0 && e.host_offset)
          got[b].offset = static_cast<int64_t>(*e.host_offset + b * 4096 - e.offset);
      }
    }
    for (uint64_t b = 0; b < n; ++b) {
      EXPECT_EQ(want[b].data, got[b].data) << "block " << b;
      EXPECT_EQ(want[b].zero, got[b].zero) << "block " << b;
      EXPECT_EQ(want[b].depth, got[b].depth) << "block " << b;
      EXPECT_EQ(want[b].offset, got[b].offset) << "block " << b;
      if (HasFailure()) return;
    }
  }

  std::string dir_;
};

TEST_F(Qcow2InteropTest, QemuConvertedImagesReadBackIdentical) {
  const std::string src = MakeSource();
  const std::vector<uint8_t> want = ReadFileBytes(src);
  const std::vector<std::string> variants = {
      "-c -o compression_type=zlib",
      "-c -o compression_type=zstd",
      "-o extended_l2=on,cluster_size=64k",
      "-o refcount_bits=1",
      "-o refcount_bits=64",
      "-o cluster_size=512",
      "-o cluster_size=2M",
      "-o compat=0.10",
      "-c -o compat=0.10,cluster_size=4k",
      "-c -o extended_l2=on,cluster_size=32k,compression_type=zstd",
  };
  for (const auto& v : variants) {
    SCOPED_TRACE(v);
    std::string img = P("conv.qcow2"), msg;
    fsys::remove(img);
    ASSERT_EQ(Shell("qemu-img convert -O qcow2 " + v + " '" + src + "' '" + img + "'", &msg), 0) << msg;
    EXPECT_TRUE(CowtapRead(img) == want);
    if (v.find("data_file") == std::string::npos) ExpectMapMatchesQemu(img);
    CheckOptions ck;
    auto r = CheckImage(img, ck);
    ASSERT_TRUE(r.ok()) << r.status().ToString();
    EXPECT_EQ(r->ExitCode(), 0) << (r->messages.empty() ? "" : r->messages[0]);
    // The statistics agree with qemu-img check's.
    ASSERT_EQ(Shell("qemu-img check --output=json '" + img + "'", &msg), 0) << msg;
    auto j = nlohmann::json::parse(msg, nullptr, false);
    ASSERT_FALSE(j.is_discarded()) << msg;
    EXPECT_EQ(j.value("allocated-clusters", uint64_t{0}), r->allocated_clusters);
    EXPECT_EQ(j.value("total-clusters", uint64_t{0}), r->total_clusters);
    EXPECT_EQ(j.value("fragmented-clusters", uint64_t{0}), r->fragmented_clusters);
    EXPECT_EQ(j.value("image-end-offset", uint64_t{0}), r->image_end_offset);
  }
}

TEST_F(Qcow2InteropTest, ZeroClustersSnapshotsAndBackingFromQemu) {
  const std::string src = MakeSource(2 << 20);
  std::string base = P("base.qcow2"), top = P("top.qcow2"), msg;
  ASSERT_EQ(Shell("qemu-img convert -O qcow2 '" + src + "' '" + base + "'", &msg), 0) << msg;
  ASSERT_EQ(Shell("qemu-img create -f qcow2 -b base.qcow2 -F qcow2 '" + top + "' 3M", &msg), 0) << msg;
  ASSERT_EQ(Shell("qemu-io -c 'write -P 0xaa 0 100k' -c 'write -z 64k 128k' -c 'write -z -u 512k 192k' "
                  "-c 'write -P 0x11 2500k 300k' '" +
                      top + "'",
                  &msg),
            0)
      << msg;
  ASSERT_EQ(Shell("qemu-img snapshot -c snap1 '" + top + "'", &msg), 0) << msg;
  ASSERT_EQ(Shell("qemu-io -c 'write -P 0x55 0 256k' -c 'discard 1M 64k' '" + top + "'", &msg), 0) << msg;
  EXPECT_TRUE(CowtapRead(top) == QemuRead(top));
  ExpectMapMatchesQemu(top);
  auto snap_want = QemuRead(top, "snap1");
  EXPECT_TRUE(CowtapRead(top, "snap1") == snap_want);

  // cowtap writes to the active layer; the snapshot stays intact and QEMU
  // finds the image consistent.
  {
    OpenOptions oo;
    auto img = OpenImage(top, oo);
    ASSERT_TRUE(img.ok()) << img.status().ToString();
    std::vector<uint8_t> b(300 << 10, 0x77);
    iovec v = MakeIoVec(b.data(), b.size());
    ASSERT_TRUE((*img)->Write(30 << 10, {&v, 1}).ok());
    ASSERT_TRUE((*img)->Write(2000 << 10, {&v, 1}).ok());
    ASSERT_TRUE((*img)->Discard(0, 64 << 10).ok());
    ASSERT_TRUE((*img)->Close().ok());
  }
  ExpectQemuCheckClean(top);
  EXPECT_TRUE(QemuRead(top, "snap1") == snap_want);
  EXPECT_TRUE(CowtapRead(top) == QemuRead(top));
}

TEST_F(Qcow2InteropTest, ExternalDataFileFromQemu) {
  const std::string src = MakeSource(1 << 20);
  std::string img = P("df.qcow2"), data = P("df.data"), msg;
  ASSERT_EQ(Shell("qemu-img convert -O qcow2 -o data_file='" + data + "' '" + src + "' '" + img + "'", &msg), 0) << msg;
  EXPECT_TRUE(CowtapRead(img) == ReadFileBytes(src));
}

struct Twin {
  std::string create_opts;  // qemu-img -o
  CreateOptions co;
};

// The same operations through cowtap and through qemu-io give images that
// `qemu-img compare` finds equal, and cowtap's passes `qemu-img check`.
TEST_F(Qcow2InteropTest, CowtapWrittenImagesPassCheckAndMatchQemuTwin) {
  std::string msg;
  const std::string base = P("base.raw");
  {
    std::vector<uint8_t> b(3 << 20);
    std::mt19937_64 rng(5);
    for (auto& x : b) x = static_cast<uint8_t>(rng());
    std::ofstream(base, std::ios::binary).write(reinterpret_cast<const char*>(b.data()), b.size());
  }
  struct Op {
    char kind;  // w = write pattern, z = write zeroes, u = zero+unmap, d = discard
    uint64_t off, len;
    uint8_t pattern;
  };
  const std::vector<Op> ops = {{'w', 0, 4096, 0x11},         {'w', 70000, 200000, 0x22}, {'z', 300000, 131072, 0},
                               {'w', 1 << 20, 65536, 0x33},  {'u', 1 << 20, 65536, 0},   {'d', 2 << 20, 131072, 0},
                               {'w', 3000000, 500000, 0x44}, {'z', 3500000, 1000, 0},    {'w', 512, 1024, 0x55}};
  std::vector<std::pair<std::string, CreateOptions>> kinds;
  auto add = [&](std::string opts, auto tweak) {
    CreateOptions co;
    co.size_bytes = 4 << 20;
    co.backing_file = "base.raw";
    co.backing_format = ImageFormat::kRaw;
    tweak(co);
    kinds.push_back({std::move(opts), co});
  };
  add("", [](CreateOptions&) {});
  add("cluster_size=4096,refcount_bits=1", [](CreateOptions& c) {
    c.cluster_size = 4096;
    c.refcount_bits = 1;
  });
  add("cluster_size=512,refcount_bits=64", [](CreateOptions& c) {
    c.cluster_size = 512;
    c.refcount_bits = 64;
  });
  add("extended_l2=on,cluster_size=32k", [](CreateOptions& c) {
    c.extended_l2 = true;
    c.cluster_size = 32768;
  });
  add("lazy_refcounts=on", [](CreateOptions& c) { c.lazy_refcounts = true; });
  add("compat=0.10", [](CreateOptions& c) { c.qcow2_version = 2; });
  add("compression_type=zstd,cluster_size=2M", [](CreateOptions& c) {
    c.compression_type = "zstd";
    c.cluster_size = 2 << 20;
  });
  for (auto& [opts, co] : kinds) {
    SCOPED_TRACE(opts);
    const bool v2 = co.qcow2_version == 2;
    std::string ours = P("ours.qcow2"), twin = P("twin.qcow2");
    fsys::remove(ours);
    fsys::remove(twin);
    ASSERT_TRUE(CreateImage(ours, co).ok());
    ASSERT_EQ(Shell("qemu-img create -q -f qcow2 -b base.raw -F raw" + (opts.empty() ? "" : " -o " + opts) + " '" +
                        twin + "' 4M",
                    &msg),
              0)
        << msg;
    std::string io_cmds;
    {
      OpenOptions oo;
      auto img = OpenImage(ours, oo);
      ASSERT_TRUE(img.ok()) << img.status().ToString();
      for (const Op& op : ops) {
        if (op.kind == 'd' && v2) continue;
        std::string range = std::to_string(op.off) + " " + std::to_string(op.len);
        if (op.kind == 'w') {
          std::vector<uint8_t> b(op.len, op.pattern);
          iovec v = MakeIoVec(b.data(), b.size());
          ASSERT_TRUE((*img)->Write(op.off, {&v, 1}).ok());
          io_cmds += " -c 'write -P " + std::to_string(op.pattern) + " " + range + "'";
        } else if (op.kind == 'z' || op.kind == 'u') {
          ASSERT_TRUE((*img)->WriteZeroes(op.off, op.len, op.kind == 'u').ok());
          io_cmds += std::string(" -c 'write -z") + (op.kind == 'u' ? " -u " : " ") + range + "'";
        } else {
          ASSERT_TRUE((*img)->Discard(op.off, op.len).ok());
          io_cmds += " -c 'discard " + range + "'";
        }
      }
      ASSERT_TRUE((*img)->Close().ok());
    }
    ASSERT_EQ(Shell("qemu-io" + io_cmds + " '" + twin + "'", &msg), 0) << msg;
    ExpectQemuCheckClean(ours);
    EXPECT_EQ(Shell("qemu-img compare '" + ours + "' '" + twin + "'", &msg), 0) << msg;
    EXPECT_TRUE(CowtapRead(ours) == QemuRead(ours));
    // qemu-img info agrees with what we created.
    ASSERT_EQ(Shell("qemu-img info --output=json '" + ours + "'", &msg), 0) << msg;
    auto j = nlohmann::json::parse(msg, nullptr, false);
    ASSERT_FALSE(j.is_discarded()) << msg;
    EXPECT_EQ(j["virtual-size"], co.size_bytes);
    EXPECT_EQ(j["cluster-size"], co.cluster_size);
    EXPECT_EQ(j["backing-filename"], "base.raw");
    EXPECT_EQ(j["backing-filename-format"], "raw");
    auto& spec = j["format-specific"]["data"];
    EXPECT_EQ(spec["compat"], v2 ? "0.10" : "1.1");
    if (!v2) {
      EXPECT_EQ(spec["refcount-bits"], co.refcount_bits);
      EXPECT_EQ(spec["lazy-refcounts"], co.lazy_refcounts);
      EXPECT_EQ(spec["extended-l2"], co.extended_l2);
      EXPECT_EQ(spec["compression-type"], co.compression_type);
      EXPECT_EQ(spec["corrupt"], false);
    }
  }
}

TEST_F(Qcow2InteropTest, CowtapCheckAgreesWithQemuOnLeaks) {
  std::string img = P("leak.qcow2"), msg;
  ASSERT_EQ(Shell("qemu-img create -q -f qcow2 -o lazy_refcounts=on '" + img + "' 4M", &msg), 0) << msg;
  // Abort after a flush: the dirty bit stays set, refcounts are missing.
  Shell("qemu-io -c 'write -P 0x5a 0 1M' -c flush -c abort '" + img + "'", &msg);
  CheckOptions ck;
  auto r = CheckImage(img, ck);
  ASSERT_TRUE(r.ok()) << r.status().ToString();
  int qemu_rc = Shell("qemu-img check '" + img + "'", &msg);
  EXPECT_EQ(r->ExitCode(), qemu_rc) << msg;
  // Opening it read-write rebuilds the refcounts; QEMU then agrees it is clean.
  {
    OpenOptions oo;
    auto opened = OpenImage(img, oo);
    ASSERT_TRUE(opened.ok()) << opened.status().ToString();
    EXPECT_FALSE((*opened)->info().dirty);
    ASSERT_TRUE((*opened)->Close().ok());
  }
  ExpectQemuCheckClean(img);
  std::vector<uint8_t> want(4 << 20, 0);
  std::fill(want.begin(), want.begin() + (1 << 20), 0x5a);
  EXPECT_TRUE(CowtapRead(img) == want);
}

// cowtap copies-on-write out of compressed clusters and clusters shared with
// an internal snapshot; QEMU then finds the image consistent, equal to a
// twin it wrote itself, and the snapshot unchanged.
TEST_F(Qcow2InteropTest, CowtapWritesIntoCompressedAndSnapshottedImages) {
  const std::string src = MakeSource(2 << 20);
  const std::vector<uint8_t> src_bytes = ReadFileBytes(src);
  for (const std::string opts : {"compression_type=zlib", "compression_type=zstd", "extended_l2=on,cluster_size=32k",
                                 "cluster_size=4k,refcount_bits=8"}) {
    SCOPED_TRACE(opts);
    std::string img = P("c.qcow2"), twin = P("c-twin.qcow2"), msg;
    fsys::remove(img);
    ASSERT_EQ(Shell("qemu-img convert -c -O qcow2 -o " + opts + " '" + src + "' '" + img + "'", &msg), 0) << msg;
    ASSERT_EQ(Shell("qemu-img snapshot -c s1 '" + img + "'", &msg), 0) << msg;
    fsys::copy_file(img, twin, fsys::copy_options::overwrite_existing);
    {
      OpenOptions oo;
      auto im = OpenImage(img, oo);
      ASSERT_TRUE(im.ok()) << im.status().ToString();
      std::vector<uint8_t> b(70000, 0x61);
      iovec v = MakeIoVec(b.data(), 5000);
      ASSERT_TRUE((*im)->Write(10000, {&v, 1}).ok());
      v = MakeIoVec(b.data(), 70000);
      ASSERT_TRUE((*im)->Write(200000, {&v, 1}).ok());
      ASSERT_TRUE((*im)->WriteZeroes(400000, 3000, false).ok());
      ASSERT_TRUE((*im)->Discard(1 << 20, 65536).ok());
      ASSERT_TRUE((*im)->Close().ok());
    }
    ASSERT_EQ(Shell("qemu-io -c 'write -P 0x61 10000 5000' -c 'write -P 0x61 200000 70000' -c 'write -z 400000 3000' "
                    "-c 'discard 1M 64k' '" +
                        twin + "'",
                    &msg),
              0)
        << msg;
    ExpectQemuCheckClean(img);
    EXPECT_EQ(Shell("qemu-img compare '" + img + "' '" + twin + "'", &msg), 0) << msg;
    EXPECT_TRUE(QemuRead(img, "s1") == src_bytes);
    EXPECT_TRUE(CowtapRead(img, "s1") == src_bytes);
    CheckOptions ck;
    auto r = CheckImage(img, ck);
    ASSERT_TRUE(r.ok()) << r.status().ToString();
    EXPECT_EQ(r->ExitCode(), 0) << (r->messages.empty() ? "" : r->messages[0]);
  }
}

}  // namespace
}  // namespace cowtap::cow
