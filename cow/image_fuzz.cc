// libFuzzer target: an image file the fuzzer writes, opened and used as
// cowtapd would use a guest's disk.
//
// Input: the bytes of the top image (qcow2, qcow or raw: the format is
// probed, as for an image whose format the toolstack did not name). It sits
// in an in-memory file system beside a small raw base "base.raw", so a
// backing reference to that name resolves and the chain code runs too.
// The image is opened writable, then: Map over the first 64 MiB, three
// reads at offsets taken from the input, one 4 KiB write and a re-read of
// it, a discard, a flush and a close; finally the offline check (with leak
// repair) runs on what is left. Every step may fail with a Status (that is
// the point of hostile input); what must not happen is a crash, a sanitizer
// report, a hang or unbounded memory (libFuzzer's -rss_limit_mb), or a
// write that does not read back.
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <string>
#include <vector>

#include "base/iovec.h"
#include "cow/check.h"
#include "cow/file.h"
#include "cow/image.h"

namespace cowtap::cow {
namespace {

void Require(bool condition) {
  if (!condition) std::abort();
}

uint64_t Mix(const uint8_t* data, size_t size, uint64_t salt) {
  uint64_t h = 1469598103934665603ull ^ salt;
  for (size_t i = 0; i < size && i < 4096; ++i) h = (h ^ data[i]) * 1099511628211ull;
  return h;
}

Status PutFile(FileSystem& fs, const std::string& path, const uint8_t* data, size_t size) {
  COWTAP_ASSIGN_OR_RETURN(auto file, fs.Open(path, {.writable = true, .create = true}));
  return file->WriteAt(0, {data, size});
}

void RunOne(const uint8_t* data, size_t size) {
  std::unique_ptr<FileSystem> fs = NewMemFileSystem();
  // Built once: filling 1 MiB per input through coverage-instrumented -O0
  // code was most of each run (10 inputs/s).
  static const std::vector<uint8_t> base = [] {
    std::vector<uint8_t> b(1 << 20);
    for (size_t i = 0; i < b.size(); ++i) b[i] = static_cast<uint8_t>(i * 7 + 3);
    return b;
  }();
  if (!PutFile(*fs, "/fuzz/base.raw", base.data(), base.size()).ok()) return;
  if (!PutFile(*fs, "/fuzz/top.img", data, size).ok()) return;

  OpenOptions options;
  options.fs = fs.get();
  options.max_chain_depth = 4;
  options.l2_cache_bytes = 1 << 20;
  options.refcount_cache_bytes = 1 << 20;
  options.remap_cache_entries = 1024;
  auto opened = OpenImage("/fuzz/top.img", options);
  if (!opened.ok()) return;
  std::unique_ptr<Image> image = std::move(*opened);
  const uint64_t disk = image->info().size_bytes;

  (void)image->Map(0, std::min<uint64_t>(disk, 64ull << 20));

  std::vector<uint8_t> buf(8192);
  for (uint64_t salt = 1; salt <= 3 && disk >= buf.size(); ++salt) {
    uint64_t offset = (Mix(data, size, salt) % (disk - buf.size() + 1)) & ~uint64_t{511};
    iovec v = MakeIoVec(buf.data(), buf.size());
    (void)image->Read(offset, IoVecs(&v, 1));
  }

  if (!image->info().read_only && disk >= 4096) {
    const uint64_t offset = (Mix(data, size, 9) % (disk / 4096)) * 4096;
    std::vector<uint8_t> pattern(4096);
    for (size_t i = 0; i < pattern.size(); ++i) pattern[i] = static_cast<uint8_t>(i ^ 0x5a);
    iovec w = MakeIoVec(pattern.data(), pattern.size());
    if (image->Write(offset, IoVecs(&w, 1)).ok()) {
      std::vector<uint8_t> back(4096, 0xee);
      iovec r = MakeIoVec(back.data(), back.size());
      // A write that succeeded reads back, unless the image went corrupt
      // (and so read-only) in between, in which case the read must fail.
      if (image->Read(offset, IoVecs(&r, 1)).ok()) Require(back == pattern);
    }
    (void)image->Discard(0, std::min<uint64_t>(disk, 1 << 16));
    (void)image->Flush();
  }
  (void)image->Close();
  image.reset();

  CheckOptions check;
  check.fs = fs.get();
  check.repair_leaks = true;
  (void)CheckImage("/fuzz/top.img", check);
}

}  // namespace
}  // namespace cowtap::cow

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  cowtap::cow::RunOne(data, size);
  return 0;
}
