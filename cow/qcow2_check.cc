// Qcow2 consistency check: recompute every cluster's references
// (ScanQcow2References), compare with the stored refcounts, verify COPIED
// flags in the active tree, and optionally repair (leaks: lower refcounts to
// the references; all: also raise refcounts and fix COPIED flags).
#include "cow/qcow2_check.h"

#include <algorithm>

#include "base/checked_math.h"
#include "base/endian.h"
#include "cow/qcow2_refcount.h"
#include "cow/qcow2_scan.h"

namespace cowtap::cow {
namespace {

struct Pass {
  CheckResult r;
  std::vector<uint64_t> leaked, missing;  // cluster indices
  struct CopiedFix {
    uint64_t entry_offset;
    uint64_t value;
  };
  std::vector<CopiedFix> copied;
};

Result<Pass> RunPass(File& file, const std::string& path) {
  Pass p;
  COWTAP_ASSIGN_OR_RETURN(Qcow2Header h, ReadQcow2Header(file, path));
  COWTAP_ASSIGN_OR_RETURN(uint64_t file_size, file.Size());
  COWTAP_ASSIGN_OR_RETURN(auto snapshots, ReadQcow2SnapshotTable(file, h, file_size, path));
  Qcow2Refcounts::Geometry g{h.cluster_bits, h.refcount_order, h.refcount_table_offset, h.refcount_table_clusters};
  COWTAP_ASSIGN_OR_RETURN(auto refcounts, Qcow2Refcounts::Load(&file, path, g, 4ull << 20));
  COWTAP_ASSIGN_OR_RETURN(Qcow2RefScan scan,
                          ScanQcow2References(file, h, snapshots, refcounts->table(), file_size, path));
  const uint64_t cs = h.cluster_size();
  p.r.corruptions = scan.corruptions;
  p.r.messages = scan.messages;
  p.r.allocated_clusters = scan.allocated_clusters;
  p.r.fragmented_clusters = scan.fragmented_clusters;
  p.r.total_clusters = DivRoundUp(h.size, cs);
  uint64_t n = std::max<uint64_t>(scan.refs.size(), DivRoundUp(file_size, cs));
  // Refcounts held by blocks beyond the end of the file count too (leaks).
  const auto& table = refcounts->table();
  for (uint64_t bi = table.size(); bi > 0; --bi) {
    if (table[bi - 1]) {
      n = std::max(n, bi * refcounts->block_entries());
      break;
    }
  }
  uint64_t last_used = 0;
  for (uint64_t c = 0; c < n; ++c) {
    uint64_t want = c < scan.refs.size() ? scan.refs[c] : 0;
    COWTAP_ASSIGN_OR_RETURN(uint64_t have, refcounts->Get(c));
    if (have || want) last_used = c + 1;
    if (have == want) continue;
    std::string where =
        "cluster " + std::to_string(c) + " refcount=" + std::to_string(have) + " reference=" + std::to_string(want);
    if (have > want) {
      ++p.r.leaks;
      p.leaked.push_back(c);
      p.r.messages.push_back("Leaked " + where);
    } else {
      ++p.r.corruptions;
      p.missing.push_back(c);
      p.r.messages.push_back("ERROR " + where);
    }
  }
  p.r.image_end_offset = last_used * cs;
  // COPIED flags of the active tree must say "refcount == 1".
  std::vector<uint8_t> l1(uint64_t{h.l1_size} * 8), l2(cs);
  COWTAP_RETURN_IF_ERROR(file.ReadAt(h.l1_table_offset, l1));
  const uint64_t eb = h.l2_entry_bytes();
  for (uint64_t i = 0; i < h.l1_size; ++i) {
    uint64_t raw = LoadBe64(&l1[i * 8]);
    auto l2off = DecodeQcow2L1Entry(raw, h, h.l1_table_offset + i * 8, path);
    if (!l2off.ok() || *l2off == 0 || !RangeWithin(*l2off, cs, file_size)) continue;
    COWTAP_ASSIGN_OR_RETURN(uint64_t rc, refcounts->Get(*l2off / cs));
    if ((rc == 1) != ((raw & kQcow2Copied) != 0)) {
      ++p.r.corruptions;
      p.r.messages.push_back("ERROR OFLAG_COPIED L2 cluster: l1_index=" + std::to_string(i) +
                             " refcount=" + std::to_string(rc));
      p.copied.push_back({h.l1_table_offset + i * 8, rc == 1 ? raw | kQcow2Copied : raw & ~kQcow2Copied});
    }
    COWTAP_RETURN_IF_ERROR(file.ReadAt(*l2off, l2));
    if (h.has_data_file()) continue;
    for (uint64_t j = 0; j < h.l2_entries(); ++j) {
      Qcow2L2Entry e{LoadBe64(&l2[j * eb]), eb == 16 ? LoadBe64(&l2[j * eb + 8]) : 0};
      auto type = ClassifyQcow2L2Entry(e, h, false, *l2off + j * eb, path);
      if (!type.ok() || (*type != Qcow2ClusterType::kNormal && *type != Qcow2ClusterType::kZeroAlloc)) continue;
      uint64_t host = e.raw & kQcow2OffsetMask;
      if (host >= file_size) continue;
      COWTAP_ASSIGN_OR_RETURN(uint64_t drc, refcounts->Get(host / cs));
      if ((drc == 1) != ((e.raw & kQcow2Copied) != 0)) {
        ++p.r.corruptions;
        p.r.messages.push_back("ERROR OFLAG_COPIED data cluster: l2_entry=" + std::to_string(e.raw) +
                               " refcount=" + std::to_string(drc));
        p.copied.push_back({*l2off + j * eb, drc == 1 ? e.raw | kQcow2Copied : e.raw & ~kQcow2Copied});
      }
    }
  }
  return p;
}

}  // namespace

Result<CheckResult> CheckQcow2Image(File& file, const std::string& path, const CheckOptions& options) {
  COWTAP_ASSIGN_OR_RETURN(Pass first, RunPass(file, path));
  const bool fix_leaks = options.repair_leaks || options.repair_all;
  const bool fix_all = options.repair_all;
  if (!(fix_leaks && (first.r.leaks || (fix_all && first.r.corruptions)))) return first.r;

  COWTAP_ASSIGN_OR_RETURN(Qcow2Header h, ReadQcow2Header(file, path));
  COWTAP_ASSIGN_OR_RETURN(uint64_t file_size, file.Size());
  COWTAP_ASSIGN_OR_RETURN(auto snapshots, ReadQcow2SnapshotTable(file, h, file_size, path));
  Qcow2Refcounts::Geometry g{h.cluster_bits, h.refcount_order, h.refcount_table_offset, h.refcount_table_clusters};
  COWTAP_ASSIGN_OR_RETURN(auto refcounts, Qcow2Refcounts::Load(&file, path, g, 4ull << 20));
  COWTAP_ASSIGN_OR_RETURN(Qcow2RefScan scan,
                          ScanQcow2References(file, h, snapshots, refcounts->table(), file_size, path));
  // New refcount blocks go past everything referenced.
  refcounts->set_allocation_floor(std::max<uint64_t>(scan.refs.size(), DivRoundUp(file_size, h.cluster_size())));
  std::vector<uint64_t> fix = first.leaked;
  if (fix_all) fix.insert(fix.end(), first.missing.begin(), first.missing.end());
  for (uint64_t c : fix) COWTAP_RETURN_IF_ERROR(refcounts->Set(c, c < scan.refs.size() ? scan.refs[c] : 0));
  COWTAP_RETURN_IF_ERROR(refcounts->FlushDirty());
  COWTAP_RETURN_IF_ERROR(file.Flush());
  if (fix_all) {
    // COPIED flags are judged against the repaired refcounts.
    COWTAP_ASSIGN_OR_RETURN(Pass mid, RunPass(file, path));
    for (const auto& f : mid.copied) {
      uint8_t b[8];
      StoreBe64(b, f.value);
      COWTAP_RETURN_IF_ERROR(file.WriteAt(f.entry_offset, b));
    }
    COWTAP_RETURN_IF_ERROR(file.Flush());
  }
  COWTAP_ASSIGN_OR_RETURN(Pass after, RunPass(file, path));
  if (after.r.corruptions == 0 && after.r.leaks == 0 && (h.incompatible_features & kQcow2IncompatDirty)) {
    uint8_t b[8];
    StoreBe64(b, h.incompatible_features & ~kQcow2IncompatDirty);
    COWTAP_RETURN_IF_ERROR(file.WriteAt(kQcow2OffIncompatible, b));
    COWTAP_RETURN_IF_ERROR(file.Flush());
  }
  CheckResult r = after.r;
  r.leaks_fixed = first.r.leaks > after.r.leaks ? first.r.leaks - after.r.leaks : 0;
  r.corruptions_fixed = first.r.corruptions > after.r.corruptions ? first.r.corruptions - after.r.corruptions : 0;
  return r;
}

}  // namespace cowtap::cow
