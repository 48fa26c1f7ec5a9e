// Qcow2Image asynchronous guest I/O: the remap-cache fast path, the slow path
// that resolves under mu_ and does its data I/O outside it, allocations kept
// in flight until their data is written and then linked in batches. The
// design and its ordering rules are in qcow2_image.h.
#include "cow/qcow2_async.h"

#include <algorithm>

#include "base/checked_math.h"

namespace cowtap::cow {
namespace {

// preadv/pwritev and io_uring take at most IOV_MAX (1024) vectors.
constexpr size_t kMaxIovPerIo = 512;
// Clusters reserved together for one run of an allocating write.
constexpr uint64_t kMaxRunClusters = 256;

}  // namespace

void Qcow2Image::AddPiece(std::vector<Piece>* plan, const Piece& p) {
  if (!plan->empty()) {
    Piece& b = plan->back();
    if (b.kind == p.kind && b.pos + b.length == p.pos && (p.kind == Piece::kZero || b.at + b.length == p.at)) {
      b.length += p.length;
      return;
    }
  }
  plan->push_back(p);
}

ImageIoStats Qcow2Image::io_stats() const {
  ImageIoStats s;
  s.fast_reads = counters_.fast_reads.load(std::memory_order_relaxed);
  s.fast_writes = counters_.fast_writes.load(std::memory_order_relaxed);
  s.slow_reads = counters_.slow_reads.load(std::memory_order_relaxed);
  s.slow_writes = counters_.slow_writes.load(std::memory_order_relaxed);
  s.allocations = counters_.allocations.load(std::memory_order_relaxed);
  s.allocating_writes = counters_.allocating_writes.load(std::memory_order_relaxed);
  s.link_rounds = counters_.link_rounds.load(std::memory_order_relaxed);
  s.links = counters_.links.load(std::memory_order_relaxed);
  s.alloc_waits = counters_.alloc_waits.load(std::memory_order_relaxed);
  s.deferred_frees = counters_.deferred_frees.load(std::memory_order_relaxed);
  return s;
}

Status Qcow2Image::Read(uint64_t offset, IoVecs iov) {
  // Synchronous reads stay entirely under mu_: they never wait for a
  // submission another caller may hold back (plugged), and no free can
  // complete while mu_ is held.
  std::lock_guard lock(mu_);
  COWTAP_RETURN_IF_ERROR(CheckRange(offset, TotalLength(iov)));
  return ReadLocked(offset, iov);
}

Status Qcow2Image::Write(uint64_t offset, IoVecs iov) {
  return WaitForCompletion([&](ImageCompletion done) { SubmitWrite(offset, iov, std::move(done)); });
}

bool Qcow2Image::PlanFromRemap(uint64_t offset, uint64_t length, bool write, std::vector<Piece>* plan) {
  uint64_t pos = 0;
  while (pos < length) {
    const uint64_t g = offset + pos;
    const uint64_t vc = g / cluster_size_, in = g % cluster_size_;
    const uint64_t n = std::min(cluster_size_ - in, length - pos);
    std::optional<Remap> m = remap_->Lookup(vc);
    if (!m) return false;
    if (write) {
      if (!(m->flags & Remap::kWritable)) return false;
      AddPiece(plan, Piece{Piece::kHost, m->host_offset + in, pos, n});
    } else if (m->flags & Remap::kZero) {
      AddPiece(plan, Piece{Piece::kZero, 0, pos, n});
    } else if (m->flags & Remap::kBacking) {
      AddPiece(plan, Piece{Piece::kBacking, g, pos, n});
    } else {
      AddPiece(plan, Piece{Piece::kHost, m->host_offset + in, pos, n});
    }
    pos += n;
  }
  return true;
}

void Qcow2Image::RunPlan(const std::shared_ptr<AsyncOp>& op, const std::vector<Piece>& plan, bool write) {
  auto done = [op](Status s) {
    if (!s.ok()) op->Fail(s);
    op->Put();
  };
  for (const Piece& p : plan) {
    if (p.kind == Piece::kZero) {
      ZeroIoVecs(op->iov, p.pos, p.length);
      continue;
    }
    uint64_t length = p.length;
    if (p.kind == Piece::kBacking) {
      // Past the end of the backing chain (or without one) reads as zeros.
      uint64_t avail = 0;
      if (backing_ && p.at < backing_->size_bytes()) avail = std::min(length, backing_->size_bytes() - p.at);
      if (avail < length) ZeroIoVecs(op->iov, p.pos + avail, length - avail);
      if (avail == 0) continue;
      std::vector<iovec> sub;
      SliceIoVecs(op->iov, p.pos, avail, &sub);
      op->iovs.push_back(std::move(sub));
      op->Ref();
      backing_->SubmitRead(p.at, op->iovs.back(), done);
      continue;
    }
    if (p.pos == 0 && length == op->length && op->iov.size() <= kMaxIovPerIo) {
      // The whole request is one host extent: its own vectors serve.
      op->Ref();
      if (write) {
        data_->SubmitWritev(p.at, op->iov, done);
      } else {
        data_->SubmitReadv(p.at, op->iov, done);
      }
      continue;
    }
    std::vector<iovec> sub;
    SliceIoVecs(op->iov, p.pos, length, &sub);
    uint64_t at = p.at;
    for (size_t i = 0; i < sub.size(); i += kMaxIovPerIo) {
      const size_t end = std::min(sub.size(), i + kMaxIovPerIo);
      op->iovs.emplace_back(sub.begin() + i, sub.begin() + end);
      const uint64_t bytes = TotalLength(op->iovs.back());
      op->Ref();
      if (write) {
        data_->SubmitWritev(at, op->iovs.back(), done);
      } else {
        data_->SubmitReadv(at, op->iovs.back(), done);
      }
      at += bytes;
    }
  }
}

void Qcow2Image::SubmitRead(uint64_t offset, IoVecs iov, ImageCompletion done) {
  const uint64_t length = TotalLength(iov);
  if (closed_) return done(Closed());
  if (!RangeWithin(offset, length, info_.size_bytes)) return done(CheckRange(offset, length));
  auto op = std::make_shared<AsyncOp>(this, offset, iov, std::move(done));
  if (remap_ && length > 0) {
    // Enter before the lookup: a cluster freed after this point is not
    // reused until this read completes.
    op->gate = gate_.Enter();
    std::vector<Piece> plan;
    if (PlanFromRemap(offset, length, /*write=*/false, &plan)) {
      counters_.fast_reads.fetch_add(1, std::memory_order_relaxed);
      RunPlan(op, plan, /*write=*/false);
      op->Put();
      return;
    }
    gate_.Exit(op->gate);
    op->gate = -1;
  }
  StartSlowRead(op);
}

Status Qcow2Image::PlanReadLocked(uint64_t offset, IoVecs iov, std::vector<Piece>* plan) {
  const uint64_t total = TotalLength(iov);
  const bool ext = h_.extended_l2();
  uint64_t pos = 0;
  while (pos < total) {
    const uint64_t g = offset + pos;
    const uint64_t vc = g / cluster_size_, in = g % cluster_size_;
    const uint64_t n = std::min(cluster_size_ - in, total - pos);
    const uint64_t at = pos;
    pos += n;
    if (auto m = RemapLookup(vc)) {
      if (m->flags & Remap::kZero) {
        AddPiece(plan, Piece{Piece::kZero, 0, at, n});
      } else if (m->flags & Remap::kBacking) {
        AddPiece(plan, Piece{Piece::kBacking, g, at, n});
      } else {
        AddPiece(plan, Piece{Piece::kHost, m->host_offset + in, at, n});
      }
      continue;
    }
    COWTAP_ASSIGN_OR_RETURN(ClusterRef ref, LookupCluster(vc));
    if (!ext && ref.type == Qcow2ClusterType::kNormal) {
      AddPiece(plan, Piece{Piece::kHost, (ref.entry.raw & kQcow2OffsetMask) + in, at, n});
    } else if (!ext && ref.type == Qcow2ClusterType::kUnallocated) {
      AddPiece(plan, Piece{Piece::kBacking, g, at, n});
    } else if (!ext && (ref.type == Qcow2ClusterType::kZeroPlain || ref.type == Qcow2ClusterType::kZeroAlloc)) {
      AddPiece(plan, Piece{Piece::kZero, 0, at, n});
    } else {
      // Compressed clusters and subclusters: read now, under the lock.
      std::vector<iovec> sub;
      SliceIoVecs(iov, at, n, &sub);
      COWTAP_RETURN_IF_ERROR(ReadCluster(ref, in, sub));
    }
    PublishRemap(ref);
    ReadAheadRemaps(ref);
  }
  return Status::Ok();
}

void Qcow2Image::StartSlowRead(const std::shared_ptr<AsyncOp>& op) {
  counters_.slow_reads.fetch_add(1, std::memory_order_relaxed);
  std::vector<Piece> plan;
  {
    std::lock_guard lock(mu_);
    Status s = CheckRange(op->offset, op->length);
    if (s.ok()) s = PlanReadLocked(op->offset, op->iov, &plan);
    if (!s.ok()) {
      op->Fail(s);
      plan.clear();
    } else if (!plan.empty()) {
      // Entered under mu_: no free of a cluster in the plan can be decided
      // between the lookup and here.
      op->gate = gate_.Enter();
    }
  }
  RunPlan(op, plan, /*write=*/false);
  op->Put();
}

void Qcow2Image::SubmitWrite(uint64_t offset, IoVecs iov, ImageCompletion done) {
  const uint64_t length = TotalLength(iov);
  if (closed_) return done(Closed());
  if (!RangeWithin(offset, length, info_.size_bytes)) return done(CheckRange(offset, length));
  auto op = std::make_shared<AsyncOp>(this, offset, iov, std::move(done));
  if (remap_ && length > 0 && fast_writes_ok_) {
    op->gate = gate_.Enter();
    std::vector<Piece> plan;
    if (PlanFromRemap(offset, length, /*write=*/true, &plan)) {
      counters_.fast_writes.fetch_add(1, std::memory_order_relaxed);
      RunPlan(op, plan, /*write=*/true);
      op->Put();
      return;
    }
    gate_.Exit(op->gate);
    op->gate = -1;
  }
  counters_.slow_writes.fetch_add(1, std::memory_order_relaxed);
  StartSlowWrite(op);
}

void Qcow2Image::StartSlowWrite(const std::shared_ptr<AsyncOp>& op) {
  std::vector<Piece> plan;
  std::vector<std::shared_ptr<PendingAlloc>> allocs;
  {
    std::lock_guard lock(mu_);
    Status s = CheckRange(op->offset, op->length);
    if (s.ok()) s = CheckWritable();
    if (s.ok() && (h_.extended_l2() || data_ != file_.get())) {
      // Subcluster bitmaps and external data files: synchronous, under mu_.
      s = h_.extended_l2() ? WriteExtended(op->offset, op->iov) : WriteLocked(op->offset, op->iov);
      if (s.code() == ErrorCode::kCorrupt) MarkBroken(s).IgnoreError();
      if (!s.ok()) op->Fail(s);
    } else if (s.ok()) {
      fast_writes_ok_ = read_only_reason_.empty();
      if (!inflight_.empty() && op->length > 0) {
        const uint64_t first = op->offset / cluster_size_, last = (op->offset + op->length - 1) / cluster_size_;
        for (uint64_t vc = first; vc <= last; ++vc) {
          auto it = inflight_.find(vc);
          if (it == inflight_.end()) continue;
          // Retried once that allocation is linked or given back.
          it->second->waiters.push_back(op);
          counters_.alloc_waits.fetch_add(1, std::memory_order_relaxed);
          return;
        }
      }
      s = PlanWriteLocked(op, &plan, &allocs);
      if (!s.ok()) {
        for (auto& a : allocs) GiveBack(*a);
        allocs.clear();
        plan.clear();
        if (s.code() == ErrorCode::kCorrupt) MarkBroken(s).IgnoreError();
        op->Fail(s);
      } else if (!plan.empty()) {
        op->gate = gate_.Enter();
      }
    } else {
      op->Fail(s);
    }
  }
  RunPlan(op, plan, /*write=*/true);
  for (auto& a : allocs) {
    counters_.allocating_writes.fetch_add(1, std::memory_order_relaxed);
    op->Ref();
    data_->SubmitWritev(a->write_at, a->io, [this, a](Status s) { OnAllocWritten(a, std::move(s)); });
  }
  op->Put();
}

Status Qcow2Image::PlanWriteLocked(const std::shared_ptr<AsyncOp>& op, std::vector<Piece>* plan,
                                   std::vector<std::shared_ptr<PendingAlloc>>* allocs) {
  const uint64_t total = op->length;
  auto in_place = [](const ClusterRef& r) {
    return r.type == Qcow2ClusterType::kNormal && (r.entry.raw & kQcow2Copied);
  };
  uint64_t pos = 0;
  while (pos < total) {
    const uint64_t g = op->offset + pos;
    const uint64_t vc = g / cluster_size_, in = g % cluster_size_;
    uint64_t n = std::min(cluster_size_ - in, total - pos);
    std::optional<uint64_t> host;
    if (auto m = RemapLookup(vc); m && (m->flags & Remap::kWritable)) host = m->host_offset;
    if (!host) {
      COWTAP_ASSIGN_OR_RETURN(ClusterRef ref, LookupCluster(vc));
      if (in_place(ref)) {
        host = ref.entry.raw & kQcow2OffsetMask;
        PublishRemap(ref);
      }
    }
    if (host) {
      AddPiece(plan, Piece{Piece::kHost, *host + in, pos, n});
      pos += n;
      continue;
    }
    // A run of clusters that all need allocation: one reservation, one write.
    uint64_t k = 1;
    while (pos + n < total && k < kMaxRunClusters) {
      const uint64_t next = std::min(cluster_size_, total - pos - n);
      COWTAP_ASSIGN_OR_RETURN(ClusterRef r2, LookupCluster(vc + k));
      if (in_place(r2)) break;
      n += next;
      ++k;
    }
    std::vector<iovec> data;
    SliceIoVecs(op->iov, pos, n, &data);
    COWTAP_ASSIGN_OR_RETURN(uint64_t consumed, ReserveRun(op, g, data, k, allocs));
    pos += consumed;
  }
  return Status::Ok();
}

}  // namespace cowtap::cow
