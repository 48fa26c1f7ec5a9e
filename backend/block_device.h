// BlockDevice: the storage a VBD serves, as the backend sees it — a flat
// array of bytes with read, write, flush, discard and write-zeroes. The
// backend knows the image engine (cow/) only through this interface; mains
// wire a concrete device (NewImageBlockDevice over a cow::Image, or
// NewMemBlockDevice for tests).
//
// Two ways in:
//   * the synchronous methods (Read/Write/...), which return when done;
//   * Submit(), which starts one BlockIo and reports its outcome through a
//     completion callback, called exactly once, possibly on another thread.
//     The default Submit runs the synchronous methods inline, so a device
//     that is synchronous today can become asynchronous (io_uring) without
//     the ring server changing.
//
// Offsets and lengths are bytes. Callers (the ring server) have already
// validated every range against size_bytes(); implementations check again
// and fail with kOutOfRange rather than trust it.
//
// Thread-safety: implementations are thread-safe (several ring queues share
// one device).
#pragma once

#include <cstdint>
#include <functional>
#include <memory>

#include "base/iovec.h"
#include "base/status.h"

namespace cowtap::cow {
class Image;
}

namespace cowtap::backend {

enum class BlockIoKind : uint8_t { kRead, kWrite, kFlush, kDiscard, kWriteZeroes };

struct BlockIo {
  BlockIoKind kind = BlockIoKind::kRead;
  uint64_t offset_bytes = 0;
  uint64_t length_bytes = 0;  // kRead/kWrite: TotalLength(iov)
  IoVecs iov;                 // kRead/kWrite; must stay valid until completion
  // kWrite: make this write and every earlier completed write durable
  // before completing (FUA + preflush: blkif barriers and flushes with data).
  bool flush_after = false;
  // kDiscard: the range must read as zeros afterwards and its old contents
  // be unrecoverable through this device (blkif secure discard).
  bool secure = false;
};

// Called exactly once with the I/O's outcome.
using BlockCompletion = std::function<void(Status)>;

class BlockDevice {
 public:
  BlockDevice() = default;
  BlockDevice(const BlockDevice&) = delete;
  BlockDevice& operator=(const BlockDevice&) = delete;
  virtual ~BlockDevice() = default;

  // Current size; may grow or shrink while served (online resize).
  virtual uint64_t size_bytes() const = 0;
  virtual bool read_only() const = 0;
  // Logical sector size (the unit of `sectors`): 512 for every image.
  virtual uint32_t logical_sector_size() const { return 512; }
  // The unit the storage prefers to be written in (blkif
  // physical-sector-size); a multiple of logical_sector_size().
  virtual uint32_t physical_sector_size() const { return 512; }
  // Whether Discard does anything useful, and in what unit.
  virtual bool supports_discard() const = 0;
  virtual uint32_t discard_granularity_bytes() const { return logical_sector_size(); }
  // Whether Discard(secure) can honour the secure flag.
  virtual bool supports_secure_discard() const { return false; }

  // Fills iov from [offset, offset + TotalLength(iov)).
  virtual Status Read(uint64_t offset_bytes, IoVecs iov) = 0;
  // Writes iov at offset; not durable until Flush() returns OK.
  virtual Status Write(uint64_t offset_bytes, IoVecs iov) = 0;
  // Makes every write that completed before this call durable.
  virtual Status Flush() = 0;
  // The range's contents are no longer needed; afterwards it reads as zeros
  // (blocks the device cannot release may be left unchanged, as blkif allows).
  virtual Status Discard(uint64_t offset_bytes, uint64_t length_bytes, bool secure) = 0;
  // Makes the range read as zeros.
  virtual Status WriteZeroes(uint64_t offset_bytes, uint64_t length_bytes) = 0;

  // Starts io and calls done exactly once with its outcome, on this thread
  // or another. REQUIRES: io.iov's memory stays valid until done runs.
  // The default executes synchronously through the methods above.
  virtual void Submit(const BlockIo& io, BlockCompletion done);

  // Batching hints from a caller about to Submit() several I/Os from one
  // thread (the ring server brackets each pass over its ring with them):
  // between Plug() and Unplug() on a thread the device may hold that
  // thread's submissions back and start them together at Unplug() (one
  // io_uring_submit per ring wakeup). Calls nest; the defaults do nothing.
  virtual void Plug() {}
  virtual void Unplug() {}
};

struct ImageDeviceOptions {
  // Serve read-only even if the image is writable (blkif mode "r").
  bool read_only = false;
  // Offer discard (the toolstack's discard-enable).
  bool discard = true;
};

// A BlockDevice over one image chain. Shares ownership of the image.
// Submit() is asynchronous: reads and writes use the image's SubmitRead/
// SubmitWrite; flush, discard and write-zeroes run on two worker threads of
// the device. The device must outlive the I/O submitted to it.
// physical_sector_size is 4096 when the size is a multiple of it (every
// image cowtap creates), else 512; discard granularity is the cluster size
// (qcow2/qcow) or 4096 (raw).
std::unique_ptr<BlockDevice> NewImageBlockDevice(std::shared_ptr<cow::Image> image,
                                                 const ImageDeviceOptions& options = {});

}  // namespace cowtap::backend
