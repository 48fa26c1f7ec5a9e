// CreateQcow2Image: writes a new, empty qcow2 image (header, refcount table,
// refcount blocks covering the metadata, empty L1) in a single write, so an
// overlay over a base image takes one small write and one flush.
#include <algorithm>

#include "base/checked_math.h"
#include "base/endian.h"
#include "cow/formats.h"
#include "cow/qcow2_format.h"

namespace cowtap::cow {

Status CreateQcow2Image(const std::string& path, const CreateOptions& o, FileSystem* fs) {
  auto bad = [&](const std::string& what) { return Status::InvalidArgument(path + ": cannot create qcow2: " + what); };
  if (!IsPowerOfTwo(o.cluster_size) || o.cluster_size < 512 || o.cluster_size > (2u << 20))
    return bad("cluster_size " + std::to_string(o.cluster_size) + " must be a power of two in 512..2097152");
  if (o.qcow2_version != 2 && o.qcow2_version != 3) return bad("version must be 2 (compat=0.10) or 3 (compat=1.1)");
  if (o.refcount_bits < 1 || o.refcount_bits > 64 || !IsPowerOfTwo(static_cast<uint64_t>(o.refcount_bits)))
    return bad("refcount_bits must be one of 1, 2, 4, 8, 16, 32, 64");
  if (o.compression_type != "zlib" && o.compression_type != "zstd") return bad("compression_type must be zlib or zstd");
  const bool v2 = o.qcow2_version == 2;
  if (v2 && (o.refcount_bits != 16 || o.lazy_refcounts || o.extended_l2 || o.compression_type != "zlib" ||
             !o.data_file.empty()))
    return bad(
        "version 2 images support only 16-bit refcounts, zlib, no lazy refcounts, no extended L2 and no "
        "data file; use version 3");
  if (o.extended_l2 && o.cluster_size < 16384) return bad("extended_l2 needs a cluster size of at least 16 KiB");
  if (o.data_file_raw && o.data_file.empty()) return bad("data_file_raw needs data_file");
  if (o.data_file_raw && !o.backing_file.empty()) return bad("data_file_raw cannot be combined with a backing file");
  if (o.size_bytes > (1ull << 62)) return bad("virtual size is too large");

  Qcow2Header h;
  h.version = static_cast<uint32_t>(o.qcow2_version);
  h.cluster_bits = static_cast<uint32_t>(__builtin_ctz(o.cluster_size));
  h.size = o.size_bytes;
  h.refcount_order = static_cast<uint32_t>(__builtin_ctz(static_cast<unsigned>(o.refcount_bits)));
  h.header_length = v2 ? 72 : 112;
  if (!v2) {
    if (o.extended_l2) h.incompatible_features |= kQcow2IncompatExtendedL2;
    if (o.compression_type == "zstd") {
      h.incompatible_features |= kQcow2IncompatCompression;
      h.compression_type = 1;
    }
    if (!o.data_file.empty()) {
      h.incompatible_features |= kQcow2IncompatDataFile;
      h.data_file = o.data_file;
    }
    if (o.data_file_raw) h.autoclear_features |= kQcow2AutoclearDataFileRaw;
    if (o.lazy_refcounts) h.compatible_features |= kQcow2CompatLazyRefcounts;
    h.feature_names = {{0, 0, "dirty bit"},        {0, 1, "corrupt bit"},         {0, 2, "external data file"},
                       {0, 3, "compression type"}, {0, 4, "extended L2 entries"}, {1, 0, "lazy refcounts"},
                       {2, 0, "bitmaps"},          {2, 1, "raw external data"}};
  }
  h.backing_file = o.backing_file;
  if (!o.backing_file.empty() && o.backing_format) h.backing_format = std::string(FormatName(*o.backing_format));

  const uint64_t cs = h.cluster_size();
  const uint64_t l1_entries = Qcow2L1EntriesFor(h.size, h.cluster_bits, o.extended_l2);
  if (l1_entries * 8 > kQcow2MaxL1Bytes)
    return bad("virtual size needs an L1 table above 32 MiB; use a larger cluster size");
  h.l1_size = static_cast<uint32_t>(l1_entries);
  const uint64_t l1_clusters = std::max<uint64_t>(1, DivRoundUp(l1_entries * 8, cs));
  // Refcount blocks must cover every metadata cluster, themselves included.
  const uint64_t per_block = cs * 8 / static_cast<uint64_t>(o.refcount_bits);
  uint64_t table_clusters = 1, blocks = 1;
  while (true) {
    uint64_t total = 1 + table_clusters + blocks + l1_clusters;
    uint64_t need_blocks = DivRoundUp(total, per_block);
    uint64_t need_table = DivRoundUp(need_blocks * 8, cs);
    if (need_blocks == blocks && need_table == table_clusters) break;
    blocks = need_blocks;
    table_clusters = need_table;
  }
  if (table_clusters * cs > kQcow2MaxRefcountTableBytes) return bad("refcount table would exceed 8 MiB");
  const uint64_t total = 1 + table_clusters + blocks + l1_clusters;
  h.refcount_table_offset = cs;
  h.refcount_table_clusters = static_cast<uint32_t>(table_clusters);
  h.l1_table_offset = (1 + table_clusters + blocks) * cs;

  COWTAP_ASSIGN_OR_RETURN(std::vector<uint8_t> image, EncodeQcow2Header(h));
  image.resize(total * cs, 0);
  for (uint64_t b = 0; b < blocks; ++b) {
    uint64_t block_off = (1 + table_clusters + b) * cs;
    StoreBe64(&image[cs + b * 8], block_off);
    std::span<uint8_t> block(&image[block_off], cs);
    for (uint64_t c = b * per_block; c < std::min(total, (b + 1) * per_block); ++c)
      SetQcow2Refcount(block, c - b * per_block, h.refcount_order, 1);
  }

  if (!o.data_file.empty()) {
    FileOpenOptions dfo;
    dfo.create = true;
    dfo.writable = true;
    auto df = fs->Open(o.data_file, dfo);
    if (!df.ok()) return df.status().Annotate(path + ": creating external data file");
    COWTAP_RETURN_IF_ERROR((*df)->Truncate(0));
    if (o.data_file_raw) COWTAP_RETURN_IF_ERROR((*df)->Truncate(o.size_bytes));
    COWTAP_RETURN_IF_ERROR((*df)->Flush());
  }
  FileOpenOptions fo;
  fo.create = true;
  fo.writable = true;
  fo.exclusive = !o.overwrite;
  COWTAP_ASSIGN_OR_RETURN(auto file, fs->Open(path, fo));
  COWTAP_RETURN_IF_ERROR(file->Truncate(0));
  COWTAP_RETURN_IF_ERROR(file->WriteAt(0, image));
  return file->Flush();
}

}  // namespace cowtap::cow
