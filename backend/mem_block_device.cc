#include "backend/mem_block_device.h"

#include <fmt/format.h>

#include <algorithm>
#include <cstring>

#include "base/checked_math.h"

namespace cowtap::backend {

MemBlockDevice::MemBlockDevice(const MemBlockDeviceOptions& options)
    : options_(options), data_(options.size_bytes), durable_(options.size_bytes) {}

uint64_t MemBlockDevice::size_bytes() const {
  std::lock_guard lock(mu_);
  return data_.size();
}

Status MemBlockDevice::CheckRange(uint64_t offset_bytes, uint64_t length_bytes) const {
  if (!RangeWithin(offset_bytes, length_bytes, data_.size())) {
    return Status::OutOfRange(
        fmt::format("mem device: [{}, +{}) outside {} bytes", offset_bytes, length_bytes, data_.size()));
  }
  return Status::Ok();
}

std::optional<Status> MemBlockDevice::TakeInjected(BlockIoKind kind) {
  for (auto it = injected_.begin(); it != injected_.end(); ++it) {
    if (it->first == kind) {
      Status s = std::move(it->second);
      injected_.erase(it);
      return s;
    }
  }
  return std::nullopt;
}

Status MemBlockDevice::Read(uint64_t offset_bytes, IoVecs iov) {
  std::lock_guard lock(mu_);
  const uint64_t length = TotalLength(iov);
  log_.push_back({BlockIoKind::kRead, offset_bytes, length, false, false});
  if (auto s = TakeInjected(BlockIoKind::kRead)) return *s;
  COWTAP_RETURN_IF_ERROR(CheckRange(offset_bytes, length));
  CopyToIoVecs(iov, 0, data_.data() + offset_bytes, length);
  return Status::Ok();
}

Status MemBlockDevice::Write(uint64_t offset_bytes, IoVecs iov) {
  std::lock_guard lock(mu_);
  const uint64_t length = TotalLength(iov);
  log_.push_back({BlockIoKind::kWrite, offset_bytes, length, false, false});
  if (auto s = TakeInjected(BlockIoKind::kWrite)) return *s;
  if (options_.read_only) return Status::ReadOnly("mem device is read-only");
  COWTAP_RETURN_IF_ERROR(CheckRange(offset_bytes, length));
  CopyFromIoVecs(iov, 0, data_.data() + offset_bytes, length);
  return Status::Ok();
}

Status MemBlockDevice::Flush() {
  std::lock_guard lock(mu_);
  log_.push_back({BlockIoKind::kFlush, 0, 0, false, false});
  if (auto s = TakeInjected(BlockIoKind::kFlush)) return *s;
  durable_ = data_;
  return Status::Ok();
}

Status MemBlockDevice::Discard(uint64_t offset_bytes, uint64_t length_bytes, bool secure) {
  std::lock_guard lock(mu_);
  log_.push_back({BlockIoKind::kDiscard, offset_bytes, length_bytes, false, secure});
  if (auto s = TakeInjected(BlockIoKind::kDiscard)) return *s;
  if (!options_.discard || (secure && !options_.secure_discard)) return Status::NotSupported("mem device: discard");
  if (options_.read_only) return Status::ReadOnly("mem device is read-only");
  COWTAP_RETURN_IF_ERROR(CheckRange(offset_bytes, length_bytes));
  std::memset(data_.data() + offset_bytes, 0, length_bytes);
  return Status::Ok();
}

Status MemBlockDevice::WriteZeroes(uint64_t offset_bytes, uint64_t length_bytes) {
  std::lock_guard lock(mu_);
  log_.push_back({BlockIoKind::kWriteZeroes, offset_bytes, length_bytes, false, false});
  if (auto s = TakeInjected(BlockIoKind::kWriteZeroes)) return *s;
  if (options_.read_only) return Status::ReadOnly("mem device is read-only");
  COWTAP_RETURN_IF_ERROR(CheckRange(offset_bytes, length_bytes));
  std::memset(data_.data() + offset_bytes, 0, length_bytes);
  return Status::Ok();
}

void MemBlockDevice::Submit(const BlockIo& io, BlockCompletion done) {
  if (options_.defer_completions) {
    std::lock_guard lock(mu_);
    pending_.push_back({io, std::move(done)});
    return;
  }
  BlockDevice::Submit(io, std::move(done));
}

size_t MemBlockDevice::PendingCount() const {
  std::lock_guard lock(mu_);
  return pending_.size();
}

size_t MemBlockDevice::CompletePending(size_t max, bool reverse) {
  size_t n = 0;
  while (n < max) {
    Pending p;
    {
      std::lock_guard lock(mu_);
      if (pending_.empty()) break;
      if (reverse) {
        p = std::move(pending_.back());
        pending_.pop_back();
      } else {
        p = std::move(pending_.front());
        pending_.pop_front();
      }
    }
    BlockDevice::Submit(p.io, std::move(p.done));
    ++n;
  }
  return n;
}

void MemBlockDevice::FailNext(BlockIoKind kind, Status status) {
  std::lock_guard lock(mu_);
  injected_.emplace_back(kind, std::move(status));
}

void MemBlockDevice::Resize(uint64_t size_bytes) {
  std::lock_guard lock(mu_);
  data_.resize(size_bytes);
  durable_.resize(size_bytes);
}

std::vector<MemBlockDevice::LoggedOp> MemBlockDevice::log() const {
  std::lock_guard lock(mu_);
  return log_;
}

std::vector<uint8_t> MemBlockDevice::Contents() const {
  std::lock_guard lock(mu_);
  return data_;
}

std::vector<uint8_t> MemBlockDevice::DurableContents() const {
  std::lock_guard lock(mu_);
  return durable_;
}

void MemBlockDevice::Fill(uint64_t offset_bytes, const std::vector<uint8_t>& bytes) {
  std::lock_guard lock(mu_);
  if (!RangeWithin(offset_bytes, bytes.size(), data_.size())) return;
  std::copy(bytes.begin(), bytes.end(), data_.begin() + static_cast<ptrdiff_t>(offset_bytes));
  std::copy(bytes.begin(), bytes.end(), durable_.begin() + static_cast<ptrdiff_t>(offset_bytes));
}

}  // namespace cowtap::backend
