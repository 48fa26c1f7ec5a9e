// qcow v1 header and table-entry codec, and its raw-deflate helper (written
// for qcow v1 alone; qcow2 has its own codec module).
#include "cow/qcow_format.h"

#include <zlib.h>

#include <algorithm>

#include "base/checked_math.h"
#include "base/endian.h"

namespace cowtap::cow {
namespace {

std::string Hex(uint64_t v) {
  char buf[24];
  std::snprintf(buf, sizeof(buf), "0x%llx", static_cast<unsigned long long>(v));
  return buf;
}

Status Bad(const std::string& path, const std::string& what) {
  return Status::Corrupt(path + ": qcow header: " + what +
                         "; the file is damaged or not a qcow v1 image (check it with qemu-img info)");
}

}  // namespace

uint64_t QcowHeader::metadata_end() const {
  uint64_t end = std::max(kQcowHeaderBytes, l1_end());
  if (backing_file_offset != 0) end = std::max(end, backing_file_offset + backing_file_size);
  return end;
}

Result<QcowHeader> ParseQcowHeader(std::span<const uint8_t> bytes, uint64_t file_size, const std::string& path) {
  if (bytes.size() < kQcowHeaderBytes || file_size < kQcowHeaderBytes)
    return Bad(path, "file is " + std::to_string(file_size) + " bytes, shorter than the 48-byte header");
  const uint8_t* p = bytes.data();
  QcowHeader h;
  h.magic = LoadBe32(p);
  h.version = LoadBe32(p + 4);
  h.backing_file_offset = LoadBe64(p + 8);
  h.backing_file_size = LoadBe32(p + 16);
  h.mtime = LoadBe32(p + 20);
  h.size = LoadBe64(p + 24);
  h.cluster_bits = p[32];
  h.l2_bits = p[33];
  h.crypt_method = LoadBe32(p + 36);
  h.l1_table_offset = LoadBe64(p + 40);

  if (h.magic != kQcowMagic) return Bad(path, "bad magic " + Hex(h.magic) + " at offset 0");
  if (h.version != 1)
    return Status::NotSupported(path + ": qcow version " + std::to_string(h.version) +
                                " is not qcow v1 (open it as qcow2, or convert it with qemu-img convert)");
  if (h.crypt_method != 0)
    return Status::NotSupported(path + ": qcow v1 encryption (crypt_method " + std::to_string(h.crypt_method) +
                                ") is not supported (insecure legacy AES; decrypt with qemu-img convert)");
  if (h.cluster_bits < kQcowMinClusterBits || h.cluster_bits > kQcowMaxClusterBits)
    return Bad(path, "cluster_bits " + std::to_string(h.cluster_bits) + " at offset 32 is outside 9..16");
  if (h.l2_bits < kQcowMinL2Bits || h.l2_bits > kQcowMaxL2Bits)
    return Bad(path, "l2_bits " + std::to_string(h.l2_bits) + " at offset 33 is outside 6..13");
  if (h.size < 2) return Bad(path, "virtual size " + std::to_string(h.size) + " at offset 24 is too small");
  const uint64_t l1_entries = h.size / h.l1_entry_span() + (h.size % h.l1_entry_span() != 0);
  if (l1_entries > kQcowMaxL1Bytes / 8)
    return Bad(path, "virtual size " + std::to_string(h.size) + " needs an L1 table of " + std::to_string(l1_entries) +
                         " entries, more than the limit of " + std::to_string(kQcowMaxL1Bytes / 8));
  if (h.l1_table_offset < kQcowHeaderBytes)
    return Bad(path, "L1 table offset " + Hex(h.l1_table_offset) + " overlaps the header");
  if (!RangeWithin(h.l1_table_offset, l1_entries * 8, file_size))
    return Bad(path, "L1 table at " + Hex(h.l1_table_offset) + " (" + std::to_string(l1_entries * 8) +
                         " bytes) extends past the end of the file (" + std::to_string(file_size) + " bytes)");
  if (h.backing_file_offset != 0) {
    if (h.backing_file_size == 0) return Bad(path, "backing file name at " + Hex(h.backing_file_offset) + " is empty");
    if (h.backing_file_size > kQcowMaxBackingNameBytes)
      return Bad(path, "backing file name length " + std::to_string(h.backing_file_size) + " exceeds 1023 bytes");
    if (h.backing_file_offset < kQcowHeaderBytes)
      return Bad(path, "backing file name offset " + Hex(h.backing_file_offset) + " overlaps the header");
    if (!RangeWithin(h.backing_file_offset, h.backing_file_size, file_size))
      return Bad(path, "backing file name at " + Hex(h.backing_file_offset) + " extends past the end of the file");
    uint64_t name_end = h.backing_file_offset + h.backing_file_size;
    if (h.backing_file_offset < h.l1_end() && h.l1_table_offset < name_end)
      return Bad(path, "backing file name at " + Hex(h.backing_file_offset) + " overlaps the L1 table at " +
                           Hex(h.l1_table_offset));
  }
  return h;
}

void EncodeQcowHeader(const QcowHeader& h, std::span<uint8_t, kQcowHeaderBytes> out) {
  uint8_t* p = out.data();
  std::fill(out.begin(), out.end(), 0);
  StoreBe32(p, h.magic);
  StoreBe32(p + 4, h.version);
  StoreBe64(p + 8, h.backing_file_offset);
  StoreBe32(p + 16, h.backing_file_size);
  StoreBe32(p + 20, h.mtime);
  StoreBe64(p + 24, h.size);
  p[32] = h.cluster_bits;
  p[33] = h.l2_bits;
  StoreBe32(p + 36, h.crypt_method);
  StoreBe64(p + 40, h.l1_table_offset);
}

Status ValidateQcowL1Entry(const QcowHeader& h, uint64_t entry, uint64_t l1_index, uint64_t file_end,
                           const std::string& path) {
  const std::string where = path + ": L1 entry " + std::to_string(l1_index) + " (L2 table at " + Hex(entry) + ")";
  if (entry % h.cluster_size() != 0)
    return Status::Corrupt(where + " is not aligned to the cluster size " + std::to_string(h.cluster_size()));
  if (entry < h.metadata_end()) return Status::Corrupt(where + " overlaps the header or L1 table");
  if (!RangeWithin(entry, h.l2_table_bytes(), file_end))
    return Status::Corrupt(where + " extends past the end of the file (" + std::to_string(file_end) + " bytes)");
  return Status::Ok();
}

Result<QcowCluster> DecodeQcowL2Entry(const QcowHeader& h, uint64_t entry, uint64_t cluster_index, uint64_t file_end,
                                      const std::string& path) {
  QcowCluster c;
  if (entry == 0) return c;
  const uint64_t metadata_end = h.metadata_end();
  auto where = [&] { return path + ": L2 entry for guest cluster " + std::to_string(cluster_index) + " (" + Hex(entry) + ")"; };
  if (entry & kQcowCompressedFlag) {
    const int shift = 63 - h.cluster_bits;
    c.kind = QcowCluster::kCompressed;
    c.host_offset = entry & ((uint64_t{1} << shift) - 1);
    c.compressed_bytes = (entry >> shift) & (h.cluster_size() - 1);
    if (c.compressed_bytes == 0) return Status::Corrupt(where() + " is a compressed cluster of length 0");
    if (c.host_offset < metadata_end) return Status::Corrupt(where() + " points into the header or L1 table");
    if (!RangeWithin(c.host_offset, c.compressed_bytes, file_end))
      return Status::Corrupt(where() + " extends past the end of the file (" + std::to_string(file_end) + " bytes)");
    return c;
  }
  c.kind = QcowCluster::kNormal;
  c.host_offset = entry;
  if (entry % h.cluster_size() != 0)
    return Status::Corrupt(where() + " is not aligned to the cluster size " + std::to_string(h.cluster_size()));
  if (entry < metadata_end) return Status::Corrupt(where() + " points into the header or L1 table");
  if (!RangeWithin(entry, h.cluster_size(), file_end))
    return Status::Corrupt(where() + " extends past the end of the file (" + std::to_string(file_end) + " bytes)");
  return c;
}

uint64_t EncodeQcowCompressedEntry(const QcowHeader& h, uint64_t host_offset, uint64_t bytes) {
  return kQcowCompressedFlag | (bytes << (63 - h.cluster_bits)) | host_offset;
}

Status QcowInflateCluster(std::span<const uint8_t> in, std::span<uint8_t> out) {
  z_stream zs{};
  // Raw deflate (negative window bits); the largest window decodes streams
  // written with any smaller one, including qcow's 4 KiB.
  if (inflateInit2(&zs, -MAX_WBITS) != Z_OK) return Status::Internal("zlib inflateInit2 failed");
  zs.next_in = const_cast<Bytef*>(in.data());
  zs.avail_in = static_cast<uInt>(in.size());
  zs.next_out = out.data();
  zs.avail_out = static_cast<uInt>(out.size());
  const int rc = inflate(&zs, Z_FINISH);
  const uint64_t produced = out.size() - zs.avail_out;
  inflateEnd(&zs);
  // A stream whose end marker is cut off but which filled the cluster is
  // accepted (Z_BUF_ERROR), as qcow writers may pad or truncate.
  if ((rc != Z_STREAM_END && rc != Z_BUF_ERROR) || produced != out.size())
    return Status::Corrupt("compressed cluster of " + std::to_string(in.size()) + " bytes inflates to " +
                           std::to_string(produced) + " bytes, not " + std::to_string(out.size()) +
                           " (zlib status " + std::to_string(rc) + ")");
  return Status::Ok();
}

Result<std::vector<uint8_t>> QcowDeflateCluster(std::span<const uint8_t> in) {
  z_stream zs{};
  if (deflateInit2(&zs, Z_DEFAULT_COMPRESSION, Z_DEFLATED, -12, 9, Z_DEFAULT_STRATEGY) != Z_OK)
    return Status::Internal("zlib deflateInit2 failed");
  std::vector<uint8_t> out(deflateBound(&zs, static_cast<uLong>(in.size())));
  zs.next_in = const_cast<Bytef*>(in.data());
  zs.avail_in = static_cast<uInt>(in.size());
  zs.next_out = out.data();
  zs.avail_out = static_cast<uInt>(out.size());
  const int rc = deflate(&zs, Z_FINISH);
  out.resize(out.size() - zs.avail_out);
  deflateEnd(&zs);
  if (rc != Z_STREAM_END) return Status::Internal("zlib deflate failed with status " + std::to_string(rc));
  return out;
}

}  // namespace cowtap::cow
