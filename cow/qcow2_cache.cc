// LRU bookkeeping for Qcow2MetadataCache. Eviction writes back a dirty victim
// through the owner's writer before reusing its buffer.
#include "cow/qcow2_cache.h"

#include <algorithm>
#include <cstring>

namespace cowtap::cow {

Qcow2MetadataCache::Qcow2MetadataCache(File* file, uint64_t entry_bytes, uint64_t max_entries, Writer writer)
    : file_(file),
      entry_bytes_(entry_bytes),
      max_entries_(std::max<uint64_t>(2, max_entries)),
      writer_(std::move(writer)) {}

Result<Qcow2MetadataCache::Entry*> Qcow2MetadataCache::Slot(uint64_t offset, bool read) {
  auto it = map_.find(offset);
  if (it != map_.end()) {
    lru_.splice(lru_.begin(), lru_, it->second);
    return &*it->second;
  }
  std::vector<uint8_t> bytes;
  if (map_.size() >= max_entries_) {
    Entry& victim = lru_.back();
    if (victim.dirty) {
      COWTAP_RETURN_IF_ERROR(writer_(victim.offset, victim.bytes));
      victim.dirty = false;
      --dirty_count_;
    }
    map_.erase(victim.offset);
    bytes = std::move(victim.bytes);
    lru_.pop_back();
  }
  bytes.resize(entry_bytes_);
  if (read) {
    COWTAP_RETURN_IF_ERROR(file_->ReadAt(offset, bytes));
  } else {
    std::memset(bytes.data(), 0, bytes.size());
  }
  lru_.push_front(Entry{offset, false, std::move(bytes)});
  map_[offset] = lru_.begin();
  return &lru_.front();
}

Result<uint8_t*> Qcow2MetadataCache::Get(uint64_t offset) {
  COWTAP_ASSIGN_OR_RETURN(Entry * e, Slot(offset, true));
  return e->bytes.data();
}

Result<uint8_t*> Qcow2MetadataCache::GetZeroed(uint64_t offset) {
  COWTAP_ASSIGN_OR_RETURN(Entry * e, Slot(offset, false));
  return e->bytes.data();
}

void Qcow2MetadataCache::MarkDirty(uint64_t offset) {
  auto it = map_.find(offset);
  if (it == map_.end() || it->second->dirty) return;
  it->second->dirty = true;
  ++dirty_count_;
}

Status Qcow2MetadataCache::FlushDirty() {
  if (dirty_count_ == 0) return Status::Ok();
  std::vector<Entry*> dirty;
  for (auto& e : lru_)
    if (e.dirty) dirty.push_back(&e);
  std::sort(dirty.begin(), dirty.end(), [](Entry* a, Entry* b) { return a->offset < b->offset; });
  for (Entry* e : dirty) {
    COWTAP_RETURN_IF_ERROR(writer_(e->offset, e->bytes));
    e->dirty = false;
    --dirty_count_;
  }
  return Status::Ok();
}

void Qcow2MetadataCache::Drop(uint64_t offset) {
  auto it = map_.find(offset);
  if (it == map_.end()) return;
  if (it->second->dirty) --dirty_count_;
  lru_.erase(it->second);
  map_.erase(it);
}

void Qcow2MetadataCache::Clear() {
  lru_.clear();
  map_.clear();
  dirty_count_ = 0;
}

}  // namespace cowtap::cow
