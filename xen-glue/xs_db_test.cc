#include "xen-glue/xs_db.h"

#include <poll.h>

#include <algorithm>

#include <gmock/gmock.h>
#include <gtest/gtest.h>

namespace cowtap::xen {
namespace {

using ::testing::UnorderedElementsAre;

class XsDbTest : public ::testing::Test {
 protected:
  std::unique_ptr<XenStore> Open(DomId domid) {
    auto r = XsDb::Connect(db_, domid);
    EXPECT_TRUE(r.ok()) << r.status().ToString();
    return std::move(r).value();
  }
  static bool Readable(int fd) {
    pollfd p{fd, POLLIN, 0};
    return poll(&p, 1, 0) == 1;
  }
  static std::vector<XsWatchEvent> Drain(XenStore& xs) {
    std::vector<XsWatchEvent> out;
    while (true) {
      auto e = xs.ReadWatch();
      EXPECT_TRUE(e.ok());
      if (!e.ok() || !e->has_value()) break;
      out.push_back(**e);
    }
    return out;
  }

  std::shared_ptr<XsDb> db_ = std::make_shared<XsDb>();
};

TEST_F(XsDbTest, WriteCreatesParentsAndReadsBack) {
  auto xs = Open(0);
  ASSERT_TRUE(xs->Write("/a/b/c", "v").ok());
  EXPECT_EQ(*xs->Read("/a/b/c"), "v");
  EXPECT_EQ(*xs->Read("/a/b"), "");
  EXPECT_THAT(*xs->Directory("/a"), UnorderedElementsAre("b"));
  ASSERT_TRUE(xs->Write("/a/b/c", "w").ok());
  EXPECT_EQ(*xs->Read("/a/b/c"), "w");
}

TEST_F(XsDbTest, ReadMissingIsNotFound) {
  auto xs = Open(0);
  EXPECT_EQ(xs->Read("/nope").status().code(), ErrorCode::kNotFound);
  EXPECT_EQ(xs->Directory("/nope").status().code(), ErrorCode::kNotFound);
}

TEST_F(XsDbTest, InvalidPathsRejected) {
  auto xs = Open(0);
  EXPECT_EQ(xs->Write("relative", "x").code(), ErrorCode::kInvalidArgument);
  EXPECT_EQ(xs->Write("/a//b", "x").code(), ErrorCode::kInvalidArgument);
  EXPECT_EQ(xs->Write("/a/", "x").code(), ErrorCode::kInvalidArgument);
  EXPECT_EQ(xs->Write("/a b", "x").code(), ErrorCode::kInvalidArgument);
  EXPECT_EQ(xs->Write("/a", std::string(kXsMaxValueBytes + 1, 'x')).code(), ErrorCode::kInvalidArgument);
}

TEST_F(XsDbTest, MkdirKeepsExistingValue) {
  auto xs = Open(0);
  ASSERT_TRUE(xs->Write("/a", "keep").ok());
  ASSERT_TRUE(xs->Mkdir("/a").ok());
  EXPECT_EQ(*xs->Read("/a"), "keep");
  ASSERT_TRUE(xs->Mkdir("/b/c").ok());
  EXPECT_EQ(*xs->Read("/b/c"), "");
}

TEST_F(XsDbTest, RemoveIsRecursiveAndIdempotent) {
  auto xs = Open(0);
  ASSERT_TRUE(xs->Write("/a/b/c", "1").ok());
  ASSERT_TRUE(xs->Write("/a/b/d", "2").ok());
  ASSERT_TRUE(xs->Write("/a/bb", "3").ok());
  ASSERT_TRUE(xs->Remove("/a/b").ok());
  EXPECT_EQ(xs->Read("/a/b/c").status().code(), ErrorCode::kNotFound);
  EXPECT_EQ(xs->Read("/a/b").status().code(), ErrorCode::kNotFound);
  EXPECT_EQ(*xs->Read("/a/bb"), "3");  // a sibling sharing the prefix survives
  EXPECT_TRUE(xs->Remove("/a/b").ok());
  EXPECT_EQ(xs->Remove("/").code(), ErrorCode::kInvalidArgument);
}

TEST_F(XsDbTest, GuestCannotReadOrWriteDom0Nodes) {
  auto dom0 = Open(0);
  auto guest = Open(5);
  ASSERT_TRUE(dom0->Write("/local/domain/0/secret", "x").ok());
  EXPECT_EQ(guest->Read("/local/domain/0/secret").status().code(), ErrorCode::kReadOnly);
  EXPECT_EQ(guest->Write("/local/domain/0/secret", "y").code(), ErrorCode::kReadOnly);
  EXPECT_EQ(guest->Write("/local/domain/0/new", "y").code(), ErrorCode::kReadOnly);
  EXPECT_EQ(guest->Remove("/local/domain/0/secret").code(), ErrorCode::kReadOnly);
  EXPECT_EQ(*dom0->Read("/local/domain/0/secret"), "x");
}

TEST_F(XsDbTest, PermissionsGrantReadAndChildrenInherit) {
  auto dom0 = Open(0);
  auto guest = Open(5);
  ASSERT_TRUE(dom0->Mkdir("/be").ok());
  std::vector<XsPermission> perms = {{0, XsAccess::kNone}, {5, XsAccess::kRead}};
  ASSERT_TRUE(dom0->SetPermissions("/be", perms).ok());
  ASSERT_TRUE(dom0->Write("/be/state", "1").ok());
  EXPECT_EQ(*guest->Read("/be/state"), "1");
  EXPECT_EQ(*dom0->GetPermissions("/be/state"), perms);
  EXPECT_EQ(guest->Write("/be/state", "4").code(), ErrorCode::kReadOnly);
  // Another guest is not listed: default access "n".
  auto other = Open(6);
  EXPECT_EQ(other->Read("/be/state").status().code(), ErrorCode::kReadOnly);
}

TEST_F(XsDbTest, GuestOwnsWhatItCreatesAndOnlyOwnerChangesPerms) {
  db_->IntroduceDomain(5);
  auto guest = Open(5);
  auto other = Open(6);
  ASSERT_TRUE(guest->Write("/local/domain/5/device/vbd/1/state", "1").ok());
  auto perms = *guest->GetPermissions("/local/domain/5/device/vbd/1/state");
  ASSERT_FALSE(perms.empty());
  EXPECT_EQ(perms[0].domid, 5);
  std::vector<XsPermission> give_away = {{6, XsAccess::kNone}};
  EXPECT_EQ(guest->SetPermissions("/local/domain/5/device", give_away).code(), ErrorCode::kReadOnly);
  std::vector<XsPermission> open = {{5, XsAccess::kRead}};
  EXPECT_EQ(other->SetPermissions("/local/domain/5/device", open).code(), ErrorCode::kReadOnly);
  EXPECT_TRUE(guest->SetPermissions("/local/domain/5/device", open).ok());
}

TEST_F(XsDbTest, GuestNodeQuotaEnforced) {
  db_->IntroduceDomain(5);
  auto guest = Open(5);
  Status last;
  for (size_t i = 0; i < kXsMaxNodesPerDomain + 5 && last.ok(); ++i) {
    last = guest->Write("/local/domain/5/n" + std::to_string(i), "x");
  }
  EXPECT_EQ(last.code(), ErrorCode::kNoSpace);
}

TEST_F(XsDbTest, WatchFiresOnRegistrationAndOncePerChangeBelow) {
  auto xs = Open(0);
  ASSERT_TRUE(xs->Watch("/w", "tok").ok());
  EXPECT_TRUE(Readable(xs->fd()));
  EXPECT_THAT(Drain(*xs), ::testing::ElementsAre(XsWatchEvent{"/w", "tok"}));
  EXPECT_FALSE(Readable(xs->fd()));
  ASSERT_TRUE(xs->Write("/w/a/b", "1").ok());  // creates /w, /w/a, /w/a/b: one event
  ASSERT_TRUE(xs->Write("/wx", "1").ok());     // not below /w
  ASSERT_TRUE(xs->Write("/w/a/b", "2").ok());
  EXPECT_TRUE(Readable(xs->fd()));
  EXPECT_THAT(Drain(*xs), ::testing::ElementsAre(XsWatchEvent{"/w/a/b", "tok"}, XsWatchEvent{"/w/a/b", "tok"}));
  EXPECT_FALSE(Readable(xs->fd()));
}

TEST_F(XsDbTest, RemovingParentFiresWatchBelow) {
  auto xs = Open(0);
  ASSERT_TRUE(xs->Write("/p/q/r", "1").ok());
  ASSERT_TRUE(xs->Watch("/p/q/r", "t").ok());
  Drain(*xs);
  ASSERT_TRUE(xs->Remove("/p").ok());
  EXPECT_THAT(Drain(*xs), ::testing::ElementsAre(XsWatchEvent{"/p/q/r", "t"}));
}

TEST_F(XsDbTest, WatchesAreIsolatedPerHandleAndUnwatchStops) {
  auto a = Open(0);
  auto b = Open(0);
  ASSERT_TRUE(a->Watch("/x", "ta").ok());
  Drain(*a);
  ASSERT_TRUE(b->Write("/x", "1").ok());
  EXPECT_EQ(Drain(*b).size(), 0u);
  EXPECT_EQ(Drain(*a).size(), 1u);
  EXPECT_EQ(a->Watch("/x", "ta").code(), ErrorCode::kInvalidArgument);
  ASSERT_TRUE(a->Unwatch("/x", "ta").ok());
  ASSERT_TRUE(b->Write("/x", "2").ok());
  EXPECT_EQ(Drain(*a).size(), 0u);
  EXPECT_EQ(a->Unwatch("/x", "ta").code(), ErrorCode::kNotFound);
}

TEST_F(XsDbTest, GuestWatchDoesNotSeeUnreadableNodes) {
  auto dom0 = Open(0);
  auto guest = Open(5);
  ASSERT_TRUE(guest->Watch("/local/domain/0", "t").ok());
  Drain(*guest);
  ASSERT_TRUE(dom0->Write("/local/domain/0/secret", "x").ok());
  EXPECT_EQ(Drain(*guest).size(), 0u);
}

TEST_F(XsDbTest, SpecialWatchesFire) {
  auto xs = Open(0);
  ASSERT_TRUE(xs->Watch("@releaseDomain", "rel").ok());
  ASSERT_TRUE(xs->Watch("@introduceDomain", "intro").ok());
  Drain(*xs);
  db_->IntroduceDomain(7);
  db_->FireSpecial("@releaseDomain");
  EXPECT_THAT(Drain(*xs), ::testing::ElementsAre(XsWatchEvent{"@introduceDomain", "intro"},
                                                 XsWatchEvent{"@releaseDomain", "rel"}));
  EXPECT_EQ(*xs->Read("/local/domain/7"), "");
  EXPECT_EQ((*xs->GetPermissions("/local/domain/7"))[0].domid, 7);
  EXPECT_EQ(xs->Watch("@bogus", "x").code(), ErrorCode::kInvalidArgument);
}

TEST_F(XsDbTest, TransactionIsolatedUntilCommit) {
  auto a = Open(0);
  auto b = Open(0);
  ASSERT_TRUE(b->Watch("/t", "w").ok());
  Drain(*b);
  auto tx = a->TransactionStart();
  ASSERT_TRUE(tx.ok());
  ASSERT_TRUE(a->Write("/t/k", "v", *tx).ok());
  EXPECT_EQ(*a->Read("/t/k", *tx), "v");
  EXPECT_EQ(b->Read("/t/k").status().code(), ErrorCode::kNotFound);
  EXPECT_EQ(Drain(*b).size(), 0u);  // no watch before commit
  ASSERT_TRUE(a->TransactionEnd(*tx, true).ok());
  EXPECT_EQ(*b->Read("/t/k"), "v");
  EXPECT_EQ(Drain(*b).size(), 1u);
}

TEST_F(XsDbTest, TransactionAbortDiscards) {
  auto a = Open(0);
  auto tx = a->TransactionStart();
  ASSERT_TRUE(a->Write("/t", "v", *tx).ok());
  ASSERT_TRUE(a->TransactionEnd(*tx, false).ok());
  EXPECT_EQ(a->Read("/t").status().code(), ErrorCode::kNotFound);
  EXPECT_EQ(a->TransactionEnd(*tx, true).code(), ErrorCode::kInvalidArgument);
}

TEST_F(XsDbTest, TransactionConflictIsBusyAndNothingApplied) {
  auto a = Open(0);
  auto b = Open(0);
  ASSERT_TRUE(a->Write("/c/state", "1").ok());
  auto tx = a->TransactionStart();
  EXPECT_EQ(*a->Read("/c/state", *tx), "1");
  ASSERT_TRUE(a->Write("/c/other", "x", *tx).ok());
  ASSERT_TRUE(b->Write("/c/state", "2").ok());  // someone else changes what we read
  EXPECT_EQ(a->TransactionEnd(*tx, true).code(), ErrorCode::kBusy);
  EXPECT_EQ(a->Read("/c/other").status().code(), ErrorCode::kNotFound);
}

TEST_F(XsDbTest, TransactionOnUnrelatedNodesDoesNotConflict) {
  auto a = Open(0);
  auto b = Open(0);
  ASSERT_TRUE(a->Write("/c/mine", "1").ok());
  ASSERT_TRUE(a->Write("/d/theirs", "1").ok());
  auto tx = a->TransactionStart();
  ASSERT_TRUE(a->Write("/c/mine", "2", *tx).ok());
  ASSERT_TRUE(b->Write("/d/theirs", "2").ok());
  EXPECT_TRUE(a->TransactionEnd(*tx, true).ok());
  EXPECT_EQ(*a->Read("/c/mine"), "2");
}

TEST_F(XsDbTest, DirectoryInTransactionConflictsWithNewChild) {
  auto a = Open(0);
  auto b = Open(0);
  ASSERT_TRUE(a->Mkdir("/dir").ok());
  auto tx = a->TransactionStart();
  EXPECT_TRUE(a->Directory("/dir", *tx)->empty());
  ASSERT_TRUE(a->Write("/flag", "1", *tx).ok());
  ASSERT_TRUE(b->Write("/dir/new", "x").ok());
  EXPECT_EQ(a->TransactionEnd(*tx, true).code(), ErrorCode::kBusy);
}

TEST_F(XsDbTest, RunXsTransactionRetriesAfterConflict) {
  auto a = Open(0);
  auto b = Open(0);
  ASSERT_TRUE(a->Write("/counter", "0").ok());
  int attempts = 0;
  Status s = RunXsTransaction(*a, [&](XsTransaction tx) -> Status {
    ++attempts;
    COWTAP_ASSIGN_OR_RETURN(std::string v, a->Read("/counter", tx));
    if (attempts == 1) COWTAP_RETURN_IF_ERROR(b->Write("/counter", "10"));  // interferes once
    return a->Write("/counter", std::to_string(std::stoi(v) + 1), tx);
  });
  ASSERT_TRUE(s.ok()) << s.ToString();
  EXPECT_EQ(attempts, 2);
  EXPECT_EQ(*a->Read("/counter"), "11");
}

TEST_F(XsDbTest, GuestTransactionQuota) {
  auto guest = Open(5);
  Status last;
  for (size_t i = 0; i <= kXsMaxTransactionsPerConnection; ++i) last = guest->TransactionStart().status();
  EXPECT_EQ(last.code(), ErrorCode::kNoSpace);
}

TEST_F(XsDbTest, EventQueueIsBounded) {
  auto xs = Open(0);
  ASSERT_TRUE(xs->Watch("/q", "t").ok());
  for (size_t i = 0; i < kXsMaxQueuedEvents + 10; ++i) ASSERT_TRUE(xs->Write("/q", "x").ok());
  EXPECT_EQ(Drain(*xs).size(), kXsMaxQueuedEvents);
}

TEST(XsUtilTest, PermissionRoundTrip) {
  for (const char* text : {"n0", "r5", "w65535", "b12"}) {
    auto p = ParsePermission(text);
    ASSERT_TRUE(p.ok()) << text;
    EXPECT_EQ(FormatPermission(*p), text);
  }
  EXPECT_EQ(FormatPermission({7, XsAccess::kReadWrite}), "b7");
  for (const char* bad : {"", "r", "x5", "r-1", "r65536", "r5x", "R5"}) {
    EXPECT_FALSE(ParsePermission(bad).ok()) << bad;
  }
}

TEST(XsUtilTest, PathJoinsAndDeviceDirs) {
  EXPECT_EQ(XsJoin("/a", "b"), "/a/b");
  EXPECT_EQ(XsJoin("/a/", "/b"), "/a/b");
  EXPECT_EQ(XsJoin("/", "b"), "/b");
  EXPECT_EQ(XsJoin("/a", ""), "/a");
  EXPECT_EQ(XsBackendDir(0, "vbd", 5, 51712), "/local/domain/0/backend/vbd/5/51712");
  EXPECT_EQ(XsFrontendDir(5, "vbd", 51712), "/local/domain/5/device/vbd/51712");
}

}  // namespace
}  // namespace cowtap::xen
