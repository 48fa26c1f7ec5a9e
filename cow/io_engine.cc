// IoEngine: the op logic both modes share (continuation of short transfers,
// zeros past end of file, retries, error text), the per-thread plug state,
// and the two modes: UringEngine (one ring whose submission side is guarded
// by a mutex so any thread may submit, and one completion thread that reaps
// CQEs in batches) and ThreadEngine (a fixed pool of workers over a queue).
//
// Plugging across engines: a thread remembers which engines it left queued
// submissions in; its outermost Unplug flushes each one still alive. The
// registry of live engines (g_live) is what makes a remembered pointer safe
// to use: an engine leaves it before it drains.
#include "cow/io_engine.h"

#include <liburing.h>
#include <pthread.h>
#include <signal.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <thread>
#include <vector>

#include "base/checked_math.h"
#include "base/log.h"

// ThreadSanitizer cannot see that the kernel orders a submission before its
// completion; the annotations tell it, per op.
#if defined(__SANITIZE_THREAD__)
#define COWTAP_TSAN 1
#elif defined(__has_feature)
#if __has_feature(thread_sanitizer)
#define COWTAP_TSAN 1
#endif
#endif
#ifdef COWTAP_TSAN
extern "C" void __tsan_acquire(void* addr);
extern "C" void __tsan_release(void* addr);
#define COWTAP_HANDOFF_RELEASE(p) __tsan_release(p)
#define COWTAP_HANDOFF_ACQUIRE(p) __tsan_acquire(p)
#else
#define COWTAP_HANDOFF_RELEASE(p) ((void)(p))
#define COWTAP_HANDOFF_ACQUIRE(p) ((void)(p))
#endif

namespace cowtap::cow {

namespace {

constexpr int kMaxIovPerSyscall = 1024;  // IOV_MAX / UIO_MAXIOV
constexpr uint32_t kMaxRetries = 64;
constexpr uint64_t kStopToken = 0;      // user_data of the completion thread's wake-up NOP
constexpr uint64_t kDirectBlock = 512;  // smallest O_DIRECT granule

std::mutex g_live_mu;
std::vector<IoEngine*>& LiveEngines() {
  static auto* live = new std::vector<IoEngine*>();
  return *live;
}

struct PlugState {
  int depth = 0;
  std::vector<IoEngine*> engines;  // engines holding this thread's queued ops
};
thread_local PlugState t_plug;
thread_local const IoEngine* t_engine_thread = nullptr;

void Register(IoEngine* e) {
  std::lock_guard l(g_live_mu);
  LiveEngines().push_back(e);
}

void Unregister(IoEngine* e) {
  std::lock_guard l(g_live_mu);
  auto& live = LiveEngines();
  live.erase(std::remove(live.begin(), live.end(), e), live.end());
}

}  // namespace

struct IoEngine::Op {
  IoOp kind = IoOp::kReadv;
  IoTarget target;
  uint64_t offset = 0;
  IoVecs iov;
  FileCompletion done;
  size_t total = 0;
  size_t done_bytes = 0;
  std::vector<iovec> rest;  // the remainder after a short transfer
  const iovec* cur_iov = nullptr;
  int cur_cnt = 0;
  size_t cur_len = 0;
  uint32_t retries = 0;
  Status status;

  uint64_t cur_offset() const { return offset + done_bytes; }

  // Points the current piece at the untransferred bytes, at most
  // kMaxIovPerSyscall segments of them.
  void SetPiece() {
    const iovec* base = iov.data();
    size_t n = iov.size();
    if (done_bytes != 0) {
      rest.clear();
      SliceIoVecs(iov, done_bytes, total - done_bytes, &rest);
      base = rest.data();
      n = rest.size();
    }
    cur_iov = base;
    cur_cnt = static_cast<int>(std::min<size_t>(n, kMaxIovPerSyscall));
    cur_len = TotalLength({base, static_cast<size_t>(cur_cnt)});
  }

  std::string Where() const {
    const std::string& p = target.path ? *target.path : std::string("fd " + std::to_string(target.fd));
    switch (kind) {
      case IoOp::kReadv:
        return "read " + p + " at offset " + std::to_string(cur_offset());
      case IoOp::kWritev:
        return "write " + p + " at offset " + std::to_string(cur_offset());
      case IoOp::kFdatasync:
        break;
    }
    return "fdatasync " + p;
  }
};

const char* IoEngineKindName(IoEngineKind kind) {
  switch (kind) {
    case IoEngineKind::kAuto:
      return "auto";
    case IoEngineKind::kUring:
      return "io_uring";
    case IoEngineKind::kThreads:
      return "threads";
  }
  return "?";
}

// ---------------------------------------------------------------- IoTracker

void IoTracker::Begin() {
  std::lock_guard l(mu_);
  ++count_;
}

void IoTracker::End() {
  std::lock_guard l(mu_);
  if (--count_ == 0) cv_.notify_all();
}

void IoTracker::WaitIdle() {
  std::unique_lock l(mu_);
  cv_.wait(l, [this] { return count_ == 0; });
}

// ----------------------------------------------------------------- plugging

void PlugThisThread() { ++t_plug.depth; }

void UnplugThisThread() {
  if (t_plug.depth == 0) return;  // unbalanced: nothing is held back
  if (--t_plug.depth != 0) return;
  FlushThisThread();
}

void FlushThisThread() {
  std::vector<IoEngine*> engines;
  engines.swap(t_plug.engines);
  for (IoEngine* e : engines) {
    // Held across the flush so the engine cannot leave (and be destroyed)
    // between the check and the call.
    std::lock_guard l(g_live_mu);
    const auto& live = LiveEngines();
    if (std::find(live.begin(), live.end(), e) != live.end()) e->FlushPlugged();
  }
  engines.clear();
  if (t_plug.engines.empty()) t_plug.engines.swap(engines);  // keeps the capacity
}

bool ThisThreadPlugged() { return t_plug.depth > 0; }

bool OnIoEngineThread() { return t_engine_thread != nullptr; }

// ----------------------------------------------------------- IoEngine (base)

IoEngine::IoEngine(uint32_t max_in_flight, std::string fallback_reason)
    : max_in_flight_(max_in_flight), fallback_reason_(std::move(fallback_reason)) {
  Register(this);
}

IoEngine::~IoEngine() { Unregister(this); }

IoEngineStats IoEngine::stats() const {
  IoEngineStats s;
  s.ops_submitted = ops_submitted_.load(std::memory_order_relaxed);
  s.submit_calls = submit_calls_.load(std::memory_order_relaxed);
  s.completions = completions_.load(std::memory_order_relaxed);
  s.continuations = continuations_.load(std::memory_order_relaxed);
  s.max_in_flight = max_in_flight_seen_.load(std::memory_order_relaxed);
  s.space_waits = space_waits_.load(std::memory_order_relaxed);
  return s;
}

bool IoEngine::OnEngineThread() const { return t_engine_thread == this; }

void IoEngine::MarkEngineThread() {
  t_engine_thread = this;
  // Signals are for the process's own threads (a daemon's SIGTERM handling),
  // never an engine thread's to take.
  sigset_t all;
  sigfillset(&all);
  pthread_sigmask(SIG_BLOCK, &all, nullptr);
}

void IoEngine::NotePlugged() {
  auto& v = t_plug.engines;
  if (std::find(v.begin(), v.end(), this) == v.end()) v.push_back(this);
}

void IoEngine::Submit(IoOp kind, const IoTarget& target, uint64_t offset, IoVecs iov, FileCompletion done) {
  size_t total = 0;
  if (kind != IoOp::kFdatasync) {
    total = TotalLength(iov);
    if (total == 0) {
      done(Status::Ok());
      return;
    }
    auto end = AddU64(offset, total);
    if (!end || *end > static_cast<uint64_t>(INT64_MAX)) {
      done(Status::OutOfRange("I/O on " + (target.path ? *target.path : std::string("a file")) + " at offset " +
                              std::to_string(offset) + " of " + std::to_string(total) +
                              " bytes runs past the largest file offset"));
      return;
    }
  }
  auto* op = new Op;
  op->kind = kind;
  op->target = target;
  op->offset = offset;
  op->iov = iov;
  op->done = std::move(done);
  op->total = total;
  if (kind != IoOp::kFdatasync) op->SetPiece();
  if (target.tracker) target.tracker->Begin();
  AcquireSlot();
  Start(op);
}

void IoEngine::AcquireSlot() {
  std::unique_lock l(slot_mu_);
  if (in_flight_ >= max_in_flight_ && !OnEngineThread()) {
    space_waits_.fetch_add(1, std::memory_order_relaxed);
    // Whatever is queued (ours while plugged, or anyone's) must start, or the
    // room we wait for may never come.
    l.unlock();
    FlushPlugged();
    l.lock();
    slot_cv_.wait(l, [this] { return in_flight_ < max_in_flight_; });
  }
  ++in_flight_;
  ops_submitted_.fetch_add(1, std::memory_order_relaxed);
  if (in_flight_ > max_in_flight_seen_.load(std::memory_order_relaxed))
    max_in_flight_seen_.store(in_flight_, std::memory_order_relaxed);
}

bool IoEngine::Advance(Op* op, int64_t result) {
  if (result < 0) {
    int err = static_cast<int>(-result);
    // ECANCELED: io_uring cancels what a thread submitted when that thread
    // exits; the op is still wanted, so it is started again from here.
    if ((err == EINTR || err == EAGAIN || err == ECANCELED) && op->retries < kMaxRetries) {
      ++op->retries;
      continuations_.fetch_add(1, std::memory_order_relaxed);
      return false;
    }
    op->status = Status::FromErrno(err, op->Where());
    return true;
  }
  if (op->kind == IoOp::kFdatasync) return true;
  const auto n = static_cast<uint64_t>(result);
  if (n > op->cur_len) {
    op->status = Status::Internal(op->Where() + ": the kernel reported " + std::to_string(n) + " bytes of " +
                                  std::to_string(op->cur_len) + " asked");
    return true;
  }
  op->done_bytes += n;
  if (op->done_bytes == op->total) return true;
  const bool read = op->kind == IoOp::kReadv;
  if (n == 0) {
    if (read) {  // end of file: the rest reads as zeros
      ZeroIoVecs(op->iov, op->done_bytes, op->total - op->done_bytes);
      return true;
    }
    op->status = Status::IoError(op->Where() + ": the write made no progress (is the file system full?)");
    return true;
  }
  if (read && n < op->cur_len && op->target.direct) {
    // An O_DIRECT read stops short at end of file, possibly off the
    // descriptor's alignment, where reading on would be refused: a regular
    // file's size says whether the rest is past its end.
    struct stat st;
    if (::fstat(op->target.fd, &st) == 0 && S_ISREG(st.st_mode) &&
        op->cur_offset() >= static_cast<uint64_t>(st.st_size)) {
      ZeroIoVecs(op->iov, op->done_bytes, op->total - op->done_bytes);
      return true;
    }
    if (op->cur_offset() % kDirectBlock != 0) {
      op->status = Status::IoError(op->Where() + ": short O_DIRECT read ended off alignment before end of file");
      return true;
    }
  }
  continuations_.fetch_add(1, std::memory_order_relaxed);
  op->SetPiece();
  return false;
}

void IoEngine::Complete(Op* op) {
  if (op->target.tracker) op->target.tracker->End();
  FileCompletion done = std::move(op->done);
  Status status = std::move(op->status);
  delete op;
  done(std::move(status));
  completions_.fetch_add(1, std::memory_order_relaxed);
  std::lock_guard l(slot_mu_);
  --in_flight_;
  slot_cv_.notify_all();
}

void IoEngine::DrainForShutdown() {
  Unregister(this);
  FlushPlugged();
  std::unique_lock l(slot_mu_);
  slot_cv_.wait(l, [this] { return in_flight_ == 0; });
}

// ------------------------------------------------------------- ThreadEngine

namespace {

class ThreadEngine final : public IoEngine {
 public:
  ThreadEngine(uint32_t depth, std::string fallback_reason) : IoEngine(depth, std::move(fallback_reason)) {}

  Status StartWorkers(uint32_t n) {
    try {
      for (uint32_t i = 0; i < n; ++i) workers_.emplace_back([this] { Run(); });
    } catch (const std::system_error& e) {
      if (workers_.empty()) return Status::Internal(std::string("cannot start an I/O worker thread: ") + e.what());
    }
    return Status::Ok();
  }

  ~ThreadEngine() override {
    DrainForShutdown();
    {
      std::lock_guard l(mu_);
      stop_ = true;
    }
    cv_.notify_all();
    for (auto& t : workers_) t.join();
  }

  IoEngineKind kind() const override { return IoEngineKind::kThreads; }

  void FlushPlugged() override {
    std::lock_guard l(mu_);
    if (staged_.empty()) return;
    MoveStagedLocked();
  }

 protected:
  void Start(Op* op) override {
    std::lock_guard l(mu_);
    if (ThisThreadPlugged()) {
      staged_.push_back(op);
      NotePlugged();
      return;
    }
    staged_.push_back(op);
    MoveStagedLocked();
  }

 private:
  void MoveStagedLocked() {
    for (Op* op : staged_) queue_.push_back(op);
    const bool many = staged_.size() > 1;
    staged_.clear();
    submit_calls_.fetch_add(1, std::memory_order_relaxed);
    if (many) {
      cv_.notify_all();
    } else {
      cv_.notify_one();
    }
  }

  void Run() {
    MarkEngineThread();
    std::unique_lock l(mu_);
    for (;;) {
      cv_.wait(l, [this] { return stop_ || !queue_.empty(); });
      if (queue_.empty()) return;  // stop_
      Op* op = queue_.front();
      queue_.pop_front();
      l.unlock();
      while (!Advance(op, Execute(*op))) {
      }
      Complete(op);
      l.lock();
    }
  }

  static int64_t Execute(const Op& op) {
    const int fd = op.target.fd;
    ssize_t n = 0;
    switch (op.kind) {
      case IoOp::kReadv:
        n = ::preadv(fd, op.cur_iov, op.cur_cnt, static_cast<off_t>(op.cur_offset()));
        break;
      case IoOp::kWritev:
        n = ::pwritev(fd, op.cur_iov, op.cur_cnt, static_cast<off_t>(op.cur_offset()));
        break;
      case IoOp::kFdatasync:
        n = ::fdatasync(fd);
        break;
    }
    return n < 0 ? -static_cast<int64_t>(errno) : n;
  }

  std::mutex mu_;
  std::condition_variable cv_;
  std::deque<Op*> queue_;    // ready for a worker
  std::vector<Op*> staged_;  // held back by a plugged submitter
  bool stop_ = false;
  std::vector<std::thread> workers_;
};

// -------------------------------------------------------------- UringEngine

class UringEngine final : public IoEngine {
 public:
  explicit UringEngine(uint32_t depth) : IoEngine(depth, "") {}

  // Sets up the ring; returns 0 or -errno (the caller then falls back).
  int Init(const IoEngineOptions& options, uint32_t depth) {
    if (options.simulate_uring_init_errno != 0) return -options.simulate_uring_init_errno;
    io_uring_params p{};
    // Room for the completions of a full queue of outside ops plus what
    // completion callbacks submit without waiting.
    p.flags = IORING_SETUP_CQSIZE | IORING_SETUP_SUBMIT_ALL;
    p.cq_entries = depth * 4;
    int r = io_uring_queue_init_params(depth, &ring_, &p);
    if (r == -EINVAL) {  // kernels before 5.18 lack SUBMIT_ALL
      p = io_uring_params{};
      p.flags = IORING_SETUP_CQSIZE;
      p.cq_entries = depth * 4;
      r = io_uring_queue_init_params(depth, &ring_, &p);
    }
    if (r < 0) return r;
    ring_ok_ = true;
    if (options.registered_file_slots > 0 &&
        io_uring_register_files_sparse(&ring_, options.registered_file_slots) == 0) {
      slot_used_.assign(options.registered_file_slots, false);
    }
    return 0;
  }

  Status StartThread() {
    try {
      reaper_ = std::thread([this] { Run(); });
    } catch (const std::system_error& e) {
      return Status::Internal(std::string("cannot start the io_uring completion thread: ") + e.what());
    }
    return Status::Ok();
  }

  ~UringEngine() override {
    if (reaper_.joinable()) {
      DrainForShutdown();
      {
        std::lock_guard l(sq_mu_);
        io_uring_sqe* sqe = GetSqeLocked();
        io_uring_prep_nop(sqe);
        io_uring_sqe_set_data64(sqe, kStopToken);
        SubmitLocked();
      }
      reaper_.join();
    }
    if (ring_ok_) io_uring_queue_exit(&ring_);
  }

  IoEngineKind kind() const override { return IoEngineKind::kUring; }

  int RegisterFile(int fd) override {
    std::lock_guard l(reg_mu_);
    auto it = std::find(slot_used_.begin(), slot_used_.end(), false);
    if (it == slot_used_.end()) return -1;
    const int slot = static_cast<int>(it - slot_used_.begin());
    if (io_uring_register_files_update(&ring_, static_cast<unsigned>(slot), &fd, 1) != 1) return -1;
    *it = true;
    return slot;
  }

  void UnregisterFile(int slot) override {
    std::lock_guard l(reg_mu_);
    if (slot < 0 || static_cast<size_t>(slot) >= slot_used_.size() || !slot_used_[slot]) return;
    int none = -1;
    if (io_uring_register_files_update(&ring_, static_cast<unsigned>(slot), &none, 1) == 1) slot_used_[slot] = false;
  }

  void FlushPlugged() override {
    std::lock_guard l(sq_mu_);
    if (io_uring_sq_ready(&ring_) > 0) SubmitLocked();
  }

 protected:
  void Start(Op* op) override {
    std::lock_guard l(sq_mu_);
    Prep(GetSqeLocked(), op);
    if (ThisThreadPlugged()) {
      NotePlugged();
      return;
    }
    SubmitLocked();
  }

 private:
  // A free SQE; a full queue is submitted first (submission without
  // SQPOLL consumes every queued entry, so one round suffices).
  io_uring_sqe* GetSqeLocked() {
    io_uring_sqe* sqe = io_uring_get_sqe(&ring_);
    while (sqe == nullptr) {
      SubmitLocked();
      sqe = io_uring_get_sqe(&ring_);
    }
    return sqe;
  }

  void SubmitLocked() {
    while (io_uring_sq_ready(&ring_) > 0) {
      submit_calls_.fetch_add(1, std::memory_order_relaxed);
      int r = io_uring_submit(&ring_);
      if (r > 0 || r == -EINTR) continue;
      // EAGAIN/EBUSY: the kernel is short of memory or the completion queue
      // overflowed; the completion thread is draining it, so try again soon.
      static RateLimiter limiter(5, std::chrono::seconds(10));
      if (r != -EAGAIN && r != -EBUSY && limiter.Allow())
        spdlog::error("io_uring_submit: {}; retrying", std::strerror(-r));
      std::this_thread::sleep_for(std::chrono::microseconds(100));
    }
  }

  void Prep(io_uring_sqe* sqe, Op* op) {
    const bool fixed = op->target.fixed_slot >= 0;
    const int fd = fixed ? op->target.fixed_slot : op->target.fd;
    const auto off = static_cast<__u64>(op->cur_offset());
    switch (op->kind) {
      case IoOp::kReadv:
        if (op->cur_cnt == 1 && op->cur_iov[0].iov_len <= INT32_MAX) {
          io_uring_prep_read(sqe, fd, op->cur_iov[0].iov_base, static_cast<unsigned>(op->cur_iov[0].iov_len), off);
        } else {
          io_uring_prep_readv(sqe, fd, op->cur_iov, static_cast<unsigned>(op->cur_cnt), off);
        }
        break;
      case IoOp::kWritev:
        if (op->cur_cnt == 1 && op->cur_iov[0].iov_len <= INT32_MAX) {
          io_uring_prep_write(sqe, fd, op->cur_iov[0].iov_base, static_cast<unsigned>(op->cur_iov[0].iov_len), off);
        } else {
          io_uring_prep_writev(sqe, fd, op->cur_iov, static_cast<unsigned>(op->cur_cnt), off);
        }
        break;
      case IoOp::kFdatasync:
        io_uring_prep_fsync(sqe, fd, IORING_FSYNC_DATASYNC);
        break;
    }
    if (fixed) sqe->flags |= IOSQE_FIXED_FILE;
    io_uring_sqe_set_data(sqe, op);
    COWTAP_HANDOFF_RELEASE(op);
  }

  void Run() {
    MarkEngineThread();
    constexpr unsigned kBatch = 64;
    io_uring_cqe* cqes[kBatch];
    struct Reaped {
      uint64_t data;
      int32_t res;
    } reaped[kBatch];
    for (;;) {
      io_uring_cqe* first = nullptr;
      int r = io_uring_wait_cqe(&ring_, &first);
      if (r < 0) {
        if (r != -EINTR && r != -EAGAIN) {
          static RateLimiter limiter(5, std::chrono::seconds(10));
          if (limiter.Allow()) spdlog::error("io_uring_wait_cqe: {}", std::strerror(-r));
          std::this_thread::sleep_for(std::chrono::milliseconds(1));
        }
        continue;
      }
      const unsigned n = io_uring_peek_batch_cqe(&ring_, cqes, kBatch);
      for (unsigned i = 0; i < n; ++i) reaped[i] = {cqes[i]->user_data, cqes[i]->res};
      io_uring_cq_advance(&ring_, n);
      bool stop = false;
      // Completions and the continuations and new I/O they cause go to the
      // kernel together, at the Unplug.
      PlugThisThread();
      for (unsigned i = 0; i < n; ++i) {
        if (reaped[i].data == kStopToken) {
          stop = true;
          continue;
        }
        auto* op = reinterpret_cast<Op*>(reaped[i].data);
        COWTAP_HANDOFF_ACQUIRE(op);
        if (Advance(op, reaped[i].res)) {
          Complete(op);
        } else {
          Start(op);
        }
      }
      UnplugThisThread();
      // This engine may have left the registry (it is draining); what the
      // callbacks queued here must still start.
      FlushPlugged();
      if (stop) return;
    }
  }

  io_uring ring_{};
  bool ring_ok_ = false;
  std::mutex sq_mu_;  // guards the submission side of ring_
  std::mutex reg_mu_;
  std::vector<bool> slot_used_;  // registered-file table; empty when not available
  std::thread reaper_;
};

IoEngineKind KindFromEnvironment(IoEngineKind asked) {
  if (asked != IoEngineKind::kAuto) return asked;
  const char* env = std::getenv("COWTAP_IO_ENGINE");
  if (env == nullptr || *env == '\0') return asked;
  std::string v(env);
  if (v == "threads") return IoEngineKind::kThreads;
  if (v == "uring" || v == "io_uring" || v == "auto") return asked;
  static std::once_flag warned;
  std::call_once(warned,
                 [&] { spdlog::warn("COWTAP_IO_ENGINE={} is not one of auto, uring, threads; using auto", v); });
  return asked;
}

}  // namespace

Result<std::unique_ptr<IoEngine>> IoEngine::Create(const IoEngineOptions& options) {
  const uint32_t depth = std::clamp<uint32_t>(options.queue_depth, 4, 4096);
  const uint32_t workers = std::clamp<uint32_t>(options.worker_threads, 1, 64);
  const IoEngineKind kind = KindFromEnvironment(options.kind);
  std::string reason;
  if (kind == IoEngineKind::kThreads) {
    reason = options.kind == IoEngineKind::kThreads ? "" : "COWTAP_IO_ENGINE=threads";
  } else {
    auto uring = std::make_unique<UringEngine>(depth);
    int r = uring->Init(options, depth);
    if (r == 0) {
      COWTAP_RETURN_IF_ERROR(uring->StartThread());
      return std::unique_ptr<IoEngine>(std::move(uring));
    }
    reason = std::string("io_uring_queue_init: ") + std::strerror(-r);
    static std::atomic<bool> logged{false};
    if (!logged.exchange(true))
      spdlog::warn("io_uring is unavailable ({}); file I/O runs on {} worker threads instead", reason, workers);
  }
  auto threads = std::make_unique<ThreadEngine>(depth, std::move(reason));
  COWTAP_RETURN_IF_ERROR(threads->StartWorkers(workers));
  return std::unique_ptr<IoEngine>(std::move(threads));
}

IoEngine* DefaultIoEngine() {
  static IoEngine* engine = []() -> IoEngine* {
    auto e = IoEngine::Create();
    if (!e.ok()) {
      spdlog::error("no asynchronous I/O engine ({}); file I/O runs synchronously", e.status().ToString());
      return nullptr;
    }
    return std::move(e).value().release();
  }();
  return engine;
}

}  // namespace cowtap::cow
