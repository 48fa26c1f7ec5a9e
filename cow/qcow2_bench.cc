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
// Then, through the asynchronous API at queue depth 32 with O_DIRECT (the
// same File engine for both sides): 64 KiB sequential allocating writes into
// an empty qcow2 vs a raw sparse file, and 4 KiB random reads of allocated
// data, with the engine's fast/slow-path counters.
// Numbers depend on the page cache and the disk; run it a few times.
#include <fcntl.h>
#include <unistd.h>

#include <chrono>
#include <condition_variable>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <mutex>
#include <random>
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

// Keeps `qd` requests in flight until `count` were issued; offset_of(i)
// gives request i's guest offset. Returns elapsed seconds (<0 on error).
double RunQd(Image& img, bool write, uint64_t count, uint64_t length, int qd,
             const std::function<uint64_t(uint64_t)>& offset_of) {
  std::vector<uint8_t*> bufs(qd);
  for (int i = 0; i < qd; ++i) {
    bufs[i] = static_cast<uint8_t*>(std::aligned_alloc(4096, length));
    std::memset(bufs[i], 0x5a + i, length);
  }
  std::vector<iovec> iovs(qd);
  std::mutex mu;
  std::condition_variable cv;
  std::vector<int> free_slots;
  for (int i = 0; i < qd; ++i) free_slots.push_back(i);
  bool failed = false;
  auto t = Clock::now();
  for (uint64_t i = 0; i < count; ++i) {
    int slot;
    {
      std::unique_lock lock(mu);
      cv.wait(lock, [&] { return !free_slots.empty(); });
      slot = free_slots.back();
      free_slots.pop_back();
    }
    iovs[slot] = MakeIoVec(bufs[slot], length);
    auto done = [&, slot](Status s) {
      std::lock_guard lock(mu);
      if (!s.ok() && !failed) {
        std::fprintf(stderr, "I/O: %s\n", s.ToString().c_str());
        failed = true;
      }
      free_slots.push_back(slot);
      cv.notify_all();
    };
    if (write) {
      img.SubmitWrite(offset_of(i), {&iovs[slot], 1}, done);
    } else {
      img.SubmitRead(offset_of(i), {&iovs[slot], 1}, done);
    }
  }
  {
    std::unique_lock lock(mu);
    cv.wait(lock, [&] { return free_slots.size() == static_cast<size_t>(qd); });
  }
  if (write && !Check(img.Flush(), "flush")) failed = true;
  double secs = std::chrono::duration<double>(Clock::now() - t).count();
  for (auto* b : bufs) std::free(b);
  return failed ? -1 : secs;
}

void PrintStats(const char* name, const ImageIoStats& s) {
  std::printf(
      "  %s: fast reads %llu, fast writes %llu, slow reads %llu, slow writes %llu, clusters allocated %llu, "
      "allocating writes %llu, links %llu in %llu rounds, waits %llu\n",
      name, (unsigned long long)s.fast_reads, (unsigned long long)s.fast_writes, (unsigned long long)s.slow_reads,
      (unsigned long long)s.slow_writes, (unsigned long long)s.allocations, (unsigned long long)s.allocating_writes,
      (unsigned long long)s.links, (unsigned long long)s.link_rounds, (unsigned long long)s.alloc_waits);
}

// Each figure is the best of kReps runs, qcow2 and raw alternating (the
// machine may be shared: the best run is the least disturbed one).
int RunAsync(const std::string& dir) {
  constexpr int kQd = 32;
  constexpr int kReps = 3;
  OpenOptions oo;
  // COWTAP_BENCH_BUFFERED=1: page-cache I/O instead of O_DIRECT.
  oo.direct_io = std::getenv("COWTAP_BENCH_BUFFERED") == nullptr;
  const uint64_t n = kTotal / kChunk;
  auto seq = [](uint64_t i) { return i * kChunk; };
  double best_q = 1e9, best_r = 1e9;
  ImageIoStats write_stats;
  std::unique_ptr<Image> q, r;
  for (int rep = 0; rep < kReps; ++rep) {
    q.reset();
    r.reset();
    CreateOptions qo;
    qo.size_bytes = kTotal;
    qo.overwrite = true;
    if (!Check(CreateImage(dir + "/qd.qcow2", qo), "create")) return 1;
    CreateOptions ro = qo;
    ro.format = ImageFormat::kRaw;
    if (!Check(CreateImage(dir + "/qd.raw", ro), "create raw")) return 1;
    auto qi = OpenImage(dir + "/qd.qcow2", oo);
    auto ri = OpenImage(dir + "/qd.raw", oo);
    if (!Check(qi.status(), "open qcow2") || !Check(ri.status(), "open raw")) return 1;
    q = std::move(qi).value();
    r = std::move(ri).value();
    double tq = RunQd(*q, true, n, kChunk, kQd, seq);
    double tr = RunQd(*r, true, n, kChunk, kQd, seq);
    if (tq < 0 || tr < 0) return 1;
    best_q = std::min(best_q, tq);
    best_r = std::min(best_r, tr);
    write_stats = q->io_stats();
  }
  std::printf(
      "QD%d %s 256 MiB sequential 64 KiB allocating writes + flush (best of %d): qcow2 %.0f ms (%.0f MiB/s), raw "
      "sparse %.0f ms (%.0f MiB/s), time ratio %.2f\n",
      kQd, oo.direct_io ? "O_DIRECT" : "buffered", kReps, best_q * 1e3, 256 / best_q, best_r * 1e3, 256 / best_r,
      best_q / best_r);
  PrintStats("qcow2 (last run)", write_stats);
  const uint64_t reads = 65536;
  std::mt19937_64 rng(7);
  std::vector<uint64_t> offs(reads);
  for (auto& o : offs) o = (rng() % (kTotal / 4096)) * 4096;
  auto rnd = [&](uint64_t i) { return offs[i]; };
  ImageIoStats before = q->io_stats();
  double rq = 1e9, rr = 1e9;
  for (int rep = 0; rep < kReps; ++rep) {
    double a = RunQd(*q, false, reads, 4096, kQd, rnd);
    double b = RunQd(*r, false, reads, 4096, kQd, rnd);
    if (a < 0 || b < 0) return 1;
    rq = std::min(rq, a);
    rr = std::min(rr, b);
  }
  std::printf("QD%d %s 4 KiB random reads of allocated data (best of %d): qcow2 %.0f IOPS, raw %.0f IOPS, ratio %.2f\n",
              kQd, oo.direct_io ? "O_DIRECT" : "buffered", kReps, reads / rq, reads / rr, rr / rq);
  ImageIoStats after = q->io_stats();
  std::printf("  qcow2 reads: fast %llu, slow %llu\n", (unsigned long long)(after.fast_reads - before.fast_reads),
              (unsigned long long)(after.slow_reads - before.slow_reads));
  q->Close().IgnoreError();
  r->Close().IgnoreError();
  return 0;
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
  if (argc == 3 && std::string(argv[2]) == "--async-only") return cowtap::cow::RunAsync(argv[1]);
  if (argc != 2 && argc != 3) {
    std::fprintf(stderr, "usage: %s SCRATCH_DIR [--async-only]\n", argv[0]);
    return 2;
  }
  if (int rc = cowtap::cow::Run(argv[1])) return rc;
  return cowtap::cow::RunAsync(argv[1]);
}
