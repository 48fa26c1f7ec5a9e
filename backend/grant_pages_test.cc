#include "backend/grant_pages.h"

#include <gtest/gtest.h>

#include <cstdlib>
#include <cstring>
#include <set>

namespace cowtap::backend {
namespace {

// A grant table over heap pages: page contents start with the ref number,
// every Map call and every live page is counted, refs in `bad` fail.
class FakeGrantTable : public xen::GrantTable {
 public:
  class Mapping : public xen::GrantMapping {
   public:
    Mapping(FakeGrantTable* t, std::span<const xen::GrantRef> refs, bool writable)
        : table_(t), pages_(refs.size()), writable_(writable) {
      mem_ = static_cast<uint8_t*>(std::aligned_alloc(xen::kPageSize, pages_ * xen::kPageSize));
      for (size_t i = 0; i < pages_; ++i) std::memcpy(mem_ + i * xen::kPageSize, &refs[i], sizeof(refs[i]));
      table_->live_pages += pages_;
    }
    ~Mapping() override {
      table_->live_pages -= pages_;
      std::free(mem_);
    }
    uint8_t* addr() const override { return mem_; }
    size_t pages() const override { return pages_; }
    bool writable() const override { return writable_; }
    Status Unmap() override {
      ++table_->unmap_calls;
      return table_->fail_unmap ? Status::IoError("unmap refused") : Status::Ok();
    }

   private:
    FakeGrantTable* table_;
    size_t pages_;
    bool writable_;
    uint8_t* mem_;
  };

  Result<std::unique_ptr<xen::GrantMapping>> Map(xen::DomId, std::span<const xen::GrantRef> refs,
                                                 bool writable) override {
    ++map_calls;
    last_writable = writable;
    last_batch = refs.size();
    if (refs.empty() || refs.size() > kMaxMapBatch) return Status::InvalidArgument("batch size");
    for (auto r : refs) {
      if (bad.count(r)) return Status::InvalidArgument("bad ref " + std::to_string(r));
    }
    return std::unique_ptr<xen::GrantMapping>(new Mapping(this, refs, writable));
  }
  Status Copy(std::span<xen::GrantCopyOp>) override { return Status::NotSupported("copy"); }

  int map_calls = 0;
  bool last_writable = false;
  size_t last_batch = 0;
  size_t live_pages = 0;
  int unmap_calls = 0;
  bool fail_unmap = false;
  std::set<xen::GrantRef> bad;
};

xen::GrantRef RefIn(const PageRef& p) {
  xen::GrantRef r;
  std::memcpy(&r, p.addr(), sizeof(r));
  return r;
}

TEST(GrantPagesTest, NonPersistentMapsEveryTimeInOneBatchAndUnmapsOnRelease) {
  FakeGrantTable table;
  std::atomic<size_t> counted{0};
  GrantPages pages(table, 3, /*persistent=*/false, 100, &counted);
  std::vector<xen::GrantRef> refs = {10, 11, 12};
  std::vector<PageRef> out;
  ASSERT_TRUE(pages.Map(refs, /*writable=*/false, &out).ok());
  EXPECT_EQ(table.map_calls, 1);
  EXPECT_FALSE(table.last_writable);
  ASSERT_EQ(out.size(), 3u);
  EXPECT_EQ(RefIn(out[2]), 12u);
  EXPECT_EQ(counted.load(), 3u);
  out.clear();
  EXPECT_EQ(table.live_pages, 0u);
  EXPECT_EQ(counted.load(), 0u);
  ASSERT_TRUE(pages.Map(refs, /*writable=*/true, &out).ok());
  EXPECT_EQ(table.map_calls, 2);
  EXPECT_TRUE(table.last_writable);
}

TEST(GrantPagesTest, PersistentReusesMappingsAndMapsWritable) {
  FakeGrantTable table;
  GrantPages pages(table, 3, /*persistent=*/true, 100);
  std::vector<PageRef> out;
  std::vector<xen::GrantRef> refs = {20, 21};
  ASSERT_TRUE(pages.Map(refs, /*writable=*/false, &out).ok());
  EXPECT_TRUE(table.last_writable) << "persistent mappings serve reads and writes alike";
  out.clear();
  EXPECT_EQ(table.live_pages, 2u) << "kept mapped for reuse";
  ASSERT_TRUE(pages.Map(refs, false, &out).ok());
  EXPECT_EQ(table.map_calls, 1);
  EXPECT_EQ(pages.hits(), 2u);
  // Only the new ref is mapped.
  std::vector<xen::GrantRef> more = {21, 22};
  ASSERT_TRUE(pages.Map(more, false, &out).ok());
  EXPECT_EQ(table.map_calls, 2);
  EXPECT_EQ(table.last_batch, 1u);
  EXPECT_EQ(RefIn(out[0]), 21u);
  EXPECT_EQ(RefIn(out[1]), 22u);
}

TEST(GrantPagesTest, DuplicateRefInOneRequestMapsOnce) {
  FakeGrantTable table;
  GrantPages pages(table, 3, /*persistent=*/true, 100);
  std::vector<PageRef> out;
  std::vector<xen::GrantRef> refs = {30, 30, 31, 30};
  ASSERT_TRUE(pages.Map(refs, false, &out).ok());
  EXPECT_EQ(table.last_batch, 2u);
  EXPECT_EQ(out[3].addr(), out[0].addr());
  EXPECT_EQ(RefIn(out[2]), 31u);
}

TEST(GrantPagesTest, LruIsBoundedAndEvictionKeepsInUsePagesMapped) {
  FakeGrantTable table;
  GrantPages pages(table, 3, /*persistent=*/true, 4);
  std::vector<PageRef> held;
  std::vector<xen::GrantRef> first = {1, 2, 3, 4};
  ASSERT_TRUE(pages.Map(first, false, &held).ok());
  std::vector<PageRef> out;
  std::vector<xen::GrantRef> second = {5, 6, 7, 8};
  for (xen::GrantRef r : second) {
    ASSERT_TRUE(pages.Map(std::span(&r, 1), false, &out).ok());
  }
  EXPECT_EQ(pages.cached(), 4u);
  EXPECT_EQ(pages.evictions(), 4u);
  // Evicted pages a request still holds stay readable.
  EXPECT_EQ(RefIn(held[0]), 1u);
  held.clear();
  out.clear();
  EXPECT_EQ(table.live_pages, 4u) << "only the LRU's pages remain mapped";
  pages.Clear();
  EXPECT_EQ(table.live_pages, 0u);
}

TEST(GrantPagesTest, FailureLeavesNothingNewMapped) {
  FakeGrantTable table;
  table.bad = {2000};
  GrantPages pages(table, 3, /*persistent=*/true, 10000);
  std::vector<xen::GrantRef> refs;
  for (xen::GrantRef r = 1000; r < 1000 + 1500; ++r) refs.push_back(r);  // two batches
  std::vector<PageRef> out;
  Status s = pages.Map(refs, false, &out);
  EXPECT_FALSE(s.ok());
  EXPECT_NE(s.message().find("2000"), std::string::npos);
  EXPECT_TRUE(out.empty());
  EXPECT_EQ(pages.cached(), 0u);
  EXPECT_EQ(table.live_pages, 0u);
}

TEST(GrantPagesTest, LargeRequestsAreSplitIntoBatches) {
  FakeGrantTable table;
  GrantPages pages(table, 3, /*persistent=*/false, 0);
  std::vector<xen::GrantRef> refs;
  for (xen::GrantRef r = 0; r < 2500; ++r) refs.push_back(r + 8);
  std::vector<PageRef> out;
  ASSERT_TRUE(pages.Map(refs, true, &out).ok());
  EXPECT_EQ(table.map_calls, 3);
  EXPECT_EQ(RefIn(out[2499]), 2507u);
}

}  // namespace
}  // namespace cowtap::backend

namespace cowtap::backend {
namespace {

// A guest that re-touches one page of each large batch must not keep every
// batch mapped: the bound is on pages, not cache entries.
TEST(GrantPagesTest, CacheBoundsPinnedPagesNotOnlyEntries) {
  FakeGrantTable table;
  GrantPages pages(table, 3, /*persistent=*/true, 64);
  std::vector<PageRef> out;
  std::vector<xen::GrantRef> keep;
  for (xen::GrantRef base = 1000; base < 1000 + 20 * 32; base += 32) {
    std::vector<xen::GrantRef> batch;
    for (xen::GrantRef r = base; r < base + 32; ++r) batch.push_back(r);
    ASSERT_TRUE(pages.Map(batch, false, &out).ok());
    out.clear();
    keep.push_back(base);
    for (xen::GrantRef r : keep) {  // keep one page of every batch hot
      ASSERT_TRUE(pages.Map(std::span(&r, 1), false, &out).ok());
      out.clear();
    }
    EXPECT_LE(pages.pinned_pages(), 64u);
    EXPECT_LE(table.live_pages, 64u) << "batch at " << base;
  }
}

TEST(GrantPagesTest, FailedUnmapCountsThePagesLeakedNotMapped) {
  FakeGrantTable table;
  std::atomic<size_t> mapped{0};
  std::atomic<uint64_t> leaked{0};
  GrantPages pages(table, 3, /*persistent=*/false, 100, &mapped, &leaked);
  std::vector<PageRef> out;
  const xen::GrantRef refs[] = {10, 11, 12};
  ASSERT_TRUE(pages.Map(refs, true, &out).ok());
  EXPECT_EQ(mapped.load(), 3u);
  table.fail_unmap = true;
  out.clear();
  EXPECT_EQ(table.unmap_calls, 1) << "one unmap per batch, never retried";
  EXPECT_EQ(mapped.load(), 0u) << "no longer usable by the backend";
  EXPECT_EQ(leaked.load(), 3u) << "but counted: the guest cannot take them back";
  table.fail_unmap = false;
  ASSERT_TRUE(pages.Map(refs, true, &out).ok()) << "the refs may be mapped again";
  out.clear();
  EXPECT_EQ(leaked.load(), 3u);
  EXPECT_EQ(mapped.load(), 0u);
}

}  // namespace
}  // namespace cowtap::backend
