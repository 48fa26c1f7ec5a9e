#include "backend/block_device.h"

#include <fmt/format.h>

#include "base/checked_math.h"
#include "cow/image.h"

namespace cowtap::backend {

void BlockDevice::Submit(const BlockIo& io, BlockCompletion done) {
  Status s;
  switch (io.kind) {
    case BlockIoKind::kRead:
      s = Read(io.offset_bytes, io.iov);
      break;
    case BlockIoKind::kWrite:
      s = Write(io.offset_bytes, io.iov);
      if (s.ok() && io.flush_after) s = Flush();
      break;
    case BlockIoKind::kFlush:
      s = Flush();
      break;
    case BlockIoKind::kDiscard:
      s = Discard(io.offset_bytes, io.length_bytes, io.secure);
      break;
    case BlockIoKind::kWriteZeroes:
      s = WriteZeroes(io.offset_bytes, io.length_bytes);
      break;
  }
  done(std::move(s));
}

namespace {

class ImageBlockDevice final : public BlockDevice {
 public:
  ImageBlockDevice(std::shared_ptr<cow::Image> image, const ImageDeviceOptions& options)
      : image_(std::move(image)), options_(options) {}

  uint64_t size_bytes() const override { return image_->size_bytes(); }
  bool read_only() const override { return options_.read_only || image_->read_only(); }
  uint32_t physical_sector_size() const override { return size_bytes() % 4096 == 0 ? 4096 : 512; }
  bool supports_discard() const override { return options_.discard && !read_only(); }
  uint32_t discard_granularity_bytes() const override {
    const uint32_t cluster = image_->info().cluster_size;
    return cluster >= 512 ? cluster : 4096;
  }

  Status Read(uint64_t offset_bytes, IoVecs iov) override {
    COWTAP_RETURN_IF_ERROR(CheckRange(offset_bytes, TotalLength(iov)));
    return image_->Read(offset_bytes, iov);
  }

  Status Write(uint64_t offset_bytes, IoVecs iov) override {
    COWTAP_RETURN_IF_ERROR(CheckWritable());
    COWTAP_RETURN_IF_ERROR(CheckRange(offset_bytes, TotalLength(iov)));
    return image_->Write(offset_bytes, iov);
  }

  Status Flush() override {
    if (read_only()) return Status::Ok();
    return image_->Flush();
  }

  Status Discard(uint64_t offset_bytes, uint64_t length_bytes, bool secure) override {
    COWTAP_RETURN_IF_ERROR(CheckWritable());
    COWTAP_RETURN_IF_ERROR(CheckRange(offset_bytes, length_bytes));
    if (secure) {
      return Status::NotSupported(fmt::format("{}: secure discard is not supported", image_->info().path));
    }
    if (!options_.discard) return Status::NotSupported(fmt::format("{}: discard is disabled", image_->info().path));
    if (length_bytes == 0) return Status::Ok();
    return image_->Discard(offset_bytes, length_bytes);
  }

  Status WriteZeroes(uint64_t offset_bytes, uint64_t length_bytes) override {
    COWTAP_RETURN_IF_ERROR(CheckWritable());
    COWTAP_RETURN_IF_ERROR(CheckRange(offset_bytes, length_bytes));
    if (length_bytes == 0) return Status::Ok();
    return image_->WriteZeroes(offset_bytes, length_bytes, /*may_unmap=*/false);
  }

 private:
  Status CheckRange(uint64_t offset_bytes, uint64_t length_bytes) const {
    if (!RangeWithin(offset_bytes, length_bytes, size_bytes())) {
      return Status::OutOfRange(fmt::format("{}: bytes [{}, +{}) are outside the image of {} bytes",
                                            image_->info().path, offset_bytes, length_bytes, size_bytes()));
    }
    return Status::Ok();
  }
  Status CheckWritable() const {
    if (read_only()) return Status::ReadOnly(fmt::format("{}: served read-only", image_->info().path));
    return Status::Ok();
  }

  const std::shared_ptr<cow::Image> image_;
  const ImageDeviceOptions options_;
};

}  // namespace

std::unique_ptr<BlockDevice> NewImageBlockDevice(std::shared_ptr<cow::Image> image, const ImageDeviceOptions& options) {
  return std::make_unique<ImageBlockDevice>(std::move(image), options);
}

}  // namespace cowtap::backend
