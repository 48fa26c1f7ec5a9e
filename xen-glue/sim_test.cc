// The sim hypervisor with a guest in the same process (over the socket, as
// a separate process would talk to it): grants, grant copy, event channels,
// the guest's xenstore client, domain death and the toolstack helper.
#include "xen-glue/sim.h"

#include <poll.h>
#include <signal.h>
#include <stdint.h>
#include <unistd.h>
#include <xen/grant_table.h>

#include <atomic>
#include <cstring>
#include <thread>

#include <gmock/gmock.h>
#include <gtest/gtest.h>

// ASan and TSan catch SIGSEGV, report it and exit instead of dying by it.
#if defined(__SANITIZE_ADDRESS__) || defined(__SANITIZE_THREAD__)
#define SANITIZER_CATCHES_SEGV 1
#elif defined(__has_feature)
#if __has_feature(address_sanitizer) || __has_feature(thread_sanitizer)
#define SANITIZER_CATCHES_SEGV 1
#endif
#endif
#ifndef SANITIZER_CATCHES_SEGV
#define SANITIZER_CATCHES_SEGV 0
#endif

namespace cowtap::xen {
namespace {

std::string TestSocketPath() {
  return "/tmp/cowtap-sim-" + std::to_string(getpid()) + "-" +
         ::testing::UnitTest::GetInstance()->current_test_info()->name() + ".sock";
}

bool Readable(int fd, int timeout_ms = 0) {
  pollfd p{fd, POLLIN, 0};
  return poll(&p, 1, timeout_ms) == 1;
}

class SimTest : public ::testing::Test {
 protected:
  void SetUp() override {
    auto hv = SimHypervisor::Start(TestSocketPath());
    ASSERT_TRUE(hv.ok()) << hv.status().ToString();
    hv_ = std::move(hv).value();
    platform_ = hv_->NewPlatform();
    auto gt = platform_->OpenGrantTable();
    ASSERT_TRUE(gt.ok());
    gt_ = std::move(gt).value();
    auto guest = SimGuest::Connect(hv_->socket_path(), {.domid = 5, .ram_pages = 64, .grant_entries = 128});
    ASSERT_TRUE(guest.ok()) << guest.status().ToString();
    guest_ = std::move(guest).value();
  }

  GrantRef Grant(uint32_t page, bool readonly = false, DomId to = kDom0) {
    auto ref = guest_->GrantAccess(page, to, readonly);
    EXPECT_TRUE(ref.ok()) << ref.status().ToString();
    return ref.ok() ? *ref : 0;
  }

  std::unique_ptr<SimHypervisor> hv_;
  std::unique_ptr<XenPlatform> platform_;
  std::unique_ptr<GrantTable> gt_;
  std::unique_ptr<SimGuest> guest_;
  std::atomic<uint32_t> benchmark_sink_{0};
};

TEST_F(SimTest, GuestGetsRequestedDomidAndIsAlive) {
  EXPECT_EQ(guest_->domid(), 5);
  EXPECT_TRUE(platform_->DomainAlive(5));
  EXPECT_TRUE(platform_->DomainAlive(kDom0));
  EXPECT_FALSE(platform_->DomainAlive(6));
  EXPECT_EQ(platform_->self_domid(), kDom0);
  auto again = SimGuest::Connect(hv_->socket_path(), {.domid = 5});
  EXPECT_EQ(again.status().code(), ErrorCode::kBusy);
  auto any = SimGuest::Connect(hv_->socket_path(), {});
  ASSERT_TRUE(any.ok());
  EXPECT_NE((*any)->domid(), 0);
  EXPECT_NE((*any)->domid(), 5);
}

TEST_F(SimTest, ConnectRejectsOversizedGuest) {
  auto big = SimGuest::Connect(hv_->socket_path(), {.ram_pages = kMaxGuestRamPages + 1});
  EXPECT_EQ(big.status().code(), ErrorCode::kInvalidArgument);
  auto none = SimGuest::Connect("/tmp/cowtap-no-such.sock", {});
  EXPECT_FALSE(none.ok());
}

TEST_F(SimTest, MappedPagesAreSharedBothWays) {
  uint32_t p0 = *guest_->AllocPage(), p1 = *guest_->AllocPage();
  std::memset(guest_->Page(p0), 0xAB, kPageSize);
  std::memset(guest_->Page(p1), 0xCD, kPageSize);
  GrantRef refs[] = {Grant(p0), Grant(p1)};
  auto m = gt_->Map(5, refs, true);
  ASSERT_TRUE(m.ok()) << m.status().ToString();
  EXPECT_EQ((*m)->pages(), 2u);
  EXPECT_EQ((*m)->page(0)[100], 0xAB);
  EXPECT_EQ((*m)->page(1)[4095], 0xCD);
  (*m)->page(1)[7] = 0x11;
  EXPECT_EQ(guest_->Page(p1)[7], 0x11);  // zero copy: same memory
  guest_->Page(p0)[9] = 0x22;
  EXPECT_EQ((*m)->page(0)[9], 0x22);
  EXPECT_EQ(hv_->MappedGrantCount(5), 2u);
  m->reset();
  EXPECT_EQ(hv_->MappedGrantCount(5), 0u);
}

TEST_F(SimTest, InjectedMapFaultFailsTheNthCallOfThatDomainOnly) {
  GrantRef refs[] = {Grant(*guest_->AllocPage())};
  SimFaultRule rule;
  rule.domid = 5;
  rule.skip = 1;  // the second call
  hv_->faults().Set(SimFaultPoint::kGrantMap, rule);
  EXPECT_TRUE(gt_->Map(5, refs, true).ok());
  auto failed = gt_->Map(5, refs, true);
  EXPECT_EQ(failed.status().code(), ErrorCode::kIoError);
  EXPECT_THAT(failed.status().message(), ::testing::HasSubstr("injected grant map failure for domain 5"));
  EXPECT_TRUE(gt_->Map(5, refs, true).ok()) << "count 1: only one call fails";
  EXPECT_EQ(hv_->faults().fired(SimFaultPoint::kGrantMap), 1u);
  EXPECT_EQ(hv_->MappedGrantCount(5), 0u);
}

TEST_F(SimTest, InjectedUnmapFaultLeavesTheRefPinnedForGood) {
  GrantRef refs[] = {Grant(*guest_->AllocPage())};
  auto m = gt_->Map(5, refs, true);
  ASSERT_TRUE(m.ok());
  SimFaultRule rule;
  rule.domid = 5;
  hv_->faults().Set(SimFaultPoint::kGrantUnmap, rule);
  EXPECT_EQ((*m)->Unmap().code(), ErrorCode::kIoError);
  m->reset();  // the destructor does not retry
  EXPECT_EQ(hv_->MappedGrantCount(5), 1u);
  EXPECT_EQ(guest_->EndAccess(refs[0]).code(), ErrorCode::kBusy) << "as after a failed unmap in Xen";
}

TEST_F(SimTest, MapRejectsRefBeyondTable) {
  GrantRef refs[] = {guest_->grant_entries()};
  auto m = gt_->Map(5, refs, false);
  EXPECT_EQ(m.status().code(), ErrorCode::kOutOfRange);
  EXPECT_THAT(m.status().message(), ::testing::HasSubstr("beyond"));
}

TEST_F(SimTest, MapRejectsUnusedRef) {
  GrantRef refs[] = {kFirstGrantRef + 3};
  EXPECT_EQ(gt_->Map(5, refs, false).status().code(), ErrorCode::kInvalidArgument);
}

TEST_F(SimTest, MapRejectsRefGrantedToAnotherDomain) {
  GrantRef refs[] = {Grant(*guest_->AllocPage(), false, /*to=*/9)};
  auto m = gt_->Map(5, refs, false);
  EXPECT_EQ(m.status().code(), ErrorCode::kInvalidArgument);
  EXPECT_THAT(m.status().message(), ::testing::HasSubstr("granted to domain 9"));
}

TEST_F(SimTest, MapRejectsWritableMapOfReadOnlyGrant) {
  GrantRef refs[] = {Grant(*guest_->AllocPage(), /*readonly=*/true)};
  EXPECT_EQ(gt_->Map(5, refs, true).status().code(), ErrorCode::kReadOnly);
  auto ro = gt_->Map(5, refs, false);
  ASSERT_TRUE(ro.ok());
  EXPECT_FALSE((*ro)->writable());
}

TEST_F(SimTest, MapRejectsRevokedRef) {
  GrantRef ref = Grant(*guest_->AllocPage());
  ASSERT_TRUE(guest_->EndAccess(ref).ok());
  GrantRef refs[] = {ref};
  EXPECT_EQ(gt_->Map(5, refs, false).status().code(), ErrorCode::kInvalidArgument);
}

TEST_F(SimTest, MapRejectsFrameBeyondGuestRam) {
  ASSERT_TRUE(guest_->WriteRawGrantEntry(20, GTF_permit_access, kDom0, guest_->ram_pages()).ok());
  GrantRef refs[] = {20};
  EXPECT_EQ(gt_->Map(5, refs, false).status().code(), ErrorCode::kOutOfRange);
}

TEST_F(SimTest, MapRejectsEmptyAndOversizedBatch) {
  EXPECT_EQ(gt_->Map(5, {}, false).status().code(), ErrorCode::kInvalidArgument);
  std::vector<GrantRef> many(GrantTable::kMaxMapBatch + 1, kFirstGrantRef);
  EXPECT_EQ(gt_->Map(5, many, false).status().code(), ErrorCode::kInvalidArgument);
}

TEST_F(SimTest, MapRejectsUnknownDomain) {
  GrantRef refs[] = {kFirstGrantRef};
  EXPECT_EQ(gt_->Map(42, refs, false).status().code(), ErrorCode::kNotFound);
}

TEST_F(SimTest, FailedBatchLeavesNothingMapped) {
  GrantRef good = Grant(*guest_->AllocPage());
  GrantRef refs[] = {good, good + 50};  // second is not in use
  auto m = gt_->Map(5, refs, true);
  EXPECT_FALSE(m.ok());
  EXPECT_THAT(m.status().message(), ::testing::HasSubstr("segment 1"));
  EXPECT_EQ(hv_->MappedGrantCount(5), 0u);
  EXPECT_TRUE(guest_->EndAccess(good).ok());  // the good ref was unpinned
}

TEST_F(SimTest, EndAccessFailsWhileMappedAndSucceedsAfterUnmap) {
  GrantRef ref = Grant(*guest_->AllocPage());
  GrantRef refs[] = {ref};
  auto m1 = gt_->Map(5, refs, false);
  auto m2 = gt_->Map(5, refs, true);  // mapped twice: both pins must go
  ASSERT_TRUE(m1.ok() && m2.ok());
  EXPECT_EQ(guest_->EndAccess(ref).code(), ErrorCode::kBusy);
  m1->reset();
  EXPECT_EQ(guest_->EndAccess(ref).code(), ErrorCode::kBusy);
  m2->reset();
  EXPECT_TRUE(guest_->EndAccess(ref).ok());
  EXPECT_EQ(guest_->GrantsInUse(), 0u);
  EXPECT_EQ(guest_->EndAccess(ref).code(), ErrorCode::kInvalidArgument);
}

TEST_F(SimTest, ForceRevokeKeepsExistingMappingValid) {
  uint32_t page = *guest_->AllocPage();
  GrantRef ref = Grant(page);
  GrantRef refs[] = {ref};
  auto m = gt_->Map(5, refs, true);
  ASSERT_TRUE(m.ok());
  ASSERT_TRUE(guest_->ForceRevoke(ref).ok());
  (*m)->page(0)[0] = 0x5A;  // still valid memory
  EXPECT_EQ(guest_->Page(page)[0], 0x5A);
  EXPECT_FALSE(gt_->Map(5, refs, true).ok());  // new maps of the revoked ref fail
}

TEST(SimDeathTest, ReadOnlyMappingFaultsOnWrite) {
  GTEST_FLAG_SET(death_test_style, "threadsafe");
  auto write_to_read_only_map = [] {
    auto hv = SimHypervisor::Start("/tmp/cowtap-sim-death-" + std::to_string(getpid()) + ".sock");
    auto guest = SimGuest::Connect((*hv)->socket_path(), {.domid = 5});
    unlink((*hv)->socket_path().c_str());  // this process dies without cleaning up
    auto gt = (*hv)->NewPlatform()->OpenGrantTable();
    GrantRef refs[] = {*(*guest)->GrantAccess(*(*guest)->AllocPage(), kDom0, /*readonly=*/true)};
    auto m = (*gt)->Map(5, refs, false);
    if (!m.ok()) _exit(3);  // not the death we look for
    (*m)->page(0)[0] = 1;
  };
#if SANITIZER_CATCHES_SEGV
  EXPECT_DEATH(write_to_read_only_map(), "SEGV");  // the sanitizer reports the fault, then exits
#else
  EXPECT_EXIT(write_to_read_only_map(), ::testing::KilledBySignal(SIGSEGV), "");
#endif
}

TEST_F(SimTest, GrantCopyBothWaysWithPerOpStatus) {
  uint32_t page = *guest_->AllocPage();
  std::memset(guest_->Page(page), 0x33, kPageSize);
  GrantRef rw = Grant(page);
  GrantRef ro = Grant(page, true);
  uint8_t in[16] = {}, out[16];
  std::memset(out, 0x77, sizeof(out));
  GrantCopyOp ops[4];
  ops[0] = {GrantCopyOp::Direction::kFromGuest, 5, rw, 100, 16, in, {}};
  ops[1] = {GrantCopyOp::Direction::kToGuest, 5, rw, 200, 16, out, {}};
  ops[2] = {GrantCopyOp::Direction::kToGuest, 5, ro, 0, 16, out, {}};      // read-only grant
  ops[3] = {GrantCopyOp::Direction::kFromGuest, 5, rw, 4090, 16, in, {}};  // crosses the page
  ASSERT_TRUE(gt_->Copy(ops).ok());
  EXPECT_TRUE(ops[0].status.ok());
  EXPECT_EQ(in[0], 0x33);
  EXPECT_TRUE(ops[1].status.ok());
  EXPECT_EQ(guest_->Page(page)[200], 0x77);
  EXPECT_EQ(ops[2].status.code(), ErrorCode::kReadOnly);
  EXPECT_EQ(guest_->Page(page)[0], 0x33);
  EXPECT_EQ(ops[3].status.code(), ErrorCode::kInvalidArgument);
}

TEST_F(SimTest, EventChannelNotifiesBothWaysWithMasking) {
  auto guest_ev = guest_->OpenEventChannel();
  ASSERT_TRUE(guest_ev.ok()) << guest_ev.status().ToString();
  auto port_g = (*guest_ev)->BindUnbound(kDom0);
  ASSERT_TRUE(port_g.ok()) << port_g.status().ToString();
  auto back_ev = platform_->OpenEventChannel();
  ASSERT_TRUE(back_ev.ok());
  EventChannel& be = **back_ev;
  EventChannel& ge = **guest_ev;
  auto port_b = be.BindInterdomain(5, *port_g);
  ASSERT_TRUE(port_b.ok()) << port_b.status().ToString();
  EXPECT_EQ(be.BindInterdomain(5, *port_g).status().code(), ErrorCode::kInvalidArgument);  // already bound

  EXPECT_FALSE(Readable(be.fd()));
  EXPECT_FALSE((*be.Pending()).has_value());
  ASSERT_TRUE(ge.Notify(*port_g).ok());
  ASSERT_TRUE(ge.Notify(*port_g).ok());
  EXPECT_TRUE(Readable(be.fd(), 1000));
  EXPECT_EQ(*be.Pending(), std::optional<EvtchnPort>(*port_b));  // two notifications coalesce
  EXPECT_FALSE((*be.Pending()).has_value());
  ASSERT_TRUE(ge.Notify(*port_g).ok());
  EXPECT_FALSE(Readable(be.fd(), 50));  // masked until Unmask
  ASSERT_TRUE(be.Unmask(*port_b).ok());
  EXPECT_TRUE(Readable(be.fd(), 1000));  // the event that came while masked is delivered
  EXPECT_EQ(*be.Pending(), std::optional<EvtchnPort>(*port_b));
  ASSERT_TRUE(be.Unmask(*port_b).ok());

  ASSERT_TRUE(be.Notify(*port_b).ok());
  EXPECT_TRUE(Readable(ge.fd(), 1000));
  EXPECT_EQ(*ge.Pending(), std::optional<EvtchnPort>(*port_g));

  EXPECT_EQ(hv_->OpenPortCount(5), 1u);
  ASSERT_TRUE(be.Unbind(*port_b).ok());
  EXPECT_EQ(be.Notify(*port_b).code(), ErrorCode::kInvalidArgument);
  auto rebound = be.BindInterdomain(5, *port_g);  // the guest's port is unbound again
  EXPECT_TRUE(rebound.ok()) << rebound.status().ToString();
}

TEST_F(SimTest, NotificationSpamCoalescesIntoOneEvent) {
  auto ge = guest_->OpenEventChannel();
  auto be = platform_->OpenEventChannel();
  ASSERT_TRUE(ge.ok() && be.ok());
  auto port_g = (*ge)->BindUnbound(kDom0);
  auto port_b = (*be)->BindInterdomain(5, *port_g);
  ASSERT_TRUE(port_b.ok());
  for (int i = 0; i < 100000; ++i) ASSERT_TRUE((*ge)->Notify(*port_g).ok());
  EXPECT_EQ(*(*be)->Pending(), std::optional<EvtchnPort>(*port_b));
  ASSERT_TRUE((*be)->Unmask(*port_b).ok());
  EXPECT_FALSE((*(*be)->Pending()).has_value());
  EXPECT_FALSE(Readable((*be)->fd()));
}

TEST_F(SimTest, MapReadsEntryOnceWhileGuestFlipsIt) {
  uint32_t good_page = *guest_->AllocPage();
  uint32_t other_page = *guest_->AllocPage();
  std::memset(guest_->Page(good_page), 0x42, kPageSize);
  std::memset(guest_->Page(other_page), 0x99, kPageSize);
  const GrantRef ref = 30;
  std::atomic<bool> stop{false};
  std::thread flipper([&] {
    // A hostile guest flipping the entry between a valid grant, a grant to
    // someone else, and a read-only grant of another page.
    for (uint32_t i = 0; !stop.load(); ++i) {
      switch (i % 3) {
        case 0: guest_->WriteRawGrantEntry(ref, GTF_permit_access, kDom0, good_page).IgnoreError(); break;
        case 1: guest_->WriteRawGrantEntry(ref, GTF_permit_access, 9, other_page).IgnoreError(); break;
        case 2:
          guest_->WriteRawGrantEntry(ref, GTF_permit_access | GTF_readonly, kDom0, other_page).IgnoreError();
          break;
      }
    }
  });
  GrantRef refs[] = {ref};
  int mapped = 0;
  for (int i = 0; i < 3000; ++i) {
    auto m = gt_->Map(5, refs, true);
    if (m.ok()) {
      ++mapped;
      // A writable map can only ever be of the valid grant's page.
      EXPECT_EQ((*m)->page(0)[123], 0x42);
    } else {
      EXPECT_TRUE(m.status().code() == ErrorCode::kInvalidArgument || m.status().code() == ErrorCode::kReadOnly ||
                  m.status().code() == ErrorCode::kBusy)
          << m.status().ToString();
    }
  }
  stop.store(true);
  flipper.join();
  EXPECT_EQ(hv_->MappedGrantCount(5), 0u);
  RecordProperty("successful_maps", mapped);
}

TEST_F(SimTest, ConcurrentMapsWhileTheDomainIsDestroyed) {
  std::vector<GrantRef> refs;
  for (int i = 0; i < 8; ++i) refs.push_back(Grant(*guest_->AllocPage()));
  std::atomic<int> ok_maps{0}, dead_maps{0}, other{0};
  std::vector<std::thread> threads;
  for (int t = 0; t < 4; ++t) {
    threads.emplace_back([&, t] {
      for (int i = 0; i < 500; ++i) {
        std::span<const GrantRef> batch(refs.data() + (i + t) % 4, 4);
        const bool writable = (i & 1) != 0;
        auto m = gt_->Map(5, batch, writable);
        if (m.ok()) {
          if (writable) (*m)->page(3)[0] = 1;
          benchmark_sink_ += (*m)->page(2)[0];
          ++ok_maps;
        } else if (m.status().code() == ErrorCode::kCancelled) {
          ++dead_maps;
        } else {
          ++other;
        }
      }
    });
  }
  std::this_thread::sleep_for(std::chrono::milliseconds(2));
  ASSERT_TRUE(hv_->DestroyDomain(5).ok());
  for (auto& th : threads) th.join();
  EXPECT_EQ(other.load(), 0);
  EXPECT_EQ(ok_maps.load() + dead_maps.load(), 2000);
  EXPECT_EQ(hv_->MappedGrantCount(5), 0u);  // every pin released
}

TEST_F(SimTest, BindInterdomainRejectsPortsNotOfferedToUs) {
  auto ge = guest_->OpenEventChannel();
  ASSERT_TRUE(ge.ok());
  auto port = (*ge)->BindUnbound(kDom0);
  ASSERT_TRUE(port.ok());
  auto other_guest = SimGuest::Connect(hv_->socket_path(), {.domid = 6});
  ASSERT_TRUE(other_guest.ok());
  auto other = (*other_guest)->OpenEventChannel();
  ASSERT_TRUE(other.ok());
  auto stolen = (*other)->BindInterdomain(5, *port);  // offered to dom0, not to domain 6
  EXPECT_EQ(stolen.status().code(), ErrorCode::kInvalidArgument);
  EXPECT_THAT(stolen.status().message(), ::testing::HasSubstr("offered to domain 0"));
  auto be = platform_->OpenEventChannel();
  EXPECT_EQ((*be)->BindInterdomain(5, *port + 100).status().code(), ErrorCode::kNotFound);
  EXPECT_EQ((*be)->BindInterdomain(77, 1).status().code(), ErrorCode::kInvalidArgument);
}

TEST_F(SimTest, GuestXenStoreOverSocketWithPermissionsAndWatches) {
  auto gxs = guest_->OpenXenStore();
  ASSERT_TRUE(gxs.ok()) << gxs.status().ToString();
  auto bxs = platform_->OpenXenStore();
  ASSERT_TRUE(bxs.ok());
  XenStore& g = **gxs;
  XenStore& b = **bxs;
  ASSERT_TRUE(g.Write("/local/domain/5/data/x", "hello").ok());
  EXPECT_EQ(*b.Read("/local/domain/5/data/x"), "hello");
  EXPECT_EQ(g.Write("/local/domain/0/x", "no").code(), ErrorCode::kReadOnly);
  EXPECT_THAT(*g.Directory("/local/domain/5/data"), ::testing::ElementsAre("x"));
  EXPECT_EQ((*g.GetPermissions("/local/domain/5/data/x"))[0].domid, 5);

  ASSERT_TRUE(g.Watch("/local/domain/5/data", "tok").ok());
  EXPECT_TRUE(Readable(g.fd(), 1000));
  EXPECT_EQ(**g.ReadWatch(), (XsWatchEvent{"/local/domain/5/data", "tok"}));
  EXPECT_FALSE(Readable(g.fd()));
  ASSERT_TRUE(b.Write("/local/domain/5/data/y", "1").ok());
  EXPECT_TRUE(Readable(g.fd(), 1000));
  EXPECT_EQ(**g.ReadWatch(), (XsWatchEvent{"/local/domain/5/data/y", "tok"}));
  EXPECT_FALSE((*g.ReadWatch()).has_value());

  auto tx = g.TransactionStart();
  ASSERT_TRUE(tx.ok());
  ASSERT_TRUE(g.Write("/local/domain/5/data/x", "tx", *tx).ok());
  ASSERT_TRUE(b.Write("/local/domain/5/data/x", "racer").ok());
  EXPECT_EQ(g.TransactionEnd(*tx, true).code(), ErrorCode::kBusy);
  EXPECT_EQ(*g.Read("/local/domain/5/data/x"), "racer");
}

TEST_F(SimTest, GuestDisconnectKillsDomainButMappingsStayValid) {
  auto bxs = platform_->OpenXenStore();
  ASSERT_TRUE((*bxs)->Watch("@releaseDomain", "rel").ok());
  (*bxs)->ReadWatch().status().IgnoreError();
  uint32_t page = *guest_->AllocPage();
  GrantRef refs[] = {Grant(page)};
  auto m = gt_->Map(5, refs, true);
  ASSERT_TRUE(m.ok());
  auto ge = guest_->OpenEventChannel();
  auto port = (*ge)->BindUnbound(kDom0);
  auto be = platform_->OpenEventChannel();
  auto port_b = (*be)->BindInterdomain(5, *port);
  ASSERT_TRUE(port_b.ok());

  guest_.reset();  // the domain dies
  for (int i = 0; i < 200 && platform_->DomainAlive(5); ++i) std::this_thread::sleep_for(std::chrono::milliseconds(5));
  EXPECT_FALSE(platform_->DomainAlive(5));
  (*m)->page(0)[10] = 1;  // no SIGBUS, no crash
  EXPECT_EQ((*m)->page(0)[10], 1);
  EXPECT_TRUE((*be)->Notify(*port_b).ok());  // notifying a dead peer is harmless
  EXPECT_TRUE(Readable((*bxs)->fd(), 1000));
  EXPECT_EQ(**(*bxs)->ReadWatch(), (XsWatchEvent{"@releaseDomain", "rel"}));
  EXPECT_EQ(gt_->Map(5, refs, false).status().code(), ErrorCode::kCancelled);
  EXPECT_EQ(hv_->OpenPortCount(5), 0u);
  EXPECT_TRUE((*be)->Unbind(*port_b).ok());
  m->reset();
  // The domid may be reused by a new guest.
  auto again = SimGuest::Connect(hv_->socket_path(), {.domid = 5});
  EXPECT_TRUE(again.ok()) << again.status().ToString();
}

TEST_F(SimTest, DestroyDomainClosesTheGuestConnection) {
  auto gxs = guest_->OpenXenStore();
  ASSERT_TRUE(gxs.ok());
  ASSERT_TRUE(hv_->DestroyDomain(5).ok());
  EXPECT_FALSE(hv_->DomainAlive(5));
  Status s;
  for (int i = 0; i < 200 && s.ok(); ++i) {
    s = (*gxs)->Write("/local/domain/5/x", "1");
    if (s.ok()) std::this_thread::sleep_for(std::chrono::milliseconds(5));
  }
  EXPECT_FALSE(s.ok());
  EXPECT_EQ(hv_->DestroyDomain(99).code(), ErrorCode::kNotFound);
}

TEST_F(SimTest, ToolstackWritesVbdDirectoriesWithPermissions) {
  auto bxs = platform_->OpenXenStore();
  auto gxs = guest_->OpenXenStore();
  ASSERT_TRUE(bxs.ok() && gxs.ok());
  SimVbdConfig c{.frontend_domid = 5, .devid = 51712, .params = "/img/disk.qcow2", .writable = false};
  ASSERT_TRUE(ToolstackAddVbd(**bxs, c).ok());
  const std::string be = "/local/domain/0/backend/vbd/5/51712";
  const std::string fe = "/local/domain/5/device/vbd/51712";
  XenStore& b = **bxs;
  XenStore& g = **gxs;
  EXPECT_EQ(*b.Read(be + "/frontend"), fe);
  EXPECT_EQ(*b.Read(be + "/frontend-id"), "5");
  EXPECT_EQ(*b.Read(be + "/params"), "/img/disk.qcow2");
  EXPECT_EQ(*b.Read(be + "/mode"), "r");
  EXPECT_EQ(*b.Read(be + "/device-type"), "disk");
  EXPECT_EQ(*b.Read(be + "/online"), "1");
  EXPECT_EQ(*b.Read(be + "/state"), "1");
  EXPECT_EQ(*b.Read(fe + "/backend"), be);
  EXPECT_EQ(*b.Read(fe + "/backend-id"), "0");
  EXPECT_EQ(*b.Read(fe + "/virtual-device"), "51712");
  EXPECT_EQ(*b.Read(fe + "/state"), "1");
  // The guest reads the backend's keys but cannot change them; it owns its own.
  EXPECT_EQ(*g.Read(be + "/state"), "1");
  EXPECT_EQ(g.Write(be + "/state", "4").code(), ErrorCode::kReadOnly);
  EXPECT_TRUE(g.Write(fe + "/state", "3").ok());
  EXPECT_TRUE(g.Write(fe + "/ring-ref", "8").ok());
  EXPECT_EQ(*b.Read(fe + "/ring-ref"), "8");
  auto other = hv_->NewPlatform(6)->OpenXenStore();
  EXPECT_EQ((*other)->Read(be + "/state").status().code(), ErrorCode::kReadOnly);

  ASSERT_TRUE(ToolstackRemoveVbd(b, c).ok());
  EXPECT_EQ(b.Read(be).status().code(), ErrorCode::kNotFound);
  EXPECT_EQ(b.Read(fe).status().code(), ErrorCode::kNotFound);
  EXPECT_TRUE(ToolstackRemoveVbd(b, c).ok());
}

}  // namespace
}  // namespace cowtap::xen
