// Reference counting walk over all qcow2 metadata. Damaged entries are
// counted and described, never followed.
#include "cow/qcow2_scan.h"

#include <algorithm>

#include "base/checked_math.h"
#include "base/endian.h"

namespace cowtap::cow {
namespace {

constexpr uint64_t kMaxScanClusters = 1ull << 27;

std::string Hex(uint64_t v) {
  char buf[24];
  snprintf(buf, sizeof(buf), "0x%llx", static_cast<unsigned long long>(v));
  return buf;
}

class Scanner {
 public:
  Scanner(File& file, const Qcow2Header& h, uint64_t file_size, const std::string& path)
      : file_(file), h_(h), cs_(h.cluster_size()), file_size_(file_size), path_(path) {}

  Qcow2RefScan& result() { return r_; }

  void Corrupt(std::string msg) {
    ++r_.corruptions;
    r_.messages.push_back(std::move(msg));
  }

  // Counts one reference to every cluster touched by [offset, offset+bytes).
  void Ref(uint64_t offset, uint64_t bytes, const char* what) {
    if (bytes == 0) return;
    uint64_t end;
    if (!CheckedAdd(offset, bytes, &end) || end > *AlignUp(file_size_, cs_) || offset >= kQcow2MaxHostOffset) {
      Corrupt(std::string("ERROR ") + what + " at " + Hex(offset) + " (" + std::to_string(bytes) +
              " bytes) lies beyond the end of the file");
      return;
    }
    for (uint64_t c = offset / cs_; c <= (end - 1) / cs_; ++c) {
      if (c >= r_.refs.size()) r_.refs.resize(c + 1, 0);
      ++r_.refs[c];
    }
  }

  Status WalkL1(uint64_t l1_offset, uint64_t l1_size, bool active) {
    std::vector<uint8_t> l1(l1_size * 8);
    COWTAP_RETURN_IF_ERROR(file_.ReadAt(l1_offset, l1));
    std::vector<uint8_t> l2(cs_);
    const bool data_file = h_.has_data_file();
    for (uint64_t i = 0; i < l1_size; ++i) {
      uint64_t raw = LoadBe64(&l1[i * 8]);
      auto l2off = DecodeQcow2L1Entry(raw, h_, l1_offset + i * 8, path_);
      if (!l2off.ok()) {
        Corrupt("ERROR " + l2off.status().message());
        continue;
      }
      if (*l2off == 0) continue;
      if (!RangeWithin(*l2off, cs_, file_size_)) {
        Corrupt("ERROR L2 table at " + Hex(*l2off) + " (L1 index " + std::to_string(i) +
                ") lies beyond the end of the file");
        continue;
      }
      Ref(*l2off, cs_, "L2 table");
      uint64_t next_contiguous = 0;  // qemu-img measures contiguity per L2 table
      COWTAP_RETURN_IF_ERROR(file_.ReadAt(*l2off, l2));
      const uint64_t eb = h_.l2_entry_bytes();
      for (uint64_t j = 0; j < h_.l2_entries(); ++j) {
        Qcow2L2Entry e{LoadBe64(&l2[j * eb]), eb == 16 ? LoadBe64(&l2[j * eb + 8]) : 0};
        auto type = ClassifyQcow2L2Entry(e, h_, data_file, *l2off + j * eb, path_);
        if (!type.ok()) {
          Corrupt("ERROR " + type.status().message());
          continue;
        }
        uint64_t host = e.raw & kQcow2OffsetMask;
        switch (*type) {
          case Qcow2ClusterType::kCompressed: {
            auto d = DecodeQcow2Compressed(e.raw, h_.cluster_bits);
            Ref(d.host_offset, d.max_length, "compressed cluster");
            if (active) {
              // As qemu-img counts them: compressed clusters are fragmented
              // by nature (sub-sector streams are re-read per cluster).
              ++r_.allocated_clusters;
              ++r_.compressed_clusters;
              ++r_.fragmented_clusters;
            }
            break;
          }
          case Qcow2ClusterType::kNormal:
          case Qcow2ClusterType::kZeroAlloc:
            if (!data_file) Ref(host, cs_, "data cluster");
            if (active) {
              ++r_.allocated_clusters;
              if (next_contiguous != 0 && host != next_contiguous) ++r_.fragmented_clusters;
              next_contiguous = host + cs_;
            }
            break;
          default:
            break;
        }
      }
    }
    return Status::Ok();
  }

  Status WalkBitmaps(const std::vector<uint8_t>& ext) {
    if (ext.size() < 24) {
      Corrupt("ERROR bitmaps extension is shorter than 24 bytes");
      return Status::Ok();
    }
    uint32_t nb = LoadBe32(ext.data());
    uint64_t dir_size = LoadBe64(ext.data() + 8), dir_off = LoadBe64(ext.data() + 16);
    if (dir_size > (64ull << 20) || !RangeWithin(dir_off, dir_size, file_size_)) {
      Corrupt("ERROR bitmap directory at " + Hex(dir_off) + " lies beyond the end of the file");
      return Status::Ok();
    }
    Ref(dir_off, dir_size, "bitmap directory");
    std::vector<uint8_t> dir(dir_size);
    COWTAP_RETURN_IF_ERROR(file_.ReadAt(dir_off, dir));
    uint64_t p = 0;
    for (uint32_t i = 0; i < nb; ++i) {
      if (p + 24 > dir.size()) {
        Corrupt("ERROR bitmap directory is truncated");
        break;
      }
      uint64_t table_off = LoadBe64(&dir[p]);
      uint32_t table_size = LoadBe32(&dir[p + 8]);
      uint16_t name_size = LoadBe16(&dir[p + 18]);
      uint32_t extra = LoadBe32(&dir[p + 20]);
      p += (24 + uint64_t{extra} + name_size + 7) & ~uint64_t{7};
      if (!RangeWithin(table_off, uint64_t{table_size} * 8, file_size_)) {
        Corrupt("ERROR bitmap table at " + Hex(table_off) + " lies beyond the end of the file");
        continue;
      }
      if (table_size > kQcow2MaxBitmapTableEntries) {
        Corrupt("ERROR bitmap table at " + Hex(table_off) + " has " + std::to_string(table_size) +
                " entries (at most " + std::to_string(kQcow2MaxBitmapTableEntries) + ")");
        continue;
      }
      Ref(table_off, uint64_t{table_size} * 8, "bitmap table");
      std::vector<uint8_t> t(uint64_t{table_size} * 8);
      COWTAP_RETURN_IF_ERROR(file_.ReadAt(table_off, t));
      for (uint32_t k = 0; k < table_size; ++k) {
        uint64_t off = LoadBe64(&t[k * 8]) & kQcow2OffsetMask;
        if (off) Ref(off, cs_, "bitmap data");
      }
    }
    return Status::Ok();
  }

 private:
  File& file_;
  const Qcow2Header& h_;
  const uint64_t cs_;
  const uint64_t file_size_;
  const std::string& path_;
  Qcow2RefScan r_;
};

}  // namespace

Result<Qcow2RefScan> ScanQcow2References(File& file, const Qcow2Header& h, const std::vector<Qcow2Snapshot>& snapshots,
                                         const std::vector<uint64_t>& refcount_table, uint64_t file_size,
                                         const std::string& path) {
  const uint64_t cs = h.cluster_size();
  if (DivRoundUp(file_size, cs) > kMaxScanClusters)
    return Status::NotSupported(path + ": image file has too many clusters to scan in memory (" +
                                std::to_string(DivRoundUp(file_size, cs)) + ")");
  Scanner s(file, h, file_size, path);
  s.result().refs.assign(DivRoundUp(file_size, cs), 0);
  s.Ref(0, cs, "header");
  s.Ref(h.l1_table_offset, uint64_t{h.l1_size} * 8, "L1 table");
  COWTAP_RETURN_IF_ERROR(s.WalkL1(h.l1_table_offset, h.l1_size, true));
  s.Ref(h.refcount_table_offset, uint64_t{h.refcount_table_clusters} * cs, "refcount table");
  for (uint64_t e : refcount_table)
    if (e) s.Ref(e & ~(cs - 1), cs, "refcount block");
  uint64_t snap_bytes = 0;
  for (const auto& sn : snapshots) snap_bytes += EncodeQcow2Snapshot(sn).size();
  s.Ref(h.snapshots_offset, snap_bytes, "snapshot table");
  for (const auto& sn : snapshots) {
    s.Ref(sn.l1_table_offset, uint64_t{sn.l1_size} * 8, "snapshot L1 table");
    COWTAP_RETURN_IF_ERROR(s.WalkL1(sn.l1_table_offset, sn.l1_size, false));
  }
  // With autoclear bit 0 clear, a program without bitmap support (cowtap
  // among them) has written the image since the bitmaps were saved: they are
  // inconsistent, and QEMU ignores the extension, so their clusters count as
  // leaks here too (qemu-img check -r leaks and ours then agree).
  if (h.autoclear_features & kQcow2AutoclearBitmaps) {
    for (const auto& e : h.other_extensions)
      if (e.type == kQcow2ExtBitmaps) COWTAP_RETURN_IF_ERROR(s.WalkBitmaps(e.data));
  }
  return std::move(s.result());
}

Result<Qcow2Header> ReadQcow2Header(File& file, const std::string& path) {
  COWTAP_ASSIGN_OR_RETURN(uint64_t file_size, file.Size());
  std::vector<uint8_t> prefix(std::min<uint64_t>(file_size, 4096));
  COWTAP_RETURN_IF_ERROR(file.ReadAt(0, prefix));
  uint32_t cb = PeekQcow2ClusterBits(prefix);
  if (cb >= 9 && cb <= 21 && (1ull << cb) > prefix.size() && file_size > prefix.size()) {
    prefix.resize(std::min<uint64_t>(file_size, 1ull << cb));
    COWTAP_RETURN_IF_ERROR(file.ReadAt(0, prefix));
  }
  return ParseQcow2Header(prefix, file_size, path);
}

Result<std::vector<Qcow2Snapshot>> ReadQcow2SnapshotTable(File& file, const Qcow2Header& h, uint64_t file_size,
                                                          const std::string& path) {
  std::vector<Qcow2Snapshot> out;
  uint64_t off = h.snapshots_offset;
  for (uint32_t i = 0; i < h.nb_snapshots; ++i) {
    uint8_t fixed[kQcow2SnapshotFixedBytes];
    if (!RangeWithin(off, sizeof(fixed), file_size))
      return Status::Corrupt(path + ": snapshot table entry " + std::to_string(i) + " lies beyond the end of file");
    COWTAP_RETURN_IF_ERROR(file.ReadAt(off, fixed));
    uint64_t n = Qcow2SnapshotEntryBytes(fixed);
    // Bound the image-chosen size before allocating for it (the parser
    // refuses the same limit on the entry it is given).
    if (LoadBe32(fixed + 36) > kQcow2MaxSnapshotExtraBytes)
      return Status::Corrupt(path + ": snapshot table entry " + std::to_string(i) + " has " +
                             std::to_string(LoadBe32(fixed + 36)) + " bytes of extra data (at most " +
                             std::to_string(kQcow2MaxSnapshotExtraBytes) + ")");
    // QEMU does not write the padding of the last entry, so only the
    // unpadded bytes must lie inside the file.
    uint64_t unpadded =
        kQcow2SnapshotFixedBytes + uint64_t{LoadBe32(fixed + 36)} + LoadBe16(fixed + 12) + LoadBe16(fixed + 14);
    if (!RangeWithin(off, unpadded, file_size))
      return Status::Corrupt(path + ": snapshot table entry " + std::to_string(i) + " lies beyond the end of file");
    std::vector<uint8_t> entry(n);
    COWTAP_RETURN_IF_ERROR(file.ReadAt(off, entry));
    COWTAP_ASSIGN_OR_RETURN(Qcow2Snapshot s, ParseQcow2Snapshot(entry, h, file_size, off, path));
    out.push_back(std::move(s));
    off += n;
  }
  return out;
}

}  // namespace cowtap::cow
