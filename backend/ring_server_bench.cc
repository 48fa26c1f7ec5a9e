// Throughput of one RingServer over the sim hypervisor (run by hand, not a
// test): a guest thread in this process keeps `depth` 4 KiB requests in
// flight on one ring against an in-memory device, and the numbers printed
// are requests per second, event-channel kicks per request in each direction
// and grant map calls per request — with and without persistent grants.
//
//   build-backend/backend/cowtap_ring_server_bench [seconds=2] [depth=32]
#include <poll.h>
#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <vector>

#include "backend/mem_block_device.h"
#include "backend/ring_server.h"
#include "xen-glue/blkfront_ring.h"
#include "xen-glue/sim.h"

namespace cowtap::backend {
namespace {

struct Result {
  double iops = 0;
  double backend_kicks_per_req = 0;
  double guest_kicks_per_req = 0;
  double maps_per_req = 0;
  uint64_t max_batch = 0;
};

int Run(xen::SimHypervisor& hv, xen::XenPlatform& platform, xen::SimGuest& guest, bool persistent, uint8_t op,
        double seconds, uint32_t depth, Result* out) {
  const uint32_t kPages = 64;
  std::vector<uint8_t*> ring_pages;
  std::vector<xen::GrantRef> ring_refs;
  uint32_t ring_page = *guest.AllocPage();
  ring_pages.push_back(guest.Page(ring_page));
  ring_refs.push_back(*guest.GrantAccess(ring_page, xen::kDom0, false));
  xen::FrontRing ring(ring_pages, xen::BlkifAbi::kX86_64);
  auto evtchn = std::move(guest.OpenEventChannel()).value();
  const xen::EvtchnPort port = *evtchn->BindUnbound(xen::kDom0);
  std::vector<xen::GrantRef> data;
  for (uint32_t i = 0; i < kPages; ++i) data.push_back(*guest.GrantAccess(*guest.AllocPage(), xen::kDom0, false));

  RingConfig config;
  config.frontend_domid = guest.domid();
  config.name = "bench";
  config.ring_refs = ring_refs;
  config.remote_port = port;
  config.persistent = persistent;
  config.limits.sectors = (64 << 20) / 512;
  config.limits.flush = true;
  auto device = std::make_shared<MemBlockDevice>(MemBlockDeviceOptions{.size_bytes = 64 << 20});
  auto server = RingServer::Start(platform, config, device);
  if (!server.ok()) {
    std::fprintf(stderr, "start: %s\n", server.status().ToString().c_str());
    return 1;
  }
  uint64_t sent = 0, done = 0, guest_kicks = 0;
  const auto start = std::chrono::steady_clock::now();
  const auto end = start + std::chrono::duration<double>(seconds);
  while (true) {
    const bool time_up = std::chrono::steady_clock::now() >= end;
    while (!time_up && ring.InFlight() < depth && ring.FreeSlots() > 0) {
      xen::BlkifRequest r;
      r.operation = op;
      r.id = sent;
      r.sector_number = (sent * 8) % ((64 << 20) / 512 - 8);
      r.nr_segments = 1;
      r.seg[0] = {data[sent % kPages], 0, 7};
      ring.QueueRequest(r);
      ++sent;
    }
    if (ring.PushRequestsAndCheckNotify()) {
      (void)evtchn->Notify(port);
      ++guest_kicks;
    }
    xen::BlkifResponse rsp;
    uint64_t taken = 0;
    while (true) {
      auto got = ring.TakeResponse(&rsp);
      if (!got.ok() || !*got) break;
      ++taken;
    }
    done += taken;
    if (time_up && ring.InFlight() == 0) break;
    if (taken > 0) continue;  // refill before sleeping
    if (ring.FinalCheckForResponses()) continue;
    pollfd p{evtchn->fd(), POLLIN, 0};
    if (::poll(&p, 1, 100) == 1) {
      while (auto pending = *evtchn->Pending()) (void)evtchn->Unmask(*pending);
    }
  }
  const double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  const RingStats& st = (*server)->stats();
  out->iops = done / secs;
  out->backend_kicks_per_req = static_cast<double>(st.notifications.load()) / done;
  out->guest_kicks_per_req = static_cast<double>(guest_kicks) / done;
  out->maps_per_req = static_cast<double>(st.grant_maps.load()) / done;
  out->max_batch = st.max_batch.load();
  (*server)->Stop();
  (void)hv;
  return 0;
}

}  // namespace
}  // namespace cowtap::backend

int main(int argc, char** argv) {
  using namespace cowtap;
  const double seconds = argc > 1 ? std::atof(argv[1]) : 2.0;
  const uint32_t depth = argc > 2 ? static_cast<uint32_t>(std::atoi(argv[2])) : 32;
  auto hv = xen::SimHypervisor::Start("/tmp/cowtap-ring-bench-" + std::to_string(getpid()) + ".sock");
  if (!hv.ok()) {
    std::fprintf(stderr, "%s\n", hv.status().ToString().c_str());
    return 1;
  }
  auto platform = (*hv)->NewPlatform();
  auto guest = xen::SimGuest::Connect((*hv)->socket_path(), {.domid = 9, .ram_pages = 1024, .grant_entries = 1024});
  if (!guest.ok()) {
    std::fprintf(stderr, "%s\n", guest.status().ToString().c_str());
    return 1;
  }
  std::printf("ring server, 1 queue, 1-page ring, 4 KiB requests, depth %u, %.1f s each\n", depth, seconds);
  std::printf("%-28s %12s %14s %14s %12s %10s\n", "case", "req/s", "be kicks/req", "fe kicks/req", "maps/req",
              "max batch");
  for (bool persistent : {true, false}) {
    for (uint8_t op : {backend::kOpRead, backend::kOpWrite}) {
      backend::Result r;
      if (backend::Run(**hv, *platform, **guest, persistent, op, seconds, depth, &r) != 0) return 1;
      std::printf(
          "%-28s %12.0f %14.3f %14.3f %12.3f %10lu\n",
          (std::string(op == backend::kOpRead ? "read" : "write") + (persistent ? " persistent" : " map-per-request"))
              .c_str(),
          r.iops, r.backend_kicks_per_req, r.guest_kicks_per_req, r.maps_per_req,
          static_cast<unsigned long>(r.max_batch));
    }
  }
  return 0;
}
