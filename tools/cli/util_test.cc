#include "tools/cli/util.h"

#include <gtest/gtest.h>

namespace cowtap::cli {
namespace {

TEST(ParseSizeTest, PlainBytesAndHex) {
  EXPECT_EQ(*ParseSize("0"), 0u);
  EXPECT_EQ(*ParseSize("4096"), 4096u);
  EXPECT_EQ(*ParseSize("0x1000"), 4096u);
  EXPECT_EQ(*ParseSize("512B"), 512u);
  EXPECT_EQ(*ParseSize("18446744073709551615"), ~uint64_t{0});
}

TEST(ParseSizeTest, BinarySuffixesInAnyCase) {
  EXPECT_EQ(*ParseSize("64k"), 64u << 10);
  EXPECT_EQ(*ParseSize("64K"), 64u << 10);
  EXPECT_EQ(*ParseSize("64KiB"), 64u << 10);
  EXPECT_EQ(*ParseSize("1M"), 1u << 20);
  EXPECT_EQ(*ParseSize("1mb"), 1u << 20);
  EXPECT_EQ(*ParseSize("10G"), uint64_t{10} << 30);
  EXPECT_EQ(*ParseSize("2T"), uint64_t{2} << 40);
  EXPECT_EQ(*ParseSize("1P"), uint64_t{1} << 50);
  EXPECT_EQ(*ParseSize("1E"), uint64_t{1} << 60);
}

TEST(ParseSizeTest, RejectsMalformed) {
  for (const char* bad : {"", "-1", "abc", "10X", "1.5G", "0x", "G", " 1", "1 G", "10GG"}) {
    auto r = ParseSize(bad);
    EXPECT_FALSE(r.ok()) << "'" << bad << "'";
    if (!r.ok()) {
      EXPECT_EQ(r.status().code(), ErrorCode::kInvalidArgument);
      EXPECT_NE(r.status().message().find("invalid size"), std::string::npos);
    }
  }
}

TEST(ParseSizeTest, RejectsOverflow) {
  EXPECT_FALSE(ParseSize("18446744073709551616").ok());
  EXPECT_FALSE(ParseSize("16E").ok());
  EXPECT_FALSE(ParseSize("0x10000000000000000").ok());
  EXPECT_EQ(*ParseSize("15E"), uint64_t{15} << 60);
}

TEST(FormatHumanSizeTest, UsesLargestUnit) {
  EXPECT_EQ(FormatHumanSize(0), "0 B");
  EXPECT_EQ(FormatHumanSize(1023), "1023 B");
  EXPECT_EQ(FormatHumanSize(4 << 20), "4 MiB");
  EXPECT_EQ(FormatHumanSize(uint64_t{3} << 29), "1.5 GiB");
  EXPECT_EQ(FormatHumanSize(397312), "388 KiB");
}

TEST(ApplyCreateOptionsTest, SetsEveryKnownOption) {
  cow::CreateOptions o;
  ASSERT_TRUE(ApplyCreateOptions("cluster_size=4k,refcount_bits=8,compat=0.10,lazy_refcounts=on,"
                                 "extended_l2=on,compression_type=zstd,data_file=d.raw,data_file_raw=on",
                                 &o)
                  .ok());
  EXPECT_EQ(o.cluster_size, 4096u);
  EXPECT_EQ(o.refcount_bits, 8);
  EXPECT_EQ(o.qcow2_version, 2);
  EXPECT_TRUE(o.lazy_refcounts);
  EXPECT_TRUE(o.extended_l2);
  EXPECT_EQ(o.compression_type, "zstd");
  EXPECT_EQ(o.data_file, "d.raw");
  EXPECT_TRUE(o.data_file_raw);
  ASSERT_TRUE(ApplyCreateOptions("compat=1.1,lazy_refcounts=off,backing_fmt=raw", &o).ok());
  EXPECT_EQ(o.qcow2_version, 3);
  EXPECT_FALSE(o.lazy_refcounts);
  EXPECT_EQ(o.backing_format, cow::ImageFormat::kRaw);
}

TEST(ApplyCreateOptionsTest, RejectsBadOptionsNamingTheKey) {
  const char* cases[][2] = {
      {"cluster_size=3000", "cluster_size"}, {"cluster_size=4M", "cluster_size"},
      {"cluster_size=256", "cluster_size"},  {"refcount_bits=3", "refcount_bits"},
      {"refcount_bits=128", "refcount_bits"}, {"compat=2", "compat"},
      {"lazy_refcounts=maybe", "lazy_refcounts"}, {"compression_type=lz4", "compression_type"},
      {"frobnicate=1", "frobnicate"},         {"cluster_size", "cluster_size"},
  };
  for (const auto& [list, key] : cases) {
    cow::CreateOptions o;
    Status s = ApplyCreateOptions(list, &o);
    EXPECT_EQ(s.code(), ErrorCode::kInvalidArgument) << list;
    EXPECT_NE(s.message().find(key), std::string::npos) << s.message();
  }
}

TEST(HexDumpLineTest, FullAndPartialLines) {
  const uint8_t full[16] = {'H', 'e', 'l', 'l', 'o', 0, 1, 2, 0xff, 'A', 'B', 'C', 'D', 'E', 'F', 'G'};
  EXPECT_EQ(HexDumpLine(0x10, full),
            "00000010  48 65 6c 6c 6f 00 01 02  ff 41 42 43 44 45 46 47  |Hello....ABCDEFG|");
  const uint8_t part[3] = {'a', 'b', '\n'};
  EXPECT_EQ(HexDumpLine(0x100000, part),
            "00100000  61 62 0a                                          |ab.|");
}

TEST(ErrorTextTest, DropsRepeatedFileName) {
  EXPECT_EQ(ErrorText(Status::Corrupt("a.qcow2: L1 table offset 0x3 is not aligned"), "a.qcow2"),
            "L1 table offset 0x3 is not aligned");
  EXPECT_EQ(ErrorText(Status::NotFound("open a.qcow2: no such file"), "a.qcow2"), "open a.qcow2: no such file");
  EXPECT_EQ(ErrorText(Status(ErrorCode::kIoError, ""), "x"), "I/O error");
}

}  // namespace
}  // namespace cowtap::cli
