#include "xen-glue/workload_journal.h"

#include <gtest/gtest.h>
#include <unistd.h>

#include <cstdlib>
#include <fstream>

#include "xen-glue/blkfront_workload.h"

namespace cowtap::xen {
namespace {

using T = JournalRecordType;

JournalRecord R(T type, uint64_t cookie, uint64_t sector = 0, uint32_t nr = 0, uint32_t generation = 0) {
  return {type, nr, generation, sector, cookie};
}

// The allowance of one sector after replaying records over four sectors that
// start as generation 0 (region from sector 100).
SectorAllowance AllowanceOf(uint64_t sector, const std::vector<JournalRecord>& records) {
  auto allow = ReplayJournal(std::vector<uint32_t>(4, 0), 100, records);
  EXPECT_TRUE(allow.ok()) << allow.status().ToString();
  return allow.ok() ? (*allow)[sector - 100] : SectorAllowance{};
}

TEST(WorkloadJournalTest, WithoutACompletedFlushTheInitialContentAndEveryIssuedWriteAreAllowed) {
  const SectorAllowance a =
      AllowanceOf(101, {R(T::kWriteIssued, 1, 100, 2, 5), R(T::kWriteAcked, 1, 100, 2, 5), R(T::kFlushIssued, 2)});
  EXPECT_EQ(CheckSector(101, 0, a), "");
  EXPECT_EQ(CheckSector(101, 5, a), "");
  EXPECT_NE(CheckSector(101, kTagZero, a), "");
  EXPECT_NE(CheckSector(101, 4, a), "");
}

TEST(WorkloadJournalTest, AWriteAckedBeforeACompletedFlushMustReadBack) {
  const SectorAllowance a = AllowanceOf(100, {R(T::kWriteIssued, 1, 100, 1, 5), R(T::kWriteAcked, 1, 100, 1, 5),
                                              R(T::kFlushIssued, 2), R(T::kFlushAcked, 2)});
  EXPECT_EQ(CheckSector(100, 5, a), "");
  EXPECT_NE(CheckSector(100, 0, a), "") << "the flushed write was lost";
  EXPECT_NE(CheckSector(100, std::nullopt, a), "");
}

TEST(WorkloadJournalTest, AWriteAckedAfterTheFlushWasIssuedIsNotCoveredByIt) {
  const SectorAllowance a = AllowanceOf(100, {R(T::kWriteIssued, 1, 100, 1, 5), R(T::kFlushIssued, 2),
                                              R(T::kWriteAcked, 1, 100, 1, 5), R(T::kFlushAcked, 2)});
  EXPECT_EQ(CheckSector(100, 0, a), "");
  EXPECT_EQ(CheckSector(100, 5, a), "");
}

TEST(WorkloadJournalTest, TheLastIssuedCompletedFlushIsTheDurablePointWhateverTheAckOrder) {
  const SectorAllowance a =
      AllowanceOf(100, {R(T::kWriteIssued, 1, 100, 1, 5), R(T::kWriteAcked, 1, 100, 1, 5), R(T::kFlushIssued, 2),
                        R(T::kWriteIssued, 3, 100, 1, 6), R(T::kWriteAcked, 3, 100, 1, 6), R(T::kFlushIssued, 4),
                        R(T::kFlushAcked, 4), R(T::kFlushAcked, 2), R(T::kWriteIssued, 5, 100, 1, 7)});
  EXPECT_EQ(CheckSector(100, 6, a), "");
  EXPECT_EQ(CheckSector(100, 7, a), "");
  EXPECT_NE(CheckSector(100, 5, a), "") << "an older generation came back";
}

TEST(WorkloadJournalTest, ADiscardMakesZeroAllowedWhetherFlushedOrNot) {
  const std::vector<JournalRecord> flushed = {R(T::kDiscardIssued, 1, 102, 2), R(T::kDiscardAcked, 1, 102, 2),
                                              R(T::kFlushIssued, 2), R(T::kFlushAcked, 2)};
  EXPECT_EQ(CheckSector(102, kTagZero, AllowanceOf(102, flushed)), "");
  EXPECT_EQ(CheckSector(102, 0, AllowanceOf(102, flushed)), "") << "discard may leave the previous content";
  EXPECT_NE(CheckSector(101, kTagZero, AllowanceOf(101, flushed)), "") << "outside the discarded range";
  const std::vector<JournalRecord> in_flight = {R(T::kFlushIssued, 2), R(T::kFlushAcked, 2),
                                                R(T::kDiscardIssued, 3, 100, 1)};
  EXPECT_EQ(CheckSector(100, kTagZero, AllowanceOf(100, in_flight)), "");
}

TEST(WorkloadJournalTest, AZeroSectorStaysZeroUnlessWrittenLater) {
  auto allow = ReplayJournal({kTagZero, kTagZero}, 0, {R(T::kWriteIssued, 1, 1, 1, 9)});
  ASSERT_TRUE(allow.ok());
  EXPECT_EQ(CheckSector(0, kTagZero, (*allow)[0]), "");
  EXPECT_NE(CheckSector(0, 0, (*allow)[0]), "");
  EXPECT_EQ(CheckSector(1, 9, (*allow)[1]), "");
}

TEST(WorkloadJournalTest, RejectsRecordsOutsideTheRegionAndAcksWithoutIssue) {
  EXPECT_FALSE(ReplayJournal(std::vector<uint32_t>(4, 0), 100, {R(T::kWriteIssued, 1, 103, 2, 5)}).ok());
  EXPECT_FALSE(ReplayJournal(std::vector<uint32_t>(4, 0), 100, {R(T::kWriteIssued, 1, 99, 1, 5)}).ok());
  EXPECT_FALSE(ReplayJournal(std::vector<uint32_t>(4, 0), 100, {R(T::kFlushAcked, 7)}).ok());
}

TEST(WorkloadJournalTest, ObservedTagNamesExactPatternsOnly) {
  uint8_t sector[kGuestSectorBytes];
  FillWorkloadPattern(42, 7, 99, sector);
  EXPECT_EQ(ObservedTag(42, sector, 99, 5), 7u);
  EXPECT_EQ(ObservedTag(43, sector, 99, 5), std::nullopt) << "a misplaced sector";
  sector[300] ^= 1;
  EXPECT_EQ(ObservedTag(42, sector, 99, 5), std::nullopt) << "a flipped byte";
  FillWorkloadPattern(42, 0, 5, sector);
  EXPECT_EQ(ObservedTag(42, sector, 99, 5), 0u);
  std::fill(sector, sector + kGuestSectorBytes, 0);
  EXPECT_EQ(ObservedTag(42, sector, 99, 5), kTagZero);
}

TEST(WorkloadJournalTest, WriterRecordsRoundTripAndATornTailIsDropped) {
  char tmpl[] = "/tmp/cowtap-journal-XXXXXX";
  const int fd = ::mkstemp(tmpl);
  ASSERT_GE(fd, 0);
  ::close(fd);
  const std::string path = tmpl;
  {
    auto w = JournalWriter::Create(path);
    ASSERT_TRUE(w.ok());
    (*w)->Add(R(T::kWriteIssued, 1, 100, 8, 3));
    (*w)->Add(R(T::kFlushAcked, 2));
    ASSERT_TRUE((*w)->Commit().ok());
  }
  {
    std::ofstream torn(path, std::ios::binary | std::ios::app);
    torn.write("\x01\x00\x00\x00\x08", 5);
  }
  auto records = ReadJournal(path);
  ASSERT_TRUE(records.ok()) << records.status().ToString();
  ASSERT_EQ(records->size(), 2u);
  EXPECT_EQ((*records)[0].type, T::kWriteIssued);
  EXPECT_EQ((*records)[0].sector, 100u);
  EXPECT_EQ((*records)[0].nr_sectors, 8u);
  EXPECT_EQ((*records)[0].generation, 3u);
  EXPECT_EQ((*records)[1].cookie, 2u);
  ASSERT_TRUE(WriteModelFile(path, {1, kTagZero, 3}).ok());
  auto model = ReadModelFile(path);
  ASSERT_TRUE(model.ok());
  EXPECT_EQ(*model, (std::vector<uint32_t>{1, kTagZero, 3}));
  ::unlink(path.c_str());
}

}  // namespace
}  // namespace cowtap::xen
