// CreateQcowImage: writes what `qemu-img create -f qcow` writes. Without a
// backing file: 4 KiB clusters and 4 KiB L2 tables; with one: 512-byte
// clusters and 32 KiB L2 tables, so that copy-up copies little. The layout is
// header, backing name, then the zeroed L1 table padded to a 512-byte
// multiple; no L2 table or data cluster exists until the first write.
#include <array>

#include "base/checked_math.h"
#include "cow/formats.h"
#include "cow/qcow_format.h"

namespace cowtap::cow {

Status CreateQcowImage(const std::string& path, const CreateOptions& options, FileSystem* fs) {
  if (!options.data_file.empty())
    return Status::InvalidArgument(path + ": qcow v1 has no external data file (use qcow2)");
  if (options.backing_file.size() > kQcowMaxBackingNameBytes)
    return Status::InvalidArgument(path + ": backing file name is longer than 1023 bytes");
  QcowHeader h;
  const bool has_backing = !options.backing_file.empty();
  h.cluster_bits = has_backing ? 9 : 12;
  h.l2_bits = has_backing ? 12 : 9;
  auto size = AlignUp(options.size_bytes, 512);
  if (!size || *size < 512)
    return Status::InvalidArgument(path + ": qcow image size " + std::to_string(options.size_bytes) +
                                   " must be between 512 bytes and 2^63");
  h.size = *size;
  const uint64_t l1_entries = h.size / h.l1_entry_span() + (h.size % h.l1_entry_span() != 0);
  if (l1_entries > kQcowMaxL1Bytes / 8)
    return Status::InvalidArgument(path + ": size " + std::to_string(h.size) + " is too large for qcow v1 with " +
                                   std::to_string(h.cluster_size()) + "-byte clusters (use qcow2)");
  if (has_backing) {
    h.backing_file_offset = kQcowHeaderBytes;
    h.backing_file_size = static_cast<uint32_t>(options.backing_file.size());
  }
  h.l1_table_offset = kQcowHeaderBytes + h.backing_file_size;

  FileOpenOptions fo;
  fo.create = true;
  fo.writable = true;
  fo.exclusive = !options.overwrite;
  COWTAP_ASSIGN_OR_RETURN(auto file, fs->Open(path, fo));
  COWTAP_RETURN_IF_ERROR(file->Truncate(0));
  std::vector<uint8_t> head(h.l1_table_offset);
  EncodeQcowHeader(h, std::span<uint8_t, kQcowHeaderBytes>(head.data(), kQcowHeaderBytes));
  std::copy(options.backing_file.begin(), options.backing_file.end(), head.begin() + kQcowHeaderBytes);
  COWTAP_RETURN_IF_ERROR(file->WriteAt(0, head));
  // The L1 table is all zeros: extending the file writes it.
  COWTAP_RETURN_IF_ERROR(file->Truncate(h.l1_table_offset + *AlignUp(l1_entries * 8, 512)));
  return file->Flush();
}

}  // namespace cowtap::cow
