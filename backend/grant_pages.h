// Mapping a request's guest pages: GrantPages maps grant refs in batches
// (one GrantTable::Map call per batch of up to kMaxMapBatch refs) and, when
// the frontend negotiated feature-persistent, keeps them mapped in a
// bounded LRU keyed by grant ref so that later requests reusing the same
// refs need no map call at all.
//
// A mapped page is handed out as a PageRef that shares ownership of its
// batch mapping: evicting a page from the LRU while an in-flight request
// still uses it is safe (the memory stays mapped until the request drops
// its PageRef). Persistent mappings are always writable (blkif.h note 8:
// a persistent frontend grants read-write); non-persistent ones are
// writable only when the backend must write into the page (READ requests).
// Memory bound: the LRU holds at most max_entries refs, and a page leaves
// the process when neither the LRU nor a request refers to any page of its
// batch.
//
// Unmap failures: a batch is unmapped (GrantMapping::Unmap) when its last
// PageRef goes. If that fails, the batch's pages are counted as leaked
// instead of mapped, the failure is logged (rate-limited: a guest can
// provoke it) and the memory is never touched again; nothing is retried.
//
// Thread-safety: one thread at a time (the ring server's thread); PageRefs
// may be released from any thread.
#pragma once

#include <atomic>
#include <cstdint>
#include <list>
#include <memory>
#include <span>
#include <unordered_map>
#include <vector>

#include "base/status.h"
#include "xen-glue/platform.h"

namespace cowtap::backend {

// One mapped guest page (kPageSize bytes at addr()).
struct PageRef {
  std::shared_ptr<xen::GrantMapping> mapping;
  size_t index = 0;
  uint8_t* addr() const { return mapping->page(index); }
};

class GrantPages {
 public:
  // mapped_pages (optional) counts pages mapped through this object that are
  // still usable; leaked_pages (optional) those whose unmap failed (they may
  // stay mapped and pinned, the guest cannot take them back; never touched
  // again). Both must outlive every PageRef. persistent=false disables the LRU.
  GrantPages(xen::GrantTable& table, xen::DomId domid, bool persistent, size_t max_entries,
             std::atomic<size_t>* mapped_pages = nullptr, std::atomic<uint64_t>* leaked_pages = nullptr);
  GrantPages(const GrantPages&) = delete;
  GrantPages& operator=(const GrantPages&) = delete;

  // Maps refs[i] into (*out)[i]. writable: the backend will write to the
  // pages (ignored for persistent mappings, which are always writable).
  // On failure nothing new stays mapped and *out is cleared; the message
  // names the domain and the failing ref (from the platform).
  Status Map(std::span<const xen::GrantRef> refs, bool writable, std::vector<PageRef>* out);

  // Maps one batch (refs.size() <= kMaxMapBatch) outside the cache, with
  // the same counting and unmap handling: the ring pages.
  Result<std::shared_ptr<xen::GrantMapping>> MapUncached(std::span<const xen::GrantRef> refs, bool writable) {
    return MapBatch(refs, writable);
  }

  // Drops every cached mapping (pages still referenced by requests stay
  // mapped until those drop them).
  void Clear();

  size_t cached() const { return lru_.size(); }
  // Guest pages kept mapped by the cache (at most max_entries).
  size_t pinned_pages() const { return pinned_pages_; }
  uint64_t map_calls() const { return map_calls_; }
  uint64_t hits() const { return hits_; }
  uint64_t evictions() const { return evictions_; }

 private:
  // Unmaps m, then deletes it; counts and logs a failed unmap.
  static void Release(xen::GrantMapping* m, std::atomic<size_t>* mapped_pages, std::atomic<uint64_t>* leaked_pages);
  Result<std::shared_ptr<xen::GrantMapping>> MapBatch(std::span<const xen::GrantRef> refs, bool writable);
  void Insert(xen::GrantRef ref, PageRef page);

  xen::GrantTable& table_;
  const xen::DomId domid_;
  const bool persistent_;
  const size_t max_entries_;
  std::atomic<size_t>* const mapped_pages_;
  std::atomic<uint64_t>* const leaked_pages_;
  // Most recently used at the front.
  std::list<std::pair<xen::GrantRef, PageRef>> lru_;
  std::unordered_map<xen::GrantRef, std::list<std::pair<xen::GrantRef, PageRef>>::iterator> index_;
  // Cached entries per mapped batch, and the pages of batches with any.
  std::unordered_map<const xen::GrantMapping*, size_t> batch_entries_;
  size_t pinned_pages_ = 0;
  uint64_t map_calls_ = 0;
  uint64_t hits_ = 0;
  uint64_t evictions_ = 0;
};

}  // namespace cowtap::backend
