// FaultInjectingFile: a File decorator for tests that fails chosen operations
// with a chosen errno, can short-write, and can simulate a power cut: in
// power-loss mode every change since the last successful Flush() is held in a
// volatile overlay (reads see it) and only reaches the inner file on Flush();
// Crash() throws away all of it, or keeps a seeded random subset of 512-byte
// sectors (torn writes), and leaves the file dead (every later call fails with
// EIO, as a machine that lost power does nothing more). The test then reopens
// the inner storage and sees what the cut left behind.
//
// The behaviour lives in a FaultController that several FaultInjectingFiles
// may share: FaultInjectingFileSystem gives every file opened at one path the
// same controller, so two opens of a path share one "page cache" and one set
// of faults and counters, as two opens of a real file share the kernel's.
//
// Thread-safety: FaultController, FaultInjectingFile and
// FaultInjectingFileSystem are safe for concurrent use; a controller
// serializes the operations of all its files (tests do not need speed).
#pragma once

#include <cerrno>
#include <cstdint>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "cow/file.h"

namespace cowtap::cow {

enum class FaultOp : uint8_t { kRead, kWrite, kFlush, kAllocate, kTruncate, kPunchHole };

// When a fault fires, counting calls of its op from the moment it was added
// (1-based): kNth fires on call n only; kEveryNth on calls n, 2n, 3n...;
// kAfterN on every call after the first n (n = 0: every call).
enum class FaultTrigger : uint8_t { kNth, kEveryNth, kAfterN };

struct Fault {
  FaultOp op = FaultOp::kWrite;
  FaultTrigger trigger = FaultTrigger::kNth;
  uint64_t n = 1;
  int errno_value = EIO;
  // kWrite only: a short write. The first partial_bytes bytes of the data are
  // written (or held, in power-loss mode) before the error is returned.
  uint64_t partial_bytes = 0;
};

struct FaultCounters {
  uint64_t reads = 0;
  uint64_t writes = 0;
  uint64_t flushes = 0;
  uint64_t allocates = 0;
  uint64_t truncates = 0;
  uint64_t punch_holes = 0;
  uint64_t bytes_read = 0;
  uint64_t bytes_written = 0;
  uint64_t faults_fired = 0;
};

struct CrashOptions {
  // Probability that each pending 512-byte sector (and each pending truncate,
  // punch-hole or size-changing allocate) survives the cut; 0 drops all.
  double survive_probability = 0.0;
  uint64_t seed = 1;
};

class FaultController {
 public:
  FaultController() = default;
  FaultController(const FaultController&) = delete;
  FaultController& operator=(const FaultController&) = delete;

  // Arms a fault; faults are checked in the order they were added and the
  // first that fires wins. REQUIRES: fault.n >= 1 unless trigger is kAfterN.
  void AddFault(const Fault& fault);
  void ClearFaults();

  // Turning power-loss mode off does not apply pending changes (Flush does).
  void SetPowerLossMode(bool on);
  bool power_loss_mode() const;
  // Bytes held in the volatile overlay (pending writes), for assertions.
  uint64_t PendingBytes() const;

  // Drops pending changes (keeping a random subset per options), applying
  // the survivors to `storage` in their original order, then marks the
  // controller crashed: every later operation fails with EIO. Fails only if
  // applying survivors to storage fails.
  Status Crash(File& storage, const CrashOptions& options = {});
  bool crashed() const;

  FaultCounters counters() const;
  void ResetCounters();

  // The File operations, done on `inner` with faults and overlay applied.
  Status ReadAt(File& inner, uint64_t offset, std::span<uint8_t> buf);
  Status WriteAt(File& inner, uint64_t offset, std::span<const uint8_t> data);
  Status Flush(File& inner);
  Result<uint64_t> Size(File& inner);
  Status Truncate(File& inner, uint64_t size_bytes);
  Status Allocate(File& inner, uint64_t offset, uint64_t length, bool keep_size);
  Status PunchHole(File& inner, uint64_t offset, uint64_t length);

 private:
  struct ArmedFault {
    Fault fault;
    uint64_t calls = 0;
  };
  // A change held in power-loss mode, replayed in order.
  struct Pending {
    enum Kind : uint8_t { kWrite, kTruncate, kPunchHole, kExtend } kind;
    uint64_t offset;  // kTruncate / kExtend: the new size (kExtend only grows)
    uint64_t length;
    std::vector<uint8_t> bytes;  // kWrite
  };

  // Counts the call and returns the fault that fires on it, or nullptr.
  const Fault* Check(FaultOp op, const std::string& path);  // REQUIRES: mu_ held
  static Status Failure(const Fault& fault, const char* what, const std::string& path, uint64_t offset);
  Status Dead(const std::string& path) const;
  Status ApplyPending(File& inner, const Pending& p);

  mutable std::mutex mu_;
  std::vector<ArmedFault> faults_;  // GUARDED_BY(mu_)
  std::vector<Pending> pending_;    // GUARDED_BY(mu_)
  bool power_loss_ = false;         // GUARDED_BY(mu_)
  bool crashed_ = false;            // GUARDED_BY(mu_)
  FaultCounters counters_;          // GUARDED_BY(mu_)
};

class FaultInjectingFile final : public File {
 public:
  // Owns inner. With a null controller the file gets a controller of its own.
  explicit FaultInjectingFile(std::unique_ptr<File> inner, std::shared_ptr<FaultController> controller = nullptr);

  FaultController& controller() { return *controller_; }
  // Crash() with the inner file as the storage that survives.
  Status Crash(const CrashOptions& options = {}) { return controller_->Crash(*inner_, options); }

  Status ReadAt(uint64_t offset, std::span<uint8_t> buf) override;
  Status WriteAt(uint64_t offset, std::span<const uint8_t> data) override;
  Status Flush() override;
  Result<uint64_t> Size() override;
  Status Truncate(uint64_t size_bytes) override;
  Status Allocate(uint64_t offset, uint64_t length, bool keep_size) override;
  Status PunchHole(uint64_t offset, uint64_t length) override;
  const std::string& path() const override { return inner_->path(); }

 private:
  std::unique_ptr<File> inner_;
  std::shared_ptr<FaultController> controller_;
};

// Wraps a FileSystem (not owned; must outlive this). Files opened at a
// targeted path go through that path's controller; other paths pass through
// untouched.
class FaultInjectingFileSystem final : public FileSystem {
 public:
  explicit FaultInjectingFileSystem(FileSystem* base) : base_(base) {}

  // The controller for path, created on first use. Affects files opened at
  // path from now on (exact string match with the name passed to Open).
  std::shared_ptr<FaultController> Target(const std::string& path);
  // Simulates a power cut on path: its controller's pending changes are
  // dropped or partly applied to the underlying file, and the open files at
  // path go dead. Files opened at path afterwards get a fresh controller (no
  // faults, same power-loss mode). Fails with kNotFound if path was never
  // targeted.
  Status Crash(const std::string& path, const CrashOptions& options = {});

  Result<std::unique_ptr<File>> Open(const std::string& path, const FileOpenOptions& options) override;
  bool Exists(const std::string& path) override { return base_->Exists(path); }
  Status Remove(const std::string& path) override { return base_->Remove(path); }
  std::string Identity(const std::string& path) override { return base_->Identity(path); }

 private:
  FileSystem* const base_;
  std::mutex mu_;
  std::map<std::string, std::shared_ptr<FaultController>> targets_;  // GUARDED_BY(mu_)
};

}  // namespace cowtap::cow
