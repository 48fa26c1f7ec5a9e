#include "dm/offload_miss_device.h"

#include <gtest/gtest.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cstring>
#include <mutex>
#include <optional>
#include <utility>
#include <vector>

#include "dm/offload_attachment.h"

namespace cowtap::dm {
namespace {

// A device over memory that records which methods were called.
class RecordingDevice final : public backend::BlockDevice {
 public:
  explicit RecordingDevice(uint64_t size) : data(size, 0xAB) {}
  uint64_t size_bytes() const override { return data.size(); }
  bool read_only() const override { return false; }
  bool supports_discard() const override { return true; }
  Status Read(uint64_t offset, IoVecs iov) override {
    for (const iovec& v : iov) {
      std::memcpy(v.iov_base, data.data() + offset, v.iov_len);
      offset += v.iov_len;
    }
    return Status::Ok();
  }
  Status Write(uint64_t offset, IoVecs iov) override {
    ++writes;
    for (const iovec& v : iov) {
      std::memcpy(data.data() + offset, v.iov_base, v.iov_len);
      offset += v.iov_len;
    }
    return Status::Ok();
  }
  Status Flush() override { return Status::Ok(); }
  Status Discard(uint64_t off, uint64_t len, bool) override {
    ++discards;
    Note(off, len);
    return discard_status;
  }
  Status WriteZeroes(uint64_t off, uint64_t len) override {
    ++write_zeroes;
    Note(off, len);
    return Status::Ok();
  }
  // Records the range and whether every cluster of it was fenced meanwhile.
  void Note(uint64_t off, uint64_t len) {
    ranges.emplace_back(off, len);
    if (fence && cluster_size) {
      for (uint64_t c = off / cluster_size; c <= (off + len - 1) / cluster_size; ++c) {
        if (!fence->Holds(c)) unfenced = true;
      }
    }
  }
  std::vector<uint8_t> data;
  int writes = 0, discards = 0, write_zeroes = 0;
  std::vector<std::pair<uint64_t, uint64_t>> ranges;
  std::shared_ptr<MissFence> fence;
  uint64_t cluster_size = 0;
  bool unfenced = false;
  Status discard_status;
};

TEST(OffloadMissDeviceTest, OffersNoDiscardAndRefusesOneThatComesAnyway) {
  auto inner = std::make_shared<RecordingDevice>(1 << 20);
  auto dev = NewOffloadMissDevice(inner);
  EXPECT_FALSE(dev->supports_discard());
  Status s = dev->Discard(0, 65536, false);
  EXPECT_EQ(s.code(), ErrorCode::kNotSupported);
  EXPECT_NE(s.message().find("offloaded"), std::string::npos) << s.ToString();
  EXPECT_EQ(inner->discards, 0);
}

TEST(OffloadMissDeviceTest, WriteZeroesBecomesPlainWritesNeverAMetadataZero) {
  const uint64_t size = 3 << 20;
  auto inner = std::make_shared<RecordingDevice>(size);
  auto dev = NewOffloadMissDevice(inner);
  ASSERT_TRUE(dev->WriteZeroes(4096, (2 << 20) + 512).ok());
  EXPECT_EQ(inner->write_zeroes, 0);
  EXPECT_EQ(inner->writes, 3);  // 1 MiB pieces
  for (uint64_t i = 0; i < size; ++i) {
    const bool zeroed = i >= 4096 && i < 4096 + (2 << 20) + 512;
    ASSERT_EQ(inner->data[i], zeroed ? 0 : 0xAB) << "at " << i;
  }
}

TEST(OffloadMissDeviceTest, SubmittedDiscardAndWriteZeroesTakeTheSamePath) {
  auto inner = std::make_shared<RecordingDevice>(1 << 20);
  auto dev = NewOffloadMissDevice(inner);
  Status discard, zero;
  backend::BlockIo io;
  io.length_bytes = 4096;
  io.kind = backend::BlockIoKind::kDiscard;
  dev->Submit(io, [&](Status s) { discard = s; });
  io.kind = backend::BlockIoKind::kWriteZeroes;
  dev->Submit(io, [&](Status s) { zero = s; });
  EXPECT_EQ(discard.code(), ErrorCode::kNotSupported);
  EXPECT_TRUE(zero.ok()) << zero.ToString();
  EXPECT_EQ(inner->discards + inner->write_zeroes, 0);
  EXPECT_EQ(inner->data[0], 0);
}

// Routing over a 1 MiB disk of 64 KiB clusters whose clusters 2..3 are
// linear at host offset 10 MiB and 8 at 20 MiB.
constexpr uint64_t kCs = 64 << 10;
struct Routed {
  std::shared_ptr<RecordingDevice> inner = std::make_shared<RecordingDevice>(1 << 20);
  std::shared_ptr<MissFence> fence = std::make_shared<MissFence>();
  std::shared_ptr<MissRoutingCounters> counters = std::make_shared<MissRoutingCounters>();
  std::vector<std::shared_ptr<const DmTable>> tables;  // what the kernel may run
  std::vector<std::pair<uint64_t, uint64_t>> zeroed;   // host ranges
  std::vector<ZeroMode> modes;                         // one per zeroed range
  bool fenced_while_zeroing = true;
  Status zero_status;
  std::unique_ptr<backend::BlockDevice> dev;
  Routed() {
    const uint64_t spc = kCs / 512;
    auto t = DmTable::Make((1 << 20) / 512, {{0, 2 * spc, DmSegment::Kind::kMiss, 0},
                                             {2 * spc, 2 * spc, DmSegment::Kind::kLinear, (10 << 20) / 512},
                                             {4 * spc, 4 * spc, DmSegment::Kind::kMiss, 4 * spc},
                                             {8 * spc, spc, DmSegment::Kind::kLinear, (20 << 20) / 512},
                                             {9 * spc, 7 * spc, DmSegment::Kind::kMiss, 9 * spc}});
    EXPECT_TRUE(t.ok()) << t.status().ToString();
    tables = {std::make_shared<const DmTable>(*t)};
    inner->fence = fence;
    inner->cluster_size = kCs;
    OffloadMissRouting r;
    r.cluster_size = kCs;
    r.fence = fence;
    r.counters = counters;
    r.routing_tables = [this] { return tables; };
    r.zero_in_place = [this](uint64_t host, uint64_t len, ZeroMode mode) {
      zeroed.emplace_back(host, len);
      modes.push_back(mode);
      if (fence->empty()) fenced_while_zeroing = false;
      return zero_status;
    };
    dev = NewOffloadMissDevice(inner, r);
  }
};

TEST(OffloadMissDeviceTest, DiscardZeroesLinearClustersInPlaceAndHandsTheRestToTheEngineFenced) {
  Routed r;
  EXPECT_TRUE(r.dev->supports_discard());
  // Clusters 1..9 and half of 10: miss 1, linear 2-3, miss 4-7, linear 8, miss 9-10.
  ASSERT_TRUE(r.dev->Discard(kCs, 9 * kCs + kCs / 2, false).ok());
  using Range = std::pair<uint64_t, uint64_t>;
  EXPECT_EQ(r.zeroed, (std::vector<Range>{{10 << 20, 2 * kCs}, {20 << 20, kCs}}))
      << "linear clusters are zeroed at their host offsets, never freed";
  EXPECT_EQ(r.inner->ranges, (std::vector<Range>{{kCs, kCs}, {4 * kCs, 4 * kCs}, {9 * kCs, kCs + kCs / 2}}));
  EXPECT_EQ(r.inner->discards, 3);
  EXPECT_EQ(r.counters->in_place_requests, 2u);
  EXPECT_EQ(r.counters->in_place_bytes, 3 * kCs);
  EXPECT_EQ(r.counters->engine_requests, 3u);
  EXPECT_EQ(r.counters->engine_bytes, 6 * kCs + kCs / 2);
  EXPECT_FALSE(r.inner->unfenced) << "the engine changed clusters the planner could still route linear";
  EXPECT_TRUE(r.fenced_while_zeroing);
  EXPECT_EQ(r.modes, (std::vector<ZeroMode>{ZeroMode::kDeallocate, ZeroMode::kDeallocate})) << "a discard punches";
  EXPECT_TRUE(r.fence->empty()) << "the fence is lifted afterwards";
  EXPECT_EQ(r.dev->Discard(0, kCs, true).code(), ErrorCode::kNotSupported) << "secure discard is not offered";
}

TEST(OffloadMissDeviceTest, WriteZeroesIsSplitTheSameWay) {
  Routed r;
  // Inside cluster 2 (linear) and into cluster 4 (miss).
  ASSERT_TRUE(r.dev->WriteZeroes(2 * kCs + 4096, 2 * kCs).ok());
  using Range = std::pair<uint64_t, uint64_t>;
  EXPECT_EQ(r.zeroed, (std::vector<Range>{{(10 << 20) + 4096, 2 * kCs - 4096}}));
  EXPECT_EQ(r.inner->ranges, (std::vector<Range>{{4 * kCs, 4096}}));
  EXPECT_EQ(r.inner->write_zeroes, 1);
  EXPECT_EQ(r.modes, (std::vector<ZeroMode>{ZeroMode::kKeepAllocated})) << "write-zeroes keeps the blocks";
  EXPECT_TRUE(r.fenced_while_zeroing);
  EXPECT_FALSE(r.inner->unfenced);
  EXPECT_EQ(r.inner->writes, 0) << "no zero bytes written as data";
}

TEST(OffloadMissDeviceTest, BeforeTheDeviceExistsEverythingGoesToTheEngine) {
  Routed r;
  r.tables.clear();
  ASSERT_TRUE(r.dev->Discard(0, 1 << 20, false).ok());
  EXPECT_TRUE(r.zeroed.empty());
  EXPECT_EQ(r.inner->ranges, (std::vector<std::pair<uint64_t, uint64_t>>{{0, 1 << 20}}));
}

TEST(OffloadMissDeviceTest, AFailedInPlaceZeroFailsTheRequestAndLiftsTheFence) {
  Routed r;
  r.zero_status = Status::IoError("punch hole: EIO");
  Status s = r.dev->Discard(0, 4 * kCs, false);
  EXPECT_EQ(s.code(), ErrorCode::kIoError);
  EXPECT_TRUE(r.fence->empty());
  EXPECT_EQ(r.inner->ranges.size(), 1u) << "the miss run before the linear one was discarded; nothing after it";
}

TEST(MissFenceTest, HoldsWhatWasEnteredUntilItLeaves) {
  MissFence f;
  EXPECT_TRUE(f.empty());
  f.Enter(10, 5);
  f.Enter(12, 1);
  EXPECT_TRUE(f.Holds(10));
  EXPECT_TRUE(f.Holds(14));
  EXPECT_FALSE(f.Holds(15));
  EXPECT_FALSE(f.Holds(9));
  f.Leave(10, 5);
  EXPECT_FALSE(f.Holds(10));
  EXPECT_TRUE(f.Holds(12));
  f.Leave(12, 1);
  EXPECT_TRUE(f.empty());
}

}  // namespace
}  // namespace cowtap::dm

namespace cowtap::dm {
namespace {

TEST(OffloadMissDeviceTest, LinearInAnyTableTheKernelMayRunIsZeroedInPlace) {
  Routed r;
  // A reload is loading a table in which cluster 5 went linear too (and
  // 8 went miss): until it is resumed the kernel may run either.
  const uint64_t spc = kCs / 512;
  auto loading = DmTable::Make((1 << 20) / 512, {{0, 2 * spc, DmSegment::Kind::kMiss, 0},
                                                 {2 * spc, 2 * spc, DmSegment::Kind::kLinear, (10 << 20) / 512},
                                                 {4 * spc, spc, DmSegment::Kind::kMiss, 4 * spc},
                                                 {5 * spc, spc, DmSegment::Kind::kLinear, (30 << 20) / 512},
                                                 {6 * spc, 10 * spc, DmSegment::Kind::kMiss, 6 * spc}});
  ASSERT_TRUE(loading.ok());
  r.tables.push_back(std::make_shared<const DmTable>(*loading));
  ASSERT_TRUE(r.dev->Discard(4 * kCs, 6 * kCs, false).ok());  // clusters 4..9
  using Range = std::pair<uint64_t, uint64_t>;
  EXPECT_EQ(r.zeroed, (std::vector<Range>{{30 << 20, kCs}, {20 << 20, kCs}}));
  EXPECT_EQ(r.inner->ranges, (std::vector<Range>{{4 * kCs, kCs}, {6 * kCs, 2 * kCs}, {9 * kCs, kCs}}))
      << "only what every table routes to user space reaches the engine";
  EXPECT_TRUE(r.fenced_while_zeroing);
  EXPECT_FALSE(r.inner->unfenced);
}

TEST(OffloadMissDeviceTest, AFailedEngineDiscardFailsTheRequestAndLiftsTheFence) {
  Routed r;
  r.inner->discard_status = Status::IoError("engine: EIO");
  EXPECT_EQ(r.dev->Discard(4 * kCs, kCs, false).code(), ErrorCode::kIoError);
  EXPECT_TRUE(r.fence->empty());
  EXPECT_EQ(r.fence->generation(), 1u) << "logged as changed: the engine may have changed part of it";
}

TEST(OffloadMissDeviceTest, ARangePastTheDiskOrWrappingIsRefusedBeforeAnythingChanges) {
  Routed r;
  EXPECT_EQ(r.dev->Discard(15 * kCs, 2 * kCs, false).code(), ErrorCode::kOutOfRange);
  EXPECT_EQ(r.dev->WriteZeroes(UINT64_MAX - 4095, 8192).code(), ErrorCode::kOutOfRange);
  EXPECT_TRUE(r.zeroed.empty());
  EXPECT_TRUE(r.inner->ranges.empty());
  EXPECT_EQ(r.fence->generation(), 0u) << "never fenced";
}

// ZeroFileRange on a real file: zeros where asked, nothing else changed,
// the size kept; write-zeroes keeps the blocks allocated.
TEST(ZeroFileRangeTest, ZeroesInPlaceKeepingTheSizeAndForWriteZeroesTheBlocks) {
  char path[] = "/tmp/cowtap-zero-XXXXXX";
  const int fd = ::mkstemp(path);
  ASSERT_GE(fd, 0);
  ::unlink(path);
  std::vector<uint8_t> data(1 << 20, 0x5A);
  ASSERT_EQ(::pwrite(fd, data.data(), data.size(), 0), static_cast<ssize_t>(data.size()));
  ASSERT_EQ(::fsync(fd), 0);
  struct stat before {};
  ASSERT_EQ(::fstat(fd, &before), 0);
  ASSERT_TRUE(ZeroFileRange(fd, path, 256 << 10, 128 << 10, ZeroMode::kKeepAllocated).ok());
  struct stat kept {};
  ASSERT_EQ(::fstat(fd, &kept), 0);
  EXPECT_GE(kept.st_blocks, before.st_blocks) << "write-zeroes gave blocks back";
  ASSERT_TRUE(ZeroFileRange(fd, path, 640 << 10, 64 << 10, ZeroMode::kDeallocate).ok());
  struct stat after {};
  ASSERT_EQ(::fstat(fd, &after), 0);
  EXPECT_EQ(after.st_size, before.st_size);
  std::vector<uint8_t> back(data.size());
  ASSERT_EQ(::pread(fd, back.data(), back.size(), 0), static_cast<ssize_t>(back.size()));
  for (size_t i = 0; i < back.size(); ++i) {
    const bool zeroed = (i >= (256u << 10) && i < (384u << 10)) || (i >= (640u << 10) && i < (704u << 10));
    ASSERT_EQ(back[i], zeroed ? 0 : 0x5A) << "byte " << i;
  }
  EXPECT_FALSE(ZeroFileRange(-1, "nothing", 0, 4096, ZeroMode::kDeallocate).ok());
  ::close(fd);
}

TEST(MissFenceTest, ChangedSinceReportsFencedAndLeftRangesUntilTheLogRunsOut) {
  MissFence f;
  const uint64_t g0 = f.generation();
  f.Enter(1, 2);
  f.Leave(1, 2);
  const uint64_t g1 = f.generation();
  EXPECT_EQ(g1, g0 + 1);
  f.Enter(7, 1);
  using Range = MissFence::Range;
  EXPECT_EQ(*f.ChangedSince(g0), (std::vector<Range>{{7, 1}, {1, 2}}));
  EXPECT_EQ(*f.ChangedSince(g1), (std::vector<Range>{{7, 1}}));
  f.Leave(7, 1);
  for (size_t i = 0; i < MissFence::kLogRanges; ++i) {
    f.Enter(100, 1);
    f.Leave(100, 1);
  }
  EXPECT_FALSE(f.ChangedSince(g0).has_value()) << "the log forgot what happened after g0";
  EXPECT_TRUE(f.ChangedSince(f.generation()).has_value());
  EXPECT_TRUE(f.ChangedSince(f.generation())->empty());
}

TEST(FenceTableTest, KeepsChangedRangesMissAndFallsBackToAllMiss) {
  constexpr uint64_t cs = 65536, spc = cs / 512;
  auto t = DmTable::Make(8 * spc, {{0, 8 * spc, DmSegment::Kind::kLinear, 100 * spc}});
  ASSERT_TRUE(t.ok());
  MissFence f;
  const uint64_t since = f.generation();
  f.Enter(2, 1);
  f.Leave(2, 1);  // left after `since`: a plan collected before may hold it
  f.Enter(6, 5);  // fenced now, running past the disk's end
  const DmTable out = FenceTable(*t, f, since, cs);
  EXPECT_EQ(out.SegmentAt(0).kind, DmSegment::Kind::kLinear);
  EXPECT_EQ(out.SegmentAt(2 * spc).kind, DmSegment::Kind::kMiss);
  EXPECT_EQ(out.SegmentAt(3 * spc).kind, DmSegment::Kind::kLinear);
  EXPECT_EQ(out.SegmentAt(6 * spc).kind, DmSegment::Kind::kMiss);
  EXPECT_EQ(out.linear_sectors(), 5 * spc);
  EXPECT_EQ(FenceTable(*t, f, f.generation(), cs).linear_sectors(), 6 * spc) << "only the fenced range";
  for (size_t i = 0; i < MissFence::kLogRanges; ++i) {
    f.Enter(0, 1);
    f.Leave(0, 1);
  }
  EXPECT_EQ(FenceTable(*t, f, since, cs), DmTable::AllMiss(8 * spc));
}

}  // namespace
}  // namespace cowtap::dm
