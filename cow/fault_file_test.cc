// Tests of FaultInjectingFile / FaultController / FaultInjectingFileSystem:
// each trigger kind, short writes, power-loss overlay and crash (drop all and
// torn sectors), counters, path targeting, and concurrent use.
#include "cow/fault_file.h"

#include <gtest/gtest.h>

#include <thread>

namespace cowtap::cow {
namespace {

std::vector<uint8_t> Bytes(size_t n, uint8_t v) { return std::vector<uint8_t>(n, v); }

std::vector<uint8_t> ReadAll(File& f) {
  auto size = f.Size();
  EXPECT_TRUE(size.ok());
  std::vector<uint8_t> out(size.ok() ? *size : 0);
  EXPECT_TRUE(f.ReadAt(0, out).ok());
  return out;
}

// A FaultInjectingFile over a file of a MemFileSystem, with a second,
// undecorated handle on the same bytes to see what "the disk" holds.
struct Fixture {
  std::unique_ptr<FileSystem> fs = NewMemFileSystem();
  std::unique_ptr<FaultInjectingFile> file;
  std::unique_ptr<File> disk;
  Fixture() {
    FileOpenOptions fo;
    fo.create = true;
    file = std::make_unique<FaultInjectingFile>(std::move(fs->Open("/f", fo)).value());
    disk = std::move(fs->Open("/f", {})).value();
  }
};

TEST(FaultFileTest, PassesThroughWithoutFaults) {
  Fixture t;
  ASSERT_TRUE(t.file->WriteAt(10, Bytes(5, 7)).ok());
  EXPECT_EQ(*t.file->Size(), 15u);
  EXPECT_EQ(ReadAll(*t.disk)[12], 7);
  ASSERT_TRUE(t.file->Flush().ok());
  auto c = t.file->controller().counters();
  EXPECT_EQ(c.writes, 1u);
  EXPECT_EQ(c.flushes, 1u);
  EXPECT_EQ(c.bytes_written, 5u);
  EXPECT_EQ(c.faults_fired, 0u);
  EXPECT_EQ(t.file->path(), "/f");
}

TEST(FaultFileTest, FailsOnlyTheNthWriteWithTheChosenErrno) {
  Fixture t;
  t.file->controller().AddFault({FaultOp::kWrite, FaultTrigger::kNth, 3, EIO, 0});
  EXPECT_TRUE(t.file->WriteAt(0, Bytes(1, 1)).ok());
  EXPECT_TRUE(t.file->WriteAt(1, Bytes(1, 2)).ok());
  Status s = t.file->WriteAt(2, Bytes(1, 3));
  EXPECT_EQ(s.code(), ErrorCode::kIoError);
  EXPECT_EQ(s.errno_value(), EIO);
  EXPECT_TRUE(t.file->WriteAt(3, Bytes(1, 4)).ok());
  EXPECT_EQ(ReadAll(*t.disk), (std::vector<uint8_t>{1, 2, 0, 4}));
  EXPECT_EQ(t.file->controller().counters().faults_fired, 1u);
}

TEST(FaultFileTest, FailsEveryNthRead) {
  Fixture t;
  ASSERT_TRUE(t.file->WriteAt(0, Bytes(8, 1)).ok());
  t.file->controller().AddFault({FaultOp::kRead, FaultTrigger::kEveryNth, 2, EIO, 0});
  std::vector<uint8_t> buf(4);
  for (int i = 1; i <= 6; ++i) EXPECT_EQ(t.file->ReadAt(0, buf).ok(), i % 2 != 0) << "read " << i;
  EXPECT_EQ(t.file->controller().counters().reads, 6u);
}

TEST(FaultFileTest, FailsEveryFlushAfterNWithEnospc) {
  Fixture t;
  t.file->controller().AddFault({FaultOp::kFlush, FaultTrigger::kAfterN, 2, ENOSPC, 0});
  EXPECT_TRUE(t.file->Flush().ok());
  EXPECT_TRUE(t.file->Flush().ok());
  EXPECT_EQ(t.file->Flush().code(), ErrorCode::kNoSpace);
  EXPECT_EQ(t.file->Flush().code(), ErrorCode::kNoSpace);
  t.file->controller().ClearFaults();
  EXPECT_TRUE(t.file->Flush().ok());
}

TEST(FaultFileTest, FailsAllocateTruncateAndPunchHole) {
  Fixture t;
  t.file->controller().AddFault({FaultOp::kAllocate, FaultTrigger::kAfterN, 0, ENOSPC, 0});
  t.file->controller().AddFault({FaultOp::kTruncate, FaultTrigger::kNth, 1, EIO, 0});
  t.file->controller().AddFault({FaultOp::kPunchHole, FaultTrigger::kNth, 1, EIO, 0});
  EXPECT_EQ(t.file->Allocate(0, 4096, false).code(), ErrorCode::kNoSpace);
  EXPECT_EQ(t.file->Truncate(100).code(), ErrorCode::kIoError);
  EXPECT_TRUE(t.file->Truncate(100).ok());
  EXPECT_EQ(t.file->PunchHole(0, 10).code(), ErrorCode::kIoError);
  auto c = t.file->controller().counters();
  EXPECT_EQ(c.allocates, 1u);
  EXPECT_EQ(c.truncates, 2u);
  EXPECT_EQ(c.punch_holes, 1u);
  EXPECT_EQ(c.faults_fired, 3u);
}

TEST(FaultFileTest, ShortWriteLandsThePrefixThenFails) {
  Fixture t;
  t.file->controller().AddFault({FaultOp::kWrite, FaultTrigger::kNth, 1, ENOSPC, 3});
  EXPECT_EQ(t.file->WriteAt(0, Bytes(10, 9)).code(), ErrorCode::kNoSpace);
  EXPECT_EQ(ReadAll(*t.disk), Bytes(3, 9));
}

TEST(FaultFileTest, PowerLossModeHoldsWritesUntilFlush) {
  Fixture t;
  ASSERT_TRUE(t.file->WriteAt(0, Bytes(1024, 1)).ok());
  t.file->controller().SetPowerLossMode(true);
  ASSERT_TRUE(t.file->WriteAt(512, Bytes(1024, 2)).ok());
  ASSERT_TRUE(t.file->PunchHole(0, 100).ok());
  // Reads see the overlay; the disk does not have it yet.
  auto seen = ReadAll(*t.file);
  ASSERT_EQ(seen.size(), 1536u);
  EXPECT_EQ(seen[0], 0);
  EXPECT_EQ(seen[100], 1);
  EXPECT_EQ(seen[600], 2);
  EXPECT_EQ(ReadAll(*t.disk), Bytes(1024, 1));
  EXPECT_EQ(t.file->controller().PendingBytes(), 1024u);
  ASSERT_TRUE(t.file->Flush().ok());
  EXPECT_EQ(ReadAll(*t.disk), seen);
  EXPECT_EQ(t.file->controller().PendingBytes(), 0u);
}

TEST(FaultFileTest, PendingTruncateShrinksWhatReadsSee) {
  Fixture t;
  ASSERT_TRUE(t.file->WriteAt(0, Bytes(1000, 5)).ok());
  t.file->controller().SetPowerLossMode(true);
  ASSERT_TRUE(t.file->Truncate(100).ok());
  ASSERT_TRUE(t.file->Allocate(0, 300, false).ok());
  EXPECT_EQ(*t.file->Size(), 300u);
  auto seen = ReadAll(*t.file);
  EXPECT_EQ(seen[99], 5);
  EXPECT_EQ(seen[100], 0);
  EXPECT_EQ(*t.disk->Size(), 1000u);
  ASSERT_TRUE(t.file->Flush().ok());
  EXPECT_EQ(ReadAll(*t.disk), seen);
}

TEST(FaultFileTest, FailedFlushKeepsWritesPending) {
  Fixture t;
  t.file->controller().SetPowerLossMode(true);
  t.file->controller().AddFault({FaultOp::kFlush, FaultTrigger::kNth, 1, EIO, 0});
  ASSERT_TRUE(t.file->WriteAt(0, Bytes(10, 3)).ok());
  EXPECT_FALSE(t.file->Flush().ok());
  EXPECT_EQ(*t.disk->Size(), 0u);
  ASSERT_TRUE(t.file->Flush().ok());
  EXPECT_EQ(ReadAll(*t.disk), Bytes(10, 3));
}

TEST(FaultFileTest, CrashDropsEverythingUnflushedAndKillsTheFile) {
  Fixture t;
  t.file->controller().SetPowerLossMode(true);
  ASSERT_TRUE(t.file->WriteAt(0, Bytes(100, 1)).ok());
  ASSERT_TRUE(t.file->Flush().ok());
  ASSERT_TRUE(t.file->WriteAt(0, Bytes(200, 2)).ok());
  ASSERT_TRUE(t.file->Crash().ok());
  EXPECT_EQ(ReadAll(*t.disk), Bytes(100, 1));
  EXPECT_TRUE(t.file->controller().crashed());
  std::vector<uint8_t> buf(1);
  EXPECT_EQ(t.file->ReadAt(0, buf).code(), ErrorCode::kIoError);
  EXPECT_EQ(t.file->WriteAt(0, buf).code(), ErrorCode::kIoError);
  EXPECT_EQ(t.file->Flush().code(), ErrorCode::kIoError);
  EXPECT_FALSE(t.file->Size().ok());
  EXPECT_EQ(ReadAll(*t.disk), Bytes(100, 1));
}

TEST(FaultFileTest, CrashTearsWritesAtSectorGranularityDeterministically) {
  auto run = [](uint64_t seed) -> std::vector<uint8_t> {
    Fixture t;
    EXPECT_TRUE(t.file->WriteAt(0, Bytes(64 * 512, 1)).ok());
    t.file->controller().SetPowerLossMode(true);
    // Unaligned on purpose: the tear follows absolute sector boundaries.
    EXPECT_TRUE(t.file->WriteAt(256, Bytes(63 * 512, 2)).ok());
    CrashOptions crash;
    crash.survive_probability = 0.5;
    crash.seed = seed;
    EXPECT_TRUE(t.file->Crash(crash).ok());
    return ReadAll(*t.disk);
  };
  std::vector<uint8_t> a, b, c;
  a = run(7);
  b = run(7);
  c = run(8);
  ASSERT_EQ(a.size(), 64u * 512);
  EXPECT_EQ(a, b);
  EXPECT_NE(a, c);
  int old_sectors = 0, new_sectors = 0;
  for (size_t s = 0; s < 64; ++s) {
    // Each sector is uniformly old or new: no tear inside a sector.
    const uint8_t first = a[s * 512 + (s == 0 ? 256 : 0)];
    const size_t end = s == 63 ? 256 : 512;  // the write ends mid-sector
    for (size_t i = (s == 0 ? 256 : 0); i < end; ++i) ASSERT_EQ(a[s * 512 + i], first) << "sector " << s;
    (first == 1 ? old_sectors : new_sectors)++;
  }
  EXPECT_GT(old_sectors, 5);
  EXPECT_GT(new_sectors, 5);
}

TEST(FaultFileTest, FileSystemTargetsOnePathAndSharesItsController) {
  auto base = NewMemFileSystem();
  FaultInjectingFileSystem fs(base.get());
  auto ctl = fs.Target("/a");
  ctl->AddFault({FaultOp::kWrite, FaultTrigger::kAfterN, 0, EIO, 0});
  FileOpenOptions fo;
  fo.create = true;
  auto a = fs.Open("/a", fo);
  auto b = fs.Open("/b", fo);
  ASSERT_TRUE(a.ok() && b.ok());
  EXPECT_FALSE((*a)->WriteAt(0, Bytes(1, 1)).ok());
  EXPECT_TRUE((*b)->WriteAt(0, Bytes(1, 1)).ok());
  auto a2 = fs.Open("/a", {});
  EXPECT_FALSE((*a2)->WriteAt(0, Bytes(1, 1)).ok());
  EXPECT_EQ(ctl->counters().writes, 2u);
  EXPECT_TRUE(fs.Exists("/b"));
  EXPECT_EQ(fs.Crash("/b").code(), ErrorCode::kNotFound);
}

TEST(FaultFileTest, FileSystemCrashThenReopenSeesOnlyFlushedData) {
  auto base = NewMemFileSystem();
  FaultInjectingFileSystem fs(base.get());
  fs.Target("/a")->SetPowerLossMode(true);
  FileOpenOptions fo;
  fo.create = true;
  auto f = std::move(fs.Open("/a", fo)).value();
  ASSERT_TRUE(f->WriteAt(0, Bytes(10, 1)).ok());
  ASSERT_TRUE(f->Flush().ok());
  ASSERT_TRUE(f->WriteAt(5, Bytes(10, 2)).ok());
  ASSERT_TRUE(fs.Crash("/a").ok());
  EXPECT_FALSE(f->WriteAt(0, Bytes(1, 3)).ok());  // the old handle is dead
  auto again = std::move(fs.Open("/a", {})).value();
  EXPECT_EQ(ReadAll(*again), Bytes(10, 1));
  EXPECT_TRUE(again->WriteAt(0, Bytes(1, 4)).ok());  // a fresh controller after "reboot"
}

TEST(FaultFileTest, ConcurrentWritersThenFlushKeepEveryWrite) {
  Fixture t;
  t.file->controller().SetPowerLossMode(true);
  std::vector<std::thread> threads;
  for (int th = 0; th < 4; ++th)
    threads.emplace_back([&, th] {
      for (int i = 0; i < 100; ++i)
        EXPECT_TRUE(t.file->WriteAt((th * 100 + i) * 16ull, Bytes(16, static_cast<uint8_t>(th + 1))).ok());
    });
  for (auto& th : threads) th.join();
  ASSERT_TRUE(t.file->Flush().ok());
  auto disk = ReadAll(*t.disk);
  ASSERT_EQ(disk.size(), 400u * 16);
  for (int th = 0; th < 4; ++th) EXPECT_EQ(disk[(th * 100 + 50) * 16], th + 1);
  EXPECT_EQ(t.file->controller().counters().writes, 400u);
}

}  // namespace
}  // namespace cowtap::cow
