// File: the byte-addressed storage an image lives in, and FileSystem: how an
// image chain finds its files by name. These are the seams tests cut: the
// engine runs unchanged on POSIX files, on in-memory files, and on a
// fault-injecting decorator that fails or drops writes on demand.
//
// Thread-safety: every File implementation is safe for concurrent calls on
// disjoint or overlapping ranges (like pread/pwrite); the order in which two
// concurrent writes to the same bytes land is unspecified. FileSystem
// implementations are thread-safe.
#pragma once

#include <sys/uio.h>

#include <cstdint>
#include <functional>
#include <memory>
#include <span>
#include <string>

#include "base/iovec.h"
#include "base/status.h"

namespace cowtap::cow {

// Outcome of an asynchronous file operation; called exactly once, on the
// submitting thread or another (an io_uring completion thread).
using FileCompletion = std::function<void(Status)>;

class File {
 public:
  File() = default;
  File(const File&) = delete;
  File& operator=(const File&) = delete;
  virtual ~File() = default;

  // Reads exactly buf.size() bytes at offset. Bytes at or past end of file
  // read as zeros (callers that must reject out-of-file offsets compare with
  // Size() first). Fails only on an I/O error.
  virtual Status ReadAt(uint64_t offset, std::span<uint8_t> buf) = 0;
  // Writes all of data at offset, extending the file if needed.
  virtual Status WriteAt(uint64_t offset, std::span<const uint8_t> data) = 0;
  // Scatter-gather forms; the default implementations loop over ReadAt/WriteAt.
  virtual Status ReadvAt(uint64_t offset, IoVecs iov);
  virtual Status WritevAt(uint64_t offset, IoVecs iov);
  // Makes every completed write durable (fdatasync).
  virtual Status Flush() = 0;
  // Asynchronous forms of ReadvAt/WritevAt/Flush: start the operation and
  // call done exactly once with its outcome (same semantics as the
  // synchronous form, including zeros past end of file for reads).
  // REQUIRES: iov's array and memory stay valid until done runs. The
  // defaults run the synchronous form inline, so every File supports them;
  // files with an OS descriptor override them with io_uring.
  virtual void SubmitReadv(uint64_t offset, IoVecs iov, FileCompletion done);
  virtual void SubmitWritev(uint64_t offset, IoVecs iov, FileCompletion done);
  virtual void SubmitFlush(FileCompletion done);
  virtual Result<uint64_t> Size() = 0;
  virtual Status Truncate(uint64_t size_bytes) = 0;
  // Reserves space for [offset, offset + length) (fallocate). With keep_size
  // the file's size does not change. Implementations without the notion may
  // succeed without doing anything.
  virtual Status Allocate(uint64_t offset, uint64_t length, bool keep_size) = 0;
  // Makes [offset, offset + length) read as zeros, freeing space where the
  // storage can (punch hole); never changes the size.
  virtual Status PunchHole(uint64_t offset, uint64_t length) = 0;
  // The name the file was opened by (for error messages).
  virtual const std::string& path() const = 0;
  // The OS descriptor, or -1 for files that have none (in-memory, fault).
  virtual int fd() const { return -1; }
};

class IoEngine;

struct FileOpenOptions {
  bool writable = false;
  bool create = false;     // create if missing (implies writable)
  bool exclusive = false;  // with create: fail if it exists
  bool direct = false;     // O_DIRECT where supported (falls back silently)
  // Take QEMU's image locks (cow/image_lock.h) so that no other cowtapd or
  // QEMU opens the file read-write while we hold it, nor at all while we
  // write it; refused with kBusy. POSIX files only.
  bool lock = false;
  // The engine behind the Submit* methods of POSIX files (null: the
  // process's DefaultIoEngine()). REQUIRES: outlives the file.
  IoEngine* io_engine = nullptr;
};

class FileSystem {
 public:
  FileSystem() = default;
  FileSystem(const FileSystem&) = delete;
  FileSystem& operator=(const FileSystem&) = delete;
  virtual ~FileSystem() = default;

  virtual Result<std::unique_ptr<File>> Open(const std::string& path, const FileOpenOptions& options) = 0;
  virtual bool Exists(const std::string& path) = 0;
  virtual Status Remove(const std::string& path) = 0;
  // A key naming the file behind path, equal for every name of one file
  // (symlinks, "./" forms), so a backing chain that loops is recognised.
  // The default is the path itself.
  virtual std::string Identity(const std::string& path) { return path; }
};

// The process's real file system (POSIX). Never null; not owned by the caller.
FileSystem* DefaultFileSystem();

// An in-memory file system: files live as long as the object. Opening the
// same path twice gives two File objects over the same bytes (as a reopen
// after a crash would).
std::unique_ptr<FileSystem> NewMemFileSystem();

// A standalone in-memory file (not reachable by name).
std::unique_ptr<File> NewMemFile(std::string name = "mem");

// Resolves `name` as a backing file is resolved: absolute names as they are,
// relative names against the directory of `relative_to`.
std::string ResolveRelativePath(const std::string& relative_to, const std::string& name);

}  // namespace cowtap::cow
