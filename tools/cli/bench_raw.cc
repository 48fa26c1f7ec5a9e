// The raw-file peer of `cowtap bench`: the row's pattern on a plain file
// with liburing directly — the floor every cowtap path is compared with.
#include <fcntl.h>
#include <fmt/format.h>
#include <liburing.h>
#include <unistd.h>

#include <cstdlib>
#include <cstring>
#include <memory>
#include <vector>

#include "tools/cli/bench_runners.h"
#include "tools/cli/bench_stats.h"

namespace cowtap::cli::bench {
namespace {

// Owns the fd, the ring and the buffers.
struct RawRig {
  int fd = -1;
  bool ring_ok = false;
  io_uring ring{};
  void* buffers = nullptr;
  ~RawRig() {
    if (ring_ok) io_uring_queue_exit(&ring);
    if (fd >= 0) ::close(fd);
    std::free(buffers);
  }
};

}  // namespace

Result<PeerResult> RunRawPeer(const Workload& w, const std::string& raw_path, bool direct_io) {
  if (std::string why = ValidateWorkload(w); !why.empty()) return Status::InvalidArgument(why);
  RawRig rig;
  const int flags = (w.read_percent == 100 ? O_RDONLY : O_RDWR) | O_CLOEXEC | (direct_io ? O_DIRECT : 0);
  rig.fd = ::open(raw_path.c_str(), flags);
  if (rig.fd < 0) return Status::FromErrno(errno, fmt::format("bench: open {}", raw_path));
  const uint32_t depth = w.queue_depth;
  if (int rc = io_uring_queue_init(depth, &rig.ring, 0); rc < 0) {
    return Status::FromErrno(-rc, "bench: io_uring_queue_init for the raw peer (io_uring unavailable here?)");
  }
  rig.ring_ok = true;
  const size_t slot_bytes = std::max(w.read_block_bytes, w.write_block_bytes);
  if (posix_memalign(&rig.buffers, 4096, slot_bytes * depth) != 0) {
    return Status::NoSpace("bench: no memory for buffers");
  }
  std::memset(rig.buffers, 0x5A, slot_bytes * depth);
  std::vector<uint64_t> start_ns(depth);
  std::vector<uint32_t> lengths(depth);
  std::vector<uint32_t> free_slots;
  for (uint32_t i = 0; i < depth; ++i) free_slots.push_back(depth - 1 - i);

  PeerResult r;
  r.peer = Peer::kRaw;
  ResetPeakRss();
  const double cpu0 = ProcessCpuSeconds();
  const uint64_t t0 = NowNs();
  const uint64_t deadline = w.time_limit_ms ? t0 + w.time_limit_ms * 1000000 : UINT64_MAX;
  OpPattern pattern(w);
  LatencyHistogram hist;
  uint64_t issued = 0, in_flight = 0;
  while (true) {
    while (issued < w.ops && !free_slots.empty() && NowNs() < deadline) {
      io_uring_sqe* sqe = io_uring_get_sqe(&rig.ring);
      if (sqe == nullptr) break;
      const PatternOp op = pattern.Next();
      const uint32_t slot = free_slots.back();
      free_slots.pop_back();
      void* buf = static_cast<uint8_t*>(rig.buffers) + slot * slot_bytes;
      if (op.write) {
        io_uring_prep_write(sqe, rig.fd, buf, op.length, op.offset);
      } else {
        io_uring_prep_read(sqe, rig.fd, buf, op.length, op.offset);
      }
      io_uring_sqe_set_data64(sqe, slot);
      lengths[slot] = op.length;
      start_ns[slot] = NowNs();
      ++issued;
      ++in_flight;
    }
    if (in_flight == 0) break;
    if (int rc = io_uring_submit_and_wait(&rig.ring, 1); rc < 0 && rc != -EINTR) {
      return Status::FromErrno(-rc, fmt::format("bench: io_uring_submit on {}", raw_path));
    }
    io_uring_cqe* cqe = nullptr;
    unsigned head = 0, seen = 0;
    const uint64_t now = NowNs();
    io_uring_for_each_cqe(&rig.ring, head, cqe) {
      const uint32_t slot = static_cast<uint32_t>(io_uring_cqe_get_data64(cqe));
      ++seen;
      if (slot >= depth) continue;
      hist.Record(now - start_ns[slot]);
      if (cqe->res != static_cast<int>(lengths[slot])) ++r.errors;
      ++r.ops;
      r.bytes += lengths[slot];
      --in_flight;
      free_slots.push_back(slot);
    }
    io_uring_cq_advance(&rig.ring, seen);
  }
  if (w.flush_at_end && ::fdatasync(rig.fd) != 0) ++r.errors;
  r.elapsed_s = static_cast<double>(NowNs() - t0) / 1e9;
  r.cpu_s = ProcessCpuSeconds() - cpu0;
  r.peak_rss_bytes = PeakRssBytes();
  r.has_latency = hist.count() > 0;
  r.p50_us = hist.PercentileUs(50);
  r.p99_us = hist.PercentileUs(99);
  r.ran = true;
  if (r.errors > 0) r.note = fmt::format("{} requests failed or were short", r.errors);
  return r;
}

}  // namespace cowtap::cli::bench
