// Control plane of BlkFront: the xenbus handshake, feature negotiation,
// ring set-up and teardown, and xenstore events (resize, backend leaving).
// The data path is in blkfront_data.cc, misbehaviour in blkfront_misbehave.cc.
#include "xen-glue/blkfront.h"

#include <poll.h>

#include <algorithm>
#include <charconv>
#include <chrono>
#include <thread>

#include <fmt/format.h>
#include <spdlog/spdlog.h>

namespace cowtap::xen {
namespace {

// xenbus states (xen/io/xenbus.h).
constexpr int kInitialising = 1;
constexpr int kInitWait = 2;
constexpr int kInitialised = 3;
constexpr int kConnected = 4;
constexpr int kClosing = 5;
constexpr int kClosed = 6;
constexpr uint32_t kMaxOrder = 4;  // blkfront's limit (16 pages)
constexpr uint32_t kMaxQueues = 16;
constexpr uint32_t kMaxIndirectSegments = kBlkifMaxIndirectPages * kBlkifSegmentsPerIndirectPage;
constexpr char kWatchToken[] = "blkfront-backend";

Result<uint64_t> ParseUint(const std::string& text, const std::string& path) {
  uint64_t v = 0;
  auto [ptr, ec] = std::from_chars(text.data(), text.data() + text.size(), v);
  if (ec != std::errc() || ptr != text.data() + text.size() || text.empty()) {
    return Status::InvalidArgument(fmt::format("xenstore {} = '{}' is not an unsigned number", path, text));
  }
  return v;
}

}  // namespace

BlkFront::BlkFront(SimGuest& guest, uint32_t devid, const BlkfrontOptions& options)
    : guest_(&guest), devid_(devid), options_(options) {
  frontend_path_ = XsFrontendDir(guest.domid(), "vbd", devid);
}

BlkFront::~BlkFront() {
  if (connected_) {
    Status s = Disconnect();
    if (!s.ok()) SPDLOG_WARN("blkfront {}: disconnect at destruction: {}", frontend_path_, s.ToString());
  }
  ReleaseQueues();
}

Result<std::unique_ptr<BlkFront>> BlkFront::Attach(SimGuest& guest, uint32_t devid, const BlkfrontOptions& options) {
  std::unique_ptr<BlkFront> front(new BlkFront(guest, devid, options));
  COWTAP_ASSIGN_OR_RETURN(front->store_, guest.OpenXenStore());
  COWTAP_ASSIGN_OR_RETURN(front->evtchn_, guest.OpenEventChannel());
  XenStore& xs = *front->store_;
  COWTAP_ASSIGN_OR_RETURN(front->device_.backend_path, xs.Read(XsJoin(front->frontend_path_, "backend")));
  COWTAP_ASSIGN_OR_RETURN(std::string backend_id, xs.Read(XsJoin(front->frontend_path_, "backend-id")));
  COWTAP_ASSIGN_OR_RETURN(uint64_t bid, ParseUint(backend_id, front->frontend_path_ + "/backend-id"));
  if (bid > 0x7fef) return Status::InvalidArgument("backend-id " + backend_id + " is not a domain id");
  front->device_.backend_domid = static_cast<DomId>(bid);
  COWTAP_RETURN_IF_ERROR(xs.Watch(front->device_.backend_path, kWatchToken));
  COWTAP_RETURN_IF_ERROR(front->Handshake());
  return front;
}

Result<int> BlkFront::ReadBackendState() {
  const std::string path = XsJoin(device_.backend_path, "state");
  auto text = store_->Read(path);
  if (!text.ok()) {
    // A removed backend directory reads as Closed.
    if (text.status().code() == ErrorCode::kNotFound) return kClosed;
    return text.status();
  }
  COWTAP_ASSIGN_OR_RETURN(uint64_t v, ParseUint(*text, path));
  return static_cast<int>(v);
}

Status BlkFront::WaitBackendState(std::initializer_list<int> states, int* seen) {
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::milliseconds(options_.handshake_timeout_ms);
  while (true) {
    // Consume queued watch events first, then look at the state: a change
    // after the read fires a new event, so none is missed.
    while (true) {
      COWTAP_ASSIGN_OR_RETURN(auto ev, store_->ReadWatch());
      if (!ev) break;
    }
    COWTAP_ASSIGN_OR_RETURN(*seen, ReadBackendState());
    if (std::find(states.begin(), states.end(), *seen) != states.end()) return Status::Ok();
    const auto left = std::chrono::duration_cast<std::chrono::milliseconds>(deadline - std::chrono::steady_clock::now());
    if (left.count() <= 0) {
      return Status::Busy(fmt::format("blkfront {}: backend {} stayed in state {} for {} ms; is the backend running?",
                                      frontend_path_, device_.backend_path, *seen, options_.handshake_timeout_ms));
    }
    pollfd pfd{store_->fd(), POLLIN, 0};
    if (poll(&pfd, 1, static_cast<int>(std::min<int64_t>(left.count(), 100))) < 0 && errno != EINTR) {
      return Status::FromErrno(errno, "poll on the xenstore watch fd");
    }
  }
}

Status BlkFront::ReadBackendFeatures() {
  auto read_uint = [&](const char* key, uint64_t dflt) -> Result<uint64_t> {
    const std::string path = XsJoin(device_.backend_path, key);
    auto text = store_->Read(path);
    if (!text.ok()) {
      if (text.status().code() == ErrorCode::kNotFound) return dflt;
      return text.status();
    }
    return ParseUint(*text, path);
  };
  COWTAP_ASSIGN_OR_RETURN(uint64_t order, read_uint("max-ring-page-order", 0));
  COWTAP_ASSIGN_OR_RETURN(uint64_t queues, read_uint("multi-queue-max-queues", 1));
  COWTAP_ASSIGN_OR_RETURN(uint64_t indirect, read_uint("feature-max-indirect-segments", 0));
  COWTAP_ASSIGN_OR_RETURN(uint64_t persistent, read_uint("feature-persistent", 0));
  COWTAP_ASSIGN_OR_RETURN(uint64_t flush, read_uint("feature-flush-cache", 0));
  COWTAP_ASSIGN_OR_RETURN(uint64_t barrier, read_uint("feature-barrier", 0));
  COWTAP_ASSIGN_OR_RETURN(uint64_t discard, read_uint("feature-discard", 0));
  COWTAP_ASSIGN_OR_RETURN(uint64_t secure, read_uint("discard-secure", 0));
  COWTAP_ASSIGN_OR_RETURN(uint64_t granularity, read_uint("discard-granularity", 0));
  COWTAP_ASSIGN_OR_RETURN(uint64_t alignment, read_uint("discard-alignment", 0));
  backend_max_order_ = static_cast<uint32_t>(std::min<uint64_t>(order, kMaxOrder));
  backend_max_queues_ = static_cast<uint32_t>(std::clamp<uint64_t>(queues, 1, kMaxQueues));
  backend_indirect_ = static_cast<uint32_t>(std::min<uint64_t>(indirect, kMaxIndirectSegments));
  backend_persistent_ = persistent != 0;
  device_.flush = options_.use_flush && flush != 0;
  device_.barrier = options_.use_barrier && barrier != 0;
  device_.discard = options_.use_discard && discard != 0;
  device_.discard_secure = device_.discard && secure != 0;
  device_.discard_granularity = static_cast<uint32_t>(std::min<uint64_t>(granularity, UINT32_MAX));
  device_.discard_alignment = static_cast<uint32_t>(std::min<uint64_t>(alignment, UINT32_MAX));
  return Status::Ok();
}

Status BlkFront::SetupQueues() {
  const uint32_t order = options_.legacy_single_page_keys ? 0 : std::min(options_.max_ring_page_order, backend_max_order_);
  const uint32_t nqueues = std::clamp<uint32_t>(std::min(options_.max_queues, backend_max_queues_), 1, kMaxQueues);
  device_.ring_page_order = order;
  device_.num_queues = nqueues;
  queues_.clear();
  queues_.resize(nqueues);
  for (Queue& q : queues_) {
    std::vector<uint8_t*> pages;
    for (uint32_t i = 0; i < (1u << order); ++i) {
      COWTAP_ASSIGN_OR_RETURN(uint32_t page, guest_->AllocPage());
      q.ring_pages.push_back(page);
      pages.push_back(guest_->Page(page));
      COWTAP_ASSIGN_OR_RETURN(GrantRef ref, guest_->GrantAccess(page, device_.backend_domid, false));
      ++stats_.grants_created;
      q.ring_refs.push_back(ref);
    }
    q.ring = std::make_unique<FrontRing>(std::span<uint8_t* const>(pages), options_.abi);
    COWTAP_ASSIGN_OR_RETURN(q.port, evtchn_->BindUnbound(device_.backend_domid));
    q.shadow.assign(q.ring->size(), Shadow{});
    q.free_ids.clear();
    for (uint32_t id = q.ring->size(); id-- > 0;) q.free_ids.push_back(id);
  }
  device_.ring_entries = queues_[0].ring->size();
  return Status::Ok();
}

Status BlkFront::PublishKeys() {
  const uint32_t order = device_.ring_page_order;
  const bool legacy = order == 0;
  return RunXsTransaction(*store_, [&](XsTransaction tx) -> Status {
    auto write = [&](const std::string& key, const std::string& value) {
      return store_->Write(XsJoin(frontend_path_, key), value, tx);
    };
    if (!legacy) COWTAP_RETURN_IF_ERROR(write("ring-page-order", std::to_string(order)));
    if (queues_.size() >= 2) COWTAP_RETURN_IF_ERROR(write("multi-queue-num-queues", std::to_string(queues_.size())));
    for (size_t qi = 0; qi < queues_.size(); ++qi) {
      const std::string dir = queues_.size() >= 2 ? fmt::format("queue-{}/", qi) : "";
      const Queue& q = queues_[qi];
      if (legacy) {
        COWTAP_RETURN_IF_ERROR(write(dir + "ring-ref", std::to_string(q.ring_refs[0])));
      } else {
        for (size_t i = 0; i < q.ring_refs.size(); ++i) {
          COWTAP_RETURN_IF_ERROR(write(fmt::format("{}ring-ref{}", dir, i), std::to_string(q.ring_refs[i])));
        }
      }
      COWTAP_RETURN_IF_ERROR(write(dir + "event-channel", std::to_string(q.port)));
    }
    if (options_.write_protocol) COWTAP_RETURN_IF_ERROR(write("protocol", std::string(BlkifAbiName(options_.abi))));
    return write("feature-persistent", options_.persistent_grants ? "1" : "0");
  });
}

Status BlkFront::ReadDiskProperties() {
  auto read_uint = [&](const char* key, std::optional<uint64_t> dflt) -> Result<uint64_t> {
    const std::string path = XsJoin(device_.backend_path, key);
    auto text = store_->Read(path);
    if (!text.ok()) {
      if (text.status().code() == ErrorCode::kNotFound && dflt) return *dflt;
      return text.status().Annotate("blkfront: reading the backend's " + std::string(key));
    }
    return ParseUint(*text, path);
  };
  COWTAP_ASSIGN_OR_RETURN(device_.sectors, read_uint("sectors", std::nullopt));
  COWTAP_ASSIGN_OR_RETURN(uint64_t info, read_uint("info", 0));
  COWTAP_ASSIGN_OR_RETURN(uint64_t sector_size, read_uint("sector-size", 512));
  COWTAP_ASSIGN_OR_RETURN(uint64_t physical, read_uint("physical-sector-size", sector_size));
  if (sector_size != 512) {
    return Status::NotSupported(fmt::format("blkfront {}: backend sector-size {} (only 512 is implemented)",
                                            frontend_path_, sector_size));
  }
  device_.info = static_cast<uint32_t>(info);
  device_.read_only = (info & 4) != 0;
  device_.sector_size = 512;
  device_.physical_sector_size = static_cast<uint32_t>(std::min<uint64_t>(physical, UINT32_MAX));
  return Status::Ok();
}

Status BlkFront::SetFrontendState(int state) {
  return store_->Write(XsJoin(frontend_path_, "state"), std::to_string(state));
}

Status BlkFront::Handshake() {
  int seen = 0;
  if (options_.wait_for_initwait) {
    COWTAP_RETURN_IF_ERROR(WaitBackendState({kInitWait}, &seen));
  }
  COWTAP_RETURN_IF_ERROR(ReadBackendFeatures());
  COWTAP_RETURN_IF_ERROR(SetupQueues());
  COWTAP_RETURN_IF_ERROR(PublishKeys());
  COWTAP_RETURN_IF_ERROR(SetFrontendState(kInitialised));
  if (!options_.wait_for_initwait) {
    // Without waiting for InitWait the backend may still show Closing/Closed
    // from an earlier session (its watch on our state has not run yet): that
    // is not a refusal. Wait until it has moved on.
    COWTAP_RETURN_IF_ERROR(WaitBackendState({kInitWait, kInitialised, kConnected}, &seen));
  }
  COWTAP_RETURN_IF_ERROR(WaitBackendState({kConnected, kClosing, kClosed}, &seen));
  if (seen != kConnected) {
    return Status::IoError(fmt::format("blkfront {}: backend {} refused the connection (went to state {}); see "
                                       "the backend's log",
                                       frontend_path_, device_.backend_path, seen));
  }
  // Features may be (re)published up to Connected (a frontend that did not
  // wait for InitWait may have read none), so the data-path features are
  // settled here, as blkfront does on connect. Persistent grants are on when
  // both sides said so: our key, written before, and the backend's.
  COWTAP_RETURN_IF_ERROR(ReadBackendFeatures());
  device_.persistent = options_.persistent_grants && backend_persistent_;
  const uint32_t indirect = std::min(options_.max_indirect_segments, backend_indirect_);
  device_.indirect_segments = indirect > kBlkifMaxDirectSegments ? indirect : 0;
  COWTAP_RETURN_IF_ERROR(ReadDiskProperties());
  COWTAP_RETURN_IF_ERROR(SetFrontendState(kConnected));
  connected_ = true;
  backend_gone_ = false;
  return Status::Ok();
}

Status BlkFront::HandleXenstoreEvents() {
  bool changed = false;
  while (true) {
    COWTAP_ASSIGN_OR_RETURN(auto ev, store_->ReadWatch());
    if (!ev) break;
    changed = true;
  }
  if (!changed || !connected_) return Status::Ok();
  COWTAP_ASSIGN_OR_RETURN(int state, ReadBackendState());
  if (state == kClosing || state == kClosed) {
    backend_gone_ = true;
    return Status::Ok();
  }
  if (state == kConnected) {
    const uint64_t before = device_.sectors;
    COWTAP_ASSIGN_OR_RETURN(uint64_t now, RefreshSectors());
    if (now != before) ++stats_.resize_events;
  }
  return Status::Ok();
}

Result<uint64_t> BlkFront::RefreshSectors() {
  const std::string path = XsJoin(device_.backend_path, "sectors");
  COWTAP_ASSIGN_OR_RETURN(std::string text, store_->Read(path));
  COWTAP_ASSIGN_OR_RETURN(device_.sectors, ParseUint(text, path));
  return device_.sectors;
}

Status BlkFront::EndGrant(GrantRef ref) {
  Status s = guest_->EndAccess(ref);
  if (s.ok()) ++stats_.grants_ended;
  return s;
}

void BlkFront::ReleaseQueues() {
  // Ends access to every grant; the backend should have unmapped on Closing,
  // but give it a moment (kBusy) before counting a ref as leaked.
  std::vector<DataPage> pending;
  for (Queue& q : queues_) {
    for (size_t i = 0; i < q.ring_refs.size(); ++i) pending.push_back({q.ring_pages[i], q.ring_refs[i]});
    for (Shadow& sh : q.shadow) {
      if (!sh.in_use) continue;
      for (const DataPage& p : sh.data) pending.push_back(p);
      for (const DataPage& p : sh.indirect) pending.push_back(p);
      sh = Shadow{};
    }
    if (evtchn_) evtchn_->Unbind(q.port).IgnoreError();
  }
  queues_.clear();
  pending.insert(pending.end(), persistent_pool_.begin(), persistent_pool_.end());
  pending.insert(pending.end(), deferred_end_.begin(), deferred_end_.end());
  persistent_pool_.clear();
  deferred_end_.clear();
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::milliseconds(options_.handshake_timeout_ms);
  while (!pending.empty()) {
    std::vector<DataPage> busy;
    for (const DataPage& p : pending) {
      Status s = EndGrant(p.gref);
      if (s.code() == ErrorCode::kBusy) {
        busy.push_back(p);
      } else {
        guest_->FreePage(p.page);
      }
    }
    pending.swap(busy);
    if (pending.empty() || std::chrono::steady_clock::now() > deadline) break;
    std::this_thread::sleep_for(std::chrono::milliseconds(5));
  }
  leaked_grants_ += pending.size();
  if (!pending.empty()) {
    SPDLOG_WARN("blkfront {}: {} grant(s) still mapped by the backend after disconnect", frontend_path_,
                pending.size());
  }
}

Status BlkFront::Disconnect() {
  if (!connected_) return Status::Ok();
  // Let in-flight requests finish, as blkfront does before closing.
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::milliseconds(options_.handshake_timeout_ms);
  std::vector<BlkCompletion> dropped;
  while (InFlight() > 0 && !backend_gone_ && std::chrono::steady_clock::now() < deadline) {
    auto n = Poll(&dropped, 50);
    if (!n.ok()) break;
  }
  connected_ = false;
  COWTAP_RETURN_IF_ERROR(SetFrontendState(kClosing));
  int seen = 0;
  Status waited = WaitBackendState({kClosing, kClosed}, &seen);
  ReleaseQueues();
  COWTAP_RETURN_IF_ERROR(SetFrontendState(kClosed));
  COWTAP_RETURN_IF_ERROR(waited);
  return Status::Ok();
}

Status BlkFront::Reconnect() {
  if (connected_) return Status::InvalidArgument("blkfront " + frontend_path_ + ": already connected");
  COWTAP_RETURN_IF_ERROR(SetFrontendState(kInitialising));
  return Handshake();
}

}  // namespace cowtap::xen
