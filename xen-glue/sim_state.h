// SimState: the simulated hypervisor's machine state — domains (their RAM
// and grant-table memfds), event-channel ports and grant pins — shared by
// the socket server (sim_hypervisor.cc) and every in-process platform object.
// Also the in-process EventChannel (over a PortControl) used by both sides.
//
// Grant entries live in the guest's shared grant table (Xen v1 layout,
// 8 bytes: flags u16, domid u16, frame u32). The hypervisor reads an entry
// with one atomic 64-bit load, validates that copy, and pins it by setting
// GTF_reading / GTF_writing with a 64-bit compare-and-swap against the very
// value it validated, so a guest racing to change the entry either loses
// (we retry and re-validate) or wins before we looked. Pin counts per ref
// are hypervisor-private; the bit is cleared when the last pin goes.
//
// Thread-safety: SimState is thread-safe (mu_ for domains and ports; each
// domain's own pin_mu for grants). Lock order: mu_ before pin_mu.
#pragma once

#include <atomic>
#include <condition_variable>
#include <map>
#include <memory>
#include <mutex>

#include "xen-glue/platform.h"
#include "xen-glue/sim.h"
#include "xen-glue/sim_wire.h"
#include "xen-glue/xs_db.h"

namespace cowtap::xen::sim {

inline constexpr DomId kFirstReservedDomId = 0x7ff0;  // DOMID_FIRST_RESERVED
inline constexpr size_t kMaxPortsPerDomain = 1024;

struct SimDomain {
  SimDomain() = default;
  SimDomain(const SimDomain&) = delete;
  SimDomain& operator=(const SimDomain&) = delete;
  ~SimDomain();

  DomId domid = 0;
  std::atomic<bool> alive{true};
  UniqueFd ram_fd;
  uint32_t ram_pages = 0;
  UniqueFd grant_fd;
  uint32_t grant_entries = 0;
  uint64_t* grant_table = nullptr;  // shared with the guest: read with atomics only
  size_t grant_map_bytes = 0;

  std::mutex pin_mu;
  struct Pins {
    uint32_t readers = 0;
    uint32_t writers = 0;
  };
  std::map<GrantRef, Pins> pins;  // GUARDED_BY(pin_mu)
};

class SimState {
 public:
  SimState() : xs(std::make_shared<XsDb>()) {}

  const std::shared_ptr<XsDb> xs;
  // Faults for the backend's calls; mappings keep it for their unmap.
  const std::shared_ptr<SimFaults> faults = std::make_shared<SimFaults>();

  // Registers a domain from a guest's hello: validates sizes, seals the
  // memfds against shrinking and maps the grant table. domid 0 = pick one.
  Result<std::shared_ptr<SimDomain>> AddDomain(DomId domid, UniqueFd ram_fd, uint32_t ram_pages,
                                               UniqueFd grant_fd, uint32_t grant_entries);
  // Marks the domain dead: ports closed (peers become unbound),
  // @releaseDomain fired. Existing mappings stay valid. Idempotent.
  void KillDomain(const std::shared_ptr<SimDomain>& domain);
  std::shared_ptr<SimDomain> FindDomain(DomId domid);
  bool DomainAlive(DomId domid);
  bool WaitForDomain(DomId domid, std::chrono::milliseconds timeout);

  Result<PortFds> BindUnbound(DomId self, DomId remote);
  Result<PortFds> BindInterdomain(DomId self, DomId remote, EvtchnPort remote_port);
  Status Unbind(DomId self, EvtchnPort port);
  size_t OpenPortCount(DomId domid);

  Result<std::unique_ptr<GrantMapping>> Map(DomId self, DomId granter, std::span<const GrantRef> refs,
                                            bool writable);
  Status Copy(DomId self, std::span<GrantCopyOp> ops);
  size_t MappedGrantCount(DomId domid);

 private:
  struct Port {
    bool bound = false;
    DomId remote = 0;
    EvtchnPort remote_port = 0;
    UniqueFd in;
    UniqueFd out;
  };
  using PortTable = std::map<EvtchnPort, Port>;
  Result<EvtchnPort> NewPortLocked(DomId domid);
  bool AliveLocked(DomId domid);
  static Result<PortFds> Export(EvtchnPort port, const Port& p);

  std::mutex mu_;
  std::condition_variable cv_;
  std::map<DomId, std::shared_ptr<SimDomain>> domains_;  // GUARDED_BY(mu_)
  std::map<DomId, PortTable> ports_;                      // GUARDED_BY(mu_)
};

// Who allocates and closes ports for an EventChannel handle: SimState
// directly (in process) or the hypervisor over the guest's socket.
class PortControl {
 public:
  virtual ~PortControl() = default;
  virtual Result<PortFds> BindUnbound(DomId remote) = 0;
  virtual Result<PortFds> BindInterdomain(DomId remote, EvtchnPort remote_port) = 0;
  virtual Status Unbind(EvtchnPort port) = 0;
};

// An EventChannel whose fd is an epoll set of its ports' eventfds, armed
// EPOLLONESHOT (a port that fired stays masked until Unmask).
Result<std::unique_ptr<EventChannel>> NewSimEventChannel(std::unique_ptr<PortControl> control);

}  // namespace cowtap::xen::sim
