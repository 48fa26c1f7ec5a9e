// qcow2_bench: by-hand measurements of the qcow2 engine against the same
// pattern on a plain raw file (not a test, not built by default). Build and
// run from the repository root:
//   c++ -std=c++20 -O2 -I. cow/qcow2_bench.cc -o /tmp/qcow2_bench
//       build-qcow2/cow/libcowtap_cow.a build-qcow2/base/libcowtap_base.a
//       -lspdlog -lfmt -lz -lzstd -luring
//   /tmp/qcow2_bench /some/scratch/dir
// Prints: overlay creation time, 256 MiB sequential 64 KiB allocating
// writes (+flush) vs a raw sparse file, copy-up of 4 KiB into every 64 KiB
// cluster over a raw base vs copying the base, and sequential 64 KiB reads.
// Numbers depend on the page cache and the disk; run it a few times.
#include <fcntl.h>
#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <vector>

#include "cow/image.h"

namespace cowtap::cow {
namespace {

using Clock = std::chrono::steady_clock;
constexpr uint64_t kTotal = 256ull << 20;
constexpr uint64_t kChunk = 65536;

double MsSince(Clock::time_point start) {
  return std::chrono::duration<double, std::milli>(Clock::now() - start).count();
}

bool Check(const Status& s, const char* what) {
  if (!s.ok()) std::fprintf(stderr, "%s: %s\n", what, s.ToString().c_str());
  return s.ok();
}

int Run(const std::string& dir) {
  std::vector<uint8_t> buf(kChunk, 0x5a);
  CreateOptions base;
  base.format = ImageFormat::kRaw;
  base.size_bytes = 1ull << 30;
  base.overwrite = true;
  if (!Check(CreateImage(dir + "/base.raw", base), "create base")) return 1;

  auto t = Clock::now();
  for (int i = 0; i < 100; ++i) {
    CreateOptions co;
    co.backing_file = "base.raw";
    co.backing_format = ImageFormat::kRaw;
    co.overwrite = true;
    if (!Check(CreateImage(dir + "/ov.qcow2", co), "create overlay")) return 1;
  }
  std::printf("create overlay over 1 GiB raw: %.3f ms each (mean of 100)\n", MsSince(t) / 100);

  {
    CreateOptions co;
    co.size_bytes = kTotal;
    co.overwrite = true;
    if (!Check(CreateImage(dir + "/empty.qcow2", co), "create")) return 1;
    auto img = OpenImage(dir + "/empty.qcow2");
    if (!Check(img.status(), "open")) return 1;
    t = Clock::now();
    for (uint64_t off = 0; off < kTotal; off += kChunk) {
      iovec v = MakeIoVec(buf.data(), kChunk);
      if (!Check((*img)->Write(off, {&v, 1}), "write")) return 1;
    }
    if (!Check((*img)->Flush(), "flush")) return 1;
    double q = MsSince(t);
    (*img)->Close().IgnoreError();
    int fd = open((dir + "/sparse.raw").c_str(), O_CREAT | O_TRUNC | O_RDWR, 0644);
    if (fd < 0 || ftruncate(fd, kTotal) != 0) return 1;
    t = Clock::now();
    for (uint64_t off = 0; off < kTotal; off += kChunk)
      if (pwrite(fd, buf.data(), kChunk, off) != static_cast<ssize_t>(kChunk)) return 1;
    fdatasync(fd);
    double r = MsSince(t);
    close(fd);
    std::printf("256 MiB sequential 64 KiB writes + flush: empty qcow2 %.0f ms, raw sparse %.0f ms, ratio %.2f\n", q, r,
                q / r);
  }

  {
    int fd = open((dir + "/full.raw").c_str(), O_CREAT | O_TRUNC | O_RDWR, 0644);
    if (fd < 0) return 1;
    for (uint64_t off = 0; off < kTotal; off += kChunk)
      if (pwrite(fd, buf.data(), kChunk, off) != static_cast<ssize_t>(kChunk)) return 1;
    fsync(fd);
    close(fd);
    CreateOptions co;
    co.backing_file = "full.raw";
    co.backing_format = ImageFormat::kRaw;
    co.overwrite = true;
    if (!Check(CreateImage(dir + "/cow.qcow2", co), "create cow")) return 1;
    auto img = OpenImage(dir + "/cow.qcow2");
    if (!Check(img.status(), "open cow")) return 1;
    t = Clock::now();
    for (uint64_t off = 0; off < kTotal; off += kChunk) {
      iovec v = MakeIoVec(buf.data(), 4096);
      if (!Check((*img)->Write(off, {&v, 1}), "write cow")) return 1;
    }
    if (!Check((*img)->Flush(), "flush cow")) return 1;
    double q = MsSince(t);
    (*img)->Close().IgnoreError();
    t = Clock::now();
    int in = open((dir + "/full.raw").c_str(), O_RDONLY);
    int out = open((dir + "/copy.raw").c_str(), O_CREAT | O_TRUNC | O_RDWR, 0644);
    if (in < 0 || out < 0) return 1;
    std::vector<uint8_t> b2(kChunk);
    for (uint64_t off = 0; off < kTotal; off += kChunk) {
      if (pread(in, b2.data(), kChunk, off) != static_cast<ssize_t>(kChunk)) return 1;
      if (pwrite(out, b2.data(), kChunk, off) != static_cast<ssize_t>(kChunk)) return 1;
    }
    fdatasync(out);
    double r = MsSince(t);
    close(in);
    close(out);
    std::printf(
        "copy-up 4 KiB into each 64 KiB cluster over a 256 MiB raw base: %.0f ms; copying the raw base: "
        "%.0f ms; ratio %.2f\n",
        q, r, q / r);
  }

  {
    OpenOptions oo;
    oo.read_only = true;
    auto img = OpenImage(dir + "/empty.qcow2", oo);
    if (!Check(img.status(), "open ro")) return 1;
    std::vector<uint8_t> rb(kChunk);
    t = Clock::now();
    for (uint64_t off = 0; off < kTotal; off += kChunk) {
      iovec v = MakeIoVec(rb.data(), kChunk);
      if (!Check((*img)->Read(off, {&v, 1}), "read")) return 1;
    }
    double q = MsSince(t);
    int fd = open((dir + "/sparse.raw").c_str(), O_RDONLY);
    if (fd < 0) return 1;
    t = Clock::now();
    for (uint64_t off = 0; off < kTotal; off += kChunk)
      if (pread(fd, rb.data(), kChunk, off) != static_cast<ssize_t>(kChunk)) return 1;
    double r = MsSince(t);
    close(fd);
    std::printf("256 MiB sequential 64 KiB reads (page cache): qcow2 %.0f ms, raw %.0f ms, throughput ratio %.2f\n", q,
                r, r / q);
  }
  return 0;
}

}  // namespace
}  // namespace cowtap::cow

int main(int argc, char** argv) {
  if (argc != 2) {
    std::fprintf(stderr, "usage: %s SCRATCH_DIR\n", argv[0]);
    return 2;
  }
  return cowtap::cow::Run(argv[1]);
}
