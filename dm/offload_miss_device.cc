#include "dm/offload_miss_device.h"

#include <fmt/format.h>

#include <algorithm>
#include <vector>

namespace cowtap::dm {
namespace {

// Zero writes go in pieces of at most this size (one buffer, shared).
constexpr uint64_t kZeroChunkBytes = 1 << 20;

class OffloadMissDevice final : public backend::BlockDevice {
 public:
  explicit OffloadMissDevice(std::shared_ptr<backend::BlockDevice> inner)
      : inner_(std::move(inner)), zeros_(kZeroChunkBytes, 0) {}

  uint64_t size_bytes() const override { return inner_->size_bytes(); }
  bool read_only() const override { return inner_->read_only(); }
  uint32_t logical_sector_size() const override { return inner_->logical_sector_size(); }
  uint32_t physical_sector_size() const override { return inner_->physical_sector_size(); }
  bool supports_discard() const override { return false; }
  bool supports_secure_discard() const override { return false; }

  Status Read(uint64_t offset_bytes, IoVecs iov) override { return inner_->Read(offset_bytes, iov); }
  Status Write(uint64_t offset_bytes, IoVecs iov) override { return inner_->Write(offset_bytes, iov); }
  Status Flush() override { return inner_->Flush(); }
  Status Discard(uint64_t offset_bytes, uint64_t length_bytes, bool) override {
    return Status::NotSupported(
        fmt::format("discard of {} bytes at {} refused: the image is offloaded to the kernel, and freeing clusters "
                    "the dm table may route linear is not safe yet",
                    length_bytes, offset_bytes));
  }
  Status WriteZeroes(uint64_t offset_bytes, uint64_t length_bytes) override {
    // zeros_ is only read, so concurrent callers may share it.
    while (length_bytes > 0) {
      const uint64_t n = std::min(length_bytes, kZeroChunkBytes);
      std::vector<iovec> iov{MakeIoVec(zeros_.data(), n)};
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
  const std::shared_ptr<backend::BlockDevice> inner_;
  const std::vector<uint8_t> zeros_;
};

}  // namespace

std::unique_ptr<backend::BlockDevice> NewOffloadMissDevice(std::shared_ptr<backend::BlockDevice> inner) {
  return std::make_unique<OffloadMissDevice>(std::move(inner));
}

}  // namespace cowtap::dm
