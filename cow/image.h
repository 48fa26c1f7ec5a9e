// Image: one layer of a disk image chain (qcow2, qcow v1 or raw), with its
// backing chain below it, seen as a flat array of bytes of size_bytes().
//
// Reads resolve through the chain (unallocated ranges read from the backing
// image, zeros past its end); writes, discards and write-zeroes change only
// this layer, never a backing image. Backing images are shared_ptr so that
// one read-only base can serve any number of overlays.
//
// Thread-safety: every method of every Image implementation may be called
// from several threads at once; implementations serialize internally as they
// need. Close() must not race with other calls.
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "base/iovec.h"
#include "base/status.h"
#include "cow/file.h"
#include "cow/remap_cache.h"

namespace cowtap::cow {

enum class ImageFormat { kRaw, kQcow, kQcow2 };

std::string_view FormatName(ImageFormat format);
// "raw", "qcow", "qcow2" (case-sensitive); nullopt otherwise.
std::optional<ImageFormat> ParseFormatName(std::string_view name);

struct SnapshotInfo {
  std::string id;
  std::string name;
  uint64_t size_bytes = 0;  // virtual disk size recorded in the snapshot
  uint64_t date_sec = 0;
  uint32_t date_nsec = 0;
  uint64_t vm_state_size = 0;
};

struct ImageInfo {
  ImageFormat format = ImageFormat::kRaw;
  std::string path;
  uint64_t size_bytes = 0;     // virtual size
  uint64_t file_size_bytes = 0;
  uint32_t cluster_size = 0;   // 0 for raw
  int version = 0;             // qcow2: 2 or 3; qcow: 1
  bool read_only = false;
  std::string backing_file;    // as recorded in the header
  std::string backing_path;    // resolved path actually opened
  std::optional<ImageFormat> backing_format;  // as recorded (nullopt: probed)
  // qcow2 only.
  int refcount_bits = 0;
  bool dirty = false;
  bool corrupt = false;
  bool lazy_refcounts = false;
  bool extended_l2 = false;
  std::string compression_type;  // "zlib" or "zstd"
  std::string data_file;
  bool data_file_raw = false;
  uint64_t incompatible_features = 0;
  uint64_t compatible_features = 0;
  uint64_t autoclear_features = 0;
  std::vector<SnapshotInfo> snapshots;
};

// One run of guest bytes with uniform mapping, as qemu-img map reports it.
struct Extent {
  uint64_t offset = 0;   // guest offset
  uint64_t length = 0;
  bool data = false;     // allocated somewhere in the chain (not a hole)
  bool zero = false;     // reads as zeros
  bool compressed = false;
  int depth = 0;         // 0 = this layer, 1 = its backing, ...
  // Where the bytes live when data && !compressed: the file and the byte
  // offset in it. Unset for holes, zero and compressed extents.
  std::optional<uint64_t> host_offset;
  std::string file;
};

// Outcome of an asynchronous image operation; called exactly once, on the
// submitting thread (synchronous completion) or on a file's completion
// thread. Never called with an engine lock held.
using ImageCompletion = std::function<void(Status)>;

// Counters of how guest I/O was served (monotonic since open). For benches
// and tests; read racily.
struct ImageIoStats {
  uint64_t fast_reads = 0;       // every cluster hit the remap cache, no engine lock
  uint64_t fast_writes = 0;      // every cluster hit as in-place writable, no engine lock
  uint64_t slow_reads = 0;       // resolved under the engine lock
  uint64_t slow_writes = 0;
  uint64_t allocations = 0;      // clusters reserved for guest data
  uint64_t allocating_writes = 0;  // data writes into newly reserved clusters
  uint64_t link_rounds = 0;      // lock acquisitions that linked >= 1 allocation
  uint64_t links = 0;            // allocations linked into L2 tables
  uint64_t alloc_waits = 0;      // writes that waited for an allocation in flight
  uint64_t deferred_frees = 0;   // clusters freed only after older I/O drained
};

struct OpenOptions {
  bool read_only = false;
  // The format of the top image; probed when unset. Backing images use the
  // format their overlay records, or are probed (never writable anyway).
  std::optional<ImageFormat> format;
  // Open this internal snapshot (by id or name) read-only instead of the
  // active layer (qcow2 only).
  std::string snapshot;
  bool direct_io = false;
  // With direct_io: still open the backing files (read-only, shared by every
  // overlay over them) through the page cache, so a base that many VBDs read
  // has its pages cached once for all of them.
  bool buffered_backing = true;
  // Metadata cache bounds (qcow2/qcow): bytes of L2 tables and refcount
  // blocks kept in memory; 0 picks a default sized from the image.
  uint64_t l2_cache_bytes = 0;
  uint64_t refcount_cache_bytes = 0;
  // Entries in the remap cache; 0 disables it.
  uint64_t remap_cache_entries = 1 << 16;
  // Longest backing chain accepted (a loop is caught well before).
  int max_chain_depth = 64;
  // Where files are found; nullptr means DefaultFileSystem().
  FileSystem* fs = nullptr;
};

class Image {
 public:
  Image() = default;
  Image(const Image&) = delete;
  Image& operator=(const Image&) = delete;
  virtual ~Image() = default;

  virtual const ImageInfo& info() const = 0;
  uint64_t size_bytes() const { return info().size_bytes; }
  bool read_only() const { return info().read_only; }

  // Fills iov with guest bytes [offset, offset + TotalLength(iov)).
  // Fails with kOutOfRange if the range is not inside the image, kCorrupt if
  // metadata on the path is invalid, kIoError on storage failure.
  virtual Status Read(uint64_t offset, IoVecs iov) = 0;
  // Writes iov at offset into this layer, allocating and copying up from the
  // backing chain as needed. Not durable until Flush() returns OK.
  // kReadOnly on read-only images, kNoSpace when the host file cannot grow.
  virtual Status Write(uint64_t offset, IoVecs iov) = 0;
  // Makes [offset, offset + length) read as zeros. With may_unmap the layer
  // may release the space (the range still reads as zeros, never as backing).
  virtual Status WriteZeroes(uint64_t offset, uint64_t length, bool may_unmap) = 0;
  // Tells the layer the range's contents are no longer needed. Afterwards the
  // range reads as zeros (never as stale backing data). Unaligned heads and
  // tails may be left unchanged.
  virtual Status Discard(uint64_t offset, uint64_t length) = 0;
  // Makes every write that returned OK before this call durable.
  virtual Status Flush() = 0;

  // Asynchronous Read/Write/Flush: start the operation and call done exactly
  // once with the outcome the synchronous form would return. A write counts
  // as completed (for Flush) when done runs. REQUIRES: iov's array and
  // memory stay valid until done runs. The defaults run the synchronous form
  // inline; qcow2 and raw serve reads and writes through the files' async
  // I/O, with several in flight at once.
  virtual void SubmitRead(uint64_t offset, IoVecs iov, ImageCompletion done) { done(Read(offset, iov)); }
  virtual void SubmitWrite(uint64_t offset, IoVecs iov, ImageCompletion done) { done(Write(offset, iov)); }
  virtual void SubmitFlush(ImageCompletion done) { done(Flush()); }
  // How guest I/O was served so far (zeros where a format does not count).
  virtual ImageIoStats io_stats() const { return {}; }
  // Describes [offset, offset + length) through the chain, in order, merging
  // neighbours with the same attributes.
  virtual Result<std::vector<Extent>> Map(uint64_t offset, uint64_t length) = 0;
  // Flushes and marks the image clean (clears the dirty bit where it was set
  // by us). Further calls fail with kCancelled. Called by the destructor if
  // not called before (errors then are logged).
  virtual Status Close() = 0;

  // The image below this one, or null.
  virtual std::shared_ptr<Image> backing() const = 0;
  // The layer's remap cache (qcow2/qcow), or null. Not synchronized: for
  // reports and tests while no I/O runs; during I/O use LookupRemap().
  virtual RemapCache* remap_cache() { return nullptr; }
  // What this layer's remap cache knows of a virtual cluster, looked up
  // under the layer's own lock (safe while other threads do I/O on it, as
  // overlays sharing one base do).
  virtual std::optional<Remap> LookupRemap(uint64_t virtual_cluster) { return std::nullopt; }
};

// Resolves a backing reference to an open image (read-only). Passed to the
// format openers by OpenImage so that they need not know about chains.
struct BackingRef {
  std::string name;  // as recorded in the overlay
  std::optional<ImageFormat> format;
};
using BackingOpener = std::function<Result<std::shared_ptr<Image>>(const BackingRef&)>;

// Runs start (which submits one asynchronous operation with the completion
// it is given) and blocks until that completion ran; returns its status.
// On a plugged thread (io_engine.h) the held-back submissions are started
// first. Must not be called on an I/O engine's completion thread.
Status WaitForCompletion(const std::function<void(ImageCompletion)>& start);

// Reads the first bytes of a file and says which format it is (qcow2: magic
// and version 2/3; qcow: magic and version 1; anything else raw).
Result<ImageFormat> ProbeFormat(File& file);

// Opens the image at path with its whole backing chain. Relative backing
// names resolve against the directory of the image naming them. A chain
// longer than options.max_chain_depth or one that loops is refused.
Result<std::unique_ptr<Image>> OpenImage(const std::string& path, const OpenOptions& options = {});

struct CreateOptions {
  ImageFormat format = ImageFormat::kQcow2;
  // Virtual size; 0 means "the backing image's size" (backing_file required).
  uint64_t size_bytes = 0;
  std::string backing_file;  // recorded as given; resolved like OpenImage does
  std::optional<ImageFormat> backing_format;  // probed and recorded when unset
  uint32_t cluster_size = 65536;              // qcow2; qcow picks its own
  int qcow2_version = 3;
  int refcount_bits = 16;
  bool lazy_refcounts = false;
  bool extended_l2 = false;
  std::string compression_type = "zlib";  // "zlib" or "zstd"
  std::string data_file;                  // external data file (qcow2 v3)
  bool data_file_raw = false;
  bool overwrite = false;  // replace an existing file
  FileSystem* fs = nullptr;
};

// Creates a new image (an overlay when backing_file is set). Fast: writes
// only the header and the empty first tables.
Status CreateImage(const std::string& path, const CreateOptions& options);

}  // namespace cowtap::cow
