// Qcow2MetadataCache: a bounded write-back LRU cache of fixed-size pieces of
// qcow2 metadata (L2 table slices, refcount blocks), keyed by their byte
// offset in the image file.
//
// The owner decides write ordering: dirty entries are written only through
// the writer callback the owner supplies (on eviction and on FlushDirty), so
// the owner can make sure, e.g., that refcount blocks reach the disk before
// any L2 slice that references a newly allocated cluster.
//
// Thread-safety: none; the owning image serializes access (its mutex).
// Pointers returned by Get/GetZeroed stay valid until the next call that may
// evict (Get, GetZeroed) or Drop/Clear.
#pragma once

#include <cstdint>
#include <functional>
#include <list>
#include <span>
#include <unordered_map>
#include <vector>

#include "base/status.h"
#include "cow/file.h"

namespace cowtap::cow {

class Qcow2MetadataCache {
 public:
  // Writes one dirty entry to disk (and whatever must precede it).
  using Writer = std::function<Status(uint64_t offset, std::span<const uint8_t> bytes)>;

  // REQUIRES: entry_bytes > 0, max_entries >= 2.
  Qcow2MetadataCache(File* file, uint64_t entry_bytes, uint64_t max_entries, Writer writer);
  Qcow2MetadataCache(const Qcow2MetadataCache&) = delete;
  Qcow2MetadataCache& operator=(const Qcow2MetadataCache&) = delete;

  // The entry at offset (a multiple of entry_bytes), read from the file on a
  // miss. May write back the least recently used dirty entry first.
  Result<uint8_t*> Get(uint64_t offset);
  // The entry at offset without reading it: all zeros if it was not cached
  // (for newly allocated tables).
  Result<uint8_t*> GetZeroed(uint64_t offset);
  void MarkDirty(uint64_t offset);
  // Writes every dirty entry through the writer (in offset order).
  Status FlushDirty();
  bool HasDirty() const { return dirty_count_ != 0; }
  // Forgets an entry (its dirty contents are lost).
  void Drop(uint64_t offset);
  void Clear();

  uint64_t entry_bytes() const { return entry_bytes_; }
  uint64_t max_entries() const { return max_entries_; }
  uint64_t MemoryBytes() const { return map_.size() * entry_bytes_; }

 private:
  struct Entry {
    uint64_t offset;
    bool dirty;
    std::vector<uint8_t> bytes;
  };
  Result<Entry*> Slot(uint64_t offset, bool read);

  File* file_;
  const uint64_t entry_bytes_;
  const uint64_t max_entries_;
  Writer writer_;
  std::list<Entry> lru_;  // front = most recently used
  std::unordered_map<uint64_t, std::list<Entry>::iterator> map_;
  uint64_t dirty_count_ = 0;
};

}  // namespace cowtap::cow
