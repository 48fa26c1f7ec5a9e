// Microbenchmarks of the sim platform: what a grant map, a grant copy, an
// event-channel round trip and a xenstore read cost, so backend figures can
// be read against them. Not a test. Run:
//   cmake --build build-xen --target cowtap_sim_bench && ./build-xen/xen-glue/cowtap_sim_bench
#include <benchmark/benchmark.h>
#include <poll.h>
#include <unistd.h>

#include <atomic>
#include <thread>
#include <vector>

#include "xen-glue/sim.h"

namespace cowtap::xen {
namespace {

struct Fixture {
  Fixture() {
    hv = std::move(SimHypervisor::Start("/tmp/cowtap-simbench-" + std::to_string(getpid()) + ".sock")).value();
    platform = hv->NewPlatform();
    gt = std::move(platform->OpenGrantTable()).value();
    guest = std::move(SimGuest::Connect(hv->socket_path(), {.domid = 4, .ram_pages = 256, .grant_entries = 512}))
                .value();
    for (int i = 0; i < 32; ++i) refs.push_back(*guest->GrantAccess(*guest->AllocPage(), kDom0, false));
  }
  std::unique_ptr<SimHypervisor> hv;
  std::unique_ptr<XenPlatform> platform;
  std::unique_ptr<GrantTable> gt;
  std::unique_ptr<SimGuest> guest;
  std::vector<GrantRef> refs;
};

void BM_MapUnmap(benchmark::State& state) {
  Fixture f;
  std::span<const GrantRef> batch(f.refs.data(), static_cast<size_t>(state.range(0)));
  for (auto _ : state) {
    auto m = f.gt->Map(4, batch, true);
    if (!m.ok()) state.SkipWithError(m.status().ToString().c_str());
    benchmark::DoNotOptimize((*m)->addr()[0]);
  }
  state.SetItemsProcessed(state.iterations() * state.range(0));
}
BENCHMARK(BM_MapUnmap)->Arg(1)->Arg(11)->Arg(32);

void BM_GrantCopy4K(benchmark::State& state) {
  Fixture f;
  std::vector<uint8_t> buf(kPageSize);
  GrantCopyOp op{GrantCopyOp::Direction::kFromGuest, 4, f.refs[0], 0, kPageSize, buf.data(), {}};
  for (auto _ : state) {
    if (!f.gt->Copy({&op, 1}).ok() || !op.status.ok()) state.SkipWithError("copy failed");
  }
  state.SetBytesProcessed(state.iterations() * kPageSize);
}
BENCHMARK(BM_GrantCopy4K);

// Backend notifies, a guest thread waits on its fd and notifies back.
void BM_EventRoundTrip(benchmark::State& state) {
  Fixture f;
  auto ge = std::move(f.guest->OpenEventChannel()).value();
  auto be = std::move(f.platform->OpenEventChannel()).value();
  EvtchnPort gport = *ge->BindUnbound(kDom0);
  EvtchnPort bport = *be->BindInterdomain(4, gport);
  std::atomic<bool> stop{false};
  std::thread echo([&] {
    pollfd p{ge->fd(), POLLIN, 0};
    while (!stop.load()) {
      if (poll(&p, 1, 100) != 1) continue;
      if (auto port = *ge->Pending()) {
        ge->Unmask(*port).IgnoreError();
        ge->Notify(gport).IgnoreError();
      }
    }
  });
  pollfd p{be->fd(), POLLIN, 0};
  for (auto _ : state) {
    be->Notify(bport).IgnoreError();
    while (poll(&p, 1, 1000) != 1) {
    }
    auto port = *be->Pending();
    be->Unmask(*port).IgnoreError();
  }
  stop.store(true);
  echo.join();
}
BENCHMARK(BM_EventRoundTrip)->UseRealTime();

void BM_XenStoreRead(benchmark::State& state) {
  Fixture f;
  bool remote = state.range(0) != 0;
  auto xs = remote ? std::move(f.guest->OpenXenStore()).value() : std::move(f.platform->OpenXenStore()).value();
  if (!xs->Write("/local/domain/4/k", "value").ok()) state.SkipWithError("write failed");
  for (auto _ : state) benchmark::DoNotOptimize(xs->Read("/local/domain/4/k"));
  state.SetLabel(remote ? "guest over socket" : "in process");
}
BENCHMARK(BM_XenStoreRead)->Arg(0)->Arg(1)->UseRealTime();

}  // namespace
}  // namespace cowtap::xen

BENCHMARK_MAIN();
