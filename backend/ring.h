// BackRing: the backend's half of one blkif shared ring (io/ring.h's
// back_ring), over shared memory the guest writes concurrently.
//
// Index discipline (in this order, as ring.h prescribes):
//   * Refresh(): load req_prod once (acquire = read barrier: the slots it
//     covers are read after it) and check that the guest cannot have more
//     than capacity() requests outstanding (req_prod - rsp_prod_pvt <=
//     capacity, RING_REQUEST_PROD_OVERFLOW). A violation is a broken ring:
//     kCorrupt, and the caller stops serving this ring.
//   * TakeRequest(): copies the slot out once into private memory, then
//     decodes the copy; nothing reads that slot again.
//   * PushResponse() writes slots; PublishResponses() stores rsp_prod with
//     release order (write barrier before), then a full fence before reading
//     rsp_event, and says whether the frontend must be notified
//     (RING_PUSH_RESPONSES_AND_CHECK_NOTIFY).
//   * FinalCheckForRequests(): before sleeping, set req_event = req_cons + 1,
//     full fence, look again (RING_FINAL_CHECK_FOR_REQUESTS), so a request
//     pushed meanwhile is never slept through.
// A response slot is reused by a later request only after the guest saw the
// response, hence HasRequest() also stops at capacity() requests in flight
// (RING_REQUEST_CONS_OVERFLOW).
//
// Thread-safety: one thread at a time (the ring server's thread).
#pragma once

#include <cstddef>
#include <cstdint>

#include "backend/blkif.h"
#include "base/status.h"

namespace cowtap::backend {

class BackRing {
 public:
  // shared: ring_bytes of contiguously mapped ring pages (4096 << order).
  // Does not initialise the shared header (the frontend does). capacity()
  // is 0 if ring_bytes cannot hold one slot; such a ring never has requests.
  BackRing(uint8_t* shared, size_t ring_bytes, Abi abi);
  BackRing(const BackRing&) = delete;
  BackRing& operator=(const BackRing&) = delete;

  Abi abi() const { return abi_; }
  uint32_t capacity() const { return capacity_; }

  // Reads req_prod (see above). kCorrupt if the frontend claims more
  // requests than the ring can hold; the snapshot is then left unchanged.
  Status Refresh();
  // True if the snapshot has an unconsumed request and a response slot is
  // free for it.
  bool HasRequest() const;
  // Copies out and decodes the next request. REQUIRES: HasRequest().
  Request TakeRequest();
  // Writes a response into the next response slot (not yet visible).
  // REQUIRES: fewer responses pushed than requests taken.
  void PushResponse(const Response& response);
  // Publishes pushed responses; true if the frontend asked to be notified.
  bool PublishResponses();
  // Re-arms req_event; true if requests arrived meanwhile (do not sleep).
  // Refreshes the snapshot; kCorrupt as Refresh().
  Result<bool> FinalCheckForRequests();

  uint32_t req_cons() const { return req_cons_; }
  uint32_t rsp_prod_pvt() const { return rsp_prod_pvt_; }
  // Requests taken and not yet answered.
  uint32_t InFlight() const { return req_cons_ - rsp_prod_pvt_; }

 private:
  uint32_t LoadShared(size_t offset, bool acquire) const;
  void StoreShared(size_t offset, uint32_t value, bool release);
  uint8_t* Slot(uint32_t index) const;

  uint8_t* const shared_;
  const Abi abi_;
  const uint32_t capacity_;
  uint32_t req_prod_snapshot_ = 0;
  uint32_t req_cons_ = 0;
  uint32_t rsp_prod_pvt_ = 0;
};

}  // namespace cowtap::backend
