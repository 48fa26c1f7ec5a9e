// The block I/O vocabulary of the simulated guest: the operations a guest
// submits (BlkIo), what comes back (BlkCompletion), and BlockTarget, the
// small asynchronous interface the workload driver runs against. BlkFront
// (blkfront.h) implements it over a blkif ring; tests implement it over
// memory so the workload's verification can be tested without a backend.
//
// Thread-safety: a BlockTarget is driven by one thread at a time.
#pragma once

#include <cstdint>
#include <string_view>
#include <vector>

#include "base/status.h"

namespace cowtap::xen {

inline constexpr uint32_t kGuestSectorBytes = 512;

enum class BlkOp : uint8_t {
  kRead,
  kWrite,
  kWriteBarrier,  // a write ordered after, and durable with, every earlier write
  kFlush,         // FLUSH_DISKCACHE with no data
  kDiscard,
  kSecureDiscard,
};

std::string_view BlkOpName(BlkOp op);
inline bool BlkOpHasData(BlkOp op) {
  return op == BlkOp::kRead || op == BlkOp::kWrite || op == BlkOp::kWriteBarrier;
}

struct BlkIo {
  BlkOp op = BlkOp::kRead;
  uint64_t sector = 0;       // first 512-byte sector (unused for kFlush)
  uint32_t nr_sectors = 0;   // sectors (unused for kFlush)
  // Read: filled on successful completion; write: copied at Submit. Must hold
  // nr_sectors * 512 bytes and (for reads) stay valid until completion.
  uint8_t* buffer = nullptr;
  uint64_t cookie = 0;       // caller's tag, echoed in the completion
};

struct BlkCompletion {
  uint64_t cookie = 0;
  BlkOp op = BlkOp::kRead;
  int16_t status = 0;  // BLKIF_RSP_OKAY 0, ERROR -1, EOPNOTSUPP -2
};

class BlockTarget {
 public:
  BlockTarget() = default;
  BlockTarget(const BlockTarget&) = delete;
  BlockTarget& operator=(const BlockTarget&) = delete;
  virtual ~BlockTarget() = default;

  virtual uint64_t sectors() const = 0;
  // Largest nr_sectors one data request may carry.
  virtual uint32_t max_sectors_per_io() const = 0;
  // Largest nr_sectors of a kWriteBarrier (blkif sends barriers without
  // indirect descriptors, so they may be smaller than other requests).
  virtual uint32_t max_sectors_per_barrier() const { return max_sectors_per_io(); }
  // Whether the device negotiated the operation (reads/writes always).
  virtual bool Supports(BlkOp op) const = 0;
  // Queues one request. kBusy when no slot is free now (Poll first);
  // kInvalidArgument for a malformed io (null buffer, zero or too many
  // sectors); kNotSupported when Supports(op) is false.
  virtual Status Submit(const BlkIo& io) = 0;
  // Waits up to timeout_ms (0: don't wait) for completions and appends them
  // to *out; returns how many were appended. Fails when the device broke.
  virtual Result<size_t> Poll(std::vector<BlkCompletion>* out, int timeout_ms) = 0;
  // Requests submitted and not yet completed.
  virtual uint32_t InFlight() const = 0;
};

// Submits io and polls until it completes (or timeout_ms passes: kBusy).
// Returns the blkif status. REQUIRES: nothing else in flight on target.
Result<int16_t> ExecuteSync(BlockTarget& target, const BlkIo& io, int timeout_ms = 10000);

}  // namespace cowtap::xen
