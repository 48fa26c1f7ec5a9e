// qcow version 1 on-disk format: header decoding and validation, L2 entry
// decoding, and the raw-deflate codec of compressed clusters. Pure functions
// over bytes the caller read; nothing here does I/O. Thread-safe.
//
// Layout (all big-endian): a 48-byte header, the backing file name (no
// format is recorded), the L1 table (l1_size u64 entries, not necessarily
// aligned), then L2 tables of 2^l2_bits u64 entries and data clusters of
// 2^cluster_bits bytes, appended at the end of the file as they are needed.
// An L1 entry is the host offset of an L2 table (0: none). An L2 entry is 0
// (unallocated: read the backing file, or zeros), the host offset of a data
// cluster, or with bit 63 set a compressed cluster: the low 63 - cluster_bits
// bits are its byte offset and the next cluster_bits bits its byte length.
#pragma once

#include <cstdint>
#include <span>
#include <string>
#include <vector>

#include "base/status.h"

namespace cowtap::cow {

inline constexpr uint32_t kQcowMagic = 0x514649fb;  // "QFI\xfb"
inline constexpr uint64_t kQcowHeaderBytes = 48;
inline constexpr uint32_t kQcowMaxBackingNameBytes = 1023;
// Bounds what an image file can make us allocate for its L1 table.
inline constexpr uint64_t kQcowMaxL1Bytes = 32ull << 20;
inline constexpr uint64_t kQcowCompressedFlag = 1ull << 63;
inline constexpr int kQcowMinClusterBits = 9;
inline constexpr int kQcowMaxClusterBits = 16;
inline constexpr int kQcowMinL2Bits = 6;
inline constexpr int kQcowMaxL2Bits = 13;

struct QcowHeader {
  uint32_t magic = kQcowMagic;
  uint32_t version = 1;
  uint64_t backing_file_offset = 0;
  uint32_t backing_file_size = 0;
  uint32_t mtime = 0;
  uint64_t size = 0;  // virtual size in bytes
  uint8_t cluster_bits = 12;
  uint8_t l2_bits = 9;
  uint32_t crypt_method = 0;
  uint64_t l1_table_offset = 0;

  uint64_t cluster_size() const { return uint64_t{1} << cluster_bits; }
  uint64_t l2_entries() const { return uint64_t{1} << l2_bits; }
  uint64_t l2_table_bytes() const { return l2_entries() * 8; }
  // Guest bytes one L1 entry maps.
  uint64_t l1_entry_span() const { return uint64_t{1} << (cluster_bits + l2_bits); }
  // ceil(size / l1_entry_span()). REQUIRES: a validated header (no overflow).
  uint64_t l1_size() const { return size / l1_entry_span() + (size % l1_entry_span() != 0); }
  uint64_t l1_end() const { return l1_table_offset + l1_size() * 8; }
  // First byte past the header, backing name and L1: where L2 tables and
  // data clusters may start.
  uint64_t metadata_end() const;
};

// Decodes bytes[0, 48) and validates the header against the file's size:
// magic, version 1, no encryption, cluster_bits 9..16, l2_bits 6..13, a size
// of at least 2 bytes whose L1 table is at most kQcowMaxL1Bytes, the backing
// name (at most 1023 bytes, after the header, inside the file) and the L1
// table (after the header, inside the file). kCorrupt (kNotSupported for
// another version or encryption) naming path and the offending field.
Result<QcowHeader> ParseQcowHeader(std::span<const uint8_t> bytes, uint64_t file_size, const std::string& path);

// Encodes h into out[0, 48).
void EncodeQcowHeader(const QcowHeader& h, std::span<uint8_t, kQcowHeaderBytes> out);

// Validates one L1 entry (nonzero): cluster aligned, after the metadata, and
// the whole L2 table inside [0, file_end). kCorrupt naming index and offset.
Status ValidateQcowL1Entry(const QcowHeader& h, uint64_t entry, uint64_t l1_index, uint64_t file_end,
                           const std::string& path);

struct QcowCluster {
  enum Kind : uint8_t { kUnallocated, kNormal, kCompressed };
  Kind kind = kUnallocated;
  uint64_t host_offset = 0;
  uint64_t compressed_bytes = 0;  // kCompressed only
};

// Decodes and validates an L2 entry for guest cluster cluster_index: normal
// clusters must be cluster aligned, after the metadata and wholly inside
// [0, file_end); compressed ones non-empty, after the metadata and inside.
Result<QcowCluster> DecodeQcowL2Entry(const QcowHeader& h, uint64_t entry, uint64_t cluster_index, uint64_t file_end,
                                      const std::string& path);
// The L2 entry of a compressed cluster. REQUIRES: bytes < cluster size and
// host_offset < 2^(63 - cluster_bits).
uint64_t EncodeQcowCompressedEntry(const QcowHeader& h, uint64_t host_offset, uint64_t bytes);

// Inflates a raw-deflate stream into exactly out.size() bytes. kCorrupt if
// the stream is malformed or does not produce exactly that many bytes.
Status QcowInflateCluster(std::span<const uint8_t> in, std::span<uint8_t> out);
// Raw deflate with a 4 KiB window, as qcow v1 writers use.
Result<std::vector<uint8_t>> QcowDeflateCluster(std::span<const uint8_t> in);

}  // namespace cowtap::cow
