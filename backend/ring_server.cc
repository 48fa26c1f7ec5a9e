#include "backend/ring_server.h"

#include <fmt/format.h>
#include <poll.h>
#include <spdlog/spdlog.h>
#include <sys/eventfd.h>
#include <unistd.h>

#include <algorithm>
#include <bit>
#include <chrono>
#include <condition_variable>
#include <cstring>
#include <mutex>
#include <thread>
#include <unordered_map>

#include "backend/grant_pages.h"
#include "backend/ring.h"
#include "base/log.h"

namespace cowtap::backend {

using xen::GrantRef;

// One request between being taken off the ring and being answered. Its
// destructor answers BLKIF_RSP_ERROR if nothing else did, so no path —
// early return, teardown — leaves the guest waiting.
struct InFlight {
  explicit InFlight(RingServer::Impl* s) : server(s) {}
  ~InFlight();
  InFlight(const InFlight&) = delete;
  InFlight& operator=(const InFlight&) = delete;

  RingServer::Impl* server;
  std::chrono::steady_clock::time_point taken = std::chrono::steady_clock::now();
  BlockRequest req;
  std::vector<PageRef> pages;  // data pages, unmapped (or returned to the LRU) with this
  std::vector<iovec> iov;
  Status result;
  bool answered = false;
};

class RingServer::Impl {
 public:
  Impl(RingConfig config, std::shared_ptr<BlockDevice> device)
      : config_(std::move(config)), device_(std::move(device)), sectors_(config_.limits.sectors) {}
  ~Impl();

  Status Init(xen::XenPlatform& platform);
  void StartThread() {
    thread_ = std::thread([this] { Run(); });
  }
  void Stop();
  void Pause();
  void Resume();
  void Answer(InFlight& op, const Status& status);
  bool halted() const { return halted_.load(std::memory_order_acquire); }

  RingConfig config_;
  std::shared_ptr<BlockDevice> device_;
  std::atomic<uint64_t> sectors_;
  RingStats stats_;
  std::atomic<bool> halted_{false};
  mutable std::mutex halt_mu_;
  std::string halt_reason_;  // GUARDED_BY(halt_mu_)
  std::atomic<size_t> mapped_pages_{0};
  std::unique_ptr<BackRing> ring_;
  std::atomic<bool> paused_{false};

 private:
  void Run();
  void ProcessRing();
  void ConsumeRequests();
  void HandleRequest(Request request);
  Status LoadIndirectSegments(InFlight& op, const DeviceLimits& limits);
  void Submit(std::unique_ptr<InFlight> op);
  void OnComplete(InFlight* op, Status status);
  void DrainCompletions();
  void PublishAndNotify();
  void Halt(const Status& why);
  bool Blocked() const { return held_ != nullptr || ordered_in_flight_; }
  void Wake();
  // Ring thread: while paused, tells Pause() once nothing is in flight.
  void ReportPauseState();
  void UpdateInFlight() { stats_.in_flight.store(in_flight_.size() + (held_ ? 1 : 0), std::memory_order_relaxed); }
  void LogGuestError(const Status& status);

  std::unique_ptr<xen::GrantTable> grants_;
  std::unique_ptr<xen::EventChannel> evtchn_;
  xen::EvtchnPort local_port_ = 0;
  bool bound_ = false;
  std::shared_ptr<xen::GrantMapping> ring_mapping_;
  std::unique_ptr<GrantPages> pages_;
  int stop_fd_ = -1;
  int completion_fd_ = -1;
  std::thread thread_;
  std::thread::id thread_id_;
  bool stopping_ = false;
  // A kick the frontend asked for that failed: Run retries it (ring thread only).
  bool notify_owed_ = false;
  static constexpr int kNotifyRetryMs = 10;
  RateLimiter log_limiter_{20, std::chrono::seconds(5)};

  // Ring thread only.
  std::unordered_map<InFlight*, std::unique_ptr<InFlight>> in_flight_;
  std::unique_ptr<InFlight> held_;  // a flush/barrier waiting for earlier I/O
  bool ordered_in_flight_ = false;  // a flush/barrier is executing
  // Filled by completions on any thread.
  std::mutex completed_mu_;
  std::vector<InFlight*> completed_;  // GUARDED_BY(completed_mu_)
  // Pause handshake: the ring thread sets drained_ while paused_ and idle.
  std::mutex pause_mu_;
  std::condition_variable pause_cv_;
  bool drained_ = false;        // GUARDED_BY(pause_mu_)
  bool thread_exited_ = false;  // GUARDED_BY(pause_mu_)
};

size_t LatencyBucket(uint64_t us) {
  return std::min<size_t>(static_cast<size_t>(std::bit_width(us)), kLatencyBuckets - 1);
}

InFlight::~InFlight() {
  if (!answered) server->Answer(*this, Status::Cancelled("request dropped before completion"));
}

RingServer::Impl::~Impl() {
  Stop();
  if (stop_fd_ >= 0) ::close(stop_fd_);
  if (completion_fd_ >= 0) ::close(completion_fd_);
}

Status RingServer::Impl::Init(xen::XenPlatform& platform) {
  const size_t nrefs = config_.ring_refs.size();
  if (nrefs == 0 || nrefs > 16 || (nrefs & (nrefs - 1)) != 0) {
    return Status::InvalidArgument(
        fmt::format("{}: {} ring refs; a ring is 1, 2, 4, 8 or 16 pages", config_.name, nrefs));
  }
  stop_fd_ = ::eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
  completion_fd_ = ::eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
  if (stop_fd_ < 0 || completion_fd_ < 0) return Status::FromErrno(errno, config_.name + ": eventfd");

  COWTAP_ASSIGN_OR_RETURN(grants_, platform.OpenGrantTable());
  pages_ = std::make_unique<GrantPages>(*grants_, config_.frontend_domid, config_.persistent,
                                        config_.max_persistent_grants, &mapped_pages_, &stats_.leaked_pages);
  COWTAP_ASSIGN_OR_RETURN(ring_mapping_, pages_->MapUncached(config_.ring_refs, true));
  ring_ = std::make_unique<BackRing>(ring_mapping_->addr(), nrefs * xen::kPageSize, config_.abi);
  if (ring_->capacity() == 0) return Status::InvalidArgument(config_.name + ": ring too small");

  COWTAP_ASSIGN_OR_RETURN(evtchn_, platform.OpenEventChannel());
  auto port = evtchn_->BindInterdomain(config_.frontend_domid, config_.remote_port);
  if (!port.ok()) return port.status().Annotate(config_.name + ": binding event channel");
  local_port_ = *port;
  bound_ = true;
  return Status::Ok();
}

void RingServer::Impl::Stop() {
  if (thread_.joinable()) {
    uint64_t one = 1;
    if (::write(stop_fd_, &one, sizeof(one)) < 0) spdlog::error("{}: cannot signal stop: {}", config_.name, errno);
    thread_.join();
  }
  {
    std::lock_guard lock(pause_mu_);
    thread_exited_ = true;
  }
  pause_cv_.notify_all();
  // Every request was answered by the thread's drain; now release every
  // grant and the event channel.
  if (pages_) pages_->Clear();
  if (ring_mapping_) {
    ring_.reset();
    ring_mapping_.reset();
  }
  if (bound_) {
    Status s = evtchn_->Unbind(local_port_);
    if (!s.ok()) spdlog::warn("{}: unbinding event channel: {}", config_.name, s.ToString());
    bound_ = false;
  }
}

void RingServer::Impl::Run() {
  thread_id_ = std::this_thread::get_id();
  ProcessRing();  // the frontend may have queued requests before we bound
  while (true) {
    pollfd fds[3] = {{stop_fd_, POLLIN, 0}, {completion_fd_, POLLIN, 0}, {evtchn_->fd(), POLLIN, 0}};
    // A halted ring no longer listens to the guest (a notification flood
    // must not keep this thread busy).
    const nfds_t nfds = halted() ? 2 : 3;
    if (::poll(fds, nfds, notify_owed_ ? kNotifyRetryMs : -1) < 0) {
      if (errno == EINTR) continue;
      Halt(Status::FromErrno(errno, "poll"));
      break;
    }
    if (fds[0].revents) break;
    stats_.wakeups.fetch_add(1, std::memory_order_relaxed);
    if (fds[1].revents) {
      uint64_t v;
      if (::read(completion_fd_, &v, sizeof(v)) < 0 && errno != EAGAIN) Halt(Status::FromErrno(errno, "eventfd"));
    }
    if (nfds == 3 && fds[2].revents) {
      // Acknowledge and unmask before looking at the ring: a notification
      // that arrives after this point wakes us again.
      while (true) {
        auto pending = evtchn_->Pending();
        if (!pending.ok()) {
          Halt(pending.status().Annotate("event channel"));
          break;
        }
        if (!pending->has_value()) break;
        Status s = evtchn_->Unmask(**pending);
        if (!s.ok()) Halt(s.Annotate("event channel unmask"));
      }
    }
    ProcessRing();
    ReportPauseState();
  }

  // Stopping: take nothing new, let in-flight I/O finish and answer it.
  stopping_ = true;
  while (!in_flight_.empty() || held_) {
    DrainCompletions();
    PublishAndNotify();
    if (in_flight_.empty() && !held_) break;
    pollfd fd{completion_fd_, POLLIN, 0};
    if (::poll(&fd, 1, 100) > 0) {
      uint64_t v;
      if (::read(completion_fd_, &v, sizeof(v)) < 0) {
      }
    }
  }
  PublishAndNotify();
  {
    std::lock_guard lock(pause_mu_);
    thread_exited_ = true;
  }
  pause_cv_.notify_all();
}

void RingServer::Impl::ProcessRing() {
  while (true) {
    DrainCompletions();
    const bool paused = paused_.load(std::memory_order_acquire);
    if (!halted() && !stopping_ && !paused) ConsumeRequests();
    DrainCompletions();
    PublishAndNotify();
    if (halted() || stopping_ || paused || Blocked()) return;  // a completion or Resume wakes us
    auto more = ring_->FinalCheckForRequests();
    if (!more.ok()) {
      Halt(more.status());
      PublishAndNotify();
      return;
    }
    if (!*more) return;
  }
}

void RingServer::Impl::ConsumeRequests() {
  Status s = ring_->Refresh();
  if (!s.ok()) {
    Halt(s);
    return;
  }
  uint64_t batch = 0;
  device_->Plug();
  while (!Blocked() && ring_->HasRequest()) {
    Request request = ring_->TakeRequest();
    ++batch;
    HandleRequest(request);
  }
  device_->Unplug();
  stats_.requests.fetch_add(batch, std::memory_order_relaxed);
  if (batch > stats_.max_batch.load(std::memory_order_relaxed)) stats_.max_batch.store(batch);
}

void RingServer::Impl::HandleRequest(Request request) {
  auto op = std::make_unique<InFlight>(this);
  DeviceLimits limits = config_.limits;
  limits.sectors = sectors_.load(std::memory_order_relaxed);
  Status s = ValidateRequest(request, limits, &op->req);
  if (s.ok() && op->req.indirect) s = LoadIndirectSegments(*op, limits);
  if (!s.ok()) {
    Answer(*op, s);
    return;
  }
  const bool ordered = op->req.op == BlockOp::kFlush || op->req.flush_after;
  if (ordered) {
    if (!in_flight_.empty()) {
      held_ = std::move(op);  // submitted by DrainCompletions once the ring is idle
      UpdateInFlight();
      return;
    }
    ordered_in_flight_ = true;
  }
  Submit(std::move(op));
}

Status RingServer::Impl::LoadIndirectSegments(InFlight& op, const DeviceLimits& limits) {
  stats_.indirect.fetch_add(1, std::memory_order_relaxed);
  std::vector<PageRef> pages;
  COWTAP_RETURN_IF_ERROR(pages_->Map(std::span(op.req.indirect_grefs.data(), op.req.nr_indirect_pages),
                                     /*writable=*/false, &pages));
  // Copy the descriptors out of the guest's pages once, then decode the copy.
  std::vector<uint8_t> raw(static_cast<size_t>(op.req.nr_segments) * kSegmentDescriptorSize);
  for (uint32_t p = 0; p < op.req.nr_indirect_pages; ++p) {
    const size_t begin = static_cast<size_t>(p) * kPageSize;
    const size_t n = std::min(kPageSize, raw.size() - begin);
    std::memcpy(raw.data() + begin, pages[p].addr(), n);
  }
  std::vector<Segment> segments(op.req.nr_segments);
  for (size_t i = 0; i < segments.size(); ++i) segments[i] = DecodeSegment(raw.data() + i * kSegmentDescriptorSize);
  return ValidateSegments(segments, limits, &op.req);
}

void RingServer::Impl::Submit(std::unique_ptr<InFlight> op) {
  BlockIo io;
  const BlockRequest& r = op->req;
  io.offset_bytes = r.offset_bytes;
  io.length_bytes = r.length_bytes;
  io.flush_after = r.flush_after;
  io.secure = r.secure;
  switch (r.op) {
    case BlockOp::kRead:
      io.kind = BlockIoKind::kRead;
      break;
    case BlockOp::kWrite:
      io.kind = BlockIoKind::kWrite;
      break;
    case BlockOp::kFlush:
      io.kind = BlockIoKind::kFlush;
      break;
    case BlockOp::kDiscard:
      io.kind = BlockIoKind::kDiscard;
      break;
  }
  if (r.op == BlockOp::kRead || r.op == BlockOp::kWrite) {
    std::vector<GrantRef> refs(r.segments.size());
    for (size_t i = 0; i < refs.size(); ++i) refs[i] = r.segments[i].gref;
    const uint64_t maps_before = pages_->map_calls();
    const uint64_t hits_before = pages_->hits();
    // READ fills guest pages: they must be mapped writable.
    Status s = pages_->Map(refs, /*writable=*/r.op == BlockOp::kRead, &op->pages);
    stats_.grant_maps.fetch_add(pages_->map_calls() - maps_before, std::memory_order_relaxed);
    stats_.persistent_hits.fetch_add(pages_->hits() - hits_before, std::memory_order_relaxed);
    stats_.persistent_evictions.store(pages_->evictions(), std::memory_order_relaxed);
    if (!s.ok()) {
      if (ordered_in_flight_ && r.flush_after) ordered_in_flight_ = false;
      Answer(*op, s);
      return;
    }
    const size_t sector = config_.limits.sector_size;
    op->iov.resize(r.segments.size());
    for (size_t i = 0; i < r.segments.size(); ++i) {
      const Segment& seg = r.segments[i];
      op->iov[i] = MakeIoVec(op->pages[i].addr() + seg.first_sect * sector,
                             (static_cast<size_t>(seg.last_sect - seg.first_sect) + 1) * sector);
    }
    io.iov = op->iov;
  }
  InFlight* raw = op.get();
  in_flight_.emplace(raw, std::move(op));
  UpdateInFlight();
  device_->Submit(io, [this, raw](Status status) { OnComplete(raw, std::move(status)); });
}

void RingServer::Impl::OnComplete(InFlight* op, Status status) {
  // Only the completion that makes the queue non-empty wakes the ring
  // thread: the ring thread takes the whole queue at once, so every later
  // one is taken by the drain that the first one's wakeup (or, for an inline
  // completion, the ring thread's own drain after submitting) leads to. A
  // batch of completions from the engine's thread costs one eventfd write.
  bool first;
  {
    std::lock_guard lock(completed_mu_);
    op->result = std::move(status);
    first = completed_.empty();
    completed_.push_back(op);
  }
  if (first && std::this_thread::get_id() != thread_id_) {
    uint64_t one = 1;
    if (::write(completion_fd_, &one, sizeof(one)) < 0) spdlog::error("{}: completion wakeup lost", config_.name);
  }
}

void RingServer::Impl::DrainCompletions() {
  while (true) {
    std::vector<InFlight*> done;
    {
      std::lock_guard lock(completed_mu_);
      done.swap(completed_);
    }
    for (InFlight* raw : done) {
      auto it = in_flight_.find(raw);
      if (it == in_flight_.end()) continue;  // cannot happen: completions are unique
      std::unique_ptr<InFlight> op = std::move(it->second);
      in_flight_.erase(it);
      UpdateInFlight();
      if (op->req.op == BlockOp::kFlush || op->req.flush_after) ordered_in_flight_ = false;
      Answer(*op, op->result);
    }
    if (held_ && in_flight_.empty()) {
      ordered_in_flight_ = true;
      std::unique_ptr<InFlight> held = std::move(held_);
      UpdateInFlight();
      Submit(std::move(held));
      continue;  // a synchronous device completed it already
    }
    if (done.empty()) return;
  }
}

void RingServer::Impl::Answer(InFlight& op, const Status& status) {
  op.answered = true;
  op.pages.clear();  // release the guest's pages before the guest learns it may reuse them
  const int16_t code = ResponseStatusFor(status);
  const BlockRequest& r = op.req;
  const auto us = std::chrono::duration_cast<std::chrono::microseconds>(std::chrono::steady_clock::now() - op.taken);
  stats_.latency_us_log2[LatencyBucket(static_cast<uint64_t>(std::max<int64_t>(us.count(), 0)))].fetch_add(
      1, std::memory_order_relaxed);
  if (code == kRspOkay) {
    switch (r.op) {
      case BlockOp::kRead:
        stats_.reads.fetch_add(1, std::memory_order_relaxed);
        stats_.bytes_read.fetch_add(r.length_bytes, std::memory_order_relaxed);
        break;
      case BlockOp::kWrite:
        stats_.writes.fetch_add(1, std::memory_order_relaxed);
        stats_.bytes_written.fetch_add(r.length_bytes, std::memory_order_relaxed);
        if (r.flush_after) stats_.flushes.fetch_add(1, std::memory_order_relaxed);
        break;
      case BlockOp::kFlush:
        stats_.flushes.fetch_add(1, std::memory_order_relaxed);
        break;
      case BlockOp::kDiscard:
        stats_.discards.fetch_add(1, std::memory_order_relaxed);
        stats_.bytes_discarded.fetch_add(r.length_bytes, std::memory_order_relaxed);
        break;
    }
  } else {
    (code == kRspEopnotsupp ? stats_.eopnotsupp : stats_.errors).fetch_add(1, std::memory_order_relaxed);
    LogGuestError(status);
  }
  ring_->PushResponse({r.id, r.operation, code});
}

void RingServer::Impl::PublishAndNotify() {
  if (!ring_->PublishResponses() && !notify_owed_) return;
  Status s = evtchn_->Notify(local_port_);
  if (s.ok()) {
    stats_.notifications.fetch_add(1, std::memory_order_relaxed);
    notify_owed_ = false;
    return;
  }
  // The responses are published; the kick is owed and retried from Run.
  notify_owed_ = true;
  stats_.notify_failures.fetch_add(1, std::memory_order_relaxed);
  if (log_limiter_.Allow()) {
    spdlog::warn("{}: notifying the frontend failed (retrying): {}", config_.name, s.ToString());
  }
}

void RingServer::Impl::Halt(const Status& why) {
  if (halted_.exchange(true)) return;
  {
    std::lock_guard lock(halt_mu_);
    halt_reason_ = why.ToString();
  }
  spdlog::error(
      "{}: ring halted, the frontend broke the ring protocol ({}); this ring serves nothing more "
      "until the frontend reconnects",
      config_.name, why.ToString());
}

void RingServer::Impl::Wake() {
  uint64_t one = 1;
  if (::write(completion_fd_, &one, sizeof(one)) < 0) spdlog::error("{}: cannot wake the ring thread", config_.name);
}

void RingServer::Impl::ReportPauseState() {
  if (!paused_.load(std::memory_order_acquire)) return;
  if (!in_flight_.empty() || held_) return;  // a completion wakes us again
  {
    std::lock_guard lock(pause_mu_);
    if (drained_) return;
    drained_ = true;
  }
  pause_cv_.notify_all();
}

void RingServer::Impl::Pause() {
  std::unique_lock lock(pause_mu_);
  if (thread_exited_ || !thread_.joinable()) return;
  paused_.store(true, std::memory_order_release);
  Wake();
  pause_cv_.wait(lock, [&] { return drained_ || thread_exited_; });
}

void RingServer::Impl::Resume() {
  {
    std::lock_guard lock(pause_mu_);
    drained_ = false;
    paused_.store(false, std::memory_order_release);
  }
  // The frontend may have queued requests (and its notifications were
  // acknowledged) while we were paused: look at the ring now.
  if (thread_.joinable()) Wake();
}

void RingServer::Impl::LogGuestError(const Status& status) {
  if (!log_limiter_.Allow()) return;
  const uint64_t suppressed = log_limiter_.TakeSuppressed();
  spdlog::warn("{}: request failed: {}{}", config_.name, status.ToString(),
               suppressed ? fmt::format(" ({} similar messages suppressed)", suppressed) : "");
}

// --- RingServer ---

Result<std::unique_ptr<RingServer>> RingServer::Start(xen::XenPlatform& platform, RingConfig config,
                                                      std::shared_ptr<BlockDevice> device) {
  const bool start_paused = config.start_paused;
  auto impl = std::make_unique<Impl>(std::move(config), std::move(device));
  COWTAP_RETURN_IF_ERROR(impl->Init(platform));  // on failure ~Impl releases what Init got
  impl->paused_.store(start_paused, std::memory_order_release);
  impl->StartThread();
  return std::unique_ptr<RingServer>(new RingServer(std::move(impl)));
}

RingServer::RingServer(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
RingServer::~RingServer() { Stop(); }
void RingServer::Stop() { impl_->Stop(); }
void RingServer::Pause() { impl_->Pause(); }
void RingServer::Resume() { impl_->Resume(); }
bool RingServer::paused() const { return impl_->paused_.load(std::memory_order_acquire); }
void RingServer::UpdateSectors(uint64_t sectors) { impl_->sectors_.store(sectors, std::memory_order_relaxed); }
bool RingServer::halted() const { return impl_->halted_.load(std::memory_order_acquire); }
std::string RingServer::halt_reason() const {
  std::lock_guard lock(impl_->halt_mu_);
  return impl_->halt_reason_;
}
const RingStats& RingServer::stats() const { return impl_->stats_; }
size_t RingServer::mapped_pages() const { return impl_->mapped_pages_.load(std::memory_order_relaxed); }
uint32_t RingServer::capacity() const { return impl_->ring_ ? impl_->ring_->capacity() : 0; }

}  // namespace cowtap::backend
