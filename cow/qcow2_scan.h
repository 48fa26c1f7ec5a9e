// ScanQcow2References: walks every piece of qcow2 metadata (header, active
// and snapshot L1/L2 trees, refcount table and blocks, snapshot table,
// bitmap directory/tables/data) and counts the references each host cluster
// receives. CheckImage compares these counts with the stored refcounts;
// Qcow2Image uses them to rebuild the refcounts of a dirty image.
//
// Also holds the small file-reading helpers both need (header, snapshot
// table). Thread-safety: functions over a caller-owned File; not
// synchronized beyond what File offers.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "base/status.h"
#include "cow/file.h"
#include "cow/qcow2_format.h"

namespace cowtap::cow {

struct Qcow2RefScan {
  std::vector<uint32_t> refs;         // references per host cluster index
  uint64_t corruptions = 0;           // invalid entries / references beyond EOF
  std::vector<std::string> messages;  // one per corruption found
  uint64_t allocated_clusters = 0;    // guest clusters allocated in the active layer
  uint64_t compressed_clusters = 0;
  uint64_t fragmented_clusters = 0;
};

// Fails only if the scan itself cannot run (I/O error, image too large to
// hold one counter per cluster in memory).
Result<Qcow2RefScan> ScanQcow2References(File& file, const Qcow2Header& h, const std::vector<Qcow2Snapshot>& snapshots,
                                         const std::vector<uint64_t>& refcount_table, uint64_t file_size,
                                         const std::string& path);

// Reads and parses the header of an open qcow2 file.
Result<Qcow2Header> ReadQcow2Header(File& file, const std::string& path);
// Reads and parses the snapshot table.
Result<std::vector<Qcow2Snapshot>> ReadQcow2SnapshotTable(File& file, const Qcow2Header& h, uint64_t file_size,
                                                          const std::string& path);

}  // namespace cowtap::cow
