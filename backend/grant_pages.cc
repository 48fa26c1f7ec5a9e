#include "backend/grant_pages.h"

#include <fmt/format.h>

#include <algorithm>
#include <chrono>

#include "base/log.h"

namespace cowtap::backend {

namespace {

// Shared by every ring: a guest that makes unmaps fail must not flood the log.
RateLimiter& UnmapLogLimiter() {
  static RateLimiter limiter(10, std::chrono::seconds(10));
  return limiter;
}

}  // namespace

GrantPages::GrantPages(xen::GrantTable& table, xen::DomId domid, bool persistent, size_t max_entries,
                       std::atomic<size_t>* mapped_pages, std::atomic<uint64_t>* leaked_pages)
    : table_(table),
      domid_(domid),
      persistent_(persistent && max_entries > 0),
      max_entries_(max_entries),
      mapped_pages_(mapped_pages),
      leaked_pages_(leaked_pages) {}

void GrantPages::Release(xen::GrantMapping* m, std::atomic<size_t>* mapped_pages, std::atomic<uint64_t>* leaked_pages) {
  const size_t pages = m->pages();
  Status s = m->Unmap();
  delete m;
  if (mapped_pages) mapped_pages->fetch_sub(pages, std::memory_order_relaxed);
  if (s.ok()) return;
  if (leaked_pages) leaked_pages->fetch_add(pages, std::memory_order_relaxed);
  if (UnmapLogLimiter().Allow()) {
    const uint64_t suppressed = UnmapLogLimiter().TakeSuppressed();
    spdlog::error("unmapping {} guest page(s) failed, counted as leaked: {}{}", pages, s.ToString(),
                  suppressed ? fmt::format(" ({} similar messages suppressed)", suppressed) : "");
  }
}

Result<std::shared_ptr<xen::GrantMapping>> GrantPages::MapBatch(std::span<const xen::GrantRef> refs, bool writable) {
  ++map_calls_;
  COWTAP_ASSIGN_OR_RETURN(std::unique_ptr<xen::GrantMapping> mapping, table_.Map(domid_, refs, writable));
  std::atomic<size_t>* mapped = mapped_pages_;
  std::atomic<uint64_t>* leaked = leaked_pages_;
  if (mapped) mapped->fetch_add(mapping->pages(), std::memory_order_relaxed);
  return std::shared_ptr<xen::GrantMapping>(mapping.release(),
                                            [mapped, leaked](xen::GrantMapping* m) { Release(m, mapped, leaked); });
}

Status GrantPages::Map(std::span<const xen::GrantRef> refs, bool writable, std::vector<PageRef>* out) {
  out->clear();
  out->resize(refs.size());
  if (refs.empty()) return Status::Ok();

  // Refs to map now, in request order (duplicates mapped once when
  // persistent, since they are cached after the first).
  std::vector<size_t> missing;
  if (persistent_) {
    for (size_t i = 0; i < refs.size(); ++i) {
      auto it = index_.find(refs[i]);
      if (it != index_.end()) {
        lru_.splice(lru_.begin(), lru_, it->second);
        (*out)[i] = it->second->second;
        ++hits_;
      } else {
        missing.push_back(i);
      }
    }
  } else {
    missing.resize(refs.size());
    for (size_t i = 0; i < refs.size(); ++i) missing[i] = i;
  }
  if (missing.empty()) return Status::Ok();

  std::vector<xen::GrantRef> batch;
  std::vector<size_t> batch_slots;  // out index for each batch entry
  std::unordered_map<xen::GrantRef, size_t> first_in_batch;
  for (size_t i : missing) {
    if (persistent_) {
      auto [it, inserted] = first_in_batch.emplace(refs[i], batch.size());
      if (!inserted) continue;  // same ref twice in one request
    }
    batch.push_back(refs[i]);
    batch_slots.push_back(i);
  }
  const bool map_writable = persistent_ || writable;
  std::vector<PageRef> mapped(batch.size());
  for (size_t start = 0; start < batch.size(); start += xen::GrantTable::kMaxMapBatch) {
    const size_t n = std::min(batch.size() - start, xen::GrantTable::kMaxMapBatch);
    auto mapping = MapBatch(std::span(batch).subspan(start, n), map_writable);
    if (!mapping.ok()) {
      out->clear();  // drops whatever this call mapped
      return mapping.status();
    }
    for (size_t k = 0; k < n; ++k) mapped[start + k] = PageRef{*mapping, k};
  }
  for (size_t b = 0; b < batch.size(); ++b) {
    (*out)[batch_slots[b]] = mapped[b];
    if (persistent_) Insert(batch[b], mapped[b]);
  }
  if (persistent_) {
    for (size_t i : missing) {
      if (!(*out)[i].mapping) (*out)[i] = mapped[first_in_batch[refs[i]]];
    }
  }
  return Status::Ok();
}

void GrantPages::Insert(xen::GrantRef ref, PageRef page) {
  // A batch stays mapped while any of its pages is cached, so the bound is
  // on pages pinned by cached batches, not only on entries: otherwise a
  // guest touching one page of each old batch keeps whole batches mapped.
  const xen::GrantMapping* batch = page.mapping.get();
  if (batch_entries_[batch]++ == 0) pinned_pages_ += batch->pages();
  lru_.emplace_front(ref, std::move(page));
  index_[ref] = lru_.begin();
  while (!lru_.empty() && (lru_.size() > max_entries_ || pinned_pages_ > max_entries_)) {
    const xen::GrantMapping* victim = lru_.back().second.mapping.get();
    auto it = batch_entries_.find(victim);
    if (--it->second == 0) {
      pinned_pages_ -= victim->pages();
      batch_entries_.erase(it);
    }
    index_.erase(lru_.back().first);
    lru_.pop_back();
    ++evictions_;
  }
}

void GrantPages::Clear() {
  index_.clear();
  lru_.clear();
  batch_entries_.clear();
  pinned_pages_ = 0;
}

}  // namespace cowtap::backend
