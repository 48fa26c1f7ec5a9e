// cowtap_libxen_smoke: exercises the libxen platform on a real Xen dom0 —
// xenstore (read/write/directory/permissions/watches/transactions), event
// channels (a dom0 -> dom0 interdomain pair across two handles), grants
// (dom0 shares pages with itself through gntalloc, then maps and copies them
// through the platform) and DomainAlive. Prints one line per check and
// "N passed, M failed"; exit status 0 only if all passed. On a machine
// without Xen it prints why and exits 77 (skip).
#include <poll.h>
#include <stdint.h>  // the Xen public headers need it first
#include <sys/mman.h>

#include <cstdio>
#include <cstring>
#include <string>

extern "C" {  // the libxen headers have no C++ guards
#include <xengnttab.h>
}

#include "xen-glue/platform.h"

namespace {

int passed = 0, failed = 0;

void Check(bool ok, const std::string& what, const cowtap::Status& s = cowtap::Status::Ok()) {
  std::printf("%s %s%s%s\n", ok ? "PASS" : "FAIL", what.c_str(), s.ok() ? "" : ": ", s.ok() ? "" : s.ToString().c_str());
  (ok ? passed : failed)++;
}

bool Readable(int fd, int timeout_ms) {
  pollfd p{fd, POLLIN, 0};
  return poll(&p, 1, timeout_ms) == 1;
}

using namespace cowtap::xen;  // NOLINT: a small main

void XenStoreChecks(XenPlatform& platform) {
  auto xs = platform.OpenXenStore();
  Check(xs.ok(), "open xenstore", xs.status());
  if (!xs.ok()) return;
  XenStore& x = **xs;
  const std::string dir = "/local/domain/0/cowtap-smoke";
  x.Remove(dir).IgnoreError();
  Check(x.Watch(dir, "tok").ok(), "watch");
  Check(Readable(x.fd(), 2000), "watch fires on registration");
  while (auto e = *x.ReadWatch()) {
  }
  Check(x.Write(dir + "/a", "hello").ok(), "write");
  auto v = x.Read(dir + "/a");
  Check(v.ok() && *v == "hello", "read back", v.status());
  Check(x.Read(dir + "/missing").status().code() == cowtap::ErrorCode::kNotFound, "missing key is kNotFound");
  auto names = x.Directory(dir);
  Check(names.ok() && names->size() == 1 && (*names)[0] == "a", "directory", names.status());
  const XsPermission perms[] = {{0, XsAccess::kNone}, {5, XsAccess::kRead}};
  Check(x.SetPermissions(dir + "/a", perms).ok(), "set permissions");
  auto got = x.GetPermissions(dir + "/a");
  Check(got.ok() && got->size() == 2 && (*got)[1] == perms[1], "get permissions", got.status());
  Check(Readable(x.fd(), 2000), "watch fires on change");
  auto e = x.ReadWatch();
  Check(e.ok() && e->has_value() && (*e)->token == "tok", "watch event read", e.status());

  auto tx = x.TransactionStart();
  Check(tx.ok(), "transaction start", tx.status());
  if (tx.ok()) {
    Check(x.Read(dir + "/a", *tx).ok(), "read in transaction");
    Check(x.Write(dir + "/b", "tx", *tx).ok(), "write in transaction");
    Check(x.Write(dir + "/a", "racer").ok(), "conflicting write outside");
    cowtap::Status end = x.TransactionEnd(*tx, true);
    Check(end.code() == cowtap::ErrorCode::kBusy, "conflicting commit is kBusy", end);
  }
  cowtap::Status retry = RunXsTransaction(x, [&](XsTransaction t) { return x.Write(dir + "/c", "1", t); });
  Check(retry.ok(), "transaction commit", retry);
  Check(x.Remove(dir).ok() && x.Remove(dir).ok(), "recursive and idempotent remove");
}

void EventChannelChecks(XenPlatform& platform) {
  auto a = platform.OpenEventChannel();
  auto b = platform.OpenEventChannel();
  Check(a.ok() && b.ok(), "open two event-channel handles", a.ok() ? b.status() : a.status());
  if (!a.ok() || !b.ok()) return;
  auto pa = (*a)->BindUnbound(0);
  Check(pa.ok(), "bind unbound", pa.status());
  if (!pa.ok()) return;
  auto pb = (*b)->BindInterdomain(0, *pa);
  Check(pb.ok(), "bind interdomain", pb.status());
  if (!pb.ok()) return;
  auto none = (*a)->Pending();
  Check(none.ok() && !none->has_value(), "Pending is non-blocking", none.status());
  Check((*b)->Notify(*pb).ok(), "notify");
  Check(Readable((*a)->fd(), 2000), "fd readable after notify");
  auto p = (*a)->Pending();
  Check(p.ok() && *p == std::optional<EvtchnPort>(*pa), "Pending returns the port", p.status());
  Check((*a)->Unmask(*pa).ok(), "unmask");
  Check((*a)->Notify(*pa).ok() && Readable((*b)->fd(), 2000), "notify the other way");
  Check((*b)->Unbind(*pb).ok(), "unbind");
}

void GrantChecks(XenPlatform& platform) {
  xengntshr_handle* shr = xengntshr_open(nullptr, 0);
  Check(shr != nullptr, "xengntshr_open (gntalloc)");
  if (shr == nullptr) return;
  uint32_t refs[2];
  auto* shared = static_cast<uint8_t*>(xengntshr_share_pages(shr, 0, 2, refs, 1));
  Check(shared != nullptr, "share 2 pages with dom0");
  if (shared == nullptr) return;
  std::memset(shared, 0x5A, 2 * kPageSize);
  auto gt = platform.OpenGrantTable();
  Check(gt.ok(), "open grant table", gt.status());
  if (gt.ok()) {
    auto m = (*gt)->Map(0, refs, true);
    Check(m.ok(), "map a batch of 2 refs", m.status());
    if (m.ok()) {
      Check((*m)->page(1)[10] == 0x5A, "mapped page shows the granter's bytes");
      (*m)->page(0)[0] = 0xA5;
      Check(shared[0] == 0xA5, "write through the mapping is seen by the granter");
      m->reset();
    }
    uint32_t bad[] = {refs[0] + 100000};
    auto bogus = (*gt)->Map(0, bad, false);
    Check(!bogus.ok(), "map of a bogus ref fails (" + bogus.status().ToString() + ")");
    uint32_t ro_ref[1];
    void* ro = xengntshr_share_pages(shr, 0, 1, ro_ref, 0);
    Check(ro != nullptr, "share a page read-only");
    if (ro != nullptr) {
      auto rw = (*gt)->Map(0, ro_ref, true);
      Check(!rw.ok(), "writable map of a read-only grant fails (" + rw.status().ToString() + ")");
      auto r = (*gt)->Map(0, ro_ref, false);
      Check(r.ok(), "read-only map of a read-only grant", r.status());
      r = cowtap::Status::Cancelled("unmapped");
      xengntshr_unshare(shr, ro, 1);
    }
    uint8_t buf[64] = {};
    GrantCopyOp op{GrantCopyOp::Direction::kFromGuest, 0, refs[1], 100, 64, buf, {}};
    cowtap::Status s = (*gt)->Copy({&op, 1});
    Check(s.ok() && op.status.ok() && buf[0] == 0x5A, "grant copy from the granter", s.ok() ? op.status : s);
  }
  xengntshr_unshare(shr, shared, 2);
  xengntshr_close(shr);
}

}  // namespace

int main() {
  auto platform = NewLibxenPlatform();
  if (!platform.ok()) {
    std::printf("SKIP %s\n", platform.status().ToString().c_str());
    return 77;
  }
  Check((*platform)->DomainAlive(0), "dom0 is alive");
  Check(!(*platform)->DomainAlive(31000), "an unknown domain is not alive");
  XenStoreChecks(**platform);
  EventChannelChecks(**platform);
  GrantChecks(**platform);
  std::printf("%d passed, %d failed\n", passed, failed);
  return failed == 0 ? 0 : 1;
}
