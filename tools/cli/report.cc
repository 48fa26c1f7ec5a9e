#include "tools/cli/report.h"

#include <fmt/format.h>

#include <ctime>

#include "tools/cli/util.h"

namespace cowtap::cli {
namespace {

using json = nlohmann::ordered_json;

// Names of the qcow2 header feature bits (docs/qcow-format-notes.md).
std::vector<std::string> FeatureNames(uint64_t bits, const std::vector<const char*>& names) {
  std::vector<std::string> out;
  for (int bit = 0; bit < 64; ++bit) {
    if (!(bits & (uint64_t{1} << bit))) continue;
    if (static_cast<size_t>(bit) < names.size()) {
      out.emplace_back(names[bit]);
    } else {
      out.push_back(fmt::format("unknown-bit-{}", bit));
    }
  }
  return out;
}

std::vector<std::string> IncompatibleNames(uint64_t bits) {
  return FeatureNames(bits, {"dirty", "corrupt", "external-data-file", "compression-type", "extended-l2"});
}
std::vector<std::string> CompatibleNames(uint64_t bits) { return FeatureNames(bits, {"lazy-refcounts"}); }
std::vector<std::string> AutoclearNames(uint64_t bits) { return FeatureNames(bits, {"bitmaps", "data-file-raw"}); }

std::string JoinOrNone(const std::vector<std::string>& items) {
  if (items.empty()) return "none";
  std::string out;
  for (const auto& s : items) out += (out.empty() ? "" : " ") + s;
  return out;
}

std::string Compat(int version) { return version == 2 ? "0.10" : "1.1"; }

std::string FormatDate(uint64_t sec) {
  std::time_t t = static_cast<std::time_t>(sec);
  std::tm tm{};
  if (!localtime_r(&t, &tm)) return std::to_string(sec);
  char buf[32];
  std::strftime(buf, sizeof(buf), "%Y-%m-%d %H:%M:%S", &tm);
  return buf;
}

bool SameKind(const cow::Extent& a, const cow::Extent& b) {
  if (a.data != b.data || a.zero != b.zero || a.compressed != b.compressed || a.depth != b.depth) return false;
  if (a.file != b.file || a.host_offset.has_value() != b.host_offset.has_value()) return false;
  return !a.host_offset || *a.host_offset + a.length == *b.host_offset;
}

}  // namespace

json InfoToJson(const LayerReport& layer) {
  const cow::ImageInfo& i = layer.info;
  json j;
  j["filename"] = i.path;
  j["format"] = std::string(cow::FormatName(i.format));
  j["virtual-size"] = i.size_bytes;
  if (layer.disk_usage_bytes) j["actual-size"] = *layer.disk_usage_bytes;
  j["file-size"] = i.file_size_bytes;
  if (i.cluster_size) j["cluster-size"] = i.cluster_size;
  j["dirty-flag"] = i.dirty;
  j["read-only"] = i.read_only;
  if (!i.backing_file.empty()) {
    j["backing-filename"] = i.backing_file;
    j["full-backing-filename"] = i.backing_path.empty() ? i.backing_file : i.backing_path;
    if (i.backing_format) j["backing-filename-format"] = std::string(cow::FormatName(*i.backing_format));
  }
  if (!i.snapshots.empty()) {
    json snaps = json::array();
    for (const auto& s : i.snapshots) {
      snaps.push_back({{"id", s.id},
                       {"name", s.name},
                       {"vm-state-size", s.vm_state_size},
                       {"date-sec", s.date_sec},
                       {"date-nsec", s.date_nsec},
                       {"disk-size", s.size_bytes}});
    }
    j["snapshots"] = snaps;
  }
  if (i.format == cow::ImageFormat::kQcow2) {
    json data;
    data["compat"] = Compat(i.version);
    if (i.version >= 3) {
      data["compression-type"] = i.compression_type.empty() ? "zlib" : i.compression_type;
      data["lazy-refcounts"] = i.lazy_refcounts;
      data["refcount-bits"] = i.refcount_bits;
      data["corrupt"] = i.corrupt;
      data["extended-l2"] = i.extended_l2;
      if (!i.data_file.empty()) {
        data["data-file"] = i.data_file;
        data["data-file-raw"] = i.data_file_raw;
      }
    } else {
      data["refcount-bits"] = i.refcount_bits;
    }
    j["format-specific"] = {{"type", "qcow2"}, {"data", data}};
    j["features"] = {{"incompatible", IncompatibleNames(i.incompatible_features)},
                     {"compatible", CompatibleNames(i.compatible_features)},
                     {"autoclear", AutoclearNames(i.autoclear_features)}};
  }
  return j;
}

std::string InfoToText(const LayerReport& layer) {
  const cow::ImageInfo& i = layer.info;
  std::string s;
  s += fmt::format("image: {}\n", i.path);
  s += fmt::format("file format: {}\n", cow::FormatName(i.format));
  s += fmt::format("virtual size: {} ({} bytes)\n", FormatHumanSize(i.size_bytes), i.size_bytes);
  if (layer.disk_usage_bytes) s += fmt::format("disk size: {}\n", FormatHumanSize(*layer.disk_usage_bytes));
  s += fmt::format("file size: {} ({} bytes)\n", FormatHumanSize(i.file_size_bytes), i.file_size_bytes);
  if (i.cluster_size) s += fmt::format("cluster_size: {}\n", i.cluster_size);
  if (!i.backing_file.empty()) {
    s += fmt::format("backing file: {}", i.backing_file);
    if (!i.backing_path.empty() && i.backing_path != i.backing_file)
      s += fmt::format(" (actual path: {})", i.backing_path);
    s += "\n";
    if (i.backing_format) s += fmt::format("backing file format: {}\n", cow::FormatName(*i.backing_format));
  }
  if (!i.snapshots.empty()) {
    s += "Snapshot list:\n";
    s += fmt::format("{:<10}{:<20}{:>12}  {:<19}  {}\n", "ID", "TAG", "VM SIZE", "DATE", "DISK SIZE");
    for (const auto& snap : i.snapshots)
      s += fmt::format("{:<10}{:<20}{:>12}  {:<19}  {}\n", snap.id, snap.name, FormatHumanSize(snap.vm_state_size),
                       FormatDate(snap.date_sec), FormatHumanSize(snap.size_bytes));
  }
  if (i.format == cow::ImageFormat::kQcow2) {
    s += "Format specific information:\n";
    s += fmt::format("    compat: {}\n", Compat(i.version));
    if (i.version >= 3) {
      s += fmt::format("    compression type: {}\n", i.compression_type.empty() ? "zlib" : i.compression_type);
      s += fmt::format("    lazy refcounts: {}\n", i.lazy_refcounts);
    }
    s += fmt::format("    refcount bits: {}\n", i.refcount_bits);
    if (i.version >= 3) {
      s += fmt::format("    corrupt: {}\n", i.corrupt);
      s += fmt::format("    extended l2: {}\n", i.extended_l2);
      if (!i.data_file.empty()) {
        s += fmt::format("    data file: {}\n", i.data_file);
        s += fmt::format("    data file raw: {}\n", i.data_file_raw);
      }
    }
    s += fmt::format("    dirty: {}\n", i.dirty);
    s += fmt::format("    incompatible features: {}\n", JoinOrNone(IncompatibleNames(i.incompatible_features)));
    s += fmt::format("    compatible features: {}\n", JoinOrNone(CompatibleNames(i.compatible_features)));
    s += fmt::format("    autoclear features: {}\n", JoinOrNone(AutoclearNames(i.autoclear_features)));
  } else if (i.format == cow::ImageFormat::kQcow) {
    s += "Format specific information:\n";
    s += fmt::format("    version: {}\n", i.version ? i.version : 1);
  }
  return s;
}

void AppendMerged(const std::vector<cow::Extent>& extents, std::vector<cow::Extent>* out) {
  for (const auto& e : extents) {
    if (e.length == 0) continue;
    if (!out->empty() && out->back().offset + out->back().length == e.offset && SameKind(out->back(), e)) {
      out->back().length += e.length;
    } else {
      out->push_back(e);
    }
  }
}

json ExtentToJson(const cow::Extent& e) {
  json j;
  j["start"] = e.offset;
  j["length"] = e.length;
  j["depth"] = e.depth;
  j["present"] = e.data;
  j["zero"] = e.zero;
  j["data"] = e.data && !e.zero;
  j["compressed"] = e.compressed;
  if (e.host_offset) j["offset"] = *e.host_offset;
  if (e.host_offset && !e.file.empty()) j["filename"] = e.file;
  return j;
}

std::string MapToJsonText(const std::vector<cow::Extent>& extents) {
  std::string s = "[";
  for (size_t k = 0; k < extents.size(); ++k) {
    if (k) s += ",\n";
    s += ExtentToJson(extents[k]).dump();
  }
  s += "]\n";
  return s;
}

std::string MapToText(const std::vector<cow::Extent>& extents) {
  std::string s = fmt::format("{:<20}{:<20}{:<6}{:<6}{:<6}{:<20}{}\n", "Offset", "Length", "Data", "Zero", "Depth",
                              "Mapped to", "File");
  for (const auto& e : extents) {
    const bool data = e.data && !e.zero;
    std::string mapped = e.compressed ? "compressed" : e.host_offset ? fmt::format("{:#x}", *e.host_offset) : "-";
    s += fmt::format("{:<20}{:<20}{:<6}{:<6}{:<6}{:<20}{}\n", fmt::format("{:#x}", e.offset),
                     fmt::format("{:#x}", e.length), data ? "yes" : "no", e.zero ? "yes" : "no", e.depth, mapped,
                     e.host_offset ? e.file : "");
  }
  return s;
}

json CheckToJson(const std::string& path, std::string_view format, const cow::CheckResult& r) {
  json j;
  j["filename"] = path;
  j["format"] = std::string(format);
  j["check-errors"] = r.corruptions;
  j["corruptions"] = r.corruptions;
  j["leaks"] = r.leaks;
  j["corruptions-fixed"] = r.corruptions_fixed;
  j["leaks-fixed"] = r.leaks_fixed;
  j["image-end-offset"] = r.image_end_offset;
  j["total-clusters"] = r.total_clusters;
  j["allocated-clusters"] = r.allocated_clusters;
  j["fragmented-clusters"] = r.fragmented_clusters;
  j["messages"] = r.messages;
  return j;
}

std::string CheckToText(const cow::CheckResult& r) {
  std::string s;
  for (const auto& m : r.messages) s += m + "\n";
  if (r.corruptions_fixed || r.leaks_fixed) {
    s += "The following inconsistencies were found and repaired:\n\n";
    s += fmt::format("    {} leaked clusters\n    {} corruptions\n\n", r.leaks_fixed, r.corruptions_fixed);
  }
  if (r.corruptions == 0 && r.leaks == 0) s += "No errors were found on the image.\n";
  if (r.corruptions)
    s += fmt::format(
        "\n{} errors were found on the image.\n"
        "Data may be corrupted, or further writes to the image may corrupt it.\n",
        r.corruptions);
  if (r.leaks)
    s += fmt::format(
        "\n{} leaked clusters were found on the image.\n"
        "This means waste of disk space, but no harm to data.\n",
        r.leaks);
  if (r.total_clusters) {
    const double total = static_cast<double>(r.total_clusters);
    s += fmt::format("{}/{} = {:.2f}% allocated, {:.2f}% fragmented\n", r.allocated_clusters, r.total_clusters,
                     100.0 * static_cast<double>(r.allocated_clusters) / total,
                     r.allocated_clusters
                         ? 100.0 * static_cast<double>(r.fragmented_clusters) / static_cast<double>(r.allocated_clusters)
                         : 0.0);
  }
  if (r.image_end_offset) s += fmt::format("Image end offset: {}\n", r.image_end_offset);
  return s;
}

}  // namespace cowtap::cli
