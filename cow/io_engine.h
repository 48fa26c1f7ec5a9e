// IoEngine: asynchronous file I/O for the data path (readv, writev and
// fdatasync on a descriptor at an offset), over io_uring (liburing), with a
// small worker-thread pool running preadv/pwritev/fdatasync where io_uring is
// unavailable (ENOSYS/EPERM in containers and under seccomp) or where the
// environment asks for it (COWTAP_IO_ENGINE=threads).
//
// Semantics of every op, in both modes (the File contract): short transfers
// are continued for the remainder; a read that meets end of file fills the
// rest with zeros; EINTR/EAGAIN/ECANCELED are retried (bounded); any other
// error completes the op with a Status naming the file, the offset and the
// errno text. The completion runs exactly once, on an engine thread (or
// inline on the submitting thread for an op that is rejected before it
// starts: zero length, offset overflow).
//
// Batching: PlugThisThread()/UnplugThisThread() bracket a burst of
// submissions from one thread (a ring server's pass over its ring); while
// plugged, ops are queued but the kernel is entered only at the outermost
// Unplug (or when the submission queue is full). Unplugged submissions start
// at once. The engine's own threads plug around each batch of completions,
// so completions that submit more I/O batch too.
//
// Bounds: at most queue_depth ops are in flight from outside the engine; a
// submitter beyond that starts what it has queued and waits for room. The
// engine's own threads (completion callbacks) never wait, so a callback may
// submit more I/O without deadlock.
//
// Two rules for callers follow: a completion must not block waiting for
// other I/O of the same engine (it runs on the thread that would complete
// it), and a plugged thread must not wait for I/O it submitted while plugged
// (nothing starts it before its Unplug).
//
// Engine threads block every signal. COWTAP_IO_ENGINE=threads in the
// environment selects the threads mode for engines created with kAuto
// (the default engine included); "uring"/"auto" or unset keep io_uring.
//
// Thread-safety: every method is safe to call from any thread. The
// destructor waits for every submitted op to complete (callbacks included);
// REQUIRES: no submissions race with destruction.
#pragma once

#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <memory>
#include <mutex>
#include <string>

#include "base/iovec.h"
#include "base/status.h"
#include "cow/file.h"

namespace cowtap::cow {

enum class IoEngineKind : uint8_t {
  kAuto,     // io_uring, unless COWTAP_IO_ENGINE=threads or io_uring fails to start
  kUring,    // io_uring; falls back to threads (logged once) if it fails to start
  kThreads,  // worker threads with preadv/pwritev/fdatasync
};

const char* IoEngineKindName(IoEngineKind kind);

struct IoEngineOptions {
  IoEngineKind kind = IoEngineKind::kAuto;
  // Submission queue entries; also the bound on ops in flight from outside
  // the engine. Clamped to [4, 4096].
  uint32_t queue_depth = 256;
  // Worker threads of the threads mode. Clamped to [1, 64].
  uint32_t worker_threads = 4;
  // Slots of the io_uring registered-file table (0: no registered files).
  uint32_t registered_file_slots = 256;
  // Tests: pretend io_uring_queue_init failed with this errno (0: do not).
  int simulate_uring_init_errno = 0;
};

struct IoEngineStats {
  uint64_t ops_submitted = 0;  // ops accepted by Submit
  uint64_t submit_calls = 0;   // io_uring_submit calls (threads: batches handed to the workers)
  uint64_t completions = 0;    // ops whose completion has run
  uint64_t continuations = 0;  // resubmissions after a short transfer or a retryable error
  uint64_t max_in_flight = 0;  // highest number of ops in flight at once
  uint64_t space_waits = 0;    // times a submitter waited for room
};

enum class IoOp : uint8_t { kReadv, kWritev, kFdatasync };

// Counts one file's ops in flight, so that its owner can wait for them before
// closing the descriptor. The engine calls Begin() when it accepts an op and
// End() once the op's outcome is known, before the completion runs (so a
// completion may destroy the file). Thread-safe.
class IoTracker {
 public:
  void Begin();
  void End();
  // Returns once every begun op has ended.
  void WaitIdle();

 private:
  std::mutex mu_;
  std::condition_variable cv_;
  uint64_t count_ = 0;
};

// What an op works on. REQUIRES: *path and *tracker outlive the op (until
// its completion starts); fixed_slot comes from this engine's RegisterFile.
struct IoTarget {
  int fd = -1;
  int fixed_slot = -1;  // registered-file slot, or -1 to use fd
  bool direct = false;  // fd is O_DIRECT: a short read ending off alignment is end of file
  const std::string* path = nullptr;
  IoTracker* tracker = nullptr;  // optional
};

class IoEngine {
 public:
  // Starts an engine of the asked kind (falling back to threads when
  // io_uring cannot start). Fails only if no thread can be created.
  static Result<std::unique_ptr<IoEngine>> Create(const IoEngineOptions& options = {});

  IoEngine(const IoEngine&) = delete;
  IoEngine& operator=(const IoEngine&) = delete;
  virtual ~IoEngine();

  // Starts op on target: for kReadv/kWritev, [offset, offset + TotalLength(iov))
  // of the file to or from iov; kFdatasync ignores offset and iov. Calls done
  // exactly once. REQUIRES: iov's array and memory stay valid until done runs.
  // May wait for room (see Bounds above): do not hold a lock a completion takes.
  void Submit(IoOp op, const IoTarget& target, uint64_t offset, IoVecs iov, FileCompletion done);

  // Enters fd in the registered-file table so ops skip the per-op file
  // lookup. Returns the slot, or -1 if the engine has none free (or is the
  // threads mode); -1 is a valid "not registered" IoTarget::fixed_slot.
  virtual int RegisterFile(int fd) {
    (void)fd;
    return -1;
  }
  // REQUIRES: no op on the slot is in flight.
  virtual void UnregisterFile(int slot) { (void)slot; }

  virtual IoEngineKind kind() const = 0;
  IoEngineStats stats() const;
  // Why this engine is the threads mode ("" for io_uring or when asked for).
  const std::string& fallback_reason() const { return fallback_reason_; }

  // Starts whatever plugged submissions this engine holds (any thread's).
  virtual void FlushPlugged() = 0;

  struct Op;  // one submitted operation (defined in io_engine.cc)

 protected:
  IoEngine(uint32_t max_in_flight, std::string fallback_reason);

  // Mode hooks. Start queues op (its current piece) for execution; it is
  // called for new ops and for continuations, and must not wait for room.
  virtual void Start(Op* op) = 0;

  // Shared op logic used by the modes.
  // Records a finished syscall's result (bytes or -errno) on op; returns true
  // when the op is finished (its status set), false when the remainder must
  // be started again (op's current piece updated).
  bool Advance(Op* op, int64_t result);
  // Ends op: releases its tracker, runs its completion, frees it.
  void Complete(Op* op);
  // Waits until no op is in flight; derived destructors call it first.
  void DrainForShutdown();
  // Whether the calling thread is one of this engine's own threads.
  bool OnEngineThread() const;
  void MarkEngineThread();
  // Called by a mode when a plugged submission is left queued, so the
  // thread's outermost Unplug flushes this engine.
  void NotePlugged();

  std::atomic<uint64_t> submit_calls_{0};

 private:
  void AcquireSlot();

  const uint32_t max_in_flight_;
  const std::string fallback_reason_;
  mutable std::mutex slot_mu_;
  std::condition_variable slot_cv_;
  uint64_t in_flight_ = 0;
  std::atomic<uint64_t> ops_submitted_{0};
  std::atomic<uint64_t> completions_{0};
  std::atomic<uint64_t> continuations_{0};
  std::atomic<uint64_t> max_in_flight_seen_{0};
  std::atomic<uint64_t> space_waits_{0};
};

// The process-wide engine (created on first use, never destroyed), with the
// default options; COWTAP_IO_ENGINE=threads selects the threads mode.
IoEngine* DefaultIoEngine();

// Batching for the calling thread (see above). Calls nest; every Plug needs
// one Unplug on the same thread.
void PlugThisThread();
void UnplugThisThread();
// Whether the calling thread is plugged.
bool ThisThreadPlugged();
// Starts what the calling thread holds back while plugged, and stays
// plugged: for a plugged thread about to wait for its own I/O (a
// synchronous wrapper over Submit), which would otherwise wait forever.
void FlushThisThread();
// Whether the calling thread is one of any engine's own threads, where
// waiting for I/O would deadlock (a synchronous wrapper can check this).
bool OnIoEngineThread();

}  // namespace cowtap::cow
