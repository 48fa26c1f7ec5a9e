// How `cowtap info`, `map` and `check` present what they found: qemu-img's
// text layouts, and JSON with the keys `qemu-img ... --output=json` uses (so
// scripts written for qemu-img read cowtap's output), plus a few cowtap keys
// qemu-img has no equivalent for. Pure functions of their inputs; thread-safe.
#pragma once

#include <nlohmann/json.hpp>

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "cow/check.h"
#include "cow/image.h"

namespace cowtap::cli {

// One layer of a chain as `info` reports it. disk_usage_bytes is what the
// file occupies on disk (st_blocks), when known.
struct LayerReport {
  cow::ImageInfo info;
  std::optional<uint64_t> disk_usage_bytes;
};

// qemu-img info --output=json keys: filename, format, virtual-size,
// actual-size, cluster-size, dirty-flag, backing-filename,
// full-backing-filename, backing-filename-format, snapshots, format-specific;
// plus cowtap's file-size and features.
nlohmann::ordered_json InfoToJson(const LayerReport& layer);
// The qemu-img info text block (image:, file format:, virtual size:, ...).
std::string InfoToText(const LayerReport& layer);

// Appends extents to *out, merging each with the last one when they are
// contiguous and alike (same flags, depth, file, and host offsets that
// continue). Map() results of neighbouring windows are joined this way.
void AppendMerged(const std::vector<cow::Extent>& extents, std::vector<cow::Extent>* out);

// qemu-img map --output=json keys: start, length, depth, present, zero, data,
// compressed, offset (only where the bytes have a host location); plus
// cowtap's filename there.
nlohmann::ordered_json ExtentToJson(const cow::Extent& extent);
// qemu-img map's JSON layout: an array with one object per line.
std::string MapToJsonText(const std::vector<cow::Extent>& extents);
// A table of every extent: offset, length, data, zero, depth, host offset, file.
std::string MapToText(const std::vector<cow::Extent>& extents);

// qemu-img check --output=json keys: filename, format, check-errors,
// corruptions, leaks, corruptions-fixed, leaks-fixed, image-end-offset,
// total-clusters, allocated-clusters, fragmented-clusters.
nlohmann::ordered_json CheckToJson(const std::string& path, std::string_view format, const cow::CheckResult& result);
// qemu-img check's text summary.
std::string CheckToText(const cow::CheckResult& result);

}  // namespace cowtap::cli
