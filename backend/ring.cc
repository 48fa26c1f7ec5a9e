#include "backend/ring.h"

#include <fmt/format.h>

#include <atomic>
#include <cstring>

namespace cowtap::backend {
namespace {

// Offsets of the shared header (struct blkif_sring).
constexpr size_t kReqProd = 0;
constexpr size_t kReqEvent = 4;
constexpr size_t kRspProd = 8;
constexpr size_t kRspEvent = 12;

}  // namespace

BackRing::BackRing(uint8_t* shared, size_t ring_bytes, Abi abi)
    : shared_(shared), abi_(abi), capacity_(RingCapacity(abi, ring_bytes)) {
  // Resume where the shared indices stand (a reconnect to a ring that was
  // already in use starts at the frontend's view, normally 0).
  if (capacity_ != 0) {
    rsp_prod_pvt_ = LoadShared(kRspProd, true);
    req_cons_ = rsp_prod_pvt_;
    req_prod_snapshot_ = req_cons_;
  }
}

uint32_t BackRing::LoadShared(size_t offset, bool acquire) const {
  auto* p = reinterpret_cast<uint32_t*>(shared_ + offset);
  return std::atomic_ref<uint32_t>(*p).load(acquire ? std::memory_order_acquire : std::memory_order_relaxed);
}

void BackRing::StoreShared(size_t offset, uint32_t value, bool release) {
  auto* p = reinterpret_cast<uint32_t*>(shared_ + offset);
  std::atomic_ref<uint32_t>(*p).store(value, release ? std::memory_order_release : std::memory_order_relaxed);
}

uint8_t* BackRing::Slot(uint32_t index) const {
  return shared_ + kRingHeaderBytes + static_cast<size_t>(index & (capacity_ - 1)) * RingSlotBytes(abi_);
}

Status BackRing::Refresh() {
  if (capacity_ == 0) return Status::Ok();
  const uint32_t prod = LoadShared(kReqProd, true);
  // Unsigned wrap-around arithmetic: both differences are mod 2^32.
  if (prod - rsp_prod_pvt_ > capacity_) {
    return Status::Corrupt(fmt::format("frontend req_prod {} is {} requests ahead of answered {} on a ring of {}", prod,
                                       prod - rsp_prod_pvt_, rsp_prod_pvt_, capacity_));
  }
  // A producer behind our consumer (it went backwards) is equally broken.
  if (prod - req_cons_ > capacity_) {
    return Status::Corrupt(fmt::format("frontend req_prod {} moved behind consumed {}", prod, req_cons_));
  }
  req_prod_snapshot_ = prod;
  return Status::Ok();
}

bool BackRing::HasRequest() const {
  return capacity_ != 0 && req_cons_ != req_prod_snapshot_ && req_cons_ - rsp_prod_pvt_ < capacity_;
}

Request BackRing::TakeRequest() {
  uint8_t copy[kMaxRequestBytes];
  // The guest may rewrite the slot at any moment: copy it once, then decode
  // only the private copy. The acquire load of req_prod ordered this read.
  const size_t n = RequestBytes(abi_);
  const volatile uint8_t* src = Slot(req_cons_);
  for (size_t i = 0; i < n; ++i) copy[i] = src[i];
  ++req_cons_;
  return DecodeRequest(abi_, std::span<const uint8_t>(copy, n));
}

void BackRing::PushResponse(const Response& response) {
  uint8_t bytes[16];
  EncodeResponse(abi_, response, bytes);
  std::memcpy(Slot(rsp_prod_pvt_), bytes, ResponseBytes(abi_));
  ++rsp_prod_pvt_;
}

bool BackRing::PublishResponses() {
  if (capacity_ == 0) return false;
  const uint32_t old_prod = LoadShared(kRspProd, false);
  const uint32_t new_prod = rsp_prod_pvt_;
  if (old_prod == new_prod) return false;
  // Release: the frontend sees the responses before the new producer index.
  StoreShared(kRspProd, new_prod, true);
  // Full barrier: the new rsp_prod is visible before we read rsp_event.
  std::atomic_thread_fence(std::memory_order_seq_cst);
  const uint32_t event = LoadShared(kRspEvent, false);
  return static_cast<uint32_t>(new_prod - event) < static_cast<uint32_t>(new_prod - old_prod);
}

Result<bool> BackRing::FinalCheckForRequests() {
  COWTAP_RETURN_IF_ERROR(Refresh());
  if (HasRequest()) return true;
  StoreShared(kReqEvent, req_cons_ + 1, false);
  // Full barrier: req_event is visible before we look at req_prod again.
  std::atomic_thread_fence(std::memory_order_seq_cst);
  COWTAP_RETURN_IF_ERROR(Refresh());
  return HasRequest();
}

}  // namespace cowtap::backend
