#include "backend/block_device.h"

#include <fmt/format.h>

#include <condition_variable>
#include <deque>
#include <mutex>
#include <thread>
#include <vector>

#include "base/checked_math.h"
#include "cow/image.h"
#include "cow/io_engine.h"

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

// A few threads that run the operations that may block for long (flush,
// discard, write-zeroes) off the submitting (ring) thread. Started on first
// use; the destructor runs what is queued, then joins.
class WorkerPool {
 public:
  explicit WorkerPool(size_t threads) : max_threads_(threads) {}
  WorkerPool(const WorkerPool&) = delete;
  WorkerPool& operator=(const WorkerPool&) = delete;
  ~WorkerPool() {
    {
      std::lock_guard lock(mu_);
      stopping_ = true;
    }
    cv_.notify_all();
    for (auto& t : threads_) t.join();
  }

  void Run(std::function<void()> task) {
    {
      std::lock_guard lock(mu_);
      queue_.push_back(std::move(task));
      if (idle_ == 0 && threads_.size() < max_threads_) threads_.emplace_back([this] { Loop(); });
    }
    cv_.notify_one();
  }

 private:
  void Loop() {
    std::unique_lock lock(mu_);
    while (true) {
      ++idle_;
      cv_.wait(lock, [&] { return stopping_ || !queue_.empty(); });
      --idle_;
      if (queue_.empty()) return;  // stopping and drained
      std::function<void()> task = std::move(queue_.front());
      queue_.pop_front();
      lock.unlock();
      task();
      lock.lock();
    }
  }

  const size_t max_threads_;
  std::mutex mu_;
  std::condition_variable cv_;
  std::deque<std::function<void()>> queue_;  // GUARDED_BY(mu_)
  std::vector<std::thread> threads_;         // GUARDED_BY(mu_)
  size_t idle_ = 0;                          // GUARDED_BY(mu_)
  bool stopping_ = false;                    // GUARDED_BY(mu_)
};

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

  // One io_uring submission per ring pass: the image's files submit through
  // the calling thread's plug.
  void Plug() override { cow::PlugThisThread(); }
  void Unplug() override { cow::UnplugThisThread(); }

  // Reads and writes go to the image's asynchronous I/O (several in flight,
  // completing on the file's threads); flush, discard and write-zeroes, and
  // the flush of a FUA write, run on the worker pool so the ring thread
  // never blocks on them.
  void Submit(const BlockIo& io, BlockCompletion done) override {
    switch (io.kind) {
      case BlockIoKind::kRead: {
        Status s = CheckRange(io.offset_bytes, TotalLength(io.iov));
        if (!s.ok()) return done(std::move(s));
        image_->SubmitRead(io.offset_bytes, io.iov, std::move(done));
        return;
      }
      case BlockIoKind::kWrite: {
        Status s = CheckWritable();
        if (s.ok()) s = CheckRange(io.offset_bytes, TotalLength(io.iov));
        if (!s.ok()) return done(std::move(s));
        if (!io.flush_after) {
          image_->SubmitWrite(io.offset_bytes, io.iov, std::move(done));
          return;
        }
        // A write that completed inline came from a synchronous file: its
        // flush runs inline too. Otherwise the flush leaves the file's
        // completion thread for the pool.
        image_->SubmitWrite(io.offset_bytes, io.iov,
                            [this, submitter = std::this_thread::get_id(), done = std::move(done)](Status ws) mutable {
                              if (!ws.ok()) return done(std::move(ws));
                              if (std::this_thread::get_id() == submitter) return done(Flush());
                              pool_.Run([this, done = std::move(done)] { done(Flush()); });
                            });
        return;
      }
      case BlockIoKind::kFlush:
      case BlockIoKind::kDiscard:
      case BlockIoKind::kWriteZeroes:
        pool_.Run([this, io, done = std::move(done)] { BlockDevice::Submit(io, done); });
        return;
    }
    done(Status::InvalidArgument("unknown block I/O kind"));
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
  // Last member: destroyed (drained and joined) first.
  WorkerPool pool_{2};
};

}  // namespace

std::unique_ptr<BlockDevice> NewImageBlockDevice(std::shared_ptr<cow::Image> image, const ImageDeviceOptions& options) {
  return std::make_unique<ImageBlockDevice>(std::move(image), options);
}

}  // namespace cowtap::backend
