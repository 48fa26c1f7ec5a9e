// POSIX implementation of File and FileSystem over pread/pwrite/fdatasync,
// with the Submit* forms on an IoEngine (io_uring). O_DIRECT is requested
// when asked for and silently dropped where the file system refuses it;
// transfers that do not meet the descriptor's direct-I/O alignment (from
// statx STATX_DIOALIGN, else 4096) go through an aligned bounce buffer
// (synchronously, also for the Submit* forms). Image locks (image_lock.h)
// are taken at open when asked for.
//
// A PosixFile waits, when destroyed, for its ops in flight on the engine, so
// the descriptor is never closed (and reused) under them.
#include <fcntl.h>
#include <linux/falloc.h>
#include <linux/fs.h>
#include <sys/ioctl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <string>

#include "cow/file.h"
#include "cow/image_lock.h"
#include "cow/io_engine.h"

namespace cowtap::cow {
namespace {

constexpr uint32_t kDefaultDirectAlign = 4096;

// The direct-I/O alignment of fd: memory and file offset/length.
struct DirectAlign {
  uint32_t mem = kDefaultDirectAlign;
  uint32_t offset = kDefaultDirectAlign;
};

DirectAlign QueryDirectAlign(int fd) {
  DirectAlign a;
  struct statx stx = {};
  if (::statx(fd, "", AT_EMPTY_PATH, STATX_DIOALIGN, &stx) == 0 && (stx.stx_mask & STATX_DIOALIGN) &&
      stx.stx_dio_mem_align != 0 && stx.stx_dio_offset_align != 0 &&
      (stx.stx_dio_mem_align & (stx.stx_dio_mem_align - 1)) == 0 &&
      (stx.stx_dio_offset_align & (stx.stx_dio_offset_align - 1)) == 0 && stx.stx_dio_offset_align <= (1u << 16) &&
      stx.stx_dio_mem_align <= (1u << 16)) {
    a.mem = stx.stx_dio_mem_align;
    a.offset = stx.stx_dio_offset_align;
  }
  return a;
}

class PosixFile final : public File {
 public:
  PosixFile(int fd, std::string path, bool direct, IoEngine* engine)
      : fd_(fd), path_(std::move(path)), direct_(direct), asked_engine_(engine) {
    if (direct_) align_ = QueryDirectAlign(fd_);
  }
  ~PosixFile() override {
    tracker_.WaitIdle();
    if (engine_ && slot_ >= 0) engine_->UnregisterFile(slot_);
    ::close(fd_);
  }

  Status ReadAt(uint64_t offset, std::span<uint8_t> buf) override {
    if (direct_ && !Aligned(offset, buf.data(), buf.size())) return BounceRead(offset, buf);
    size_t done = 0;
    while (done < buf.size()) {
      ssize_t n = ::pread(fd_, buf.data() + done, buf.size() - done, static_cast<off_t>(offset + done));
      if (n < 0) {
        if (errno == EINTR) continue;
        return Status::FromErrno(errno, Where("read", offset + done));
      }
      if (n == 0) {  // end of file: the rest reads as zeros
        std::memset(buf.data() + done, 0, buf.size() - done);
        break;
      }
      done += static_cast<size_t>(n);
      if (direct_ && done < buf.size() && (offset + done) % align_.offset != 0) {
        // O_DIRECT stops off alignment only at end of file (and would refuse
        // an unaligned read of the rest).
        std::memset(buf.data() + done, 0, buf.size() - done);
        break;
      }
    }
    return Status::Ok();
  }

  Status WriteAt(uint64_t offset, std::span<const uint8_t> data) override {
    if (direct_ && !Aligned(offset, data.data(), data.size())) return BounceWrite(offset, data);
    size_t done = 0;
    while (done < data.size()) {
      ssize_t n = ::pwrite(fd_, data.data() + done, data.size() - done, static_cast<off_t>(offset + done));
      if (n < 0) {
        if (errno == EINTR) continue;
        return Status::FromErrno(errno, Where("write", offset + done));
      }
      if (n == 0) return Status::IoError(Where("write made no progress", offset + done));
      done += static_cast<size_t>(n);
    }
    return Status::Ok();
  }

  Status ReadvAt(uint64_t offset, IoVecs iov) override {
    if (direct_) return File::ReadvAt(offset, iov);
    // preadv handles the common case in one call; fall back on short reads.
    if (iov.size() <= IOV_MAX) {
      ssize_t n = ::preadv(fd_, iov.data(), static_cast<int>(iov.size()), static_cast<off_t>(offset));
      if (n >= 0 && static_cast<size_t>(n) == TotalLength(iov)) return Status::Ok();
    }
    return File::ReadvAt(offset, iov);
  }

  Status WritevAt(uint64_t offset, IoVecs iov) override {
    if (direct_) return File::WritevAt(offset, iov);
    if (iov.size() <= IOV_MAX) {
      ssize_t n = ::pwritev(fd_, iov.data(), static_cast<int>(iov.size()), static_cast<off_t>(offset));
      if (n >= 0 && static_cast<size_t>(n) == TotalLength(iov)) return Status::Ok();
      if (n < 0 && errno != EINTR) return Status::FromErrno(errno, Where("write", offset));
    }
    return File::WritevAt(offset, iov);
  }

  Status Flush() override {
    if (::fdatasync(fd_) != 0) return Status::FromErrno(errno, "fdatasync " + path_);
    return Status::Ok();
  }

  void SubmitReadv(uint64_t offset, IoVecs iov, FileCompletion done) override {
    IoEngine* engine = Engine();
    if (engine == nullptr || (direct_ && !Aligned(offset, iov))) {
      done(ReadvAt(offset, iov));
      return;
    }
    engine->Submit(IoOp::kReadv, Target(), offset, iov, std::move(done));
  }

  void SubmitWritev(uint64_t offset, IoVecs iov, FileCompletion done) override {
    IoEngine* engine = Engine();
    if (engine == nullptr || (direct_ && !Aligned(offset, iov))) {
      done(WritevAt(offset, iov));
      return;
    }
    engine->Submit(IoOp::kWritev, Target(), offset, iov, std::move(done));
  }

  void SubmitFlush(FileCompletion done) override {
    IoEngine* engine = Engine();
    if (engine == nullptr) {
      done(Flush());
      return;
    }
    engine->Submit(IoOp::kFdatasync, Target(), 0, {}, std::move(done));
  }

  Result<uint64_t> Size() override {
    struct stat st;
    if (::fstat(fd_, &st) != 0) return Status::FromErrno(errno, "fstat " + path_);
    if (S_ISBLK(st.st_mode)) {  // an LVM or SAN volume: st_size is 0
      uint64_t bytes = 0;
      if (::ioctl(fd_, BLKGETSIZE64, &bytes) != 0) return Status::FromErrno(errno, "BLKGETSIZE64 " + path_);
      return bytes;
    }
    return static_cast<uint64_t>(st.st_size);
  }

  Status Truncate(uint64_t size_bytes) override {
    if (::ftruncate(fd_, static_cast<off_t>(size_bytes)) != 0)
      return Status::FromErrno(errno, Where("truncate", size_bytes));
    return Status::Ok();
  }

  Status Allocate(uint64_t offset, uint64_t length, bool keep_size) override {
    int mode = keep_size ? FALLOC_FL_KEEP_SIZE : 0;
    if (::fallocate(fd_, mode, static_cast<off_t>(offset), static_cast<off_t>(length)) != 0) {
      if (errno == EOPNOTSUPP) {
        if (keep_size) return Status::Ok();
        // No fallocate (some FUSE/tmpfs set-ups): extending is enough.
        auto size = Size();
        if (!size.ok()) return size.status();
        if (*size < offset + length) return Truncate(offset + length);
        return Status::Ok();
      }
      return Status::FromErrno(errno, Where("fallocate", offset));
    }
    return Status::Ok();
  }

  Status PunchHole(uint64_t offset, uint64_t length) override {
    if (::fallocate(fd_, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, static_cast<off_t>(offset),
                    static_cast<off_t>(length)) == 0)
      return Status::Ok();
    if (errno != EOPNOTSUPP) return Status::FromErrno(errno, Where("punch hole", offset));
    // Fall back to writing zeros, within the current size only.
    auto size = Size();
    if (!size.ok()) return size.status();
    if (offset >= *size) return Status::Ok();
    uint64_t end = std::min<uint64_t>(*size, offset + length);
    std::string zeros(std::min<uint64_t>(end - offset, 1 << 20), '\0');
    for (uint64_t o = offset; o < end;) {
      uint64_t n = std::min<uint64_t>(end - o, zeros.size());
      COWTAP_RETURN_IF_ERROR(WriteAt(o, {reinterpret_cast<const uint8_t*>(zeros.data()), n}));
      o += n;
    }
    return Status::Ok();
  }

  const std::string& path() const override { return path_; }
  int fd() const override { return fd_; }

 private:
  // The engine of the Submit* forms (null: none could start), chosen and
  // given the descriptor on first use, so that files that never do
  // asynchronous I/O start no engine and take no registered slot.
  IoEngine* Engine() {
    std::call_once(engine_once_, [this] {
      engine_ = asked_engine_ ? asked_engine_ : DefaultIoEngine();
      if (engine_) slot_ = engine_->RegisterFile(fd_);
    });
    return engine_;
  }

  // REQUIRES: Engine() returned non-null.
  IoTarget Target() { return IoTarget{fd_, slot_, direct_, &path_, &tracker_}; }

  bool Aligned(uint64_t offset, const void* p, size_t len) const {
    return offset % align_.offset == 0 && reinterpret_cast<uintptr_t>(p) % align_.mem == 0 && len % align_.offset == 0;
  }

  // Whether the kernel takes iov at offset on the O_DIRECT descriptor as it is.
  bool Aligned(uint64_t offset, IoVecs iov) const {
    if (offset % align_.offset != 0) return false;
    for (const iovec& v : iov)
      if (reinterpret_cast<uintptr_t>(v.iov_base) % align_.mem != 0 || v.iov_len % align_.offset != 0) return false;
    return true;
  }

  std::string Where(const char* op, uint64_t offset) const {
    return std::string(op) + " " + path_ + " at offset " + std::to_string(offset);
  }

  // Aligned bounce buffers for O_DIRECT descriptors given unaligned I/O.
  struct Bounce {
    uint64_t start = 0;
    size_t len = 0;
    uint8_t* p = nullptr;
    Bounce(uint64_t offset, size_t n, const DirectAlign& align) {
      const uint64_t a = align.offset;
      start = offset & ~(a - 1);
      uint64_t end = (offset + n + a - 1) & ~(a - 1);
      len = end - start;
      if (::posix_memalign(reinterpret_cast<void**>(&p), std::max(align.mem, align.offset), len) != 0) p = nullptr;
    }
    ~Bounce() { std::free(p); }
  };

  Status BounceRead(uint64_t offset, std::span<uint8_t> buf) {
    Bounce b(offset, buf.size(), align_);
    if (!b.p) return Status::NoSpace("out of memory for a bounce buffer");
    COWTAP_RETURN_IF_ERROR(ReadAt(b.start, {b.p, b.len}));
    std::memcpy(buf.data(), b.p + (offset - b.start), buf.size());
    return Status::Ok();
  }

  Status BounceWrite(uint64_t offset, std::span<const uint8_t> data) {
    // Read-modify-write of the covering aligned blocks. Callers on O_DIRECT
    // files serialize overlapping sub-block writes themselves (metadata).
    Bounce b(offset, data.size(), align_);
    if (!b.p) return Status::NoSpace("out of memory for a bounce buffer");
    COWTAP_RETURN_IF_ERROR(ReadAt(b.start, {b.p, b.len}));
    std::memcpy(b.p + (offset - b.start), data.data(), data.size());
    auto size = Size();
    if (!size.ok()) return size.status();
    COWTAP_RETURN_IF_ERROR(WriteAt(b.start, {b.p, b.len}));
    // Do not let block rounding grow the file past what was asked.
    uint64_t want_end = offset + data.size();
    if (b.start + b.len > *size && b.start + b.len > want_end) return Truncate(std::max<uint64_t>(*size, want_end));
    return Status::Ok();
  }

  const int fd_;
  const std::string path_;
  const bool direct_;
  IoEngine* const asked_engine_;  // null: DefaultIoEngine()
  DirectAlign align_;
  IoTracker tracker_;
  std::once_flag engine_once_;
  IoEngine* engine_ = nullptr;  // set by Engine(); null: Submit* run synchronously
  int slot_ = -1;               // registered-file slot on engine_, or -1
};

class PosixFileSystem final : public FileSystem {
 public:
  Result<std::unique_ptr<File>> Open(const std::string& path, const FileOpenOptions& options) override {
    int flags = O_CLOEXEC;
    flags |= (options.writable || options.create) ? O_RDWR : O_RDONLY;
    if (options.create) flags |= O_CREAT;
    if (options.create && options.exclusive) flags |= O_EXCL;
    bool direct = false;
    int fd = -1;
    if (options.direct) {
      fd = ::open(path.c_str(), flags | O_DIRECT, 0644);
      if (fd >= 0) direct = true;
    }
    if (fd < 0) fd = ::open(path.c_str(), flags, 0644);
    if (fd < 0) {
      Status s = Status::FromErrno(errno, "open " + path);
      if (errno == ENOENT) return Status::NotFound("open " + path + ": no such file");
      return s;
    }
    if (options.lock) {
      Status s = LockImageFile(fd, path, options.writable || options.create);
      if (!s.ok()) {
        ::close(fd);
        return s;
      }
    }
    return std::unique_ptr<File>(new PosixFile(fd, path, direct, options.io_engine));
  }

  bool Exists(const std::string& path) override { return ::access(path.c_str(), F_OK) == 0; }

  Status Remove(const std::string& path) override {
    if (::unlink(path.c_str()) != 0) return Status::FromErrno(errno, "unlink " + path);
    return Status::Ok();
  }

  std::string Identity(const std::string& path) override {
    struct stat st;
    if (::stat(path.c_str(), &st) != 0) return path;
    return std::to_string(st.st_dev) + ":" + std::to_string(st.st_ino);
  }
};

}  // namespace

FileSystem* DefaultFileSystem() {
  static PosixFileSystem* fs = new PosixFileSystem();
  return fs;
}

}  // namespace cowtap::cow
