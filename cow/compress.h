// Cluster compression for qcow2 (and qcow v1): raw deflate (no zlib header,
// which qcow2 calls "zlib", compression_type 0) and zstd (compression_type 1).
//
// Decompression fills exactly one cluster and stops there: a compressed
// stream may be followed by trailing bytes of the next stream in its last
// sector, which are ignored. Pure functions over caller buffers; thread-safe.
#pragma once

#include <cstdint>
#include <span>
#include <string>
#include <vector>

#include "base/status.h"

namespace cowtap::cow {

enum class CompressionType : uint8_t { kDeflate = 0, kZstd = 1 };

// Decompresses `input` (which may hold trailing bytes past the end of the
// stream) into exactly out.size() bytes. Fails with kCorrupt (message names
// `what`, e.g. "path: compressed cluster at 0x1234") if the stream is
// malformed or produces fewer bytes than out.size().
Status DecompressCluster(CompressionType type, std::span<const uint8_t> input, std::span<uint8_t> out,
                         const std::string& what);

// Compresses one cluster. Returns the compressed bytes, or an empty vector
// when compression does not make the data smaller than input.size() - 512
// (the caller then stores the cluster uncompressed, as QEMU does).
Result<std::vector<uint8_t>> CompressCluster(CompressionType type, std::span<const uint8_t> input);

}  // namespace cowtap::cow
