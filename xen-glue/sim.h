// The simulated hypervisor: Xen without Xen, so that the backend, the daemon
// and the blkfront-like guest run and are tested on any Linux machine. It
// lives in the library cowtap_xen (files xen-glue/sim_*.cc) beside libxen.
//
// Model:
//   * SimHypervisor runs in the backend's process. It owns an in-memory
//     xenstore (nodes, permissions, watches, transactions), a registry of
//     domains and the event channels, and serves guests on a Unix socket
//     (SOCK_SEQPACKET) from one thread. NewPlatform() gives the backend a
//     XenPlatform (domid 0 by default) that calls it directly.
//   * A guest is a SEPARATE PROCESS (or, in tests, the same one): SimGuest
//     connects to the socket, allocates its RAM and its grant table as
//     memfds and passes both (SCM_RIGHTS) at connect; the hypervisor seals
//     them against shrinking, so a mapping can never SIGBUS.
//   * Grants: the guest's table holds Xen v1 entries (grant_entry_v1: flags,
//     domid, frame). GrantTable::Map reads an entry once (one 64-bit atomic
//     load), checks it, and marks it GTF_reading/GTF_writing with a
//     compare-and-swap as Xen does, then mmaps the frame from the RAM memfd
//     (PROT_READ for read-only): real shared memory, zero copy.
//     EndAccess therefore FAILS (kBusy) while the backend has the ref mapped
//     — Xen semantics. ForceRevoke (misbehaviour) clears the entry anyway;
//     the backend's mapping stays valid memory, new maps of it fail.
//   * Event channels: each port pair is two eventfds created by the
//     hypervisor and passed to the guest; Notify writes the peer's eventfd
//     without a round trip. A handle's fd() is an epoll set of its ports'
//     eventfds (EPOLLONESHOT = Xen's mask bit).
//   * The guest's xenstore client is a request/response socket per handle
//     plus an eventfd that is readable while watch events are queued.
//   * A guest whose socket closes (exit, crash, SIGKILL) is dead:
//     DomainAlive() is false, "@releaseDomain" watches fire, its event
//     channels become unbound, its watches and transactions go; its
//     xenstore nodes stay until the toolstack removes them, and the
//     backend's mappings of its pages stay valid until unmapped.
//
// Limits a guest cannot exceed (it controls them): RAM <= kMaxGuestRamPages,
// grant table <= kMaxGrantEntries, xenstore values <= 4096 bytes, nodes per
// domain, watches and open transactions per handle, queued watch events.
//
// Thread-safety: SimHypervisor and SimGuest are thread-safe. Handles
// (EventChannel, XenStore) follow platform.h: one thread at a time each.
#pragma once

#include <array>
#include <chrono>
#include <cstdint>
#include <memory>
#include <mutex>
#include <string>
#include <string_view>
#include <vector>

#include "base/status.h"
#include "xen-glue/platform.h"

namespace cowtap::xen {

inline constexpr uint32_t kMaxGuestRamPages = 1u << 20;  // 4 GiB
inline constexpr uint32_t kMaxGrantEntries = 1u << 16;
// Refs below this are reserved (as Xen reserves 0..7); GrantAccess never
// returns them.
inline constexpr GrantRef kFirstGrantRef = 8;

// Faults injected into the backend's side of the sim: the calls of the
// platforms NewPlatform made (grant map and unmap, event-channel bind and
// notify, xenstore reads and writes). A guest's own calls are never failed.
// A failed unmap leaves the pages mapped and the refs pinned, as a failed
// unmap does in Xen: MappedGrantCount keeps counting them and the guest's
// EndAccess stays kBusy.
enum class SimFaultPoint : uint8_t {
  kGrantMap,      // GrantTable::Map of the guest's refs
  kGrantUnmap,    // GrantMapping::Unmap (or destruction) of the guest's pages
  kEvtchnBind,    // EventChannel::BindInterdomain to the guest
  kEvtchnNotify,  // EventChannel::Notify of a port bound to the guest
  kXsRead,        // XenStore::Read and Directory
  kXsWrite,       // XenStore::Write, Mkdir and Remove
};
inline constexpr size_t kSimFaultPoints = 6;
inline constexpr DomId kAnyDomain = 0xffff;
inline constexpr uint64_t kEveryCall = UINT64_MAX;

struct SimFaultRule {
  DomId domid = kAnyDomain;   // grant and event-channel points: the guest the call concerns
  std::string path_contains;  // xenstore points: a substring of the path ("" matches all)
  uint64_t skip = 0;          // matching calls let through first ("fail the Nth": skip = N - 1)
  uint64_t count = 1;         // then this many fail (kEveryCall: every one while the rule is set)
  ErrorCode code = ErrorCode::kIoError;
};

// Thread-safe.
class SimFaults {
 public:
  // Replaces the rule of `point` (one rule per point).
  void Set(SimFaultPoint point, SimFaultRule rule);
  void Clear(SimFaultPoint point);
  void ClearAll();
  // Calls failed at `point` so far (kept across Set and Clear).
  uint64_t fired(SimFaultPoint point) const;

  // The sim's hook: OK, or the injected error for a call at `point` that
  // concerns `domid` (kAnyDomain: not a domain's call) or `path`.
  Status Check(SimFaultPoint point, DomId domid, std::string_view path = {});

 private:
  struct Armed {
    bool set = false;
    SimFaultRule rule;
    uint64_t seen = 0;  // matching calls since Set
  };
  mutable std::mutex mu_;
  std::array<Armed, kSimFaultPoints> armed_{};     // GUARDED_BY(mu_)
  std::array<uint64_t, kSimFaultPoints> fired_{};  // GUARDED_BY(mu_)
};

class SimHypervisor {
 public:
  // Listens on socket_path (a stale socket file there is replaced) and
  // starts the serving thread. The xenstore starts with /local/domain/0.
  static Result<std::unique_ptr<SimHypervisor>> Start(const std::string& socket_path);
  // Stops serving; connected guests see their socket close (their calls
  // fail) and are dead. Platforms made by NewPlatform stay usable (they
  // share the machine state) but see every guest dead.
  virtual ~SimHypervisor() = default;

  virtual const std::string& socket_path() const = 0;
  // A platform for code running as `domid` in this process (the backend:
  // dom0). Its GrantTable maps pages granted to `domid`. Only dom0 is
  // always alive: for another domid, event-channel binds fail unless a
  // guest with that domid is connected.
  virtual std::unique_ptr<XenPlatform> NewPlatform(DomId domid = kDom0) = 0;

  virtual bool DomainAlive(DomId domid) = 0;
  // Waits until `domid` is connected and alive; false on timeout.
  virtual bool WaitForDomain(DomId domid, std::chrono::milliseconds timeout) = 0;
  // Kills the domain as `xl destroy` would: its connection is closed and it
  // is dead from now on. kNotFound if it never connected.
  virtual Status DestroyDomain(DomId domid) = 0;
  // Grant refs of `domid` currently mapped by anyone (for leak checks).
  virtual size_t MappedGrantCount(DomId domid) = 0;
  // Ports of `domid` that are allocated (bound or unbound).
  virtual size_t OpenPortCount(DomId domid) = 0;
  // Faults for the backend's calls (see SimFaults).
  virtual SimFaults& faults() = 0;
};

struct SimGuestOptions {
  DomId domid = 0;             // 0: the hypervisor picks a free one (>= 1)
  uint32_t ram_pages = 1024;   // guest RAM, 4 KiB pages
  uint32_t grant_entries = 4096;
};

// The guest side: one connected domain.
class SimGuest {
 public:
  // Connects and introduces the domain (creates /local/domain/<domid> owned
  // by it). Fails if the domid is in use by a live domain or a limit is
  // exceeded. Reconnecting with the domid of a dead domain is allowed.
  static Result<std::unique_ptr<SimGuest>> Connect(const std::string& socket_path,
                                                   const SimGuestOptions& options = {});
  // Closes the connection: the domain dies (as a clean guest shutdown).
  virtual ~SimGuest() = default;

  virtual DomId domid() const = 0;
  virtual uint32_t ram_pages() const = 0;
  virtual uint32_t grant_entries() const = 0;
  // The guest's view of one RAM page (kPageSize bytes), or nullptr if
  // page_index >= ram_pages().
  virtual uint8_t* Page(uint32_t page_index) = 0;
  // A simple page allocator over guest RAM (pages start zeroed only the
  // first time). kNoSpace when RAM is exhausted.
  virtual Result<uint32_t> AllocPage() = 0;
  virtual void FreePage(uint32_t page_index) = 0;

  // Grants `to` access to a page; writes the entry with the flags last
  // (release order), as a Linux guest does.
  virtual Result<GrantRef> GrantAccess(uint32_t page_index, DomId to, bool readonly) = 0;
  // Ends access and frees the ref. kBusy while some domain has it mapped
  // (retry after the backend unmaps); kInvalidArgument if not in use.
  virtual Status EndAccess(GrantRef ref) = 0;
  // Number of refs this guest has granted and not ended.
  virtual size_t GrantsInUse() = 0;

  // Guest-side handles over the socket. The EventChannel supports
  // BindUnbound (publish the port as "event-channel") and BindInterdomain.
  virtual Result<std::unique_ptr<EventChannel>> OpenEventChannel() = 0;
  virtual Result<std::unique_ptr<XenStore>> OpenXenStore() = 0;

  // --- Misbehaviour hooks for tests ---
  // Writes any entry verbatim, without checks (ref < grant_entries()).
  virtual Status WriteRawGrantEntry(GrantRef ref, uint16_t flags, DomId domid, uint32_t frame) = 0;
  // Clears the entry even while it is mapped (a guest revoking under the
  // backend). The ref stays allocated in this guest's free list.
  virtual Status ForceRevoke(GrantRef ref) = 0;
  // Ends the process with SIGKILL: no cleanup of any kind.
  [[noreturn]] virtual void DieAbruptly() = 0;
};

// The toolstack's part of a VBD (what libxl writes for a disk), through a
// dom0 XenStore handle, in one transaction.
struct SimVbdConfig {
  DomId backend_domid = kDom0;
  DomId frontend_domid = 1;
  uint32_t devid = 51712;          // xvda = 202 << 8
  std::string params;              // image path (or target)
  std::string type = "cowtap";     // backend "type" key
  bool writable = true;            // mode = "w" or "r"
  std::string device_type = "disk";  // or "cdrom"
  bool removable = false;
  bool bootable = true;
};
// Writes backend dir /local/domain/<b>/backend/vbd/<f>/<devid>/{frontend,
// frontend-id, params, type, mode, device-type, online=1, removable,
// bootable, state=1} (owner backend, frontend may read) and frontend dir
// /local/domain/<f>/device/vbd/<devid>/{backend, backend-id,
// virtual-device, device-type, state=1} (owner frontend, backend may read).
Status ToolstackAddVbd(XenStore& dom0_store, const SimVbdConfig& config);
// Removes both directories (idempotent).
Status ToolstackRemoveVbd(XenStore& dom0_store, const SimVbdConfig& config);

}  // namespace cowtap::xen
