// The property the kernel offload rests on: a table planned from the
// engine's knowledge, run by a dm-like executor (linear pieces straight into
// the image file, misses into the engine), gives exactly the engine's bytes —
// for reads, and for writes the engine reads back afterwards — over random
// workloads, after every reload and every revoke; and the image stays clean
// for qemu-img.
#include "dm/table_executor.h"

#include <gtest/gtest.h>
#include <stdlib.h>
#include <sys/wait.h>

#include <filesystem>
#include <fstream>
#include <random>

#include "cow/image.h"
#include "dm/offload_controller.h"

namespace cowtap::dm {
namespace {

int Shell(const std::string& cmd, std::string* out = nullptr) {
  FILE* p = popen((cmd + " 2>&1").c_str(), "r");
  if (!p) return -1;
  char buf[4096];
  std::string text;
  while (size_t n = fread(buf, 1, sizeof(buf), p)) text.append(buf, n);
  int rc = pclose(p);
  if (out) *out = text;
  return WIFEXITED(rc) ? WEXITSTATUS(rc) : -1;
}

struct Shape {
  const char* name;
  bool raw_base;
  uint32_t cluster;
  size_t max_segments;
};

class ExecutorPropertyTest : public ::testing::TestWithParam<Shape> {
 protected:
  void SetUp() override {
    char tmpl[] = "/tmp/cowtap_dm_exec_XXXXXX";
    ASSERT_NE(mkdtemp(tmpl), nullptr);
    dir_ = tmpl;
  }
  void TearDown() override { std::filesystem::remove_all(dir_); }
  std::string dir_;
};

constexpr uint64_t kSize = 4 << 20;

Status EngineRead(backend::BlockDevice& dev, uint64_t off, std::vector<uint8_t>& buf) {
  iovec v{buf.data(), buf.size()};
  return dev.Read(off, {&v, 1});
}

TEST_P(ExecutorPropertyTest, RandomWorkloadsGiveTheEnginesBytesAfterEveryReload) {
  const Shape& shape = GetParam();
  const uint64_t cs = shape.cluster;
  std::vector<uint8_t> model(kSize, 0);

  // A base with a pattern in its first half, so copy-up is visible.
  const std::string base = dir_ + (shape.raw_base ? "/base.raw" : "/base.qcow2");
  {
    cow::CreateOptions bo;
    bo.format = shape.raw_base ? cow::ImageFormat::kRaw : cow::ImageFormat::kQcow2;
    bo.size_bytes = kSize;
    bo.cluster_size = shape.cluster;
    ASSERT_TRUE(cow::CreateImage(base, bo).ok());
    auto b = cow::OpenImage(base);
    ASSERT_TRUE(b.ok()) << b.status().ToString();
    std::mt19937_64 rng(7);
    for (uint64_t i = 0; i < kSize / 2; ++i) model[i] = static_cast<uint8_t>(rng());
    iovec v{model.data(), kSize / 2};
    ASSERT_TRUE((*b)->Write(0, {&v, 1}).ok());
    ASSERT_TRUE((*b)->Close().ok());
  }
  const std::string top = dir_ + "/top.qcow2";
  cow::CreateOptions to;
  to.backing_file = std::filesystem::path(base).filename();
  to.cluster_size = shape.cluster;
  ASSERT_TRUE(cow::CreateImage(top, to).ok());
  auto opened = cow::OpenImage(top);
  ASSERT_TRUE(opened.ok()) << opened.status().ToString();
  std::shared_ptr<cow::Image> image = std::move(opened).value();
  std::unique_ptr<backend::BlockDevice> engine = backend::NewImageBlockDevice(image);
  auto file = cow::DefaultFileSystem()->Open(top, {.writable = true});
  ASSERT_TRUE(file.ok()) << file.status().ToString();

  auto popts = OffloadPlanner::OptionsFor(*image, shape.max_segments);
  ASSERT_TRUE(popts.ok()) << popts.status().ToString();
  auto planner = OffloadPlanner::Make(*popts);
  ASSERT_TRUE(planner.ok());
  FakeDeviceMapper dm;
  OffloadController ctl(dm, "cowtap-test", {"/dev/loop0", "/dev/nbd0"}, *planner,
                        [&] { return CollectWritableClusters(*image); });
  ASSERT_TRUE(ctl.Start().ok());
  TableExecutor exec(**file, *engine, ctl.live_table());

  std::mt19937_64 rng(0xd0d0 + cs + shape.max_segments);
  auto random_range = [&](uint64_t max_len) {
    uint64_t len = (1 + rng() % (max_len / 512)) * 512;
    uint64_t off = (rng() % ((kSize - len) / 512 + 1)) * 512;
    return std::pair{off, len};
  };
  auto fill = [&](std::vector<uint8_t>& buf) {
    for (auto& b : buf) b = static_cast<uint8_t>(rng());
  };
  uint64_t max_linear_sectors = 0;
  for (int round = 0; round < 12; ++round) {
    SCOPED_TRACE("round " + std::to_string(round));
    // Engine batch: writes (some reading back, which caches their remaps) and
    // discards, each discard revoked first, as the engine will do.
    for (int op = 0; op < 24; ++op) {
      if (rng() % 6 == 0) {
        const uint64_t c = rng() % (kSize / cs), n = 1 + rng() % 3;
        const uint64_t count = std::min(n, kSize / cs - c);
        ASSERT_TRUE(ctl.RevokeBeforeReuse(c, count).ok());
        exec.SetTable(ctl.live_table());
        ASSERT_EQ(exec.table().SegmentAt(c * cs / 512).kind, DmSegment::Kind::kMiss);
        ASSERT_TRUE(engine->Discard(c * cs, count * cs, false).ok());
        std::fill(model.begin() + c * cs, model.begin() + (c + count) * cs, 0);
        continue;
      }
      auto [off, len] = random_range(3 * cs);
      std::vector<uint8_t> buf(len);
      fill(buf);
      iovec v{buf.data(), len};
      ASSERT_TRUE(engine->Write(off, {&v, 1}).ok());
      std::copy(buf.begin(), buf.end(), model.begin() + off);
      if (rng() % 2) {
        ASSERT_TRUE(EngineRead(*engine, off, buf).ok());
      }
    }
    // Plan and "reload".
    auto reloaded = ctl.ReloadNow();
    ASSERT_TRUE(reloaded.ok()) << reloaded.status().ToString();
    DmTable live = *dm.LiveTable("cowtap-test");
    ASSERT_EQ(live, ctl.live_table());
    ASSERT_LE(live.segments().size(), shape.max_segments);
    max_linear_sectors = std::max(max_linear_sectors, live.linear_sectors());
    exec.SetTable(live);

    // Reads through the table == the model == the engine.
    for (int i = 0; i < 16; ++i) {
      auto [off, len] = random_range(4 * cs);
      std::vector<uint8_t> a(len), b(len);
      ASSERT_TRUE(exec.Read(off, a).ok());
      ASSERT_TRUE(EngineRead(*engine, off, b).ok());
      ASSERT_TRUE(std::equal(a.begin(), a.end(), model.begin() + off)) << "executor read at " << off << "+" << len;
      ASSERT_TRUE(std::equal(b.begin(), b.end(), model.begin() + off)) << "engine read at " << off << "+" << len;
    }
    // Writes through the table, then the engine reads them back.
    for (int i = 0; i < 8; ++i) {
      auto [off, len] = random_range(3 * cs);
      std::vector<uint8_t> buf(len);
      fill(buf);
      ASSERT_TRUE(exec.Write(off, buf).ok());
      std::copy(buf.begin(), buf.end(), model.begin() + off);
      std::vector<uint8_t> back(len);
      ASSERT_TRUE(EngineRead(*engine, off, back).ok());
      ASSERT_EQ(back, buf) << "engine after executor write at " << off << "+" << len;
    }
  }
  // The whole disk, both ways.
  std::vector<uint8_t> all(kSize);
  ASSERT_TRUE(exec.Read(0, all).ok());
  EXPECT_TRUE(all == model);
  ASSERT_TRUE(EngineRead(*engine, 0, all).ok());
  EXPECT_TRUE(all == model);
  // The offload was exercised, not just the miss path.
  EXPECT_GT(max_linear_sectors, 0u);
  EXPECT_GT(exec.stats().linear_bytes, 0u);
  EXPECT_GT(exec.stats().miss_bytes, 0u);
  EXPECT_GT(dm.reloads(), 2u);

  engine.reset();
  ASSERT_TRUE(image->Close().ok());
  image.reset();

  // Attach again: priming alone (no guest I/O yet) gives a table whose
  // linear part serves the same bytes.
  {
    auto reopened = cow::OpenImage(top);
    ASSERT_TRUE(reopened.ok()) << reopened.status().ToString();
    std::shared_ptr<cow::Image> img2 = std::move(reopened).value();
    auto dev2 = backend::NewImageBlockDevice(img2);
    auto primed = PrimeRemapCache(*img2, 1 << 20);
    ASSERT_TRUE(primed.ok()) << primed.status().ToString();
    auto table = planner->Plan(CollectWritableClusters(*img2));
    ASSERT_TRUE(table.ok());
    EXPECT_GT(table->linear_sectors(), 0u);
    TableExecutor exec2(**file, *dev2, *table);
    std::vector<uint8_t> again(kSize);
    ASSERT_TRUE(exec2.Read(0, again).ok());
    EXPECT_TRUE(again == model);
    EXPECT_GT(exec2.stats().linear_bytes, 0u);
    dev2.reset();
    ASSERT_TRUE(img2->Close().ok());
  }
  if (Shell("qemu-img --version") != 0) GTEST_SKIP() << "qemu-img not installed (apt-get install qemu-utils)";
  std::string msg;
  EXPECT_EQ(Shell("qemu-img check '" + top + "'", &msg), 0) << msg;
  std::ofstream(dir_ + "/model.raw", std::ios::binary).write(reinterpret_cast<const char*>(model.data()), kSize);
  EXPECT_EQ(Shell("qemu-img compare -f qcow2 -F raw '" + top + "' '" + dir_ + "/model.raw'", &msg), 0) << msg;
}

INSTANTIATE_TEST_SUITE_P(Shapes, ExecutorPropertyTest,
                         ::testing::Values(Shape{"qcow2_base_64k", false, 65536, 4096},
                                           Shape{"raw_base_64k", true, 65536, 4096},
                                           Shape{"qcow2_base_4k", false, 4096, 4096},
                                           Shape{"capped_4k", false, 4096, 9}),
                         [](const auto& p) { return std::string(p.param.name); });

TEST(TableExecutorTest, RefusesUnalignedAndOutOfRangeRequests) {
  auto fs = cow::NewMemFileSystem();
  auto f = fs->Open("img", {.writable = true, .create = true});
  ASSERT_TRUE(f.ok());
  class NoDevice : public backend::BlockDevice {
   public:
    uint64_t size_bytes() const override { return 4096; }
    bool read_only() const override { return false; }
    bool supports_discard() const override { return false; }
    Status Read(uint64_t, IoVecs) override { return Status::Internal("unexpected"); }
    Status Write(uint64_t, IoVecs) override { return Status::Internal("unexpected"); }
    Status Flush() override { return Status::Ok(); }
    Status Discard(uint64_t, uint64_t, bool) override { return Status::Ok(); }
    Status WriteZeroes(uint64_t, uint64_t) override { return Status::Ok(); }
  } dev;
  TableExecutor exec(**f, dev, DmTable::AllMiss(8));
  std::vector<uint8_t> buf(512);
  EXPECT_EQ(exec.Read(4096, buf).code(), ErrorCode::kOutOfRange);
  EXPECT_EQ(exec.Read(100, buf).code(), ErrorCode::kOutOfRange);
  EXPECT_EQ(exec.Read(UINT64_MAX - 511, buf).code(), ErrorCode::kOutOfRange);
  std::vector<uint8_t> odd(100);
  EXPECT_EQ(exec.Write(0, odd).code(), ErrorCode::kOutOfRange);
  // A linear segment goes to the file at its target, not to the device.
  auto t = DmTable::Make(8, {{0, 4, DmSegment::Kind::kMiss, 0}, {4, 4, DmSegment::Kind::kLinear, 16}});
  ASSERT_TRUE(t.ok());
  exec.SetTable(*t);
  std::vector<uint8_t> data(1024, 0x5a);
  ASSERT_TRUE(exec.Write(2048, data).ok());
  std::vector<uint8_t> raw(1024);
  ASSERT_TRUE((*f)->ReadAt(16 * 512, raw).ok());
  EXPECT_EQ(raw, data);
  EXPECT_EQ(exec.Write(0, data).code(), ErrorCode::kInternal);  // miss reaches the device
}

}  // namespace
}  // namespace cowtap::dm
