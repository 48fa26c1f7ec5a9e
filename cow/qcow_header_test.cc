// qcow v1 header and table validation: one test per rejected condition at
// open, and entries found invalid at run time (kCorrupt naming the file and
// offset, further writes refused).
#include <gtest/gtest.h>

#include "cow/qcow_format.h"
#include "cow/qcow_test_util.h"

namespace cowtap::cow {
namespace {

using namespace qcow_test;  // NOLINT: the shared fixture and helpers

// --- Rejected headers: one test per condition ------------------------------

class QcowHeaderTest : public QcowTest {
 protected:
  void SetUp() override { Create("/h.qcow", ImageFormat::kQcow, 4 * kMiB); }
};

TEST_F(QcowHeaderTest, ValidImageOpens) { EXPECT_NE(Open("/h.qcow"), nullptr); }

TEST_F(QcowHeaderTest, RejectsFileShorterThanHeader) {
  FileOpenOptions fo;
  fo.create = true;
  auto f = fs_->Open("/short.qcow", fo);
  ASSERT_TRUE((*f)->WriteAt(0, std::vector<uint8_t>{0x51, 0x46, 0x49, 0xfb, 0, 0, 0, 1}).ok());
  ExpectOpenFails("/short.qcow", ErrorCode::kCorrupt, "shorter than the 48-byte header");
}

TEST_F(QcowHeaderTest, RejectsBadMagic) {
  PatchBe32("/h.qcow", 0, 0x12345678);
  ExpectOpenFails("/h.qcow", ErrorCode::kCorrupt, "bad magic");
}

TEST_F(QcowHeaderTest, RejectsVersionOtherThanOne) {
  PatchBe32("/h.qcow", 4, 2);
  ExpectOpenFails("/h.qcow", ErrorCode::kNotSupported, "version 2");
}

TEST_F(QcowHeaderTest, RejectsEncryption) {
  PatchBe32("/h.qcow", 36, 1);
  ExpectOpenFails("/h.qcow", ErrorCode::kNotSupported, "encryption");
}

TEST_F(QcowHeaderTest, RejectsClusterBitsBelow9) {
  Patch("/h.qcow", 32, std::array<uint8_t, 1>{8});
  ExpectOpenFails("/h.qcow", ErrorCode::kCorrupt, "cluster_bits 8");
}

TEST_F(QcowHeaderTest, RejectsClusterBitsAbove16) {
  Patch("/h.qcow", 32, std::array<uint8_t, 1>{17});
  ExpectOpenFails("/h.qcow", ErrorCode::kCorrupt, "cluster_bits 17");
}

TEST_F(QcowHeaderTest, RejectsL2BitsBelow6) {
  Patch("/h.qcow", 33, std::array<uint8_t, 1>{5});
  ExpectOpenFails("/h.qcow", ErrorCode::kCorrupt, "l2_bits 5");
}

TEST_F(QcowHeaderTest, RejectsL2BitsAbove13) {
  Patch("/h.qcow", 33, std::array<uint8_t, 1>{14});
  ExpectOpenFails("/h.qcow", ErrorCode::kCorrupt, "l2_bits 14");
}

TEST_F(QcowHeaderTest, RejectsTinyVirtualSize) {
  PatchBe64("/h.qcow", 24, 1);
  ExpectOpenFails("/h.qcow", ErrorCode::kCorrupt, "too small");
}

TEST_F(QcowHeaderTest, RejectsVirtualSizeNeedingHugeL1) {
  PatchBe64("/h.qcow", 24, ~0ull);
  ExpectOpenFails("/h.qcow", ErrorCode::kCorrupt, "more than the limit");
}

TEST_F(QcowHeaderTest, RejectsL1InsideHeader) {
  PatchBe64("/h.qcow", 40, 8);
  ExpectOpenFails("/h.qcow", ErrorCode::kCorrupt, "overlaps the header");
}

TEST_F(QcowHeaderTest, RejectsL1PastEndOfFile) {
  PatchBe64("/h.qcow", 40, 1 * kMiB);
  ExpectOpenFails("/h.qcow", ErrorCode::kCorrupt, "past the end of the file");
}

TEST_F(QcowHeaderTest, RejectsL1LargerThanFile) {
  // 4 GiB of virtual size needs 2048 L1 entries = 16 KiB; the file has 560 bytes.
  PatchBe64("/h.qcow", 24, 4096 * kMiB);
  ExpectOpenFails("/h.qcow", ErrorCode::kCorrupt, "L1 table");
}

TEST_F(QcowHeaderTest, RejectsEmptyBackingName) {
  PatchBe64("/h.qcow", 8, 48);
  PatchBe32("/h.qcow", 16, 0);
  ExpectOpenFails("/h.qcow", ErrorCode::kCorrupt, "is empty");
}

TEST_F(QcowHeaderTest, RejectsBackingNameLongerThan1023) {
  PatchBe64("/h.qcow", 8, 48);
  PatchBe32("/h.qcow", 16, 1024);
  ExpectOpenFails("/h.qcow", ErrorCode::kCorrupt, "exceeds 1023");
}

TEST_F(QcowHeaderTest, RejectsBackingNamePastEndOfFile) {
  PatchBe64("/h.qcow", 8, 550);
  PatchBe32("/h.qcow", 16, 100);
  ExpectOpenFails("/h.qcow", ErrorCode::kCorrupt, "past the end of the file");
}

TEST_F(QcowHeaderTest, RejectsBackingNameInsideHeader) {
  PatchBe64("/h.qcow", 8, 40);
  PatchBe32("/h.qcow", 16, 4);
  ExpectOpenFails("/h.qcow", ErrorCode::kCorrupt, "overlaps the header");
}

TEST_F(QcowHeaderTest, RejectsBackingNameOverlappingL1) {
  PatchBe64("/h.qcow", 8, 50);
  PatchBe32("/h.qcow", 16, 4);
  ExpectOpenFails("/h.qcow", ErrorCode::kCorrupt, "overlaps the L1 table");
}

TEST_F(QcowHeaderTest, RejectsBackingNameWithNul) {
  Create("/base.raw", ImageFormat::kRaw, 4 * kMiB);
  Create("/o.qcow", ImageFormat::kQcow, 0, "base.raw");
  Patch("/o.qcow", 50, std::array<uint8_t, 1>{0});
  ExpectOpenFails("/o.qcow", ErrorCode::kCorrupt, "NUL");
}

TEST_F(QcowHeaderTest, RejectsUnalignedL1Entry) {
  PatchBe64("/h.qcow", 48, 4096 + 8);
  Patch("/h.qcow", 8191, std::array<uint8_t, 1>{0});  // make the file long enough
  ExpectOpenFails("/h.qcow", ErrorCode::kCorrupt, "not aligned");
}

TEST_F(QcowHeaderTest, RejectsL1EntryPastEndOfFile) {
  PatchBe64("/h.qcow", 48, 64 * 4096);
  ExpectOpenFails("/h.qcow", ErrorCode::kCorrupt, "past the end of the file");
}

TEST_F(QcowHeaderTest, RejectsL1EntryPointingAtMetadata) {
  // 8 GiB with 4 KiB clusters: an L1 table of 4096 entries at 48..32816.
  Create("/big.qcow", ImageFormat::kQcow, 1ull << 33);
  PatchBe64("/big.qcow", 48, 4096);  // an aligned offset inside the L1 table itself
  ExpectOpenFails("/big.qcow", ErrorCode::kCorrupt, "overlaps the header or L1");
}

// --- Entries found invalid at run time -------------------------------------

TEST_F(QcowTest, UnalignedL2EntryFailsReadAndStopsWrites) {
  Create("/a.qcow", ImageFormat::kQcow, 4 * kMiB);
  {
    auto img = Open("/a.qcow");
    ASSERT_TRUE(Write(*img, 0, Pattern(4096, 1)).ok());
    ASSERT_TRUE(img->Close().ok());
  }
  const uint64_t l2 = L1Entry("/a.qcow", 0);
  PatchBe64("/a.qcow", l2, 4096 * 3 + 16);
  auto img = Open("/a.qcow");
  std::vector<uint8_t> buf(512);
  iovec v = MakeIoVec(buf.data(), buf.size());
  Status s = img->Read(0, IoVecs(&v, 1));
  EXPECT_EQ(s.code(), ErrorCode::kCorrupt) << s.ToString();
  EXPECT_NE(s.message().find("guest cluster 0"), std::string::npos) << s.ToString();
  // Other clusters still read; writes are refused from now on.
  EXPECT_EQ(Read(*img, 8192, 512), std::vector<uint8_t>(512, 0));
  EXPECT_EQ(Write(*img, 8192, Pattern(512, 2)).code(), ErrorCode::kCorrupt);
}

TEST_F(QcowTest, L2EntryPastEndOfFileIsCorrupt) {
  Create("/a.qcow", ImageFormat::kQcow, 4 * kMiB);
  {
    auto img = Open("/a.qcow");
    ASSERT_TRUE(Write(*img, 0, Pattern(4096, 1)).ok());
  }
  PatchBe64("/a.qcow", L1Entry("/a.qcow", 0) + 8, 1024 * 4096);
  auto img = Open("/a.qcow");
  std::vector<uint8_t> buf(4096);
  iovec v = MakeIoVec(buf.data(), buf.size());
  EXPECT_EQ(img->Read(4096, IoVecs(&v, 1)).code(), ErrorCode::kCorrupt);
}

}  // namespace
}  // namespace cowtap::cow
