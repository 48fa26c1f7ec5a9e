// Misbehaviour modes of BlkFront: ways a buggy or hostile guest breaks the
// blkif protocol, so tests can check that the backend answers or halts only
// the affected ring, and keeps serving everything else.
#include <fmt/format.h>

#include <vector>

#include "xen-glue/blkfront.h"

namespace cowtap::xen {
namespace {

uint64_t Mix(uint64_t* state) {
  uint64_t z = (*state += 0x9e3779b97f4a7c15ull);
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  return z ^ (z >> 31);
}

}  // namespace

Status BlkFront::InjectGarbage(uint32_t qi, uint32_t count, uint64_t seed) {
  if (qi >= queues_.size()) return Status::InvalidArgument(fmt::format("no queue {}", qi));
  Queue& q = queues_[qi];
  uint64_t state = seed;
  for (uint32_t i = 0; i < count; ++i) {
    if (q.ring->FreeSlots() == 0) break;
    std::vector<uint8_t> bytes(BlkifSlotBytes(q.ring->abi()));
    for (uint8_t& b : bytes) b = static_cast<uint8_t>(Mix(&state));
    q.ring->QueueRawSlot(bytes);
  }
  return PushAndNotify(q);
}

Status BlkFront::SubmitRaw(uint32_t qi, BlkifRequest req, uint64_t cookie) {
  if (qi >= queues_.size()) return Status::InvalidArgument(fmt::format("no queue {}", qi));
  Queue& q = queues_[qi];
  if (q.free_ids.empty() || q.ring->FreeSlots() == 0) return Status::Busy("queue full");
  const uint32_t id = q.free_ids.back();
  q.free_ids.pop_back();
  Shadow sh;
  sh.in_use = true;
  sh.raw = true;
  sh.io.cookie = cookie;
  sh.io.op = req.operation == kBlkifOpRead ? BlkOp::kRead : BlkOp::kWrite;
  q.shadow[id] = std::move(sh);
  req.id = id;
  q.ring->QueueRequest(req);
  ++q.in_flight;
  ++stats_.submitted;
  return PushAndNotify(q);
}

Status BlkFront::SubmitThenRevoke(const BlkIo& io, bool before_push) {
  // Find the queue Submit will pick, build the request there, and revoke
  // around the push.
  if (!connected_) return Status::Cancelled("not connected");
  Queue& q = queues_[next_queue_];
  next_queue_ = (next_queue_ + 1) % queues_.size();
  if (q.free_ids.empty() || q.ring->FreeSlots() == 0) return Status::Busy("queue full");
  if (!BlkOpHasData(io.op) || io.buffer == nullptr || io.nr_sectors == 0 || io.nr_sectors > max_sectors_per_io()) {
    return Status::InvalidArgument("SubmitThenRevoke needs a data request within the request size limit");
  }
  BlkifRequest req;
  COWTAP_ASSIGN_OR_RETURN(uint32_t id, PrepareRequest(q, io, &req));
  Shadow& sh = q.shadow[id];
  sh.revoked = true;
  auto revoke = [&]() -> Status {
    for (const DataPage& p : sh.data) COWTAP_RETURN_IF_ERROR(guest_->ForceRevoke(p.gref));
    return Status::Ok();
  };
  if (before_push) COWTAP_RETURN_IF_ERROR(revoke());
  q.ring->QueueRequest(req);
  ++q.in_flight;
  ++stats_.submitted;
  COWTAP_RETURN_IF_ERROR(PushAndNotify(q));
  if (!before_push) COWTAP_RETURN_IF_ERROR(revoke());
  return Status::Ok();
}

Status BlkFront::RaceReqProd(uint32_t qi, uint32_t beyond) {
  if (qi >= queues_.size()) return Status::InvalidArgument(fmt::format("no queue {}", qi));
  Queue& q = queues_[qi];
  q.ring->ForceReqProd(q.ring->rsp_cons() + q.ring->size() + beyond);
  return NotifyQueue(q);
}

Status BlkFront::NotifyFlood(uint32_t qi, uint32_t count) {
  if (qi >= queues_.size()) return Status::InvalidArgument(fmt::format("no queue {}", qi));
  for (uint32_t i = 0; i < count; ++i) COWTAP_RETURN_IF_ERROR(NotifyQueue(queues_[qi]));
  return Status::Ok();
}

Result<GrantRef> BlkFront::GrantScratchPage(bool readonly) {
  COWTAP_ASSIGN_OR_RETURN(uint32_t page, guest_->AllocPage());
  auto ref = guest_->GrantAccess(page, device_.backend_domid, readonly);
  if (!ref.ok()) {
    guest_->FreePage(page);
    return ref.status();
  }
  ++stats_.grants_created;
  deferred_end_.push_back({page, *ref});
  return *ref;
}

}  // namespace cowtap::xen
