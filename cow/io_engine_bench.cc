// Benchmark of the IoEngine modes: 4 KiB random reads at a fixed queue depth
// over a file opened O_DIRECT, through io_uring (with and without a
// registered file), through the threads fallback, and with synchronous pread
// from one thread (what every request cost before the engine). Built, not
// run by ctest. Prints IOPS and CPU time per op for each row.
//
//   cowtap_io_engine_bench [--file PATH] [--size-mib 256] [--seconds 3]
//                          [--qd 32] [--buffered]
//
// The file is created (and filled, so every block is allocated) when it is
// missing or smaller than --size-mib; it is left in place for the next run.
#include <fcntl.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "cow/io_engine.h"

namespace cowtap::cow {
namespace {

constexpr size_t kBlock = 4096;

struct Config {
  std::string file;
  uint64_t size_bytes = 256ull << 20;
  double seconds = 3;
  int qd = 32;
  bool direct = true;
};

double CpuSeconds() {
  rusage ru;
  ::getrusage(RUSAGE_SELF, &ru);
  return ru.ru_utime.tv_sec + ru.ru_stime.tv_sec + (ru.ru_utime.tv_usec + ru.ru_stime.tv_usec) / 1e6;
}

struct Row {
  const char* name;
  double iops;
  double cpu_us_per_op;
  uint64_t submit_calls;
  uint64_t ops;
};

void Print(const Row& r) {
  std::printf("%-22s %10.0f IOPS %8.1f MiB/s %8.2f CPU-us/op", r.name, r.iops, r.iops * kBlock / (1 << 20),
              r.cpu_us_per_op);
  if (r.submit_calls) std::printf("  %.2f ops/submit", static_cast<double>(r.ops) / r.submit_calls);
  std::printf("\n");
}

// Keeps cfg.qd random reads in flight on engine for cfg.seconds; each
// completion starts the next read of its slot.
Row RunEngine(const char* name, IoEngine* engine, int fd, bool fixed, const Config& cfg, char* buffers) {
  const std::string path = cfg.file;
  IoTarget target{fd, fixed ? engine->RegisterFile(fd) : -1, cfg.direct, &path, nullptr};
  const uint64_t blocks = cfg.size_bytes / kBlock;
  std::vector<iovec> iovs(cfg.qd);
  std::vector<std::mt19937_64> rngs;
  for (int i = 0; i < cfg.qd; ++i) {
    iovs[i] = {buffers + i * kBlock, kBlock};
    rngs.emplace_back(1000 + i);
  }
  std::atomic<bool> stop{false};
  std::atomic<uint64_t> done{0};
  std::atomic<int> outstanding{cfg.qd};
  std::atomic<uint64_t> errors{0};
  std::function<void(int)> issue = [&](int slot) {
    const uint64_t off = (rngs[slot]() % blocks) * kBlock;
    engine->Submit(IoOp::kReadv, target, off, {&iovs[slot], 1}, [&, slot](Status s) {
      if (!s.ok()) errors.fetch_add(1);
      done.fetch_add(1, std::memory_order_relaxed);
      if (stop.load(std::memory_order_relaxed)) {
        outstanding.fetch_sub(1);
      } else {
        issue(slot);
      }
    });
  };
  const auto before = engine->stats();
  const double cpu0 = CpuSeconds();
  const auto t0 = std::chrono::steady_clock::now();
  PlugThisThread();
  for (int i = 0; i < cfg.qd; ++i) issue(i);
  UnplugThisThread();
  std::this_thread::sleep_for(std::chrono::duration<double>(cfg.seconds));
  stop = true;
  const uint64_t ops = done.load();
  const double elapsed = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  while (outstanding.load() > 0) std::this_thread::sleep_for(std::chrono::milliseconds(1));
  const double cpu = CpuSeconds() - cpu0;
  const auto after = engine->stats();
  if (target.fixed_slot >= 0) engine->UnregisterFile(target.fixed_slot);
  if (errors.load()) std::fprintf(stderr, "%s: %lu reads failed\n", name, static_cast<unsigned long>(errors.load()));
  return Row{name, ops / elapsed, cpu * 1e6 / done.load(), after.submit_calls - before.submit_calls,
             after.ops_submitted - before.ops_submitted};
}

Row RunSync(int fd, const Config& cfg, char* buffer) {
  const uint64_t blocks = cfg.size_bytes / kBlock;
  std::mt19937_64 rng(7);
  uint64_t ops = 0;
  const double cpu0 = CpuSeconds();
  const auto t0 = std::chrono::steady_clock::now();
  const auto end = t0 + std::chrono::duration<double>(cfg.seconds);
  while (std::chrono::steady_clock::now() < end) {
    for (int i = 0; i < 64; ++i, ++ops) {
      if (::pread(fd, buffer, kBlock, static_cast<off_t>((rng() % blocks) * kBlock)) != static_cast<ssize_t>(kBlock)) {
        std::perror("pread");
        std::exit(1);
      }
    }
  }
  const double elapsed = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  return Row{"sync pread (QD1)", ops / elapsed, (CpuSeconds() - cpu0) * 1e6 / ops, 0, ops};
}

bool PrepareFile(const Config& cfg) {
  struct stat st;
  if (::stat(cfg.file.c_str(), &st) == 0 && static_cast<uint64_t>(st.st_size) >= cfg.size_bytes) return true;
  std::printf("filling %s (%lu MiB)...\n", cfg.file.c_str(), static_cast<unsigned long>(cfg.size_bytes >> 20));
  int fd = ::open(cfg.file.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  if (fd < 0) return false;
  std::vector<char> chunk(1 << 20);
  std::mt19937_64 rng(1);
  for (uint64_t off = 0; off < cfg.size_bytes; off += chunk.size()) {
    for (auto& c : chunk) c = static_cast<char>(rng());
    if (::pwrite(fd, chunk.data(), chunk.size(), static_cast<off_t>(off)) != static_cast<ssize_t>(chunk.size()))
      return false;
  }
  ::fsync(fd);
  ::close(fd);
  return true;
}

int Main(int argc, char** argv) {
  Config cfg;
  const char* tmp = std::getenv("TMPDIR");
  cfg.file = std::string(tmp && *tmp ? tmp : "/tmp") + "/cowtap-io-engine-bench.img";
  for (int i = 1; i < argc; ++i) {
    std::string a = argv[i];
    auto next = [&]() -> std::string { return i + 1 < argc ? argv[++i] : ""; };
    if (a == "--file") {
      cfg.file = next();
    } else if (a == "--size-mib") {
      cfg.size_bytes = std::strtoull(next().c_str(), nullptr, 10) << 20;
    } else if (a == "--seconds") {
      cfg.seconds = std::strtod(next().c_str(), nullptr);
    } else if (a == "--qd") {
      cfg.qd = std::max(1, std::atoi(next().c_str()));
    } else if (a == "--buffered") {
      cfg.direct = false;
    } else {
      std::fprintf(stderr, "usage: %s [--file PATH] [--size-mib N] [--seconds S] [--qd N] [--buffered]\n", argv[0]);
      return 2;
    }
  }
  if (cfg.size_bytes < kBlock * 16 || !PrepareFile(cfg)) {
    std::fprintf(stderr, "cannot prepare %s\n", cfg.file.c_str());
    return 1;
  }
  int fd = ::open(cfg.file.c_str(), O_RDONLY | O_CLOEXEC | (cfg.direct ? O_DIRECT : 0));
  if (fd < 0) {
    std::perror(cfg.file.c_str());
    return 1;
  }
  void* raw = nullptr;
  if (::posix_memalign(&raw, kBlock, kBlock * cfg.qd) != 0) return 1;
  char* buffers = static_cast<char*>(raw);
  std::printf("4 KiB random reads, QD%d, %s, %lu MiB file %s, %.1f s per row\n", cfg.qd,
              cfg.direct ? "O_DIRECT" : "buffered", static_cast<unsigned long>(cfg.size_bytes >> 20), cfg.file.c_str(),
              cfg.seconds);

  {
    IoEngineOptions uo;
    uo.kind = IoEngineKind::kUring;
    auto uring = IoEngine::Create(uo);
    if (uring.ok() && (*uring)->kind() == IoEngineKind::kUring) {
      Print(RunEngine("io_uring", uring->get(), fd, false, cfg, buffers));
      Print(RunEngine("io_uring + fixed file", uring->get(), fd, true, cfg, buffers));
    } else {
      std::printf("io_uring unavailable: skipped\n");
    }
  }
  IoEngineOptions to;
  to.kind = IoEngineKind::kThreads;
  auto threads = IoEngine::Create(to);
  if (threads.ok()) Print(RunEngine("threads (4 workers)", threads->get(), fd, false, cfg, buffers));
  Print(RunSync(fd, cfg, buffers));
  std::free(raw);
  ::close(fd);
  return 0;
}

}  // namespace
}  // namespace cowtap::cow

int main(int argc, char** argv) { return cowtap::cow::Main(argc, argv); }
