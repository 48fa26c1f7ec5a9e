// POSIX implementation of File and FileSystem over pread/pwrite/fdatasync.
// O_DIRECT is requested when asked for and silently dropped where the file
// system refuses it (tmpfs); unaligned transfers on an O_DIRECT descriptor go
// through an aligned bounce buffer.
#include <fcntl.h>
#include <linux/falloc.h>
#include <linux/fs.h>
#include <sys/ioctl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cstdlib>
#include <cstring>
#include <string>

#include "cow/file.h"

namespace cowtap::cow {
namespace {

constexpr size_t kDirectAlign = 4096;

bool Aligned(uint64_t offset, const void* p, size_t len) {
  return offset % kDirectAlign == 0 && reinterpret_cast<uintptr_t>(p) % kDirectAlign == 0 &&
         len % kDirectAlign == 0;
}

class PosixFile final : public File {
 public:
  PosixFile(int fd, std::string path, bool direct) : fd_(fd), path_(std::move(path)), direct_(direct) {}
  ~PosixFile() override { ::close(fd_); }

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
  std::string Where(const char* op, uint64_t offset) const {
    return std::string(op) + " " + path_ + " at offset " + std::to_string(offset);
  }

  // Aligned bounce buffers for O_DIRECT descriptors given unaligned I/O.
  struct Bounce {
    uint64_t start = 0;
    size_t len = 0;
    uint8_t* p = nullptr;
    Bounce(uint64_t offset, size_t n) {
      start = offset & ~(kDirectAlign - 1);
      uint64_t end = (offset + n + kDirectAlign - 1) & ~(kDirectAlign - 1);
      len = end - start;
      if (::posix_memalign(reinterpret_cast<void**>(&p), kDirectAlign, len) != 0) p = nullptr;
    }
    ~Bounce() { std::free(p); }
  };

  Status BounceRead(uint64_t offset, std::span<uint8_t> buf) {
    Bounce b(offset, buf.size());
    if (!b.p) return Status::NoSpace("out of memory for a bounce buffer");
    COWTAP_RETURN_IF_ERROR(ReadAt(b.start, {b.p, b.len}));
    std::memcpy(buf.data(), b.p + (offset - b.start), buf.size());
    return Status::Ok();
  }

  Status BounceWrite(uint64_t offset, std::span<const uint8_t> data) {
    // Read-modify-write of the covering aligned blocks. Callers on O_DIRECT
    // files serialize overlapping sub-block writes themselves (metadata).
    Bounce b(offset, data.size());
    if (!b.p) return Status::NoSpace("out of memory for a bounce buffer");
    COWTAP_RETURN_IF_ERROR(ReadAt(b.start, {b.p, b.len}));
    std::memcpy(b.p + (offset - b.start), data.data(), data.size());
    auto size = Size();
    if (!size.ok()) return size.status();
    COWTAP_RETURN_IF_ERROR(WriteAt(b.start, {b.p, b.len}));
    // Do not let block rounding grow the file past what was asked.
    uint64_t want_end = offset + data.size();
    if (b.start + b.len > *size && b.start + b.len > want_end)
      return Truncate(std::max<uint64_t>(*size, want_end));
    return Status::Ok();
  }

  const int fd_;
  const std::string path_;
  const bool direct_;
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
    return std::unique_ptr<File>(new PosixFile(fd, path, direct));
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
