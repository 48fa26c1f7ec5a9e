// Qcow2 metadata codecs. Every size and offset read from the image is checked
// (overflow-checked arithmetic, bounds against the file size) before use.
#include "cow/qcow2_format.h"

#include <algorithm>

#include "base/checked_math.h"
#include "base/endian.h"

namespace cowtap::cow {
namespace {

std::string Hex(uint64_t v) {
  char buf[24];
  snprintf(buf, sizeof(buf), "0x%llx", static_cast<unsigned long long>(v));
  return buf;
}

Status Bad(const std::string& path, const std::string& what) {
  return Status::Corrupt(path + ": invalid qcow2 header: " + what +
                         " (the image is damaged; `qemu-img check` may say more)");
}

// Validates a table of `bytes` at `offset`: cluster aligned, below 2^56 and
// inside the file.
Status CheckTable(const std::string& path, const char* name, uint64_t offset, uint64_t bytes, uint64_t cluster_size,
                  uint64_t file_size) {
  if (offset % cluster_size != 0)
    return Bad(path, std::string(name) + " offset " + Hex(offset) + " is not cluster aligned");
  if (offset >= kQcow2MaxHostOffset) return Bad(path, std::string(name) + " offset " + Hex(offset) + " is >= 2^56");
  if (!RangeWithin(offset, bytes, file_size))
    return Bad(path, std::string(name) + " at " + Hex(offset) + " (" + std::to_string(bytes) +
                         " bytes) lies beyond the end of the file (" + std::to_string(file_size) + " bytes)");
  if (bytes != 0 && offset == 0) return Bad(path, std::string(name) + " overlaps the header at offset 0");
  return Status::Ok();
}

Status ParseExtensions(std::span<const uint8_t> c, uint64_t start, uint64_t end, Qcow2Header* h,
                       const std::string& path) {
  uint64_t off = start;
  std::vector<uint32_t> seen;
  while (true) {
    if (!RangeWithin(off, 8, end))
      return Bad(path, "header extension at offset " + std::to_string(off) + " runs past the header area");
    uint32_t type = LoadBe32(c.data() + off);
    uint32_t len = LoadBe32(c.data() + off + 4);
    if (type == kQcow2ExtEnd) return Status::Ok();
    uint64_t data_off = off + 8;
    if (!RangeWithin(data_off, len, end))
      return Bad(path, "header extension " + Hex(type) + " at offset " + std::to_string(off) + " (length " +
                           std::to_string(len) + ") runs past the header area");
    if (std::find(seen.begin(), seen.end(), type) != seen.end())
      return Bad(path, "header extension " + Hex(type) + " appears twice");
    seen.push_back(type);
    const uint8_t* d = c.data() + data_off;
    switch (type) {
      case kQcow2ExtBackingFormat:
        h->backing_format.assign(reinterpret_cast<const char*>(d), len);
        break;
      case kQcow2ExtDataFile:
        h->data_file.assign(reinterpret_cast<const char*>(d), len);
        break;
      case kQcow2ExtFeatureTable:
        for (uint32_t i = 0; i + 48 <= len; i += 48) {
          Qcow2FeatureName f;
          f.type = d[i];
          f.bit = d[i + 1];
          const char* n = reinterpret_cast<const char*>(d + i + 2);
          f.name.assign(n, strnlen(n, 46));
          h->feature_names.push_back(std::move(f));
        }
        break;
      case kQcow2ExtBitmaps:
        h->has_bitmaps_extension = true;
        h->other_extensions.push_back({type, std::vector<uint8_t>(d, d + len)});
        break;
      case kQcow2ExtCrypto:
        return Status::NotSupported(path +
                                    ": encrypted qcow2 images (LUKS) are not supported; decrypt with "
                                    "`qemu-img convert` first");
      default:
        h->other_extensions.push_back({type, std::vector<uint8_t>(d, d + len)});
        break;
    }
    uint64_t padded = (uint64_t{len} + 7) & ~uint64_t{7};
    off = data_off + padded;
  }
}

}  // namespace

uint64_t Qcow2L1EntriesFor(uint64_t size_bytes, uint32_t cluster_bits, bool extended_l2) {
  uint32_t l2_bits = cluster_bits - (extended_l2 ? 4 : 3);
  uint32_t shift = cluster_bits + l2_bits;
  if (shift >= 64) return 1;
  return DivRoundUp(size_bytes, 1ull << shift);
}

uint32_t PeekQcow2ClusterBits(std::span<const uint8_t> prefix) {
  return prefix.size() >= 24 ? LoadBe32(prefix.data() + 20) : 0;
}

std::string Qcow2FeatureBitNames(const Qcow2Header& header, uint8_t type, uint64_t bits) {
  std::string out;
  for (int bit = 0; bit < 64; ++bit) {
    if (!(bits & (1ull << bit))) continue;
    if (!out.empty()) out += ", ";
    std::string name;
    for (const auto& f : header.feature_names)
      if (f.type == type && f.bit == bit) name = f.name;
    out += name.empty() ? "bit " + std::to_string(bit) : "'" + name + "' (bit " + std::to_string(bit) + ")";
  }
  return out;
}

Result<Qcow2Header> ParseQcow2Header(std::span<const uint8_t> c, uint64_t file_size, const std::string& path) {
  if (c.size() < 72) return Bad(path, "file is too short for a qcow2 header (" + std::to_string(c.size()) + " bytes)");
  Qcow2Header h;
  const uint8_t* p = c.data();
  if (LoadBe32(p) != kQcow2Magic) return Bad(path, "bad magic (not a qcow2 image)");
  h.version = LoadBe32(p + 4);
  if (h.version != 2 && h.version != 3)
    return Status::NotSupported(path + ": qcow2 version " + std::to_string(h.version) +
                                " is not supported (cowtap reads versions 2 and 3)");
  h.backing_file_offset = LoadBe64(p + 8);
  h.backing_file_size = LoadBe32(p + 16);
  h.cluster_bits = LoadBe32(p + 20);
  h.size = LoadBe64(p + 24);
  h.crypt_method = LoadBe32(p + 32);
  h.l1_size = LoadBe32(p + 36);
  h.l1_table_offset = LoadBe64(p + 40);
  h.refcount_table_offset = LoadBe64(p + 48);
  h.refcount_table_clusters = LoadBe32(p + 56);
  h.nb_snapshots = LoadBe32(p + 60);
  h.snapshots_offset = LoadBe64(p + 64);
  if (h.cluster_bits < 9 || h.cluster_bits > 21)
    return Bad(path, "cluster_bits " + std::to_string(h.cluster_bits) + " is outside 9..21 (512 B..2 MiB)");
  const uint64_t cs = h.cluster_size();
  if (h.version == 2) {
    h.refcount_order = 4;
    h.header_length = 72;
  } else {
    if (c.size() < 104) return Bad(path, "file is too short for a version 3 header");
    h.incompatible_features = LoadBe64(p + 72);
    h.compatible_features = LoadBe64(p + 80);
    h.autoclear_features = LoadBe64(p + 88);
    h.refcount_order = LoadBe32(p + 96);
    h.header_length = LoadBe32(p + 100);
    if (h.header_length < 104 || h.header_length % 8 != 0 || h.header_length > cs || h.header_length > c.size())
      return Bad(path, "header_length " + std::to_string(h.header_length) +
                           " must be >= 104, a multiple of 8 and inside the first cluster");
    if (h.header_length > 104) h.compression_type = p[104];
    if (h.header_length > 112) h.extra_fields.assign(p + 112, p + h.header_length);
  }
  if (h.refcount_order > 6)
    return Bad(path, "refcount_order " + std::to_string(h.refcount_order) + " is above 6 (64-bit refcounts)");
  if (c.size() > cs) c = c.first(cs);

  // Extensions first: the feature name table names unknown bits.
  uint64_t ext_end = c.size();
  if (h.backing_file_offset != 0) ext_end = std::min<uint64_t>(ext_end, h.backing_file_offset);
  if (ext_end < h.header_length) ext_end = h.header_length;
  COWTAP_RETURN_IF_ERROR(ParseExtensions(c, h.header_length, ext_end, &h, path));

  uint64_t unknown = h.incompatible_features & ~kQcow2IncompatKnown;
  if (unknown)
    return Status::NotSupported(path + ": unsupported qcow2 incompatible feature(s): " +
                                Qcow2FeatureBitNames(h, 0, unknown) + "; cowtap cannot open this image");
  if (h.crypt_method != 0)
    return Status::NotSupported(path + ": encrypted qcow2 images (crypt_method " + std::to_string(h.crypt_method) +
                                ") are not supported; decrypt with `qemu-img convert` first");
  if (h.extended_l2() && h.cluster_bits < 14)
    return Bad(path, "extended L2 entries need cluster_bits >= 14, found " + std::to_string(h.cluster_bits));
  if (h.compression_type > 1)
    return Status::NotSupported(path + ": unknown compression_type " + std::to_string(h.compression_type));
  bool compression_bit = h.incompatible_features & kQcow2IncompatCompression;
  if (compression_bit != (h.compression_type != 0))
    return Bad(path,
               "compression_type " + std::to_string(h.compression_type) + " disagrees with incompatible feature bit 3");

  if (h.size > (1ull << 62)) return Bad(path, "virtual size " + std::to_string(h.size) + " is implausibly large");
  // L1 table.
  uint64_t needed = Qcow2L1EntriesFor(h.size, h.cluster_bits, h.extended_l2());
  if (uint64_t{h.l1_size} * 8 > kQcow2MaxL1Bytes || needed * 8 > kQcow2MaxL1Bytes)
    return Bad(path, "L1 table of " + std::to_string(std::max<uint64_t>(h.l1_size, needed)) +
                         " entries is larger than 32 MiB");
  if (h.l1_size < needed)
    return Bad(path, "l1_size " + std::to_string(h.l1_size) + " is too small for virtual size " +
                         std::to_string(h.size) + " (needs " + std::to_string(needed) + ")");
  if (h.l1_size > 0)
    COWTAP_RETURN_IF_ERROR(CheckTable(path, "L1 table", h.l1_table_offset, uint64_t{h.l1_size} * 8, cs, file_size));
  // Refcount table.
  uint64_t rt_bytes = uint64_t{h.refcount_table_clusters} * cs;
  if (h.refcount_table_clusters == 0) return Bad(path, "refcount_table_clusters is 0");
  if (rt_bytes > kQcow2MaxRefcountTableBytes)
    return Bad(path, "refcount table of " + std::to_string(rt_bytes) + " bytes is larger than 8 MiB");
  COWTAP_RETURN_IF_ERROR(CheckTable(path, "refcount table", h.refcount_table_offset, rt_bytes, cs, file_size));
  // Snapshot table.
  if (h.nb_snapshots > kQcow2MaxSnapshots)
    return Bad(path, "nb_snapshots " + std::to_string(h.nb_snapshots) + " is above 65536");
  if (h.nb_snapshots > 0)
    COWTAP_RETURN_IF_ERROR(
        CheckTable(path, "snapshot table", h.snapshots_offset, uint64_t{h.nb_snapshots} * 40, cs, file_size));
  // Backing file name: inside the first cluster, after the header.
  if (h.backing_file_offset != 0) {
    if (h.backing_file_size > kQcow2MaxBackingNameBytes)
      return Bad(path, "backing file name length " + std::to_string(h.backing_file_size) + " is above 1023");
    if (h.backing_file_offset < h.header_length || !RangeWithin(h.backing_file_offset, h.backing_file_size, cs))
      return Bad(path, "backing file name at offset " + std::to_string(h.backing_file_offset) + " (" +
                           std::to_string(h.backing_file_size) + " bytes) lies outside the first cluster");
    if (!RangeWithin(h.backing_file_offset, h.backing_file_size, c.size()))
      return Bad(path, "backing file name lies beyond the end of the file");
    h.backing_file.assign(reinterpret_cast<const char*>(c.data() + h.backing_file_offset), h.backing_file_size);
  }
  if (h.has_data_file() && h.nb_snapshots > 0)
    return Bad(path, "an image with an external data file cannot have internal snapshots");
  return h;
}

Result<std::vector<uint8_t>> EncodeQcow2Header(const Qcow2Header& h) {
  const uint64_t cs = h.cluster_size();
  std::vector<uint8_t> out(cs, 0);
  uint8_t* p = out.data();
  uint32_t header_length = h.version == 2 ? 72 : std::max<uint32_t>(h.header_length, 112);
  if (header_length > cs) return Status::InvalidArgument("qcow2 header does not fit in one cluster");
  StoreBe32(p, kQcow2Magic);
  StoreBe32(p + 4, h.version);
  StoreBe32(p + 20, h.cluster_bits);
  StoreBe64(p + 24, h.size);
  StoreBe32(p + 32, h.crypt_method);
  StoreBe32(p + 36, h.l1_size);
  StoreBe64(p + 40, h.l1_table_offset);
  StoreBe64(p + 48, h.refcount_table_offset);
  StoreBe32(p + 56, h.refcount_table_clusters);
  StoreBe32(p + 60, h.nb_snapshots);
  StoreBe64(p + 64, h.snapshots_offset);
  if (h.version >= 3) {
    StoreBe64(p + 72, h.incompatible_features);
    StoreBe64(p + 80, h.compatible_features);
    StoreBe64(p + 88, h.autoclear_features);
    StoreBe32(p + 96, h.refcount_order);
    StoreBe32(p + 100, header_length);
    p[104] = h.compression_type;
    if (!h.extra_fields.empty() && 112 + h.extra_fields.size() <= header_length)
      std::copy(h.extra_fields.begin(), h.extra_fields.end(), p + 112);
  }
  uint64_t off = header_length;
  auto put_ext = [&](uint32_t type, const uint8_t* data, uint32_t len) -> bool {
    uint64_t padded = (uint64_t{len} + 7) & ~uint64_t{7};
    if (off + 8 + padded + 8 > cs) return false;
    StoreBe32(p + off, type);
    StoreBe32(p + off + 4, len);
    if (len) std::copy(data, data + len, p + off + 8);
    off += 8 + padded;
    return true;
  };
  auto str = [](const std::string& s) { return reinterpret_cast<const uint8_t*>(s.data()); };
  bool ok = true;
  if (!h.backing_format.empty())
    ok &= put_ext(kQcow2ExtBackingFormat, str(h.backing_format), static_cast<uint32_t>(h.backing_format.size()));
  if (h.version >= 3 && !h.data_file.empty())
    ok &= put_ext(kQcow2ExtDataFile, str(h.data_file), static_cast<uint32_t>(h.data_file.size()));
  for (const auto& e : h.other_extensions) ok &= put_ext(e.type, e.data.data(), static_cast<uint32_t>(e.data.size()));
  if (!ok) return Status::InvalidArgument("qcow2 header extensions do not fit in one cluster");
  // The feature name table is informative only: left out when the cluster
  // is too small to hold it next to the backing file name.
  if (!h.feature_names.empty()) {
    std::vector<uint8_t> t(h.feature_names.size() * 48, 0);
    for (size_t i = 0; i < h.feature_names.size(); ++i) {
      t[i * 48] = h.feature_names[i].type;
      t[i * 48 + 1] = h.feature_names[i].bit;
      std::copy_n(h.feature_names[i].name.begin(), std::min<size_t>(46, h.feature_names[i].name.size()),
                  t.begin() + i * 48 + 2);
    }
    if (off + 8 + t.size() + 8 + h.backing_file.size() <= cs)
      put_ext(kQcow2ExtFeatureTable, t.data(), static_cast<uint32_t>(t.size()));
  }
  off += 8;  // end-of-extensions marker (zeros)
  if (!h.backing_file.empty()) {
    if (h.backing_file.size() > kQcow2MaxBackingNameBytes || off + h.backing_file.size() > cs)
      return Status::InvalidArgument("backing file name is too long (max 1023 bytes, inside the first cluster)");
    StoreBe64(p + 8, off);
    StoreBe32(p + 16, static_cast<uint32_t>(h.backing_file.size()));
    std::copy(h.backing_file.begin(), h.backing_file.end(), p + off);
  }
  return out;
}

Result<Qcow2ClusterType> ClassifyQcow2L2Entry(const Qcow2L2Entry& e, const Qcow2Header& h, bool data_file,
                                              uint64_t l2_entry_offset, const std::string& path) {
  auto bad = [&](const std::string& what) {
    return Status::Corrupt(path + ": L2 entry at offset " + Hex(l2_entry_offset) + " (" + Hex(e.raw) + "): " + what +
                           "; run `qemu-img check` on the image");
  };
  if (e.raw & kQcow2Compressed) {
    if (data_file) return bad("compressed cluster in an image with an external data file");
    if (h.extended_l2() && e.bitmap != 0) return bad("compressed cluster with a non-zero subcluster bitmap");
    if (e.raw & kQcow2Copied) return bad("compressed cluster has the COPIED flag");
    return Qcow2ClusterType::kCompressed;
  }
  if (e.raw & kQcow2L2Reserved) return bad("reserved bits are set");
  uint64_t off = e.raw & kQcow2OffsetMask;
  if (off % h.cluster_size() != 0) return bad("host offset is not cluster aligned");
  if (h.extended_l2()) {
    if (e.raw & kQcow2ZeroFlag) return bad("zero flag set in an extended L2 entry");
    if (Qcow2SubAllocMask(e.bitmap) & Qcow2SubZeroMask(e.bitmap))
      return bad("subcluster bitmap " + Hex(e.bitmap) + " marks a subcluster both allocated and zero");
    if (off == 0 && !(data_file && (e.raw & kQcow2Copied))) {
      if (Qcow2SubAllocMask(e.bitmap)) return bad("allocated subclusters without a host cluster");
      return Qcow2SubZeroMask(e.bitmap) ? Qcow2ClusterType::kZeroPlain : Qcow2ClusterType::kUnallocated;
    }
    return Qcow2ClusterType::kNormal;
  }
  bool zero = e.raw & kQcow2ZeroFlag;
  if (zero && h.version < 3) return bad("zero flag in a version 2 image");
  bool allocated = off != 0 || (data_file && (e.raw & kQcow2Copied));
  if (!allocated) return zero ? Qcow2ClusterType::kZeroPlain : Qcow2ClusterType::kUnallocated;
  return zero ? Qcow2ClusterType::kZeroAlloc : Qcow2ClusterType::kNormal;
}

Qcow2CompressedDesc DecodeQcow2Compressed(uint64_t raw, uint32_t cluster_bits) {
  const uint32_t x = 62 - (cluster_bits - 8);
  Qcow2CompressedDesc d;
  d.host_offset = raw & ((1ull << x) - 1);
  uint64_t nsect = (raw >> x) & ((1ull << (cluster_bits - 8)) - 1);
  d.max_length = (nsect + 1) * 512 - (d.host_offset & 511);
  return d;
}

uint64_t EncodeQcow2Compressed(uint64_t host_offset, uint64_t length, uint32_t cluster_bits) {
  const uint32_t x = 62 - (cluster_bits - 8);
  uint64_t last = host_offset + length - 1;
  uint64_t nsect = (last / 512) - (host_offset / 512);
  return kQcow2Compressed | (nsect << x) | host_offset;
}

Result<uint64_t> DecodeQcow2L1Entry(uint64_t raw, const Qcow2Header& h, uint64_t l1_entry_offset,
                                    const std::string& path) {
  if (raw & kQcow2L1Reserved)
    return Status::Corrupt(path + ": L1 entry at offset " + Hex(l1_entry_offset) + " (" + Hex(raw) +
                           ") has reserved bits set; run `qemu-img check` on the image");
  uint64_t off = raw & kQcow2OffsetMask;
  if (off % h.cluster_size() != 0)
    return Status::Corrupt(path + ": L1 entry at offset " + Hex(l1_entry_offset) + " points to misaligned L2 table " +
                           Hex(off) + "; run `qemu-img check` on the image");
  return off;
}

uint64_t GetQcow2Refcount(std::span<const uint8_t> b, uint64_t index, uint32_t order) {
  switch (order) {
    case 3:
      return b[index];
    case 4:
      return LoadBe16(&b[index * 2]);
    case 5:
      return LoadBe32(&b[index * 4]);
    case 6:
      return LoadBe64(&b[index * 8]);
    default: {
      const uint32_t bits = 1u << order;
      uint64_t bit = index * bits;
      return (b[bit / 8] >> (bit % 8)) & ((1u << bits) - 1);
    }
  }
}

void SetQcow2Refcount(std::span<uint8_t> b, uint64_t index, uint32_t order, uint64_t value) {
  switch (order) {
    case 3:
      b[index] = static_cast<uint8_t>(value);
      return;
    case 4:
      StoreBe16(&b[index * 2], static_cast<uint16_t>(value));
      return;
    case 5:
      StoreBe32(&b[index * 4], static_cast<uint32_t>(value));
      return;
    case 6:
      StoreBe64(&b[index * 8], value);
      return;
    default: {
      const uint32_t bits = 1u << order;
      uint64_t bit = index * bits;
      uint8_t mask = static_cast<uint8_t>(((1u << bits) - 1) << (bit % 8));
      b[bit / 8] = static_cast<uint8_t>((b[bit / 8] & ~mask) | ((value << (bit % 8)) & mask));
    }
  }
}

uint64_t Qcow2SnapshotEntryBytes(std::span<const uint8_t> f) {
  uint64_t n =
      kQcow2SnapshotFixedBytes + uint64_t{LoadBe32(f.data() + 36)} + LoadBe16(f.data() + 12) + LoadBe16(f.data() + 14);
  return (n + 7) & ~uint64_t{7};
}

Result<Qcow2Snapshot> ParseQcow2Snapshot(std::span<const uint8_t> e, const Qcow2Header& h, uint64_t file_size,
                                         uint64_t entry_offset, const std::string& path) {
  auto bad = [&](const std::string& what) {
    return Status::Corrupt(path + ": snapshot table entry at offset " + Hex(entry_offset) + ": " + what);
  };
  if (e.size() < kQcow2SnapshotFixedBytes || e.size() < Qcow2SnapshotEntryBytes(e)) return bad("truncated");
  Qcow2Snapshot s;
  const uint8_t* p = e.data();
  s.l1_table_offset = LoadBe64(p);
  s.l1_size = LoadBe32(p + 8);
  uint16_t id_len = LoadBe16(p + 12), name_len = LoadBe16(p + 14);
  s.date_sec = LoadBe32(p + 16);
  s.date_nsec = LoadBe32(p + 20);
  s.vm_clock_nsec = LoadBe64(p + 24);
  s.vm_state_size32 = LoadBe32(p + 32);
  uint32_t extra = LoadBe32(p + 36);
  if (extra > kQcow2MaxSnapshotExtraBytes)
    return bad("extra data of " + std::to_string(extra) + " bytes is above " +
               std::to_string(kQcow2MaxSnapshotExtraBytes));
  s.extra_data.assign(p + 40, p + 40 + extra);
  s.vm_state_size = s.vm_state_size32;
  if (extra >= 8) s.vm_state_size = LoadBe64(p + 40);
  if (extra >= 16) s.disk_size = LoadBe64(p + 48);
  s.id.assign(reinterpret_cast<const char*>(p + 40 + extra), id_len);
  s.name.assign(reinterpret_cast<const char*>(p + 40 + extra + id_len), name_len);
  if (uint64_t{s.l1_size} * 8 > kQcow2MaxL1Bytes) return bad("L1 table is larger than 32 MiB");
  if (s.l1_table_offset % h.cluster_size() != 0) return bad("L1 table offset is not cluster aligned");
  if (!RangeWithin(s.l1_table_offset, uint64_t{s.l1_size} * 8, file_size))
    return bad("L1 table lies beyond the end of the file");
  return s;
}

std::vector<uint8_t> EncodeQcow2Snapshot(const Qcow2Snapshot& s) {
  uint64_t n = kQcow2SnapshotFixedBytes + s.extra_data.size() + s.id.size() + s.name.size();
  std::vector<uint8_t> out((n + 7) & ~uint64_t{7}, 0);
  uint8_t* p = out.data();
  StoreBe64(p, s.l1_table_offset);
  StoreBe32(p + 8, s.l1_size);
  StoreBe16(p + 12, static_cast<uint16_t>(s.id.size()));
  StoreBe16(p + 14, static_cast<uint16_t>(s.name.size()));
  StoreBe32(p + 16, s.date_sec);
  StoreBe32(p + 20, s.date_nsec);
  StoreBe64(p + 24, s.vm_clock_nsec);
  StoreBe32(p + 32, s.vm_state_size32);
  StoreBe32(p + 36, static_cast<uint32_t>(s.extra_data.size()));
  std::copy(s.extra_data.begin(), s.extra_data.end(), p + 40);
  std::copy(s.id.begin(), s.id.end(), p + 40 + s.extra_data.size());
  std::copy(s.name.begin(), s.name.end(), p + 40 + s.extra_data.size() + s.id.size());
  return out;
}

}  // namespace cowtap::cow
