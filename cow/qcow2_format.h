// Qcow2 on-disk format: the pure codecs of the qcow2 v2/v3 metadata (header
// and extensions, L1/L2 entries, compressed-cluster descriptors, refcount
// entries of every width, snapshot table entries). No I/O happens here: the
// image engine reads bytes through cow::File and hands them to these
// functions, which validate everything an image file controls and return
// kCorrupt / kNotSupported statuses naming the file and the offset.
//
// Field names follow the qcow2 spec (QEMU docs/interop/qcow2.rst).
// Thread-safety: pure functions and plain values; thread-safe.
#pragma once

#include <cstdint>
#include <span>
#include <string>
#include <vector>

#include "base/status.h"

namespace cowtap::cow {

inline constexpr uint32_t kQcow2Magic = 0x514649fb;  // "QFI\xfb"

// Incompatible feature bits.
inline constexpr uint64_t kQcow2IncompatDirty = 1ull << 0;
inline constexpr uint64_t kQcow2IncompatCorrupt = 1ull << 1;
inline constexpr uint64_t kQcow2IncompatDataFile = 1ull << 2;
inline constexpr uint64_t kQcow2IncompatCompression = 1ull << 3;
inline constexpr uint64_t kQcow2IncompatExtendedL2 = 1ull << 4;
inline constexpr uint64_t kQcow2IncompatKnown = 0x1f;
// Compatible and autoclear feature bits.
inline constexpr uint64_t kQcow2CompatLazyRefcounts = 1ull << 0;
inline constexpr uint64_t kQcow2AutoclearBitmaps = 1ull << 0;
inline constexpr uint64_t kQcow2AutoclearDataFileRaw = 1ull << 1;

// Header extension types.
inline constexpr uint32_t kQcow2ExtEnd = 0;
inline constexpr uint32_t kQcow2ExtBackingFormat = 0xe2792aca;
inline constexpr uint32_t kQcow2ExtFeatureTable = 0x6803f857;
inline constexpr uint32_t kQcow2ExtBitmaps = 0x23852875;
inline constexpr uint32_t kQcow2ExtCrypto = 0x0537be77;
inline constexpr uint32_t kQcow2ExtDataFile = 0x44415441;

// Header byte offsets of fields the engine rewrites in place.
inline constexpr uint64_t kQcow2OffRefcountTable = 48;  // u64 offset + u32 clusters
inline constexpr uint64_t kQcow2OffSnapshots = 60;      // u32 count + u64 offset
inline constexpr uint64_t kQcow2OffIncompatible = 72;
inline constexpr uint64_t kQcow2OffAutoclear = 88;

// Limits (QEMU's, so that every image we accept QEMU accepts too).
inline constexpr uint64_t kQcow2MaxHostOffset = 1ull << 56;
inline constexpr uint64_t kQcow2MaxL1Bytes = 32ull << 20;
// Limits on image-chosen sizes that cowtap allocates for (QEMU's own).
inline constexpr uint32_t kQcow2MaxSnapshotExtraBytes = 1024;
inline constexpr uint32_t kQcow2MaxBitmapTableEntries = 0x8000000;
inline constexpr uint64_t kQcow2MaxRefcountTableBytes = 8ull << 20;
inline constexpr uint32_t kQcow2MaxBackingNameBytes = 1023;
inline constexpr uint32_t kQcow2MaxSnapshots = 65536;

// Entry masks.
inline constexpr uint64_t kQcow2OffsetMask = 0x00fffffffffffe00ull;  // bits 9-55
inline constexpr uint64_t kQcow2Copied = 1ull << 63;
inline constexpr uint64_t kQcow2Compressed = 1ull << 62;
inline constexpr uint64_t kQcow2ZeroFlag = 1ull << 0;
inline constexpr uint64_t kQcow2L1Reserved = 0x7f000000000001ffull;
inline constexpr uint64_t kQcow2L2Reserved = 0x3f000000000001feull;
inline constexpr uint64_t kQcow2RefTableReserved = 0x1ffull;

struct Qcow2FeatureName {
  uint8_t type = 0;  // 0 incompatible, 1 compatible, 2 autoclear
  uint8_t bit = 0;
  std::string name;
};

struct Qcow2Extension {
  uint32_t type = 0;
  std::vector<uint8_t> data;
};

struct Qcow2Header {
  uint32_t version = 3;
  uint64_t backing_file_offset = 0;
  uint32_t backing_file_size = 0;
  uint32_t cluster_bits = 16;
  uint64_t size = 0;
  uint32_t crypt_method = 0;
  uint32_t l1_size = 0;
  uint64_t l1_table_offset = 0;
  uint64_t refcount_table_offset = 0;
  uint32_t refcount_table_clusters = 0;
  uint32_t nb_snapshots = 0;
  uint64_t snapshots_offset = 0;
  uint64_t incompatible_features = 0;
  uint64_t compatible_features = 0;
  uint64_t autoclear_features = 0;
  uint32_t refcount_order = 4;
  uint32_t header_length = 112;
  uint8_t compression_type = 0;  // 0 deflate, 1 zstd
  // Header bytes past 112 up to header_length (unknown additional fields,
  // preserved on rewrite).
  std::vector<uint8_t> extra_fields;

  // From the extensions / the first cluster.
  std::string backing_file;
  std::string backing_format;
  std::string data_file;
  std::vector<Qcow2FeatureName> feature_names;
  bool has_bitmaps_extension = false;
  std::vector<Qcow2Extension> other_extensions;  // unknown types, preserved

  uint64_t cluster_size() const { return 1ull << cluster_bits; }
  bool extended_l2() const { return incompatible_features & kQcow2IncompatExtendedL2; }
  bool has_data_file() const { return incompatible_features & kQcow2IncompatDataFile; }
  // Bytes per L2 entry (8, or 16 with extended L2) and entries per L2 table.
  uint32_t l2_entry_bytes() const { return extended_l2() ? 16 : 8; }
  uint64_t l2_entries() const { return cluster_size() / l2_entry_bytes(); }
  uint32_t refcount_bits() const { return 1u << refcount_order; }
  // Refcount entries per refcount block.
  uint64_t refcount_block_entries() const { return cluster_size() * 8 / refcount_bits(); }
};

// Number of L1 entries needed to map size_bytes with this geometry, or 0 on
// overflow.
uint64_t Qcow2L1EntriesFor(uint64_t size_bytes, uint32_t cluster_bits, bool extended_l2);

// Parses and strictly validates a header. first_cluster holds the file's
// first min(cluster size, file size) bytes (at least 104; pass more than
// needed and it is trimmed). file_size bounds every table. Errors:
// kCorrupt (malformed), kNotSupported (version, unknown incompatible bits,
// encryption), each naming path and the offending field.
Result<Qcow2Header> ParseQcow2Header(std::span<const uint8_t> first_cluster, uint64_t file_size,
                                     const std::string& path);
// The cluster_bits field of a header prefix (>= 24 bytes), unvalidated.
uint32_t PeekQcow2ClusterBits(std::span<const uint8_t> prefix);

// Encodes header + extensions + backing name into one cluster-sized buffer.
// Places the backing name after the extensions and sets backing_file_offset
// and backing_file_size accordingly. Fails if it does not fit in a cluster.
Result<std::vector<uint8_t>> EncodeQcow2Header(const Qcow2Header& header);

// Names of the set bits in `bits` (of feature type 0/1/2), using the feature
// name table when it names them: "dirty (bit 0), bit 7".
std::string Qcow2FeatureBitNames(const Qcow2Header& header, uint8_t type, uint64_t bits);

// --- L2 entries -----------------------------------------------------------

enum class Qcow2ClusterType { kUnallocated, kNormal, kZeroPlain, kZeroAlloc, kCompressed };

// One decoded L2 entry (the bitmap is 0 without extended L2).
struct Qcow2L2Entry {
  uint64_t raw = 0;
  uint64_t bitmap = 0;
};

struct Qcow2CompressedDesc {
  uint64_t host_offset = 0;  // byte offset of the stream
  uint64_t max_length = 0;   // bytes from host_offset the stream may occupy
};

// Classifies an L2 entry and validates reserved bits, alignment and (for
// extended L2) the subcluster bitmap. data_file: guest clusters live in an
// external data file (host offset 0 is valid there when COPIED is set).
// Returns kCorrupt naming l2_entry_offset (the entry's byte offset in the
// image file, for messages) on any violation.
Result<Qcow2ClusterType> ClassifyQcow2L2Entry(const Qcow2L2Entry& entry, const Qcow2Header& header, bool data_file,
                                              uint64_t l2_entry_offset, const std::string& path);
Qcow2CompressedDesc DecodeQcow2Compressed(uint64_t raw, uint32_t cluster_bits);
// Encodes a compressed descriptor for a stream of `length` bytes at offset.
// REQUIRES: length > 0, host_offset below the compressed addressable range.
uint64_t EncodeQcow2Compressed(uint64_t host_offset, uint64_t length, uint32_t cluster_bits);

// Subcluster bitmap helpers (extended L2): bit i allocated, bit 32+i zero.
inline uint32_t Qcow2SubAllocMask(uint64_t bitmap) { return static_cast<uint32_t>(bitmap); }
inline uint32_t Qcow2SubZeroMask(uint64_t bitmap) { return static_cast<uint32_t>(bitmap >> 32); }

// Validates an L1 entry; returns the L2 table offset (0 = unallocated).
Result<uint64_t> DecodeQcow2L1Entry(uint64_t raw, const Qcow2Header& header, uint64_t l1_entry_offset,
                                    const std::string& path);

// --- Refcounts --------------------------------------------------------------

// Refcount entry `index` of a refcount block of width 1 << order bits.
// Sub-byte widths are packed LSB-first; widths >= 8 bits are big-endian.
// REQUIRES: the entry lies inside block.
uint64_t GetQcow2Refcount(std::span<const uint8_t> block, uint64_t index, uint32_t order);
void SetQcow2Refcount(std::span<uint8_t> block, uint64_t index, uint32_t order, uint64_t value);
inline uint64_t Qcow2MaxRefcount(uint32_t order) { return order >= 6 ? ~0ull : (1ull << (1u << order)) - 1; }

// --- Snapshot table ---------------------------------------------------------

struct Qcow2Snapshot {
  uint64_t l1_table_offset = 0;
  uint32_t l1_size = 0;
  std::string id;
  std::string name;
  uint32_t date_sec = 0;
  uint32_t date_nsec = 0;
  uint64_t vm_clock_nsec = 0;
  uint32_t vm_state_size32 = 0;
  std::vector<uint8_t> extra_data;  // preserved as read
  uint64_t vm_state_size = 0;       // from extra data when present
  uint64_t disk_size = 0;           // from extra data; 0 if absent
};

inline constexpr size_t kQcow2SnapshotFixedBytes = 40;
// Total bytes (padded to 8) of the entry whose fixed 40-byte part is given.
uint64_t Qcow2SnapshotEntryBytes(std::span<const uint8_t> fixed);
// Parses one whole entry (Qcow2SnapshotEntryBytes long) found at
// entry_offset, validating its L1 table against the image.
Result<Qcow2Snapshot> ParseQcow2Snapshot(std::span<const uint8_t> entry, const Qcow2Header& header, uint64_t file_size,
                                         uint64_t entry_offset, const std::string& path);
std::vector<uint8_t> EncodeQcow2Snapshot(const Qcow2Snapshot& snapshot);

}  // namespace cowtap::cow
