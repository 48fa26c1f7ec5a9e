// BlkFront against a minimal backend written here (not backend/): checks the
// frontend's side of the protocol on its own — the xenstore keys it writes
// for each feature setting, the request layout it puts on the ring in both
// ABIs, indirect descriptor pages, persistent grant reuse, disconnect.
// The full backend is exercised end to end in tests/blkif.
#include "xen-glue/blkfront.h"

#include <gtest/gtest.h>
#include <poll.h>
#include <unistd.h>

#include <atomic>
#include <cstring>
#include <map>
#include <thread>

#include "base/endian.h"
#include "xen-glue/blkfront_workload.h"
#include "xen-glue/sim.h"

namespace cowtap::xen {
namespace {

constexpr DomId kGuest = 7;
constexpr uint32_t kDevid = 51712;

// Serves one VBD from memory, single-threaded, trusting nothing it does not
// need to: just enough backend to drive BlkFront.
class MiniBackend {
 public:
  MiniBackend(SimHypervisor& hv, std::map<std::string, std::string> features, uint64_t sectors)
      : platform_(hv.NewPlatform(kDom0)), features_(std::move(features)), disk_(sectors * 512, 0) {}
  ~MiniBackend() { StopServing(); }

  void Publish() {
    PublishDirs();
    PublishFeatures();
  }
  // The toolstack's part only (backend state Initialising).
  void PublishDirs() {
    xs_ = platform_->OpenXenStore().value();
    gt_ = platform_->OpenGrantTable().value();
    ev_ = platform_->OpenEventChannel().value();
    SimVbdConfig cfg;
    cfg.frontend_domid = kGuest;
    cfg.devid = kDevid;
    cfg.params = "mem";
    ASSERT_TRUE(ToolstackAddVbd(*xs_, cfg).ok());
    be_ = XsBackendDir(kDom0, "vbd", kGuest, kDevid);
    fe_ = XsFrontendDir(kGuest, "vbd", kDevid);
  }
  // Features, then InitWait.
  void PublishFeatures() {
    for (const auto& [k, v] : features_) ASSERT_TRUE(xs_->Write(XsJoin(be_, k), v).ok());
    ASSERT_TRUE(xs_->Write(XsJoin(be_, "state"), "2").ok());
  }

  std::string Fe(const std::string& key) {
    auto v = xs_->Read(XsJoin(fe_, key));
    return v.ok() ? *v : "<absent>";
  }

  // Waits for Initialised, maps what the frontend published, goes Connected
  // and starts serving on a thread.
  void ConnectAndServe() {
    for (int i = 0; i < 500 && Fe("state") != "3"; ++i) usleep(10000);
    ASSERT_EQ(Fe("state"), "3");
    abi_ = Fe("protocol") == "x86_32-abi" ? BlkifAbi::kX86_32 : BlkifAbi::kX86_64;
    persistent_on_ = Fe("feature-persistent") == "1" && features_.count("feature-persistent") > 0;
    const int nq = Fe("multi-queue-num-queues") == "<absent>" ? 1 : std::stoi(Fe("multi-queue-num-queues"));
    const int order = Fe("ring-page-order") == "<absent>" ? -1 : std::stoi(Fe("ring-page-order"));
    for (int q = 0; q < nq; ++q) {
      const std::string dir = nq >= 2 ? "queue-" + std::to_string(q) + "/" : "";
      std::vector<GrantRef> refs;
      if (order < 0) {
        refs.push_back(std::stoul(Fe(dir + "ring-ref")));
      } else {
        for (int i = 0; i < (1 << order); ++i) refs.push_back(std::stoul(Fe(dir + "ring-ref" + std::to_string(i))));
      }
      Ring r;
      auto m = gt_->Map(kGuest, refs, true);
      ASSERT_TRUE(m.ok()) << m.status().ToString();
      r.map = std::move(*m);
      r.size = BlkifRingEntries(abi_, static_cast<uint32_t>(refs.size()));
      auto port = ev_->BindInterdomain(kGuest, std::stoul(Fe(dir + "event-channel")));
      ASSERT_TRUE(port.ok()) << port.status().ToString();
      r.port = *port;
      rings_.push_back(std::move(r));
    }
    ASSERT_TRUE(xs_->Write(XsJoin(be_, "sectors"), std::to_string(disk_.size() / 512)).ok());
    ASSERT_TRUE(xs_->Write(XsJoin(be_, "info"), "0").ok());
    ASSERT_TRUE(xs_->Write(XsJoin(be_, "sector-size"), "512").ok());
    ASSERT_TRUE(xs_->Write(XsJoin(be_, "state"), "4").ok());
    serving_ = true;
    thread_ = std::thread([this] { Serve(); });
  }

  void StopServing() {
    serving_ = false;
    if (thread_.joinable()) thread_.join();
  }
  // Answers Closing like a backend: unmap everything, then Closing.
  void Close() {
    StopServing();
    for (Ring& r : rings_) ev_->Unbind(r.port).IgnoreError();
    rings_.clear();
    persistent_.clear();
    ASSERT_TRUE(xs_->Write(XsJoin(be_, "state"), "5").ok());
  }

  std::atomic<uint64_t> requests{0}, indirect{0}, maps{0};

 private:
  struct Ring {
    std::unique_ptr<GrantMapping> map;
    uint32_t size = 0;
    uint32_t req_cons = 0;
    uint32_t rsp_prod = 0;
    EvtchnPort port = 0;
  };

  uint8_t* PageFor(GrantRef ref, bool writable) {
    if (persistent_on_) {
      auto it = persistent_.find(ref);
      if (it != persistent_.end()) return it->second->addr();
    }
    GrantRef refs[1] = {ref};
    auto m = gt_->Map(kGuest, refs, writable || persistent_on_);
    if (!m.ok()) return nullptr;
    ++maps;
    uint8_t* addr = (*m)->addr();
    if (persistent_on_) {
      persistent_[ref] = std::move(*m);
    } else {
      transient_.push_back(std::move(*m));
    }
    return addr;
  }

  int16_t Execute(const BlkifRequest& req) {
    std::vector<BlkifSegment> segs;
    uint8_t op = req.operation;
    if (op == kBlkifOpFlushDiskcache) return 0;
    if (op == kBlkifOpDiscard) {
      std::memset(disk_.data() + req.sector_number * 512, 0, req.nr_sectors * 512);
      return 0;
    }
    if (op == kBlkifOpIndirect) {
      ++indirect;
      op = req.indirect_op;
      for (uint32_t i = 0; i < req.nr_segments; ++i) {
        uint8_t* page = PageFor(req.indirect_grefs[i / 512], false);
        if (page == nullptr) return -1;
        const uint8_t* s = page + 8 * (i % 512);
        segs.push_back({LoadLe32(s), s[4], s[5]});
      }
    } else {
      segs.assign(req.seg, req.seg + req.nr_segments);
    }
    uint64_t offset = req.sector_number * 512;
    for (const BlkifSegment& s : segs) {
      uint8_t* page = PageFor(s.gref, op == kBlkifOpRead);
      if (page == nullptr) return -1;
      const size_t len = (s.last_sect - s.first_sect + 1) * 512;
      if (offset + len > disk_.size()) return -1;
      if (op == kBlkifOpRead) {
        std::memcpy(page + s.first_sect * 512, disk_.data() + offset, len);
      } else {
        std::memcpy(disk_.data() + offset, page + s.first_sect * 512, len);
      }
      offset += len;
    }
    return 0;
  }

  void Serve() {
    while (serving_) {
      pollfd pfd{ev_->fd(), POLLIN, 0};
      poll(&pfd, 1, 10);
      while (true) {
        auto p = ev_->Pending();
        if (!p.ok() || !*p) break;
        ev_->Unmask(**p).IgnoreError();
      }
      for (Ring& r : rings_) {
        uint8_t* base = r.map->addr();
        const uint32_t prod = std::atomic_ref<uint32_t>(*reinterpret_cast<uint32_t*>(base)).load();
        bool any = false;
        while (r.req_cons != prod) {
          uint8_t slot[112];
          std::memcpy(slot, base + 64 + (r.req_cons & (r.size - 1)) * BlkifSlotBytes(abi_), BlkifSlotBytes(abi_));
          ++r.req_cons;
          BlkifRequest req = DecodeBlkifRequest(abi_, slot);
          ++requests;
          const int16_t st = Execute(req);
          transient_.clear();  // unmap before answering, as a backend must
          EncodeBlkifResponse(abi_, {req.id, req.operation, st},
                              base + 64 + (r.rsp_prod & (r.size - 1)) * BlkifSlotBytes(abi_));
          ++r.rsp_prod;
          any = true;
        }
        if (any) {
          std::atomic_thread_fence(std::memory_order_release);
          std::atomic_ref<uint32_t>(*reinterpret_cast<uint32_t*>(base + 8)).store(r.rsp_prod);
          std::atomic_ref<uint32_t>(*reinterpret_cast<uint32_t*>(base + 4)).store(r.req_cons + 1);
          ev_->Notify(r.port).IgnoreError();
        }
      }
    }
  }

  std::unique_ptr<XenPlatform> platform_;
  std::unique_ptr<XenStore> xs_;
  std::unique_ptr<GrantTable> gt_;
  std::unique_ptr<EventChannel> ev_;
  std::map<std::string, std::string> features_;
  std::vector<uint8_t> disk_;
  std::string be_, fe_;
  BlkifAbi abi_ = BlkifAbi::kX86_64;
  bool persistent_on_ = false;
  std::vector<Ring> rings_;
  std::map<GrantRef, std::unique_ptr<GrantMapping>> persistent_;
  std::vector<std::unique_ptr<GrantMapping>> transient_;
  std::thread thread_;
  std::atomic<bool> serving_{false};
};

class BlkFrontTest : public ::testing::Test {
 protected:
  void SetUp() override {
    auto hv = SimHypervisor::Start(::testing::TempDir() + "/blkfront_test_" + std::to_string(getpid()) + ".sock");
    ASSERT_TRUE(hv.ok()) << hv.status().ToString();
    hv_ = std::move(*hv);
    SimGuestOptions go;
    go.domid = kGuest;
    go.ram_pages = 4096;
    go.grant_entries = 4096;
    auto guest = SimGuest::Connect(hv_->socket_path(), go);
    ASSERT_TRUE(guest.ok()) << guest.status().ToString();
    guest_ = std::move(*guest);
  }
  void TearDown() override {
    if (front_ && front_->connected()) {
      EXPECT_TRUE(DisconnectBoth().ok());
    }
    front_.reset();
    backend_.reset();
    guest_.reset();
    hv_.reset();
  }

  // Publishes features, attaches the frontend (the handshake runs on another
  // thread while the backend side connects here).
  void Attach(std::map<std::string, std::string> features, BlkfrontOptions options, uint64_t sectors = 8192) {
    backend_ = std::make_unique<MiniBackend>(*hv_, std::move(features), sectors);
    backend_->Publish();
    options.handshake_timeout_ms = 5000;
    Result<std::unique_ptr<BlkFront>> attached = Status::Internal("not run");
    std::thread t([&] { attached = BlkFront::Attach(*guest_, kDevid, options); });
    backend_->ConnectAndServe();
    t.join();
    ASSERT_TRUE(attached.ok()) << attached.status().ToString();
    front_ = std::move(*attached);
  }

  // The frontend's Disconnect, with the mini backend answering Closing.
  Status DisconnectBoth() {
    std::thread closer([&] {
      for (int i = 0; i < 500 && backend_->Fe("state") != "5"; ++i) usleep(10000);
      backend_->Close();
    });
    Status s = front_->Disconnect();
    closer.join();
    return s;
  }

  std::map<std::string, std::string> AllFeatures() {
    return {{"max-ring-page-order", "3"},     {"multi-queue-max-queues", "4"}, {"feature-persistent", "1"},
            {"feature-max-indirect-segments", "64"}, {"feature-flush-cache", "1"},   {"feature-barrier", "1"},
            {"feature-discard", "1"}};
  }

  void RunWorkload(uint32_t block_sectors) {
    WorkloadOptions w;
    w.ops = 300;
    w.queue_depth = 16;
    w.block_sectors = block_sectors;
    w.random_sizes = true;
    w.initial = InitialContent::kZero;
    w.flush_every = front_->Supports(BlkOp::kFlush) ? 40 : 0;
    auto wl = Workload::Create(*front_, w);
    ASSERT_TRUE(wl.ok()) << wl.status().ToString();
    auto report = wl->Run();
    ASSERT_TRUE(report.ok()) << report.status().ToString() << " backend saw " << backend_->requests.load()
                             << " requests; frontend submitted " << front_->stats().submitted << ", completed "
                             << front_->stats().completed << ", unexpected " << front_->stats().unexpected_responses;
    EXPECT_TRUE(report->passed()) << report->Summary();
  }

  std::unique_ptr<SimHypervisor> hv_;
  std::unique_ptr<SimGuest> guest_;
  std::unique_ptr<MiniBackend> backend_;
  std::unique_ptr<BlkFront> front_;
};

TEST_F(BlkFrontTest, MultiQueueMultiPageKeysLikeBlkfront) {
  BlkfrontOptions o;
  o.max_queues = 2;
  o.max_ring_page_order = 2;
  Attach(AllFeatures(), o);
  EXPECT_EQ(backend_->Fe("multi-queue-num-queues"), "2");
  EXPECT_EQ(backend_->Fe("ring-page-order"), "2");
  EXPECT_NE(backend_->Fe("queue-1/ring-ref3"), "<absent>");
  EXPECT_NE(backend_->Fe("queue-0/event-channel"), "<absent>");
  EXPECT_EQ(backend_->Fe("ring-ref"), "<absent>");
  EXPECT_EQ(backend_->Fe("ring-ref0"), "<absent>");
  EXPECT_EQ(backend_->Fe("protocol"), "x86_64-abi");
  EXPECT_EQ(backend_->Fe("feature-persistent"), "1");
  EXPECT_EQ(backend_->Fe("state"), "4");
  EXPECT_EQ(front_->device().num_queues, 2u);
  EXPECT_EQ(front_->device().ring_entries, 128u);
  EXPECT_EQ(front_->device().indirect_segments, 64u);
  RunWorkload(256);
  EXPECT_GT(backend_->indirect.load(), 0u);
}

TEST_F(BlkFrontTest, SingleQueueLegacyRingRefWithNothingOffered) {
  Attach({}, BlkfrontOptions{});
  EXPECT_NE(backend_->Fe("ring-ref"), "<absent>");
  EXPECT_EQ(backend_->Fe("ring-page-order"), "<absent>");
  EXPECT_EQ(backend_->Fe("multi-queue-num-queues"), "<absent>");
  EXPECT_EQ(front_->device().indirect_segments, 0u);
  EXPECT_FALSE(front_->device().persistent);
  EXPECT_FALSE(front_->Supports(BlkOp::kFlush));
  EXPECT_FALSE(front_->Supports(BlkOp::kDiscard));
  EXPECT_EQ(front_->max_sectors_per_io(), 88u);
  RunWorkload(88);
  // Without persistent grants every grant is ended after its request.
  EXPECT_EQ(front_->stats().grants_created - front_->stats().grants_ended, 1u);  // the ring page
}

TEST_F(BlkFrontTest, X86_32AbiRoundTripsData) {
  BlkfrontOptions o;
  o.abi = BlkifAbi::kX86_32;
  o.max_queues = 1;
  Attach(AllFeatures(), o);
  EXPECT_EQ(backend_->Fe("protocol"), "x86_32-abi");
  RunWorkload(128);
}

TEST_F(BlkFrontTest, PersistentGrantsAreReused) {
  BlkfrontOptions o;
  o.max_queues = 1;
  Attach(AllFeatures(), o);
  std::vector<uint8_t> buf(64 * 512, 1);
  for (int i = 0; i < 50; ++i) {
    auto st = ExecuteSync(*front_, BlkIo{BlkOp::kWrite, uint64_t(i) * 64, 64, buf.data(), uint64_t(i) + 1});
    ASSERT_TRUE(st.ok() && *st == 0);
  }
  // 8 ring pages + 8 data pages, granted once and reused.
  EXPECT_EQ(front_->stats().grants_created, 16u);
  EXPECT_EQ(backend_->maps.load(), 8u);
}

TEST_F(BlkFrontTest, FeatureSwitchesOverrideWhatTheBackendOffers) {
  BlkfrontOptions o;
  o.persistent_grants = false;
  o.max_indirect_segments = 0;
  o.use_flush = false;
  o.use_discard = false;
  o.use_barrier = false;
  o.write_protocol = false;
  o.legacy_single_page_keys = true;
  o.max_queues = 1;
  Attach(AllFeatures(), o);
  EXPECT_EQ(backend_->Fe("feature-persistent"), "0");
  EXPECT_EQ(backend_->Fe("protocol"), "<absent>");
  EXPECT_NE(backend_->Fe("ring-ref"), "<absent>");
  EXPECT_FALSE(front_->Supports(BlkOp::kFlush));
  EXPECT_FALSE(front_->Supports(BlkOp::kWriteBarrier));
  EXPECT_EQ(front_->Submit(BlkIo{BlkOp::kDiscard, 0, 8, nullptr, 1}).code(), ErrorCode::kNotSupported);
  EXPECT_EQ(front_->max_sectors_per_io(), 88u);
}

TEST_F(BlkFrontTest, FrontendNotWaitingForInitWaitSettlesDataFeaturesAtConnect) {
  // The frontend writes its keys before the backend has published anything;
  // persistent grants and indirect descriptors must still follow what the
  // backend offers by Connected (the backend maps persistent grants
  // read-write, so a frontend that thought otherwise would see errors).
  backend_ = std::make_unique<MiniBackend>(*hv_, AllFeatures(), 8192);
  backend_->PublishDirs();
  BlkfrontOptions o;
  o.wait_for_initwait = false;
  o.handshake_timeout_ms = 5000;
  Result<std::unique_ptr<BlkFront>> attached = Status::Internal("not run");
  std::thread t([&] { attached = BlkFront::Attach(*guest_, kDevid, o); });
  for (int i = 0; i < 500 && backend_->Fe("state") != "3"; ++i) usleep(10000);
  ASSERT_EQ(backend_->Fe("state"), "3");
  EXPECT_NE(backend_->Fe("ring-ref"), "<absent>");  // no order offered yet: one page
  backend_->PublishFeatures();
  backend_->ConnectAndServe();
  t.join();
  ASSERT_TRUE(attached.ok()) << attached.status().ToString();
  front_ = std::move(*attached);
  EXPECT_TRUE(front_->device().persistent);
  EXPECT_EQ(front_->device().indirect_segments, 64u);
  RunWorkload(256);
}

TEST_F(BlkFrontTest, DisconnectWaitsForBackendAndEndsEveryGrant) {
  BlkfrontOptions o;
  o.max_queues = 2;
  Attach(AllFeatures(), o);
  RunWorkload(64);
  Status s = DisconnectBoth();
  EXPECT_TRUE(s.ok()) << s.ToString();
  EXPECT_EQ(front_->leaked_grants(), 0u);
  EXPECT_EQ(guest_->GrantsInUse(), 0u);
  EXPECT_EQ(backend_->Fe("state"), "6");
}

}  // namespace
}  // namespace cowtap::xen
