// Pure codec tests: one test per rejected header condition, L1/L2 entry
// classification and rejection, compressed descriptors, refcount entries of
// every width, snapshot entries, and the cluster compressors.
#include "cow/qcow2_format.h"

#include <gtest/gtest.h>

#include <random>

#include "base/endian.h"
#include "cow/compress.h"

namespace cowtap::cow {
namespace {

constexpr uint64_t kFileSize = 1 << 20;

Qcow2Header ValidHeader() {
  Qcow2Header h;
  h.version = 3;
  h.cluster_bits = 16;
  h.size = 1 << 30;
  h.l1_size = 2;
  h.l1_table_offset = 3 << 16;
  h.refcount_table_offset = 1 << 16;
  h.refcount_table_clusters = 1;
  h.header_length = 112;
  return h;
}

std::vector<uint8_t> Encode(const Qcow2Header& h) {
  auto r = EncodeQcow2Header(h);
  EXPECT_TRUE(r.ok()) << r.status().ToString();
  return *r;
}

Status Parse(const std::vector<uint8_t>& b, uint64_t file_size = kFileSize) {
  return ParseQcow2Header(b, file_size, "t.qcow2").status();
}

TEST(Qcow2HeaderTest, ValidHeaderRoundTrips) {
  Qcow2Header h = ValidHeader();
  h.backing_file = "base.raw";
  h.backing_format = "raw";
  h.compatible_features = kQcow2CompatLazyRefcounts;
  h.other_extensions.push_back({0x12345678, {1, 2, 3}});
  auto p = ParseQcow2Header(Encode(h), kFileSize, "t");
  ASSERT_TRUE(p.ok()) << p.status().ToString();
  EXPECT_EQ(p->backing_file, "base.raw");
  EXPECT_EQ(p->backing_format, "raw");
  EXPECT_EQ(p->size, h.size);
  EXPECT_EQ(p->l1_size, 2u);
  EXPECT_EQ(p->compatible_features, kQcow2CompatLazyRefcounts);
  ASSERT_EQ(p->other_extensions.size(), 1u);  // unknown extension preserved
  EXPECT_EQ(p->other_extensions[0].data, (std::vector<uint8_t>{1, 2, 3}));
}

TEST(Qcow2HeaderTest, BadMagicRefused) {
  auto b = Encode(ValidHeader());
  b[0] = 'X';
  EXPECT_EQ(Parse(b).code(), ErrorCode::kCorrupt);
}

TEST(Qcow2HeaderTest, Version4Refused) {
  auto b = Encode(ValidHeader());
  StoreBe32(&b[4], 4);
  Status s = Parse(b);
  EXPECT_EQ(s.code(), ErrorCode::kNotSupported);
  EXPECT_NE(s.message().find("version 4"), std::string::npos) << s.message();
}

TEST(Qcow2HeaderTest, ClusterBitsOutOfRangeRefused) {
  for (uint32_t bits : {8u, 22u}) {
    auto b = Encode(ValidHeader());
    StoreBe32(&b[20], bits);
    EXPECT_EQ(Parse(b).code(), ErrorCode::kCorrupt) << bits;
  }
}

TEST(Qcow2HeaderTest, ExtendedL2WithSmallClustersRefused) {
  Qcow2Header h = ValidHeader();
  h.cluster_bits = 13;
  h.l1_table_offset = 3 << 13;
  h.refcount_table_offset = 1 << 13;
  h.l1_size = 1024;
  h.incompatible_features = kQcow2IncompatExtendedL2;
  EXPECT_EQ(Parse(Encode(h)).code(), ErrorCode::kCorrupt);
}

TEST(Qcow2HeaderTest, UnknownIncompatibleBitRefusedWithItsName) {
  Qcow2Header h = ValidHeader();
  h.incompatible_features = 1ull << 9;
  h.feature_names = {{0, 9, "frobnicated clusters"}};
  Status s = Parse(Encode(h));
  EXPECT_EQ(s.code(), ErrorCode::kNotSupported);
  EXPECT_NE(s.message().find("frobnicated clusters"), std::string::npos) << s.message();
  h.feature_names.clear();
  s = Parse(Encode(h));
  EXPECT_NE(s.message().find("bit 9"), std::string::npos) << s.message();
}

TEST(Qcow2HeaderTest, UnknownCompatibleAndAutoclearBitsAccepted) {
  Qcow2Header h = ValidHeader();
  h.compatible_features = 1ull << 40;
  h.autoclear_features = 1ull << 33;
  EXPECT_TRUE(Parse(Encode(h)).ok());
}

TEST(Qcow2HeaderTest, EncryptionRefused) {
  Qcow2Header h = ValidHeader();
  h.crypt_method = 2;
  EXPECT_EQ(Parse(Encode(h)).code(), ErrorCode::kNotSupported);
}

TEST(Qcow2HeaderTest, HeaderLengthRules) {
  for (uint32_t len : {100u, 108u, 70000u}) {
    auto b = Encode(ValidHeader());
    StoreBe32(&b[100], len);
    EXPECT_EQ(Parse(b).code(), ErrorCode::kCorrupt) << len;
  }
}

TEST(Qcow2HeaderTest, L1TooSmallForVirtualSizeRefused) {
  Qcow2Header h = ValidHeader();
  h.size = 3ull << 30;  // needs 6 L1 entries at 64 KiB clusters
  EXPECT_EQ(Parse(Encode(h)).code(), ErrorCode::kCorrupt);
}

TEST(Qcow2HeaderTest, L1LargerThan32MiBRefused) {
  Qcow2Header h = ValidHeader();
  h.l1_size = (32 << 20) / 8 + 1;
  EXPECT_EQ(Parse(Encode(h), 1ull << 40).code(), ErrorCode::kCorrupt);
}

TEST(Qcow2HeaderTest, L1TableBeyondEndOfFileRefused) {
  Qcow2Header h = ValidHeader();
  h.l1_table_offset = kFileSize;
  EXPECT_EQ(Parse(Encode(h)).code(), ErrorCode::kCorrupt);
}

TEST(Qcow2HeaderTest, MisalignedL1OffsetRefused) {
  Qcow2Header h = ValidHeader();
  h.l1_table_offset = (3 << 16) + 512;
  EXPECT_EQ(Parse(Encode(h)).code(), ErrorCode::kCorrupt);
}

TEST(Qcow2HeaderTest, OffsetAbove2To56Refused) {
  Qcow2Header h = ValidHeader();
  h.refcount_table_offset = 1ull << 56;
  EXPECT_EQ(Parse(Encode(h), ~0ull).code(), ErrorCode::kCorrupt);
}

TEST(Qcow2HeaderTest, RefcountTableOver8MiBRefused) {
  Qcow2Header h = ValidHeader();
  h.refcount_table_clusters = (8 << 20) / 65536 + 1;
  EXPECT_EQ(Parse(Encode(h), 1ull << 30).code(), ErrorCode::kCorrupt);
}

TEST(Qcow2HeaderTest, RefcountOrderAbove6Refused) {
  Qcow2Header h = ValidHeader();
  h.refcount_order = 7;
  EXPECT_EQ(Parse(Encode(h)).code(), ErrorCode::kCorrupt);
}

TEST(Qcow2HeaderTest, BackingNameOutsideFirstClusterRefused) {
  Qcow2Header h = ValidHeader();
  h.backing_file = "base";
  auto b = Encode(h);
  StoreBe64(&b[8], 65536 - 2);  // runs past the first cluster
  EXPECT_EQ(Parse(b).code(), ErrorCode::kCorrupt);
}

TEST(Qcow2HeaderTest, BackingNameTooLongRefused) {
  Qcow2Header h = ValidHeader();
  h.backing_file = "base";
  auto b = Encode(h);
  StoreBe32(&b[16], 1024);
  EXPECT_EQ(Parse(b).code(), ErrorCode::kCorrupt);
}

TEST(Qcow2HeaderTest, CompressionTypeWithoutFeatureBitRefused) {
  Qcow2Header h = ValidHeader();
  h.compression_type = 1;
  EXPECT_EQ(Parse(Encode(h)).code(), ErrorCode::kCorrupt);
  h.incompatible_features = kQcow2IncompatCompression;
  EXPECT_TRUE(Parse(Encode(h)).ok());
}

TEST(Qcow2HeaderTest, ExtensionRunningPastClusterRefused) {
  Qcow2Header h = ValidHeader();
  auto b = Encode(h);
  StoreBe32(&b[112], 0x12345678);
  StoreBe32(&b[116], 70000);
  EXPECT_EQ(Parse(b).code(), ErrorCode::kCorrupt);
}

TEST(Qcow2HeaderTest, ExtensionsParsed) {
  Qcow2Header h = ValidHeader();
  h.incompatible_features = kQcow2IncompatDataFile;
  h.data_file = "disk.data";
  h.other_extensions.push_back({kQcow2ExtBitmaps, std::vector<uint8_t>(24, 0)});
  auto p = ParseQcow2Header(Encode(h), kFileSize, "t");
  ASSERT_TRUE(p.ok()) << p.status().ToString();
  EXPECT_EQ(p->data_file, "disk.data");
  EXPECT_TRUE(p->has_bitmaps_extension);
}

TEST(Qcow2HeaderTest, Version2HeaderParses) {
  Qcow2Header h = ValidHeader();
  h.version = 2;
  auto p = ParseQcow2Header(Encode(h), kFileSize, "t");
  ASSERT_TRUE(p.ok()) << p.status().ToString();
  EXPECT_EQ(p->refcount_order, 4u);
  EXPECT_EQ(p->header_length, 72u);
}

// --- L1 / L2 entries -------------------------------------------------------

TEST(Qcow2EntryTest, L2Classification) {
  Qcow2Header h = ValidHeader();
  auto cls = [&](uint64_t raw) { return ClassifyQcow2L2Entry({raw, 0}, h, false, 0, "t"); };
  EXPECT_EQ(*cls(0), Qcow2ClusterType::kUnallocated);
  EXPECT_EQ(*cls(kQcow2ZeroFlag), Qcow2ClusterType::kZeroPlain);
  EXPECT_EQ(*cls(0x50000 | kQcow2ZeroFlag | kQcow2Copied), Qcow2ClusterType::kZeroAlloc);
  EXPECT_EQ(*cls(0x50000 | kQcow2Copied), Qcow2ClusterType::kNormal);
  EXPECT_EQ(*cls(kQcow2Compressed | 0x12345), Qcow2ClusterType::kCompressed);
}

TEST(Qcow2EntryTest, MisalignedL2DataOffsetRejected) {
  Qcow2Header h = ValidHeader();
  auto r = ClassifyQcow2L2Entry({0x50200, 0}, h, false, 0x30000, "t");
  EXPECT_EQ(r.status().code(), ErrorCode::kCorrupt);
  EXPECT_NE(r.status().message().find("0x30000"), std::string::npos);
}

TEST(Qcow2EntryTest, ReservedL2BitsRejected) {
  Qcow2Header h = ValidHeader();
  EXPECT_EQ(ClassifyQcow2L2Entry({0x50000 | (1ull << 58), 0}, h, false, 0, "t").status().code(), ErrorCode::kCorrupt);
  EXPECT_EQ(ClassifyQcow2L2Entry({0x50000 | 2, 0}, h, false, 0, "t").status().code(), ErrorCode::kCorrupt);
}

TEST(Qcow2EntryTest, ZeroFlagInVersion2Rejected) {
  Qcow2Header h = ValidHeader();
  h.version = 2;
  EXPECT_EQ(ClassifyQcow2L2Entry({kQcow2ZeroFlag, 0}, h, false, 0, "t").status().code(), ErrorCode::kCorrupt);
}

TEST(Qcow2EntryTest, CompressedClusterWithDataFileRejected) {
  Qcow2Header h = ValidHeader();
  EXPECT_EQ(ClassifyQcow2L2Entry({kQcow2Compressed | 0x1000, 0}, h, true, 0, "t").status().code(), ErrorCode::kCorrupt);
}

TEST(Qcow2EntryTest, ExtendedL2BitmapRules) {
  Qcow2Header h = ValidHeader();
  h.incompatible_features = kQcow2IncompatExtendedL2;
  // Allocated and zero at once.
  EXPECT_EQ(ClassifyQcow2L2Entry({0x50000 | kQcow2Copied, 0x100000001ull}, h, false, 0, "t").status().code(),
            ErrorCode::kCorrupt);
  // Allocated subclusters without a host cluster.
  EXPECT_EQ(ClassifyQcow2L2Entry({0, 1}, h, false, 0, "t").status().code(), ErrorCode::kCorrupt);
  // Zero flag is not used with extended L2.
  EXPECT_EQ(ClassifyQcow2L2Entry({kQcow2ZeroFlag, 0}, h, false, 0, "t").status().code(), ErrorCode::kCorrupt);
  EXPECT_EQ(*ClassifyQcow2L2Entry({0, 0xffffffff00000000ull}, h, false, 0, "t"), Qcow2ClusterType::kZeroPlain);
  EXPECT_EQ(*ClassifyQcow2L2Entry({0x50000 | kQcow2Copied, 3}, h, false, 0, "t"), Qcow2ClusterType::kNormal);
}

TEST(Qcow2EntryTest, L1EntryRules) {
  Qcow2Header h = ValidHeader();
  EXPECT_EQ(*DecodeQcow2L1Entry(0x70000 | kQcow2Copied, h, 0, "t"), 0x70000u);
  EXPECT_EQ(DecodeQcow2L1Entry(0x70000 | 1, h, 0, "t").status().code(), ErrorCode::kCorrupt);
  EXPECT_EQ(DecodeQcow2L1Entry(0x70200, h, 0, "t").status().code(), ErrorCode::kCorrupt);
}

TEST(Qcow2EntryTest, CompressedDescriptorRoundTrip) {
  for (uint32_t bits : {9u, 12u, 16u, 21u}) {
    for (uint64_t off : {uint64_t{0x10000}, uint64_t{0x12345}, uint64_t{(1ull << 40) + 777}}) {
      for (uint64_t len : {uint64_t{1}, uint64_t{511}, uint64_t{512}, uint64_t{1} << bits}) {
        uint64_t raw = EncodeQcow2Compressed(off, len, bits);
        auto d = DecodeQcow2Compressed(raw, bits);
        EXPECT_EQ(d.host_offset, off);
        EXPECT_GE(d.max_length, len);
        EXPECT_LT(d.max_length, len + 512);
      }
    }
  }
}

// --- refcounts ---------------------------------------------------------------

TEST(Qcow2RefcountCodecTest, EveryWidthRoundTrips) {
  std::mt19937_64 rng(1);
  for (uint32_t order = 0; order <= 6; ++order) {
    const uint64_t entries = 4096 * 8 >> order;
    std::vector<uint8_t> block(4096, 0);
    std::vector<uint64_t> want(entries);
    for (uint64_t i = 0; i < entries; ++i) {
      want[i] = rng() & Qcow2MaxRefcount(order);
      SetQcow2Refcount(block, i, order, want[i]);
    }
    for (uint64_t i = 0; i < entries; ++i) ASSERT_EQ(GetQcow2Refcount(block, i, order), want[i]) << order;
  }
}

TEST(Qcow2RefcountCodecTest, SubBytePackingIsLsbFirstAndWideIsBigEndian) {
  std::vector<uint8_t> b(8, 0);
  SetQcow2Refcount(b, 0, 0, 1);
  SetQcow2Refcount(b, 3, 0, 1);
  EXPECT_EQ(b[0], 0x09);
  std::fill(b.begin(), b.end(), 0);
  SetQcow2Refcount(b, 1, 2, 0xa);  // 4-bit entry 1 = high nibble of byte 0
  EXPECT_EQ(b[0], 0xa0);
  std::fill(b.begin(), b.end(), 0);
  SetQcow2Refcount(b, 0, 4, 0x0102);
  EXPECT_EQ(b[0], 0x01);
  EXPECT_EQ(b[1], 0x02);
}

// --- snapshots -----------------------------------------------------------------

TEST(Qcow2SnapshotCodecTest, EntryRoundTrips) {
  Qcow2Header h = ValidHeader();
  Qcow2Snapshot s;
  s.l1_table_offset = 5 << 16;
  s.l1_size = 2;
  s.id = "1";
  s.name = "before-upgrade";
  s.date_sec = 1234;
  s.extra_data.resize(24, 0);
  StoreBe64(&s.extra_data[8], 1 << 30);
  auto bytes = EncodeQcow2Snapshot(s);
  EXPECT_EQ(bytes.size() % 8, 0u);
  EXPECT_EQ(Qcow2SnapshotEntryBytes(bytes), bytes.size());
  auto p = ParseQcow2Snapshot(bytes, h, kFileSize, 0, "t");
  ASSERT_TRUE(p.ok()) << p.status().ToString();
  EXPECT_EQ(p->name, "before-upgrade");
  EXPECT_EQ(p->id, "1");
  EXPECT_EQ(p->disk_size, 1u << 30);
  EXPECT_EQ(p->l1_table_offset, s.l1_table_offset);
}

TEST(Qcow2SnapshotCodecTest, SnapshotL1BeyondEndOfFileRejected) {
  Qcow2Header h = ValidHeader();
  Qcow2Snapshot s;
  s.l1_table_offset = kFileSize;
  s.l1_size = 1;
  EXPECT_EQ(ParseQcow2Snapshot(EncodeQcow2Snapshot(s), h, kFileSize, 0, "t").status().code(), ErrorCode::kCorrupt);
}

// --- compression -------------------------------------------------------------

TEST(CompressTest, DeflateAndZstdRoundTripWithTrailingBytes) {
  std::vector<uint8_t> cluster(65536);
  for (size_t i = 0; i < cluster.size(); ++i) cluster[i] = static_cast<uint8_t>((i / 100) % 7);
  for (auto type : {CompressionType::kDeflate, CompressionType::kZstd}) {
    auto c = CompressCluster(type, cluster);
    ASSERT_TRUE(c.ok());
    ASSERT_FALSE(c->empty());
    c->insert(c->end(), 300, 0xee);  // the next stream's bytes in the last sector
    std::vector<uint8_t> out(cluster.size());
    Status s = DecompressCluster(type, *c, out, "t");
    ASSERT_TRUE(s.ok()) << s.ToString();
    EXPECT_EQ(out, cluster);
  }
}

TEST(CompressTest, TruncatedStreamIsCorrupt) {
  std::vector<uint8_t> cluster(65536, 0);
  std::mt19937 rng(3);
  for (size_t i = 0; i < 20000; ++i) cluster[i] = static_cast<uint8_t>(rng());
  for (auto type : {CompressionType::kDeflate, CompressionType::kZstd}) {
    auto c = CompressCluster(type, cluster);
    ASSERT_TRUE(c.ok() && !c->empty());
    c->resize(c->size() / 2);
    std::vector<uint8_t> out(cluster.size());
    EXPECT_EQ(DecompressCluster(type, *c, out, "t").code(), ErrorCode::kCorrupt);
  }
}

TEST(CompressTest, IncompressibleDataIsStoredUncompressed) {
  std::vector<uint8_t> cluster(4096);
  std::mt19937 rng(4);
  for (auto& b : cluster) b = static_cast<uint8_t>(rng());
  auto c = CompressCluster(CompressionType::kDeflate, cluster);
  ASSERT_TRUE(c.ok());
  EXPECT_TRUE(c->empty());
}

}  // namespace
}  // namespace cowtap::cow
