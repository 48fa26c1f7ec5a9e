// The vocabulary of `cowtap bench`: the I/O pattern a row runs (Workload),
// what each row is (RowSpec), and what one peer measured on it (PeerResult).
// Every peer of a row runs the same Workload; the runners differ only in the
// path the I/O takes (sim guest + ring, engine alone, raw file with io_uring,
// qemu-img bench). Plain values; thread-compatible.
#pragma once

#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

namespace cowtap::cli::bench {

// The I/O pattern of a row. Trivially copyable: it is sent as bytes to the
// guest child process.
struct Workload {
  uint32_t read_block_bytes = 4096;
  uint32_t write_block_bytes = 4096;
  uint32_t queue_depth = 32;
  bool sequential = false;      // else uniform random, block-aligned
  uint32_t read_percent = 100;  // of requests; 0 = writes only
  uint64_t region_bytes = 0;    // requests fall in [0, region_bytes)
  uint64_t ops = 0;             // requests to issue
  uint64_t time_limit_ms = 0;   // stop issuing after this long (0: none)
  bool flush_at_end = false;    // a flush after the last request, timed
  uint64_t seed = 1;
};

// What image a peer runs on.
enum class ImageKind : uint8_t {
  kAllocated,     // the populated base: qcow2, every cluster written
  kFreshOverlay,  // new empty qcow2 overlay over the populated base
};

struct RowSpec {
  std::string name;   // "randread-4k": what --rows selects
  std::string title;  // one line for the table
  Workload workload;
  ImageKind image = ImageKind::kAllocated;
  // The raw peer's file: sparse and new (allocating writes) or fully written.
  bool raw_sparse = false;
  uint64_t image_bytes = 0;  // virtual size of the image the row runs on
  // qemu-img bench runs sequentially only; set when the row's pattern differs
  // (the qemu peer then runs the sequential equivalent and says so).
  bool qemu_pattern_differs = false;
  // Why qemu-img bench cannot run this row at all (empty: it can).
  std::string qemu_unsupported;
};

enum class Peer : uint8_t { kRing, kEngine, kRaw, kQemu };
inline constexpr Peer kAllPeers[] = {Peer::kRing, Peer::kEngine, Peer::kRaw, Peer::kQemu};
// "cowtap-ring", "cowtap-engine", "raw-uring", "qemu-img".
std::string_view PeerName(Peer peer);

struct PeerResult {
  Peer peer = Peer::kRing;
  bool ran = false;  // false: skipped or failed; note says why
  std::string note;  // skip reason, failure, or how the pattern differed
  uint64_t ops = 0;  // requests completed (the final flush not counted)
  uint64_t bytes = 0;
  uint64_t errors = 0;  // requests answered with an error
  double elapsed_s = 0;
  bool has_latency = false;
  double p50_us = 0, p99_us = 0;
  double cpu_s = 0;        // CPU of the process(es) doing the I/O, user + system
  double guest_cpu_s = 0;  // ring peer: the guest process's share of cpu_s
  bool has_remap = false;
  double remap_hit_rate = 0;
  double remap_mean_probe = 0;
  uint64_t remap_lookups = 0;
  uint64_t peak_rss_bytes = 0;  // of the serving process during this peer

  double iops() const { return elapsed_s > 0 ? static_cast<double>(ops) / elapsed_s : 0; }
  double mib_per_s() const { return elapsed_s > 0 ? static_cast<double>(bytes) / elapsed_s / (1 << 20) : 0; }
  double cpu_s_per_gib() const { return bytes > 0 ? cpu_s * double(1ull << 30) / static_cast<double>(bytes) : 0; }
};

struct RowResult {
  RowSpec spec;
  std::vector<PeerResult> peers;  // in kAllPeers order
  std::string note;               // e.g. why the row was not run
  // The peer's result if it ran, else nullptr.
  const PeerResult* Find(Peer peer) const;
};

// The remap cache measured on its own (public API only) at the default
// capacity and load factor.
struct RemapMicro {
  uint64_t entries = 0;
  double lookup_hit_ns = 0;
  double lookup_miss_ns = 0;
  double mean_probe_hit = 0;
  double mean_probe_miss = 0;
  uint64_t memory_bytes = 0;
};

// What a whole run found, ready to print.
struct BenchReport {
  std::string dir;
  uint64_t size_bytes = 0;
  bool direct_io = true;
  bool quick = false;
  bool full = false;
  unsigned cpus = 0;
  std::string qemu_img;  // path, or empty if absent
  std::vector<RowResult> rows;
  RemapMicro remap;
  uint64_t remap_cache_entries = 0;  // configured per image
  double total_s = 0;
};

}  // namespace cowtap::cli::bench
