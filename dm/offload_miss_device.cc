#include "dm/offload_miss_device.h"

#include <fmt/format.h>

#include <algorithm>
#include <vector>

#include "base/checked_math.h"

namespace cowtap::dm {

const std::vector<uint8_t>& ZeroChunk() {
  static const std::vector<uint8_t> zeros(1 << 20, 0);
  return zeros;
}

void MissFence::Enter(uint64_t first_cluster, uint64_t count) {
  std::lock_guard lock(mu_);
  ranges_.emplace(first_cluster, count);
}

void MissFence::Leave(uint64_t first_cluster, uint64_t count) {
  std::lock_guard lock(mu_);
  auto [b, e] = ranges_.equal_range(first_cluster);
  for (auto it = b; it != e; ++it) {
    if (it->second == count) {
      ranges_.erase(it);
      break;
    }
  }
  ++generation_;
  left_.emplace_back(generation_, Range{first_cluster, count});
  if (left_.size() > kLogRanges) {
    dropped_through_ = left_.front().first;
    left_.pop_front();
  }
}

uint64_t MissFence::generation() const {
  std::lock_guard lock(mu_);
  return generation_;
}

std::optional<std::vector<MissFence::Range>> MissFence::ChangedSince(uint64_t since) const {
  std::lock_guard lock(mu_);
  if (since < dropped_through_) return std::nullopt;
  std::vector<Range> out(ranges_.begin(), ranges_.end());
  for (auto it = left_.rbegin(); it != left_.rend() && it->first > since; ++it) out.push_back(it->second);
  return out;
}

DmTable FenceTable(const DmTable& table, const MissFence& fence, uint64_t since, uint64_t cluster_size) {
  const auto changed = fence.ChangedSince(since);
  if (!changed) return DmTable::AllMiss(table.size_sectors());
  const uint64_t spc = cluster_size / kSectorSize;
  std::vector<std::pair<uint64_t, uint64_t>> sectors;
  sectors.reserve(changed->size());
  for (const auto& [first, count] : *changed) {
    sectors.emplace_back(MulU64(first, spc).value_or(UINT64_MAX), MulU64(count, spc).value_or(UINT64_MAX));
  }
  return table.WithMissRanges(std::move(sectors));
}

bool MissFence::Holds(uint64_t cluster) const {
  std::lock_guard lock(mu_);
  for (auto it = ranges_.begin(); it != ranges_.end() && it->first <= cluster; ++it) {
    if (cluster - it->first < it->second) return true;
  }
  return false;
}

bool MissFence::empty() const {
  std::lock_guard lock(mu_);
  return ranges_.empty();
}

namespace {

class OffloadMissDevice final : public backend::BlockDevice {
 public:
  OffloadMissDevice(std::shared_ptr<backend::BlockDevice> inner, OffloadMissRouting routing)
      : inner_(std::move(inner)), routing_(std::move(routing)) {}

  uint64_t size_bytes() const override { return inner_->size_bytes(); }
  bool read_only() const override { return inner_->read_only(); }
  uint32_t logical_sector_size() const override { return inner_->logical_sector_size(); }
  uint32_t physical_sector_size() const override { return inner_->physical_sector_size(); }
  bool supports_discard() const override { return routed() && inner_->supports_discard(); }
  uint32_t discard_granularity_bytes() const override { return inner_->discard_granularity_bytes(); }
  bool supports_secure_discard() const override { return false; }

  Status Read(uint64_t offset_bytes, IoVecs iov) override { return inner_->Read(offset_bytes, iov); }
  Status Write(uint64_t offset_bytes, IoVecs iov) override { return inner_->Write(offset_bytes, iov); }
  Status Flush() override { return inner_->Flush(); }
  Status Discard(uint64_t offset_bytes, uint64_t length_bytes, bool secure) override {
    if (!routed()) {
      return Status::NotSupported(
          fmt::format("discard of {} bytes at {} refused: the image is offloaded to the kernel without discard "
                      "routing",
                      length_bytes, offset_bytes));
    }
    if (secure) return Status::NotSupported("secure discard is not offered through the kernel offload");
    return Split(offset_bytes, length_bytes, ZeroMode::kDeallocate,
                 [this](uint64_t off, uint64_t len) { return inner_->Discard(off, len, false); });
  }
  Status WriteZeroes(uint64_t offset_bytes, uint64_t length_bytes) override {
    if (routed()) {
      return Split(offset_bytes, length_bytes, ZeroMode::kKeepAllocated,
                   [this](uint64_t off, uint64_t len) { return inner_->WriteZeroes(off, len); });
    }
    const std::vector<uint8_t>& zeros = ZeroChunk();
    while (length_bytes > 0) {
      const uint64_t n = std::min<uint64_t>(length_bytes, zeros.size());
      std::vector<iovec> iov{MakeIoVec(zeros.data(), n)};
      COWTAP_RETURN_IF_ERROR(inner_->Write(offset_bytes, iov));
      offset_bytes += n;
      length_bytes -= n;
    }
    return Status::Ok();
  }

  void Submit(const backend::BlockIo& io, backend::BlockCompletion done) override {
    switch (io.kind) {
      case backend::BlockIoKind::kDiscard:
      case backend::BlockIoKind::kWriteZeroes:
        BlockDevice::Submit(io, std::move(done));  // through the methods above
        return;
      default:
        inner_->Submit(io, std::move(done));
    }
  }
  void Plug() override { inner_->Plug(); }
  void Unplug() override { inner_->Unplug(); }

 private:
  bool routed() const {
    return static_cast<bool>(routing_.zero_in_place) && routing_.fence && routing_.cluster_size > 0;
  }

  // Fences the range's clusters, then zeroes in place what the live table
  // routes linear and hands every other run to engine_op.
  Status Split(uint64_t offset, uint64_t length, ZeroMode mode,
               const std::function<Status(uint64_t, uint64_t)>& engine_op) {
    if (length == 0) return Status::Ok();
    const std::optional<uint64_t> end = AddU64(offset, length);
    if (!end || *end > inner_->size_bytes()) {
      return Status::OutOfRange(
          fmt::format("{} bytes at {} pass the end of the {}-byte disk", length, offset, inner_->size_bytes()));
    }
    const uint64_t cs = routing_.cluster_size;
    const uint64_t first = offset / cs, count = (offset + length - 1) / cs - first + 1;
    routing_.fence->Enter(first, count);
    Status s = SplitFenced(offset, length, mode, engine_op);
    routing_.fence->Leave(first, count);
    return s;
  }

  Status SplitFenced(uint64_t offset, uint64_t length, ZeroMode mode,
                     const std::function<Status(uint64_t, uint64_t)>& engine_op) {
    const std::vector<std::shared_ptr<const DmTable>> tables =
        routing_.routing_tables ? routing_.routing_tables() : std::vector<std::shared_ptr<const DmTable>>{};
    const uint64_t end = offset + length;
    uint64_t run_start = offset, pos = offset;  // [run_start, pos) goes to the engine
    auto flush_run = [&]() -> Status {
      if (pos <= run_start) return Status::Ok();
      if (routing_.counters) {
        ++routing_.counters->engine_requests;
        routing_.counters->engine_bytes += pos - run_start;
      }
      return engine_op(run_start, pos - run_start);
    };
    while (pos < end) {
      // Linear in some table here: zero in place up to where that stops
      // being true for it; else miss in all: the engine's, up to the
      // nearest boundary of any table.
      const uint64_t sector = pos / kSectorSize;
      const DmSegment* linear = nullptr;
      uint64_t next = end;
      for (const auto& t : tables) {
        if (sector >= t->size_sectors()) continue;
        const DmSegment& seg = t->SegmentAt(sector);
        next = std::min(next, seg.end_sector() * kSectorSize);
        if (seg.kind == DmSegment::Kind::kLinear && linear == nullptr) linear = &seg;
      }
      if (linear == nullptr) {
        pos = std::max(next, pos + 1);
        continue;
      }
      COWTAP_RETURN_IF_ERROR(flush_run());
      const uint64_t n = std::min(end, linear->end_sector() * kSectorSize) - pos;
      const uint64_t host = linear->target_sector * kSectorSize + (pos - linear->start_sector * kSectorSize);
      COWTAP_RETURN_IF_ERROR(routing_.zero_in_place(host, n, mode));
      if (routing_.counters) {
        ++routing_.counters->in_place_requests;
        routing_.counters->in_place_bytes += n;
      }
      pos += n;
      run_start = pos;
    }
    return flush_run();
  }

  const std::shared_ptr<backend::BlockDevice> inner_;
  const OffloadMissRouting routing_;
};

}  // namespace

std::unique_ptr<backend::BlockDevice> NewOffloadMissDevice(std::shared_ptr<backend::BlockDevice> inner,
                                                           OffloadMissRouting routing) {
  return std::make_unique<OffloadMissDevice>(std::move(inner), std::move(routing));
}

}  // namespace cowtap::dm
