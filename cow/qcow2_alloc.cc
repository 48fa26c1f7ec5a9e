// Qcow2Image allocations in flight: reserving clusters for an allocating
// write (with its copy-on-write head and tail), linking the L2 entries once
// the data is written (batched across concurrent writes), giving clusters
// back when the data write fails, and waiting for in-flight allocations.
// Ordering rules are in qcow2_image.h.
#include <algorithm>

#include "base/checked_math.h"
#include "cow/qcow2_async.h"

namespace cowtap::cow {
namespace {

bool AllZero(const std::vector<uint8_t>& b) {
  return std::all_of(b.begin(), b.end(), [](uint8_t x) { return x == 0; });
}

}  // namespace

Result<uint64_t> Qcow2Image::ReserveRun(const std::shared_ptr<AsyncOp>& op, uint64_t g, IoVecs data, uint64_t k,
                                        std::vector<std::shared_ptr<PendingAlloc>>* allocs) {
  const uint64_t vc = g / cluster_size_;
  const uint64_t start = vc * cluster_size_;
  // Writable L2 tables first (this may allocate and link a table).
  COWTAP_ASSIGN_OR_RETURN(ClusterRef first, LookupClusterForWrite(vc));
  for (uint64_t i = 1; i < k; ++i) COWTAP_RETURN_IF_ERROR(LookupClusterForWrite(vc + i).status());
  auto a = std::make_shared<PendingAlloc>();
  a->op = op;
  a->vc = vc;
  bool fresh = false;
  if (first.type == Qcow2ClusterType::kZeroAlloc && (first.entry.raw & kQcow2Copied)) {
    a->host = first.entry.raw & kQcow2OffsetMask;  // preallocated zero cluster: reuse it
    a->k = 1;
    a->reused = true;
  } else {
    COWTAP_ASSIGN_OR_RETURN(auto got, AllocateClusters(k));
    a->host = got.first;
    a->k = got.second;
    fresh = IsFresh(a->host);
    high_water_ = std::max(high_water_, a->host + a->k * cluster_size_);
    counters_.allocations.fetch_add(a->k, std::memory_order_relaxed);
  }
  // Registered before anything else can fail, so the caller gives it back.
  allocs->push_back(a);
  for (uint64_t i = 0; i < a->k; ++i) inflight_[vc + i] = a;

  const uint64_t run_end = start + a->k * cluster_size_;
  const uint64_t len = std::min<uint64_t>(TotalLength(data), run_end - g);
  const uint64_t end = g + len;
  a->data_length = len;
  // Copy-on-write areas: what the guest sees there now.
  a->head.resize(g - start);
  a->tail.resize(run_end - end);
  if (!a->head.empty())
    COWTAP_RETURN_IF_ERROR(ReadLocked(start, std::vector<iovec>{MakeIoVec(a->head.data(), a->head.size())}));
  if (!a->tail.empty()) {
    uint64_t avail = end < info_.size_bytes ? std::min<uint64_t>(a->tail.size(), info_.size_bytes - end) : 0;
    if (avail) COWTAP_RETURN_IF_ERROR(ReadLocked(end, std::vector<iovec>{MakeIoVec(a->tail.data(), avail)}));
  }
  // Zero copy-on-write areas of a cluster that already reads as zeros are
  // skipped.
  const bool skip_head = fresh && AllZero(a->head), skip_tail = fresh && AllZero(a->tail);
  if (!skip_head && !a->head.empty()) a->io.push_back(MakeIoVec(a->head.data(), a->head.size()));
  SliceIoVecs(data, 0, len, &a->io);
  if (!skip_tail && !a->tail.empty()) a->io.push_back(MakeIoVec(a->tail.data(), a->tail.size()));
  a->write_at = a->host + (skip_head ? a->head.size() : 0);
  return len;
}

void Qcow2Image::DropInflight(PendingAlloc& a) {
  for (uint64_t i = 0; i < a.k; ++i) {
    auto it = inflight_.find(a.vc + i);
    if (it != inflight_.end() && it->second.get() == &a) inflight_.erase(it);
  }
  inflight_cv_.notify_all();
}

void Qcow2Image::GiveBack(PendingAlloc& a) {
  // Nothing references the clusters: their refcounts return to 0 (an L2
  // entry never pointed at them, so no ordering applies).
  if (!a.reused) {
    const uint64_t first = a.host / cluster_size_;
    for (uint64_t i = 0; i < a.k; ++i) refcounts_->Set(first + i, 0).IgnoreError();
  }
  DropInflight(a);
}

Status Qcow2Image::LinkAlloc(PendingAlloc& a) {
  std::vector<uint64_t> to_free;
  for (uint64_t i = 0; i < a.k; ++i) {
    const uint64_t host = a.host + i * cluster_size_;
    COWTAP_ASSIGN_OR_RETURN(ClusterRef r, LookupCluster(a.vc + i));
    if (!r.has_l2)
      return Status::Internal(path_ + ": L2 table of cluster " + std::to_string(a.vc + i) +
                              " vanished while its allocation was in flight");
    // The previous mapping (compressed, shared or a zero cluster elsewhere)
    // is released once the new entry is durable.
    if (r.type == Qcow2ClusterType::kCompressed) {
      auto d = DecodeQcow2Compressed(r.entry.raw, h_.cluster_bits);
      for (uint64_t c = d.host_offset / cluster_size_; c <= (d.host_offset + d.max_length - 1) / cluster_size_; ++c)
        to_free.push_back(c);
    } else if ((r.type == Qcow2ClusterType::kNormal || r.type == Qcow2ClusterType::kZeroAlloc) &&
               (r.entry.raw & kQcow2OffsetMask) != host) {
      to_free.push_back((r.entry.raw & kQcow2OffsetMask) / cluster_size_);
    }
    COWTAP_RETURN_IF_ERROR(SetL2Entry(r, host | kQcow2Copied, 0));
    RemapInsert(a.vc + i, Remap{host, 0, Remap::kWritable});
  }
  counters_.links.fetch_add(1, std::memory_order_relaxed);
  return FreeClusters(&to_free);
}

void Qcow2Image::OnAllocWritten(const std::shared_ptr<PendingAlloc>& a, Status status) {
  a->status = std::move(status);
  {
    std::lock_guard lock(link_mu_);
    link_queue_.push_back(a);
  }
  LinkQueued();
}

void Qcow2Image::LinkQueued() {
  std::vector<std::shared_ptr<PendingAlloc>> batch;
  std::vector<std::shared_ptr<AsyncOp>> retry;
  {
    std::lock_guard lock(mu_);
    {
      std::lock_guard queue_lock(link_mu_);
      batch.swap(link_queue_);
    }
    // Another completion's round linked ours already.
    if (batch.empty()) return;
    counters_.link_rounds.fetch_add(1, std::memory_order_relaxed);
    for (auto& a : batch) {
      Status s = a->status;
      if (!s.ok()) {
        // The data never reached its clusters: give them back; the guest
        // gets the error and what was there before is untouched.
        GiveBack(*a);
      } else {
        s = LinkAlloc(*a);
        if (s.code() == ErrorCode::kCorrupt) MarkBroken(s).IgnoreError();
        DropInflight(*a);
      }
      if (!s.ok()) a->op->Fail(s);
      retry.insert(retry.end(), a->waiters.begin(), a->waiters.end());
      a->waiters.clear();
    }
  }
  // Completions and retries run without mu_ (they may re-enter the image).
  for (auto& a : batch) a->op->Put();
  for (auto& op : retry) StartSlowWrite(op);
}

void Qcow2Image::WaitForAllocations(std::unique_lock<std::mutex>& lock, uint64_t offset, uint64_t length) {
  if (length == 0) return;
  const uint64_t first = offset / cluster_size_, last = (offset + length - 1) / cluster_size_;
  inflight_cv_.wait(lock, [&] {
    for (const auto& [vc, a] : inflight_)
      if (vc >= first && vc <= last) return false;
    return true;
  });
}

}  // namespace cowtap::cow
