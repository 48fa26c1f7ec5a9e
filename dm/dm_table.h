// DmTable: a device-mapper table for one VBD in the kernel offload, as an
// ordered list of segments covering [0, size) in 512-byte sectors. A segment
// is either `linear` (onto the device that holds the image file — a loop
// device — at a host sector offset: clusters the top layer owns and may be
// overwritten in place) or `miss` (onto the user-space device cowtapd serves,
// nbd or ublk, at the same sector offset: everything else). Both are the
// kernel's `linear` target; they differ in the device they point at.
//
// A DmTable is a value: immutable after Make(), copyable, safe to share
// between threads for reading.
#pragma once

#include <cstdint>
#include <string>
#include <utility>
#include <vector>

#include "base/status.h"

namespace cowtap::dm {

inline constexpr uint64_t kSectorSize = 512;

struct DmSegment {
  enum class Kind : uint8_t { kLinear, kMiss };
  uint64_t start_sector = 0;  // virtual (dm device) sector
  uint64_t sector_count = 0;
  Kind kind = Kind::kMiss;
  // kLinear: first sector on the linear device (the image file's host
  // offset / 512). kMiss: always start_sector (identity onto the miss device).
  uint64_t target_sector = 0;

  uint64_t end_sector() const { return start_sector + sector_count; }
  bool operator==(const DmSegment&) const = default;
};

// The block devices a table's segments point at.
struct DmDevices {
  std::string linear_device;  // e.g. /dev/loop3 (the image file)
  std::string miss_device;    // e.g. /dev/nbd0 (cowtapd)
};

class DmTable {
 public:
  // A table of one miss segment over the whole device (nothing offloaded).
  // size_sectors 0 gives an empty table.
  static DmTable AllMiss(uint64_t size_sectors);
  // Validates and builds: segments sorted, contiguous from 0 to
  // size_sectors, none empty, miss segments with target_sector ==
  // start_sector, linear targets not wrapping around 2^64. Adjacent miss
  // segments and adjacent linear segments that continue each other on the
  // target are merged. kInvalidArgument (saying which segment) otherwise.
  static Result<DmTable> Make(uint64_t size_sectors, std::vector<DmSegment> segments);

  DmTable() = default;

  uint64_t size_sectors() const { return size_sectors_; }
  const std::vector<DmSegment>& segments() const { return segments_; }
  // The segment containing sector. REQUIRES: sector < size_sectors().
  const DmSegment& SegmentAt(uint64_t sector) const;
  // Sectors routed linear (offloaded to the kernel).
  uint64_t linear_sectors() const;
  size_t linear_segment_count() const;

  // The same table with [first_sector, first_sector + count) routed to the
  // miss device (clamped to the table's size). Never fails.
  DmTable WithMiss(uint64_t first_sector, uint64_t sector_count) const;
  // The same for many (first_sector, sector_count) ranges, in one pass
  // (any order, overlaps allowed).
  DmTable WithMissRanges(std::vector<std::pair<uint64_t, uint64_t>> ranges) const;

  // dmsetup's text form, one line per segment:
  //   "<start> <len> linear <device> <offset>\n"
  std::string ToText(const DmDevices& devices) const;
  // The parameter string of one segment ("<device> <offset>").
  static std::string TargetParams(const DmSegment& seg, const DmDevices& devices);

  bool operator==(const DmTable&) const = default;

 private:
  uint64_t size_sectors_ = 0;
  std::vector<DmSegment> segments_;
};

}  // namespace cowtap::dm
