// Data path of BlkFront: building requests (direct and indirect segments over
// granted guest pages), pushing them with the check-notify rule, and
// completing responses (copying read data out, returning or ending grants).
#include <poll.h>

#include <algorithm>
#include <chrono>
#include <cstring>

#include <fmt/format.h>

#include "base/checked_math.h"
#include "xen-glue/blkfront.h"

namespace cowtap::xen {

uint32_t BlkFront::max_sectors_per_io() const {
  const uint32_t segments = device_.indirect_segments > 0 ? device_.indirect_segments : kBlkifMaxDirectSegments;
  return segments * kBlkifSectorsPerPage;
}

bool BlkFront::Supports(BlkOp op) const {
  switch (op) {
    case BlkOp::kRead:
      return true;
    case BlkOp::kWrite:
      return !device_.read_only;
    case BlkOp::kWriteBarrier:
      return device_.barrier && !device_.read_only;
    case BlkOp::kFlush:
      return device_.flush;
    case BlkOp::kDiscard:
      return device_.discard && !device_.read_only;
    case BlkOp::kSecureDiscard:
      return device_.discard_secure && !device_.read_only;
  }
  return false;
}

uint32_t BlkFront::InFlight() const {
  uint32_t n = 0;
  for (const Queue& q : queues_) n += q.in_flight;
  return n;
}

Result<BlkFront::DataPage> BlkFront::GetDataPage(bool for_write_only) {
  if (device_.persistent && !persistent_pool_.empty()) {
    DataPage p = persistent_pool_.back();
    persistent_pool_.pop_back();
    return p;
  }
  COWTAP_ASSIGN_OR_RETURN(uint32_t page, guest_->AllocPage());
  // Persistent pages serve reads and writes alike, so they are granted
  // read-write; per-request grants for writes are read-only.
  auto ref = guest_->GrantAccess(page, device_.backend_domid, !device_.persistent && for_write_only);
  if (!ref.ok()) {
    guest_->FreePage(page);
    return ref.status();
  }
  ++stats_.grants_created;
  return DataPage{page, *ref};
}

void BlkFront::PutDataPage(const DataPage& page, bool revoked) {
  if (revoked) {
    // The backend may still hold a mapping of a revoked ref: never reuse the
    // page. Ending access is best effort (the entry was cleared under it).
    guest_->EndAccess(page.gref).IgnoreError();
    return;
  }
  if (device_.persistent) {
    persistent_pool_.push_back(page);
    return;
  }
  Status s = EndGrant(page.gref);
  if (s.ok()) {
    guest_->FreePage(page.page);
  } else {
    deferred_end_.push_back(page);
  }
}

Result<uint32_t> BlkFront::PrepareRequest(Queue& q, const BlkIo& io, BlkifRequest* req) {
  const uint32_t id = q.free_ids.back();
  Shadow sh;
  sh.in_use = true;
  sh.io = io;
  *req = BlkifRequest{};
  req->id = id;
  req->handle = static_cast<uint16_t>(devid_);
  req->sector_number = io.sector;
  auto fail = [&](Status s) -> Result<uint32_t> {
    for (const DataPage& p : sh.data) PutDataPage(p, false);
    for (const DataPage& p : sh.indirect) PutDataPage(p, false);
    return s;
  };
  switch (io.op) {
    case BlkOp::kFlush:
      req->operation = kBlkifOpFlushDiskcache;
      req->sector_number = 0;
      break;
    case BlkOp::kDiscard:
    case BlkOp::kSecureDiscard:
      req->operation = kBlkifOpDiscard;
      req->nr_sectors = io.nr_sectors;
      req->discard_flag = io.op == BlkOp::kSecureDiscard ? kBlkifDiscardSecure : 0;
      break;
    case BlkOp::kRead:
    case BlkOp::kWrite:
    case BlkOp::kWriteBarrier: {
      const bool is_read = io.op == BlkOp::kRead;
      const uint32_t nsegs = static_cast<uint32_t>(DivRoundUp(io.nr_sectors, kBlkifSectorsPerPage));
      std::vector<BlkifSegment> segs;
      for (uint32_t i = 0; i < nsegs; ++i) {
        auto page = GetDataPage(!is_read);
        if (!page.ok()) return fail(page.status());
        sh.data.push_back(*page);
        const uint32_t sectors_here = std::min<uint32_t>(kBlkifSectorsPerPage, io.nr_sectors - i * kBlkifSectorsPerPage);
        if (!is_read) {
          std::memcpy(guest_->Page(page->page), io.buffer + size_t{i} * kBlkifPageBytes,
                      size_t{sectors_here} * kGuestSectorBytes);
        }
        segs.push_back({page->gref, 0, static_cast<uint8_t>(sectors_here - 1)});
      }
      const uint8_t op = is_read ? kBlkifOpRead : io.op == BlkOp::kWrite ? kBlkifOpWrite : kBlkifOpWriteBarrier;
      if (nsegs <= kBlkifMaxDirectSegments) {
        req->operation = op;
        req->nr_segments = static_cast<uint16_t>(nsegs);
        std::copy(segs.begin(), segs.end(), req->seg);
      } else {
        // Indirect: descriptor pages, granted read-only (read-write when
        // persistent, since they are pooled with the data pages).
        const uint32_t npages = static_cast<uint32_t>(DivRoundUp(nsegs, kBlkifSegmentsPerIndirectPage));
        req->operation = kBlkifOpIndirect;
        req->indirect_op = op;
        req->nr_segments = static_cast<uint16_t>(nsegs);
        req->nr_indirect_pages = npages;
        for (uint32_t p = 0; p < npages; ++p) {
          auto page = GetDataPage(true);
          if (!page.ok()) return fail(page.status());
          sh.indirect.push_back(*page);
          std::memset(guest_->Page(page->page), 0, kBlkifPageBytes);
          req->indirect_grefs[p] = page->gref;
        }
        for (uint32_t i = 0; i < nsegs; ++i) {
          EncodeIndirectSegment(guest_->Page(sh.indirect[i / kBlkifSegmentsPerIndirectPage].page), i, segs[i]);
        }
        ++stats_.indirect_requests;
      }
      break;
    }
  }
  q.free_ids.pop_back();
  q.shadow[id] = std::move(sh);
  return id;
}

Status BlkFront::Submit(const BlkIo& io) {
  if (!connected_) return Status::Cancelled("blkfront " + frontend_path_ + ": not connected");
  if (backend_gone_) return Status::Cancelled("blkfront " + frontend_path_ + ": the backend left Connected");
  if (!Supports(io.op)) {
    return Status::NotSupported(fmt::format("blkfront {}: {} was not negotiated with the backend", frontend_path_,
                                            BlkOpName(io.op)));
  }
  if (io.op != BlkOp::kFlush) {
    if (io.nr_sectors == 0) return Status::InvalidArgument(fmt::format("{} of zero sectors", BlkOpName(io.op)));
    if (options_.check_ranges && !RangeWithin(io.sector, io.nr_sectors, device_.sectors)) {
      return Status::OutOfRange(fmt::format("{} of sectors [{}, +{}) is beyond the disk's {} sectors",
                                            BlkOpName(io.op), io.sector, io.nr_sectors, device_.sectors));
    }
  }
  if (BlkOpHasData(io.op)) {
    if (io.buffer == nullptr) return Status::InvalidArgument("data request without a buffer");
    const uint32_t limit = io.op == BlkOp::kWriteBarrier ? max_sectors_per_barrier() : max_sectors_per_io();
    if (io.nr_sectors > limit) {
      return Status::InvalidArgument(fmt::format("{} of {} sectors exceeds the {} a request may carry",
                                                 BlkOpName(io.op), io.nr_sectors, limit));
    }
  }
  for (size_t tried = 0; tried < queues_.size(); ++tried) {
    Queue& q = queues_[next_queue_];
    next_queue_ = (next_queue_ + 1) % queues_.size();
    if (q.free_ids.empty() || q.ring->FreeSlots() == 0) continue;
    BlkifRequest req;
    COWTAP_ASSIGN_OR_RETURN(uint32_t id, PrepareRequest(q, io, &req));
    (void)id;
    q.ring->QueueRequest(req);
    ++q.in_flight;
    ++stats_.submitted;
    return PushAndNotify(q);
  }
  return Status::Busy("blkfront: every queue is full; poll for completions");
}

Status BlkFront::PushAndNotify(Queue& q) {
  if (q.ring->PushRequestsAndCheckNotify()) return NotifyQueue(q);
  return Status::Ok();
}

Status BlkFront::NotifyQueue(Queue& q) {
  ++stats_.notifications_sent;
  return evtchn_->Notify(q.port);
}

void BlkFront::Finish(Queue& q, uint32_t id, int16_t status, std::vector<BlkCompletion>* out) {
  Shadow sh = std::move(q.shadow[id]);
  q.shadow[id] = Shadow{};
  q.free_ids.push_back(id);
  --q.in_flight;
  ++stats_.completed;
  if (status == kBlkifRspOkay && sh.io.op == BlkOp::kRead && !sh.raw && sh.io.buffer != nullptr) {
    for (size_t i = 0; i < sh.data.size(); ++i) {
      const uint32_t sectors_here =
          std::min<uint32_t>(kBlkifSectorsPerPage, sh.io.nr_sectors - static_cast<uint32_t>(i) * kBlkifSectorsPerPage);
      std::memcpy(sh.io.buffer + i * kBlkifPageBytes, guest_->Page(sh.data[i].page),
                  size_t{sectors_here} * kGuestSectorBytes);
    }
  }
  for (const DataPage& p : sh.data) PutDataPage(p, sh.revoked);
  for (const DataPage& p : sh.indirect) PutDataPage(p, sh.revoked);
  out->push_back({sh.io.cookie, sh.io.op, status});
}

Status BlkFront::Drain(Queue& q, std::vector<BlkCompletion>* out, size_t* n) {
  do {
    BlkifResponse rsp;
    while (true) {
      COWTAP_ASSIGN_OR_RETURN(bool got, q.ring->TakeResponse(&rsp));
      if (!got) break;
      if (rsp.id >= q.shadow.size() || !q.shadow[rsp.id].in_use) {
        ++stats_.unexpected_responses;
        continue;
      }
      Finish(q, static_cast<uint32_t>(rsp.id), rsp.status, out);
      ++*n;
    }
  } while (q.ring->FinalCheckForResponses());
  return Status::Ok();
}

Result<size_t> BlkFront::Poll(std::vector<BlkCompletion>* out, int timeout_ms) {
  if (queues_.empty()) return Status::Cancelled("blkfront " + frontend_path_ + ": not connected");
  size_t n = 0;
  COWTAP_RETURN_IF_ERROR(HandleXenstoreEvents());
  for (Queue& q : queues_) COWTAP_RETURN_IF_ERROR(Drain(q, out, &n));
  if (n > 0 || timeout_ms == 0) return n;
  if (backend_gone_) {
    return Status::Cancelled(fmt::format("blkfront {}: backend {} left Connected with {} request(s) in flight",
                                         frontend_path_, device_.backend_path, InFlight()));
  }
  // Wait for an event; a wakeup may bring nothing new (its responses were
  // drained already), so keep waiting until something completes or time is up.
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::milliseconds(timeout_ms);
  while (n == 0) {
    const auto left =
        std::chrono::duration_cast<std::chrono::milliseconds>(deadline - std::chrono::steady_clock::now()).count();
    if (left <= 0) break;
    pollfd pfds[2] = {{evtchn_->fd(), POLLIN, 0}, {store_->fd(), POLLIN, 0}};
    if (poll(pfds, 2, static_cast<int>(left)) < 0 && errno != EINTR) {
      return Status::FromErrno(errno, "poll on blkfront fds");
    }
    while (true) {
      COWTAP_ASSIGN_OR_RETURN(std::optional<EvtchnPort> port, evtchn_->Pending());
      if (!port) break;
      COWTAP_RETURN_IF_ERROR(evtchn_->Unmask(*port));
    }
    COWTAP_RETURN_IF_ERROR(HandleXenstoreEvents());
    for (Queue& q : queues_) COWTAP_RETURN_IF_ERROR(Drain(q, out, &n));
    if (n == 0 && backend_gone_) {
      return Status::Cancelled(fmt::format("blkfront {}: backend {} left Connected with {} request(s) in flight",
                                           frontend_path_, device_.backend_path, InFlight()));
    }
  }
  return n;
}

}  // namespace cowtap::xen
