// TableExecutor: a user-space stand-in for the kernel running a DmTable, for
// tests. Read/Write split a request at segment boundaries: linear pieces go
// to the image FILE at the segment's host offset (as the loop device would),
// miss pieces to a BlockDevice (the engine, as cowtapd behind nbd would).
// SetTable is the "reload". Comparing its bytes with the engine's proves a
// planned table right without a kernel.
//
// Thread-safety: SetTable must not run concurrently with I/O (the kernel's
// suspend gives the same guarantee); Read/Write may run concurrently if the
// file and the device allow it.
#pragma once

#include <cstdint>
#include <span>

#include "backend/block_device.h"
#include "base/status.h"
#include "cow/file.h"
#include "dm/dm_table.h"

namespace cowtap::dm {

struct ExecutorStats {
  uint64_t linear_bytes = 0;  // served through the image file
  uint64_t miss_bytes = 0;    // served through the block device
};

class TableExecutor {
 public:
  // REQUIRES: image_file and miss outlive the executor.
  TableExecutor(cow::File& image_file, backend::BlockDevice& miss, DmTable table)
      : file_(image_file), miss_(miss), table_(std::move(table)) {}

  void SetTable(DmTable table) { table_ = std::move(table); }
  const DmTable& table() const { return table_; }

  // kOutOfRange if [offset, offset + size) is not inside the table or not
  // 512-byte aligned (the kernel only takes whole sectors).
  Status Read(uint64_t offset, std::span<uint8_t> buf);
  Status Write(uint64_t offset, std::span<const uint8_t> data);

  const ExecutorStats& stats() const { return stats_; }

 private:
  // Calls fn(segment, offset_in_request, length) for each piece.
  template <typename Fn>
  Status ForEachPiece(uint64_t offset, uint64_t length, Fn fn);

  cow::File& file_;
  backend::BlockDevice& miss_;
  DmTable table_;
  ExecutorStats stats_;
};

}  // namespace cowtap::dm
