// QcowL2Cache: a bounded LRU of decoded qcow v1 L2 tables keyed by their
// host offset, with a dirty bit per table for write-back. The cache only
// stores; the image decides when dirty tables are written (and in which order
// relative to data and the L1 table).
//
// Thread-safety: none; the owning image holds its metadata lock around every
// call. A pointer returned by Find/Insert stays valid until that table is
// erased.
#pragma once

#include <algorithm>
#include <cstdint>
#include <list>
#include <optional>
#include <unordered_map>
#include <vector>

namespace cowtap::cow {

class QcowL2Cache {
 public:
  // REQUIRES: max_tables >= 1.
  explicit QcowL2Cache(uint64_t max_tables) : max_tables_(max_tables) {}
  QcowL2Cache(const QcowL2Cache&) = delete;
  QcowL2Cache& operator=(const QcowL2Cache&) = delete;

  // The table at host offset, made most recently used; nullptr if absent.
  std::vector<uint64_t>* Find(uint64_t offset) {
    auto it = index_.find(offset);
    if (it == index_.end()) return nullptr;
    lru_.splice(lru_.begin(), lru_, it->second);
    return &it->second->entries;
  }

  // Adds a table. REQUIRES: not present, and !Full() (evict first).
  std::vector<uint64_t>* Insert(uint64_t offset, std::vector<uint64_t> entries, bool dirty) {
    lru_.push_front(Table{offset, std::move(entries), dirty});
    index_[offset] = lru_.begin();
    return &lru_.front().entries;
  }

  bool Full() const { return lru_.size() >= max_tables_; }
  // The least recently used table's offset, if any.
  std::optional<uint64_t> Oldest() const {
    if (lru_.empty()) return std::nullopt;
    return lru_.back().offset;
  }
  void Erase(uint64_t offset) {
    auto it = index_.find(offset);
    if (it == index_.end()) return;
    lru_.erase(it->second);
    index_.erase(it);
  }

  void SetDirty(uint64_t offset, bool dirty) {
    auto it = index_.find(offset);
    if (it != index_.end()) it->second->dirty = dirty;
  }
  bool IsDirty(uint64_t offset) const {
    auto it = index_.find(offset);
    return it != index_.end() && it->second->dirty;
  }
  // Offsets of all dirty tables, in ascending order of offset.
  std::vector<uint64_t> DirtyOffsets() const {
    std::vector<uint64_t> out;
    for (const Table& t : lru_)
      if (t.dirty) out.push_back(t.offset);
    std::sort(out.begin(), out.end());
    return out;
  }

  uint64_t size() const { return lru_.size(); }
  uint64_t max_tables() const { return max_tables_; }

 private:
  struct Table {
    uint64_t offset;
    std::vector<uint64_t> entries;
    bool dirty;
  };
  const uint64_t max_tables_;
  std::list<Table> lru_;  // most recently used first
  std::unordered_map<uint64_t, std::list<Table>::iterator> index_;
};

}  // namespace cowtap::cow
