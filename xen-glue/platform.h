// XenPlatform: everything the backend needs from Xen — grant tables (map a
// batch of a guest's pages, grant copy), event channels, xenstore and the
// domain-alive check — as small interfaces with two implementations:
//   * libxen (libxen_*.cc): libxengnttab, libxenevtchn, libxenstore and
//     libxenctrl; builds everywhere, opens only in a dom0 with /dev/xen/*.
//   * sim (sim.h, sim_*.cc, same library cowtap_xen): a simulated hypervisor
//     whose guests are separate processes sharing memfd pages.
// The backend is written against these interfaces only; mains choose one.
//
// Thread-safety: a XenPlatform and a GrantTable are thread-safe. An
// EventChannel handle and a XenStore handle are each used by one thread at a
// time (open one per ring / control thread, as with the libxen handles);
// different handles may be used concurrently. A GrantMapping may be read and
// written from any thread and destroyed from any thread (once).
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "base/status.h"

namespace cowtap::xen {

using DomId = uint16_t;
using GrantRef = uint32_t;
using EvtchnPort = uint32_t;

inline constexpr size_t kPageSize = 4096;
inline constexpr DomId kDom0 = 0;

// A batch of guest pages mapped contiguously into this process. Unmaps on
// destruction; the memory must not be touched after that. The guest may
// change the contents at any time (it is shared memory): copy before you
// validate.
class GrantMapping {
 public:
  GrantMapping() = default;
  GrantMapping(const GrantMapping&) = delete;
  GrantMapping& operator=(const GrantMapping&) = delete;
  virtual ~GrantMapping() = default;

  // Start of pages() * kPageSize bytes; page i of the batch (the i-th ref
  // passed to Map) is at addr() + i * kPageSize. Read-only mappings are
  // mapped PROT_READ: writing to them faults.
  virtual uint8_t* addr() const = 0;
  virtual size_t pages() const = 0;
  virtual bool writable() const = 0;

  // Unmaps now and says whether that worked (the destructor unmaps
  // otherwise, silently). Called at most once. Whatever it returns, the
  // memory must not be touched again. On failure the pages may still be
  // mapped and the grants pinned (the guest cannot end access to them, as
  // after a failed unmap in Xen); the destructor does not retry, and the
  // caller counts the pages as leaked. The default (fakes) has nothing to
  // report.
  virtual Status Unmap() { return Status::Ok(); }

  uint8_t* page(size_t index) const { return addr() + index * kPageSize; }
  std::span<uint8_t> bytes() const { return {addr(), pages() * kPageSize}; }
};

// One grant-copy segment between a guest page and a local buffer.
struct GrantCopyOp {
  enum class Direction : uint8_t {
    kFromGuest,  // guest page -> local (serves a WRITE request)
    kToGuest,    // local -> guest page (serves a READ request; needs a writable grant)
  };
  Direction direction = Direction::kFromGuest;
  DomId domid = 0;         // the granting domain
  GrantRef ref = 0;
  uint16_t offset = 0;     // byte offset inside the guest page
  uint16_t length = 0;     // bytes; REQUIRES offset + length <= kPageSize (else the op fails)
  uint8_t* local = nullptr;  // `length` bytes in this process
  Status status;           // out: OK, or why this op failed
};

class GrantTable {
 public:
  GrantTable() = default;
  GrantTable(const GrantTable&) = delete;
  GrantTable& operator=(const GrantTable&) = delete;
  virtual ~GrantTable() = default;

  // Maps refs.size() pages granted by `domid` (one batch, one call) into one
  // contiguous range, page i from refs[i]. writable=false maps read-only.
  // Fails — with nothing left mapped — if refs is empty or larger than
  // kMaxMapBatch, or any ref is out of the guest's table, not in use, not
  // granted to this domain, or read-only while writable was asked, or the
  // domain is dead. The message names the domain and the offending ref
  // (libxen: the first ref of the batch — Xen's gntdev reports EINVAL for
  // every refused ref, so only the sim's error codes tell the reasons apart;
  // callers treat any failure as the request's failure).
  // While mapped, the granting guest cannot end access to those refs (as in
  // Xen); the mapping stays valid memory even if the guest dies.
  virtual Result<std::unique_ptr<GrantMapping>> Map(DomId domid, std::span<const GrantRef> refs,
                                                    bool writable) = 0;

  // Performs every op (grant copy). Each op gets its own status (same checks
  // as Map; kToGuest needs a writable grant). Returns non-OK only if the
  // whole call failed (then op statuses are unspecified).
  virtual Status Copy(std::span<GrantCopyOp> ops) = 0;

  static constexpr size_t kMaxMapBatch = 1024;
};

// One event-channel handle (xenevtchn_handle). Ports bound through a handle
// deliver their events to that handle's fd. A port that fired is masked
// until Unmask(port): read Pending(), Unmask, then drain the ring, then
// re-check — the usual Xen order that loses no event.
class EventChannel {
 public:
  EventChannel() = default;
  EventChannel(const EventChannel&) = delete;
  EventChannel& operator=(const EventChannel&) = delete;
  // Unbinds every port still bound through this handle.
  virtual ~EventChannel() = default;

  // Connects a local port to `remote_port` of `remote`, which that domain
  // allocated with BindUnbound(this domain). Returns the local port.
  // Fails with kNotFound if the remote port does not exist, kInvalidArgument
  // if it is not unbound or not offered to this domain, or if remote is dead.
  virtual Result<EvtchnPort> BindInterdomain(DomId remote, EvtchnPort remote_port) = 0;
  // Allocates a local port that `remote` may bind to (the frontend side of
  // the handshake: the guest publishes it as "event-channel").
  virtual Result<EvtchnPort> BindUnbound(DomId remote) = 0;
  // Closes a port bound through this handle; the peer's port becomes unbound.
  virtual Status Unbind(EvtchnPort local_port) = 0;
  // Signals the peer of a bound local port. Notifying a port whose peer is
  // gone succeeds and does nothing (as in Xen).
  virtual Status Notify(EvtchnPort local_port) = 0;
  // Readable (poll/epoll/io_uring POLL_ADD) while some port of this handle
  // has a pending, unmasked event. Owned by the handle.
  virtual int fd() const = 0;
  // Non-blocking: the next port with a pending event (now masked and its
  // pending state consumed), or nullopt if none. Several notifications of
  // one port may coalesce into one event.
  virtual Result<std::optional<EvtchnPort>> Pending() = 0;
  // Re-enables delivery for a port returned by Pending().
  virtual Status Unmask(EvtchnPort local_port) = 0;
};

// Xenstore access rights, as in xenstored: the first entry of a node's
// permission list names its owner (who may do anything) and the access of
// every domain not listed; later entries grant access to one domain. Dom0
// may do anything everywhere.
enum class XsAccess : uint8_t { kNone, kRead, kWrite, kReadWrite };
struct XsPermission {
  DomId domid = 0;
  XsAccess access = XsAccess::kNone;
  bool operator==(const XsPermission&) const = default;
};
// "n0", "r5", "w3", "b7" — the xenstore-ls/xenstore-chmod spelling.
std::string FormatPermission(const XsPermission& perm);
Result<XsPermission> ParsePermission(std::string_view text);

struct XsWatchEvent {
  std::string path;   // the node that changed (at or below the watched path)
  std::string token;  // as given to Watch
  bool operator==(const XsWatchEvent&) const = default;
};

using XsTransaction = uint32_t;
inline constexpr XsTransaction kXsNoTransaction = 0;

// One xenstore connection (xs_handle). Paths are absolute ("/local/...") or
// the special watch paths "@introduceDomain" / "@releaseDomain" (fired when a
// domain appears / dies). Every op takes an optional transaction id.
class XenStore {
 public:
  XenStore() = default;
  XenStore(const XenStore&) = delete;
  XenStore& operator=(const XenStore&) = delete;
  // Ends open transactions (aborting them) and removes this handle's watches.
  virtual ~XenStore() = default;

  // The node's value. kNotFound if missing; kReadOnly (EACCES) if this domain
  // may not read it.
  virtual Result<std::string> Read(std::string_view path, XsTransaction tx = kXsNoTransaction) = 0;
  // Creates the node (and missing parents, with empty values) or replaces its
  // value. New nodes inherit the parent's permissions.
  virtual Status Write(std::string_view path, std::string_view value,
                       XsTransaction tx = kXsNoTransaction) = 0;
  // Creates the node with an empty value if missing; OK if it exists.
  virtual Status Mkdir(std::string_view path, XsTransaction tx = kXsNoTransaction) = 0;
  // Removes the node and everything below it. OK if it does not exist.
  virtual Status Remove(std::string_view path, XsTransaction tx = kXsNoTransaction) = 0;
  // Names (not paths) of the node's children, in no particular order.
  virtual Result<std::vector<std::string>> Directory(std::string_view path,
                                                     XsTransaction tx = kXsNoTransaction) = 0;
  virtual Result<std::vector<XsPermission>> GetPermissions(std::string_view path,
                                                           XsTransaction tx = kXsNoTransaction) = 0;
  // REQUIRES: perms non-empty. Only the owner (or dom0) may change them.
  virtual Status SetPermissions(std::string_view path, std::span<const XsPermission> perms,
                                XsTransaction tx = kXsNoTransaction) = 0;

  // Watches `path` and everything below it. Fires once right away (with
  // path itself), then once per change at or below path (including removal
  // of the node or a parent). (path, token) must be unique per handle.
  virtual Status Watch(std::string_view path, std::string_view token) = 0;
  virtual Status Unwatch(std::string_view path, std::string_view token) = 0;
  // Readable while watch events are queued for this handle. Owned by it.
  virtual int fd() const = 0;
  // Non-blocking: the next queued event, or nullopt.
  virtual Result<std::optional<XsWatchEvent>> ReadWatch() = 0;

  virtual Result<XsTransaction> TransactionStart() = 0;
  // commit=false aborts. kBusy if a node the transaction read or wrote was
  // changed by someone else meanwhile: nothing was applied; start over.
  virtual Status TransactionEnd(XsTransaction tx, bool commit) = 0;
};

class XenPlatform {
 public:
  XenPlatform() = default;
  XenPlatform(const XenPlatform&) = delete;
  XenPlatform& operator=(const XenPlatform&) = delete;
  virtual ~XenPlatform() = default;

  virtual Result<std::unique_ptr<GrantTable>> OpenGrantTable() = 0;
  virtual Result<std::unique_ptr<EventChannel>> OpenEventChannel() = 0;
  virtual Result<std::unique_ptr<XenStore>> OpenXenStore() = 0;
  // False once the domain is dying, dead or unknown.
  virtual bool DomainAlive(DomId domid) = 0;
  // The domain this process runs in (0 in dom0).
  virtual DomId self_domid() const = 0;
};

// The real platform over Debian's libxen (4.17). Fails with a clear Status
// ("no Xen here: /dev/xen/... missing; run in dom0") when there is no
// hypervisor. The simulated platform comes from SimHypervisor (sim.h).
Result<std::unique_ptr<XenPlatform>> NewLibxenPlatform();

// Joins xenstore path components with exactly one '/' between them.
std::string XsJoin(std::string_view a, std::string_view b);
// The standard directories (xenbus layout).
std::string XsBackendDir(DomId backend, std::string_view type, DomId frontend, uint32_t devid);
std::string XsFrontendDir(DomId frontend, std::string_view type, uint32_t devid);

// Retries `body(tx)` in a transaction while TransactionEnd says kBusy (at
// most max_attempts). body returns a Status; a non-OK body aborts.
template <typename Body>
Status RunXsTransaction(XenStore& store, Body&& body, int max_attempts = 64) {
  for (int attempt = 0; attempt < max_attempts; ++attempt) {
    COWTAP_ASSIGN_OR_RETURN(XsTransaction tx, store.TransactionStart());
    Status s = body(tx);
    if (!s.ok()) {
      store.TransactionEnd(tx, false).IgnoreError();
      return s;
    }
    Status end = store.TransactionEnd(tx, true);
    if (end.code() != ErrorCode::kBusy) return end;
  }
  return Status::Busy("xenstore transaction kept conflicting; retry later");
}

}  // namespace cowtap::xen
