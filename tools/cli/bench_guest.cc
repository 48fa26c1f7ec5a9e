#include "tools/cli/bench_guest.h"

#include <fmt/format.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <unistd.h>

#include <csignal>
#include <cstdio>
#include <cstring>
#include <vector>

#include "tools/cli/bench_stats.h"
#include "xen-glue/blkfront.h"
#include "xen-glue/sim.h"

namespace cowtap::cli::bench {
namespace {

constexpr uint32_t kGuestRamPages = 16384;  // 64 MiB: rings, data and indirect pages
constexpr uint32_t kGuestGrantEntries = 16384;
constexpr int kPollTimeoutMs = 20000;

void SetMessage(GuestReply* reply, const std::string& text) {
  std::snprintf(reply->message, sizeof(reply->message), "%s", text.c_str());
}

GuestReply Serve(const GuestRequest& req) {
  GuestReply reply;
  GuestRequest r = req;
  r.socket_path[sizeof(r.socket_path) - 1] = '\0';
  if (std::string why = ValidateWorkload(r.workload); !why.empty()) {
    SetMessage(&reply, why);
    return reply;
  }
  auto guest = xen::SimGuest::Connect(
      r.socket_path,
      {.domid = static_cast<xen::DomId>(r.domid), .ram_pages = kGuestRamPages, .grant_entries = kGuestGrantEntries});
  if (!guest.ok()) {
    SetMessage(&reply, "guest: connect to the sim hypervisor: " + guest.status().ToString());
    return reply;
  }
  auto front = xen::BlkFront::Attach(**guest, r.devid, xen::BlkfrontOptions{});
  if (!front.ok()) {
    SetMessage(&reply, "guest: blkfront attach: " + front.status().ToString());
    return reply;
  }
  const xen::BlkfrontDevice& d = (*front)->device();
  reply.queues = d.num_queues;
  reply.ring_page_order = d.ring_page_order;
  reply.indirect_segments = d.indirect_segments;
  reply.persistent = d.persistent ? 1 : 0;
  const uint64_t max_block = std::max(r.workload.read_block_bytes, r.workload.write_block_bytes);
  if (max_block / xen::kGuestSectorBytes > (*front)->max_sectors_per_io()) {
    SetMessage(&reply, fmt::format("guest: {}-byte requests exceed the {} sectors a request may carry here", max_block,
                                   (*front)->max_sectors_per_io()));
    return reply;
  }
  if (r.workload.region_bytes / xen::kGuestSectorBytes > (*front)->sectors()) {
    SetMessage(&reply, fmt::format("guest: the disk has {} sectors, the workload needs {} bytes", (*front)->sectors(),
                                   r.workload.region_bytes));
    return reply;
  }
  ResetPeakRss();
  const double cpu0 = ProcessCpuSeconds();
  Status s = DriveTarget(**front, r.workload, kPollTimeoutMs, &reply);
  reply.cpu_s = ProcessCpuSeconds() - cpu0;
  reply.peak_rss_bytes = PeakRssBytes();
  Status closed = (*front)->Disconnect();
  if (!s.ok()) {
    SetMessage(&reply, "guest: " + s.ToString());
    return reply;
  }
  if (!closed.ok()) {
    SetMessage(&reply, "guest: disconnect: " + closed.ToString());
    return reply;
  }
  reply.ok = 1;
  return reply;
}

}  // namespace

Status DriveTarget(xen::BlockTarget& target, const Workload& w, int poll_timeout_ms, GuestReply* reply) {
  const uint32_t depth = w.queue_depth;
  const size_t slot_bytes = std::max(w.read_block_bytes, w.write_block_bytes);
  std::vector<uint8_t> buffers(slot_bytes * depth, 0x5A);
  std::vector<uint64_t> start_ns(depth);
  std::vector<uint32_t> lengths(depth);
  std::vector<uint32_t> free_slots;
  for (uint32_t i = 0; i < depth; ++i) free_slots.push_back(depth - 1 - i);
  OpPattern pattern(w);
  LatencyHistogram hist;
  std::vector<xen::BlkCompletion> done;
  PatternOp pending;  // taken from the pattern, not yet accepted by the target
  bool has_pending = false;
  const uint64_t t0 = NowNs();
  const uint64_t deadline = w.time_limit_ms ? t0 + w.time_limit_ms * 1000000 : UINT64_MAX;
  uint64_t issued = 0, in_flight = 0;
  while (true) {
    while ((has_pending || issued < w.ops) && !free_slots.empty() && NowNs() < deadline) {
      if (!has_pending) {
        pending = pattern.Next();
        has_pending = true;
        ++issued;
      }
      const uint32_t slot = free_slots.back();
      xen::BlkIo io;
      io.op = pending.write ? xen::BlkOp::kWrite : xen::BlkOp::kRead;
      io.sector = pending.offset / xen::kGuestSectorBytes;
      io.nr_sectors = pending.length / xen::kGuestSectorBytes;
      io.buffer = buffers.data() + slot * slot_bytes;
      io.cookie = slot;
      start_ns[slot] = NowNs();
      Status s = target.Submit(io);
      if (s.code() == ErrorCode::kBusy) break;  // ring full: reap first
      COWTAP_RETURN_IF_ERROR(s);
      lengths[slot] = pending.length;
      has_pending = false;
      free_slots.pop_back();
      ++in_flight;
    }
    if (in_flight == 0) break;
    done.clear();
    COWTAP_ASSIGN_OR_RETURN(size_t n, target.Poll(&done, poll_timeout_ms));
    if (n == 0) {
      return Status::Busy(fmt::format("no response for {} ms with {} requests in flight", poll_timeout_ms, in_flight));
    }
    const uint64_t now = NowNs();
    for (const xen::BlkCompletion& c : done) {
      const uint32_t slot = static_cast<uint32_t>(c.cookie);
      if (slot >= depth) continue;
      hist.Record(now - start_ns[slot]);
      if (c.status != 0) ++reply->errors;
      ++reply->ops;
      reply->bytes += lengths[slot];
      --in_flight;
      free_slots.push_back(slot);
    }
  }
  if (w.flush_at_end && target.Supports(xen::BlkOp::kFlush)) {
    COWTAP_ASSIGN_OR_RETURN(
        int16_t st, xen::ExecuteSync(target, xen::BlkIo{xen::BlkOp::kFlush, 0, 0, nullptr, depth}, poll_timeout_ms));
    if (st != 0) ++reply->errors;
  }
  reply->elapsed_s = static_cast<double>(NowNs() - t0) / 1e9;
  reply->p50_us = hist.PercentileUs(50);
  reply->p99_us = hist.PercentileUs(99);
  return Status::Ok();
}

void GuestProcessMain(int sock) {
  // The bench may die without closing the socket cleanly: follow it.
  ::prctl(PR_SET_PDEATHSIG, SIGKILL);
  while (true) {
    GuestRequest req;
    const ssize_t n = ::recv(sock, &req, sizeof(req), 0);
    if (n < 0 && errno == EINTR) continue;
    if (n != static_cast<ssize_t>(sizeof(req))) _exit(n == 0 ? 0 : 3);
    const GuestReply reply = Serve(req);
    if (::send(sock, &reply, sizeof(reply), MSG_NOSIGNAL) != static_cast<ssize_t>(sizeof(reply))) _exit(4);
  }
}

}  // namespace cowtap::cli::bench
