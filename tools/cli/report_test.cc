#include "tools/cli/report.h"

#include <gtest/gtest.h>

namespace cowtap::cli {
namespace {

cow::Extent MakeExtent(uint64_t offset, uint64_t length, bool data, bool zero, int depth,
                       std::optional<uint64_t> host, std::string file = "") {
  cow::Extent e;
  e.offset = offset;
  e.length = length;
  e.data = data;
  e.zero = zero;
  e.depth = depth;
  e.host_offset = host;
  e.file = std::move(file);
  return e;
}

TEST(AppendMergedTest, JoinsContiguousAlikeExtentsOnly) {
  std::vector<cow::Extent> out;
  AppendMerged({MakeExtent(0, 100, true, false, 0, 1000, "a"), MakeExtent(100, 50, true, false, 0, 1100, "a")},
               &out);
  // Host offsets do not continue (1150 expected): kept apart.
  AppendMerged({MakeExtent(150, 50, true, false, 0, 5000, "a")}, &out);
  // A hole, then another hole from the next window: joined.
  AppendMerged({MakeExtent(200, 10, false, true, 1, std::nullopt)}, &out);
  AppendMerged({MakeExtent(210, 10, false, true, 1, std::nullopt), MakeExtent(220, 0, true, false, 0, 1)}, &out);
  // Same flags, different depth: kept apart.
  AppendMerged({MakeExtent(220, 10, false, true, 0, std::nullopt)}, &out);
  ASSERT_EQ(out.size(), 4u);
  EXPECT_EQ(out[0].length, 150u);
  EXPECT_EQ(out[1].offset, 150u);
  EXPECT_EQ(out[2].offset, 200u);
  EXPECT_EQ(out[2].length, 20u);
  EXPECT_EQ(out[3].depth, 0);
}

TEST(ExtentToJsonTest, UsesQemuImgMapKeys) {
  auto data = ExtentToJson(MakeExtent(65536, 131072, true, false, 0, 327680, "ov.qcow2"));
  EXPECT_EQ(data["start"], 65536);
  EXPECT_EQ(data["length"], 131072);
  EXPECT_EQ(data["depth"], 0);
  EXPECT_EQ(data["present"], true);
  EXPECT_EQ(data["zero"], false);
  EXPECT_EQ(data["data"], true);
  EXPECT_EQ(data["offset"], 327680);
  EXPECT_EQ(data["filename"], "ov.qcow2");
  // A zero cluster allocated in the top layer: present, reads as zero, no data.
  auto zero = ExtentToJson(MakeExtent(0, 4096, true, true, 0, std::nullopt));
  EXPECT_EQ(zero["present"], true);
  EXPECT_EQ(zero["zero"], true);
  EXPECT_EQ(zero["data"], false);
  EXPECT_FALSE(zero.contains("offset"));
  // Unallocated everywhere.
  auto hole = ExtentToJson(MakeExtent(0, 4096, false, true, 1, std::nullopt));
  EXPECT_EQ(hole["present"], false);
  EXPECT_EQ(hole["depth"], 1);
}

TEST(MapToJsonTextTest, OneObjectPerLineAndParsesBack) {
  std::string text = MapToJsonText({MakeExtent(0, 512, true, false, 0, 0, "r"), MakeExtent(512, 512, false, true, 0, {})});
  EXPECT_EQ(std::count(text.begin(), text.end(), '\n'), 2);
  auto parsed = nlohmann::ordered_json::parse(text);
  ASSERT_EQ(parsed.size(), 2u);
  EXPECT_EQ(parsed[1]["start"], 512);
  EXPECT_EQ(MapToJsonText({}), "[]\n");
}

TEST(MapToTextTest, ListsEveryExtentWithHexOffsets) {
  std::string text =
      MapToText({MakeExtent(0, 0x10000, true, false, 1, 0x20000, "base.raw"), MakeExtent(0x10000, 0x10000, false, true, 0, {})});
  EXPECT_NE(text.find("0x10000"), std::string::npos);
  EXPECT_NE(text.find("0x20000"), std::string::npos);
  EXPECT_NE(text.find("base.raw"), std::string::npos);
  EXPECT_EQ(std::count(text.begin(), text.end(), '\n'), 3);
}

TEST(InfoToJsonTest, RawImageHasQemuKeysAndNoFormatSpecific) {
  LayerReport r;
  r.info.format = cow::ImageFormat::kRaw;
  r.info.path = "disk.raw";
  r.info.size_bytes = 1 << 20;
  r.info.file_size_bytes = 1 << 20;
  r.disk_usage_bytes = 4096;
  auto j = InfoToJson(r);
  EXPECT_EQ(j["filename"], "disk.raw");
  EXPECT_EQ(j["format"], "raw");
  EXPECT_EQ(j["virtual-size"], 1 << 20);
  EXPECT_EQ(j["actual-size"], 4096);
  EXPECT_EQ(j["dirty-flag"], false);
  EXPECT_FALSE(j.contains("cluster-size"));
  EXPECT_FALSE(j.contains("format-specific"));
  EXPECT_FALSE(j.contains("backing-filename"));
}

TEST(InfoToJsonTest, Qcow2OverlayReportsBackingAndFeatures) {
  LayerReport r;
  cow::ImageInfo& i = r.info;
  i.format = cow::ImageFormat::kQcow2;
  i.path = "ov.qcow2";
  i.size_bytes = 4 << 20;
  i.cluster_size = 65536;
  i.version = 3;
  i.refcount_bits = 16;
  i.compression_type = "zstd";
  i.backing_file = "base.raw";
  i.backing_path = "/images/base.raw";
  i.backing_format = cow::ImageFormat::kRaw;
  i.incompatible_features = (1 << 3) | (1 << 9);
  i.compatible_features = 1;
  i.snapshots.push_back({"1", "before-upgrade", 4 << 20, 1700000000, 5, 0});
  auto j = InfoToJson(r);
  EXPECT_EQ(j["cluster-size"], 65536);
  EXPECT_EQ(j["backing-filename"], "base.raw");
  EXPECT_EQ(j["full-backing-filename"], "/images/base.raw");
  EXPECT_EQ(j["backing-filename-format"], "raw");
  EXPECT_EQ(j["format-specific"]["type"], "qcow2");
  EXPECT_EQ(j["format-specific"]["data"]["compat"], "1.1");
  EXPECT_EQ(j["format-specific"]["data"]["compression-type"], "zstd");
  EXPECT_EQ(j["format-specific"]["data"]["refcount-bits"], 16);
  EXPECT_EQ(j["features"]["incompatible"], nlohmann::ordered_json({"compression-type", "unknown-bit-9"}));
  EXPECT_EQ(j["features"]["compatible"], nlohmann::ordered_json({"lazy-refcounts"}));
  ASSERT_EQ(j["snapshots"].size(), 1u);
  EXPECT_EQ(j["snapshots"][0]["name"], "before-upgrade");
  std::string text = InfoToText(r);
  EXPECT_NE(text.find("backing file: base.raw (actual path: /images/base.raw)"), std::string::npos) << text;
  EXPECT_NE(text.find("backing file format: raw"), std::string::npos);
  EXPECT_NE(text.find("virtual size: 4 MiB (4194304 bytes)"), std::string::npos);
  EXPECT_NE(text.find("before-upgrade"), std::string::npos);
  EXPECT_NE(text.find("compat: 1.1"), std::string::npos);
}

TEST(CheckReportTest, CleanCorruptAndLeakedSummaries) {
  cow::CheckResult clean;
  clean.total_clusters = 64;
  clean.allocated_clusters = 2;
  clean.image_end_offset = 458752;
  std::string text = CheckToText(clean);
  EXPECT_NE(text.find("No errors were found on the image."), std::string::npos);
  EXPECT_NE(text.find("2/64 = 3.12% allocated"), std::string::npos);
  EXPECT_NE(text.find("Image end offset: 458752"), std::string::npos);

  cow::CheckResult bad = clean;
  bad.corruptions = 3;
  bad.leaks = 5;
  bad.messages = {"ERROR cluster 7 refcount=1 reference=2"};
  text = CheckToText(bad);
  EXPECT_EQ(text.find("No errors"), std::string::npos);
  EXPECT_NE(text.find("3 errors were found"), std::string::npos);
  EXPECT_NE(text.find("5 leaked clusters were found"), std::string::npos);
  EXPECT_NE(text.find("ERROR cluster 7"), std::string::npos);
  auto j = CheckToJson("x.qcow2", "qcow2", bad);
  EXPECT_EQ(j["check-errors"], 3);
  EXPECT_EQ(j["leaks"], 5);
  EXPECT_EQ(j["format"], "qcow2");
  EXPECT_EQ(j["total-clusters"], 64);
  EXPECT_EQ(j["image-end-offset"], 458752);
}

}  // namespace
}  // namespace cowtap::cli
