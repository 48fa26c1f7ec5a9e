// Validation of guest requests: the one place where a decoded blkif Request
// is checked against what the VBD advertised and the disk's size, turning it
// into a BlockRequest that inner layers may trust (nbdkit's validate_request
// discipline: checked once, flat, at the edge).
//
// Every rejection is a Status whose code decides the guest-visible answer
// through ResponseStatusFor(), the only mapping from errors to blkif response
// codes: kNotSupported becomes BLKIF_RSP_EOPNOTSUPP, everything else
// BLKIF_RSP_ERROR. Messages name the field and value at fault.
//
// All arithmetic on guest values is overflow-checked. Pure functions;
// thread-safe.
#pragma once

#include <array>
#include <cstdint>
#include <span>
#include <vector>

#include "backend/blkif.h"
#include "base/status.h"

namespace cowtap::backend {

// What the VBD advertised to the frontend and the disk it serves. The
// ring server snapshots it per request (sectors may change on resize).
struct DeviceLimits {
  uint64_t sectors = 0;        // disk size in units of sector_size
  uint32_t sector_size = 512;  // power of two, 512..4096
  bool read_only = false;
  bool flush = false;           // feature-flush-cache
  bool barrier = false;         // feature-barrier
  bool discard = false;         // feature-discard
  bool discard_secure = false;  // discard-secure
  // feature-max-indirect-segments; 0 means INDIRECT was not advertised.
  // REQUIRES: <= kMaxIndirectSegmentsWire.
  uint32_t max_indirect_segments = 0;
};

enum class BlockOp : uint8_t { kRead, kWrite, kFlush, kDiscard };

// A request that passed ValidateRequest (and, for reads and writes,
// ValidateSegments): everything in it is in range.
struct BlockRequest {
  uint64_t id = 0;  // echoed in the response
  // The operation to echo in the response: the wire operation, except for
  // INDIRECT, where it is indirect_op (Linux blkfront checks that a
  // response's operation equals the indirect_op it sent, as blkback does).
  uint8_t operation = 0;
  BlockOp op = BlockOp::kRead;
  // kWrite from WRITE_BARRIER or FLUSH_DISKCACHE carrying data: the data
  // must be durable (and every earlier write with it) before the answer.
  bool flush_after = false;
  bool secure = false;  // kDiscard with BLKIF_DISCARD_SECURE
  uint64_t sector_number = 0;
  // kRead/kWrite: bytes the segments cover, set by ValidateSegments.
  // kDiscard: the range to discard. kFlush: 0.
  uint64_t offset_bytes = 0;
  uint64_t length_bytes = 0;
  // kRead/kWrite. Direct requests: segments is filled by ValidateRequest.
  // Indirect: nr_segments and the indirect page refs are set; the caller maps
  // the pages, decodes nr_segments descriptors and calls ValidateSegments.
  bool indirect = false;
  uint32_t nr_segments = 0;
  uint32_t nr_indirect_pages = 0;
  std::array<uint32_t, kMaxIndirectPages> indirect_grefs{};
  std::vector<Segment> segments;
};

// Checks request against limits and fills *out. out->id and out->operation
// (see BlockRequest) are set even on failure, so the caller can always answer the guest.
// Checks: opcode known and advertised; segment count 1..11 (direct; 0 allowed
// only for FLUSH_DISKCACHE and WRITE_BARRIER) or 1..max_indirect_segments
// (indirect, whose indirect_op must be READ or WRITE); for direct requests
// every segment (see ValidateSegments); the range inside the disk; writes,
// barriers with data and discards refused on read-only devices; discards
// refused unless advertised, secure discards unless discard_secure.
Status ValidateRequest(const Request& request, const DeviceLimits& limits, BlockRequest* out);

// Checks the data segments of a read or write (first_sect <= last_sect <
// sectors per page) and that [sector_number, + their total) lies inside the
// disk; on success sets out->segments, offset_bytes and length_bytes.
// REQUIRES: out passed ValidateRequest as kRead or kWrite.
Status ValidateSegments(std::span<const Segment> segments, const DeviceLimits& limits, BlockRequest* out);

// The one mapping from an error to a blkif response status.
int16_t ResponseStatusFor(const Status& status);

}  // namespace cowtap::backend
