// RawImage: the guest's bytes are the file's bytes. Holes read as zeros;
// discard and write-zeroes punch holes. Stateless beyond the file, so all
// methods are naturally thread-safe; SubmitRead/SubmitWrite/SubmitFlush go
// straight to the file's asynchronous I/O.
#include <unistd.h>

#include <atomic>

#include "base/checked_math.h"
#include "cow/formats.h"

namespace cowtap::cow {
namespace {

class RawImage final : public Image {
 public:
  RawImage(std::unique_ptr<File> file, ImageInfo info) : file_(std::move(file)), info_(std::move(info)) {}

  const ImageInfo& info() const override { return info_; }

  Status Read(uint64_t offset, IoVecs iov) override {
    COWTAP_RETURN_IF_ERROR(Check(offset, TotalLength(iov), false));
    return file_->ReadvAt(offset, iov);
  }

  Status Write(uint64_t offset, IoVecs iov) override {
    COWTAP_RETURN_IF_ERROR(Check(offset, TotalLength(iov), true));
    return file_->WritevAt(offset, iov);
  }

  void SubmitRead(uint64_t offset, IoVecs iov, ImageCompletion done) override {
    Status s = Check(offset, TotalLength(iov), false);
    if (!s.ok()) return done(std::move(s));
    reads_.fetch_add(1, std::memory_order_relaxed);
    file_->SubmitReadv(offset, iov, std::move(done));
  }

  void SubmitWrite(uint64_t offset, IoVecs iov, ImageCompletion done) override {
    Status s = Check(offset, TotalLength(iov), true);
    if (!s.ok()) return done(std::move(s));
    writes_.fetch_add(1, std::memory_order_relaxed);
    file_->SubmitWritev(offset, iov, std::move(done));
  }

  void SubmitFlush(ImageCompletion done) override {
    if (closed_) return done(Closed());
    if (info_.read_only) return done(Status::Ok());
    file_->SubmitFlush(std::move(done));
  }

  // Every raw I/O is a fast-path I/O: the guest offset is the file offset.
  ImageIoStats io_stats() const override {
    ImageIoStats s;
    s.fast_reads = reads_.load(std::memory_order_relaxed);
    s.fast_writes = writes_.load(std::memory_order_relaxed);
    return s;
  }

  Status WriteZeroes(uint64_t offset, uint64_t length, bool may_unmap) override {
    COWTAP_RETURN_IF_ERROR(Check(offset, length, true));
    COWTAP_RETURN_IF_ERROR(file_->PunchHole(offset, length));
    // Without unmap the range must stay allocated (a later write must not
    // fail for lack of space): reserve it again.
    if (!may_unmap) return file_->Allocate(offset, length, /*keep_size=*/true);
    return Status::Ok();
  }

  Status Discard(uint64_t offset, uint64_t length) override { return WriteZeroes(offset, length, true); }

  Status Flush() override {
    if (closed_) return Closed();
    return info_.read_only ? Status::Ok() : file_->Flush();
  }

  Result<std::vector<Extent>> Map(uint64_t offset, uint64_t length) override {
    COWTAP_RETURN_IF_ERROR(Check(offset, length, false));
    std::vector<Extent> out;
    const uint64_t end = offset + length;
    const int fd = file_->fd();
    auto file_size = file_->Size();
    if (!file_size.ok()) return file_size.status();
    while (offset < end) {
      Extent e;
      e.offset = offset;
      e.file = info_.path;
      uint64_t next = end;
      bool data = true;
      if (offset >= *file_size) {
        data = false;
      } else if (fd >= 0) {
        off_t d = ::lseek(fd, static_cast<off_t>(offset), SEEK_DATA);
        if (d < 0 || static_cast<uint64_t>(d) > offset) {
          data = false;
          if (d >= 0) next = std::min<uint64_t>(end, static_cast<uint64_t>(d));
        } else {
          off_t h = ::lseek(fd, static_cast<off_t>(offset), SEEK_HOLE);
          if (h > 0) next = std::min<uint64_t>(end, static_cast<uint64_t>(h));
        }
      }
      if (data) next = std::min(next, *file_size);
      e.length = next - offset;
      e.data = data;
      e.zero = !data;
      if (data) e.host_offset = offset;
      out.push_back(std::move(e));
      offset = next;
    }
    return out;
  }

  Status Close() override {
    if (closed_.exchange(true)) return Status::Ok();
    return info_.read_only ? Status::Ok() : file_->Flush();
  }

  std::shared_ptr<Image> backing() const override { return nullptr; }

 private:
  Status Closed() const { return Status::Cancelled(info_.path + ": image is closed"); }

  Status Check(uint64_t offset, uint64_t length, bool write) const {
    if (closed_) return Closed();
    if (write && info_.read_only) return Status::ReadOnly(info_.path + ": image is open read-only");
    if (!RangeWithin(offset, length, info_.size_bytes))
      return Status::OutOfRange(info_.path + ": range " + std::to_string(offset) + "+" + std::to_string(length) +
                                " is beyond the image size " + std::to_string(info_.size_bytes));
    return Status::Ok();
  }

  std::unique_ptr<File> file_;
  ImageInfo info_;
  std::atomic<bool> closed_{false};
  std::atomic<uint64_t> reads_{0}, writes_{0};
};

}  // namespace

Result<std::unique_ptr<Image>> OpenRawImage(std::unique_ptr<File> file, const std::string& path,
                                            const OpenOptions& options) {
  if (!options.snapshot.empty())
    return Status::NotSupported(path + ": raw images have no internal snapshots (asked for '" + options.snapshot +
                                "')");
  COWTAP_ASSIGN_OR_RETURN(uint64_t size, file->Size());
  ImageInfo info;
  info.format = ImageFormat::kRaw;
  info.path = path;
  info.size_bytes = size;
  info.file_size_bytes = size;
  info.read_only = options.read_only;
  return std::unique_ptr<Image>(new RawImage(std::move(file), std::move(info)));
}

Status CreateRawImage(const std::string& path, const CreateOptions& options, FileSystem* fs) {
  if (!options.backing_file.empty())
    return Status::InvalidArgument(path + ": a raw image cannot have a backing file; create a qcow2 overlay instead");
  FileOpenOptions fo;
  fo.create = true;
  fo.writable = true;
  fo.exclusive = !options.overwrite;
  COWTAP_ASSIGN_OR_RETURN(auto file, fs->Open(path, fo));
  COWTAP_RETURN_IF_ERROR(file->Truncate(0));
  COWTAP_RETURN_IF_ERROR(file->Truncate(options.size_bytes));
  return file->Flush();
}

}  // namespace cowtap::cow
