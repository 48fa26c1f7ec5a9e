// MemBlockDevice: an in-memory BlockDevice for tests of the ring server, the
// VBD and the end-to-end guest, with the hooks those tests need: a log of
// every operation, failure injection, a durability model (what a crash would
// keep: the contents as of the last completed Flush), online resize, and a
// mode in which Submit() completes only when the test says so (to exercise
// asynchronous completion, out-of-order answers and flush draining).
//
// Thread-safety: every method may be called from any thread.
#pragma once

#include <cstdint>
#include <deque>
#include <memory>
#include <mutex>
#include <optional>
#include <vector>

#include "backend/block_device.h"

namespace cowtap::backend {

struct MemBlockDeviceOptions {
  uint64_t size_bytes = 64 << 20;
  bool read_only = false;
  bool discard = true;
  bool secure_discard = false;
  uint32_t physical_sector_size = 512;
  uint32_t discard_granularity_bytes = 512;
  // Submit() queues I/O until CompletePending(); the synchronous methods
  // are unaffected.
  bool defer_completions = false;
};

class MemBlockDevice final : public BlockDevice {
 public:
  struct LoggedOp {
    BlockIoKind kind;
    uint64_t offset_bytes;
    uint64_t length_bytes;
    bool flush_after;
    bool secure;
  };

  explicit MemBlockDevice(const MemBlockDeviceOptions& options = {});

  uint64_t size_bytes() const override;
  bool read_only() const override { return options_.read_only; }
  uint32_t physical_sector_size() const override { return options_.physical_sector_size; }
  bool supports_discard() const override { return options_.discard; }
  uint32_t discard_granularity_bytes() const override { return options_.discard_granularity_bytes; }
  bool supports_secure_discard() const override { return options_.secure_discard; }

  Status Read(uint64_t offset_bytes, IoVecs iov) override;
  Status Write(uint64_t offset_bytes, IoVecs iov) override;
  Status Flush() override;
  Status Discard(uint64_t offset_bytes, uint64_t length_bytes, bool secure) override;
  Status WriteZeroes(uint64_t offset_bytes, uint64_t length_bytes) override;
  void Submit(const BlockIo& io, BlockCompletion done) override;

  // --- test hooks ---
  // The next operation of `kind` fails with `status` (once).
  void FailNext(BlockIoKind kind, Status status);
  // Changes the size (new bytes read as zeros).
  void Resize(uint64_t size_bytes);
  // Every operation so far (synchronous or submitted), in execution order.
  std::vector<LoggedOp> log() const;
  // Current contents and contents as of the last completed Flush.
  std::vector<uint8_t> Contents() const;
  std::vector<uint8_t> DurableContents() const;
  // Writes bytes directly (setup; not logged).
  void Fill(uint64_t offset_bytes, const std::vector<uint8_t>& bytes);
  // With defer_completions: I/O submitted and not yet executed.
  size_t PendingCount() const;
  // Executes and completes up to max queued I/Os, oldest first (newest first
  // with reverse). Completions run on the calling thread. Returns how many.
  size_t CompletePending(size_t max = SIZE_MAX, bool reverse = false);

 private:
  struct Pending {
    BlockIo io;
    BlockCompletion done;
  };
  Status Execute(const BlockIo& io);
  Status CheckRange(uint64_t offset_bytes, uint64_t length_bytes) const;  // REQUIRES: mu_ held
  std::optional<Status> TakeInjected(BlockIoKind kind);                   // REQUIRES: mu_ held

  const MemBlockDeviceOptions options_;
  mutable std::mutex mu_;
  std::vector<uint8_t> data_;                             // GUARDED_BY(mu_)
  std::vector<uint8_t> durable_;                          // GUARDED_BY(mu_)
  std::vector<LoggedOp> log_;                             // GUARDED_BY(mu_)
  std::vector<std::pair<BlockIoKind, Status>> injected_;  // GUARDED_BY(mu_)
  std::deque<Pending> pending_;                           // GUARDED_BY(mu_)
};

}  // namespace cowtap::backend
