#include "xen-glue/sim_state.h"

#include <fcntl.h>
#include <sys/eventfd.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>
#include <stdint.h>  // the Xen public headers need it first
#include <xen/grant_table.h>

#include <cerrno>
#include <string>

#include "base/checked_math.h"
#include "xen-glue/sim.h"

namespace cowtap::xen::sim {
namespace {

static_assert(sizeof(grant_entry_v1_t) == sizeof(uint64_t), "a v1 grant entry is one 64-bit word");

std::string Dom(DomId d) { return "domain " + std::to_string(d); }

struct Entry {
  uint16_t flags;
  DomId domid;
  uint32_t frame;
};
Entry Decode(uint64_t e) {
  return {static_cast<uint16_t>(e & 0xffff), static_cast<DomId>((e >> 16) & 0xffff),
          static_cast<uint32_t>(e >> 32)};
}

// Checks a copy of an entry for an access by `self`.
Status CheckEntry(const SimDomain& d, GrantRef ref, const Entry& e, DomId self, bool writable) {
  std::string what = "grant ref " + std::to_string(ref) + " of " + Dom(d.domid);
  if ((e.flags & GTF_type_mask) != GTF_permit_access) {
    return Status::InvalidArgument(what + " is not in use (not granted or revoked)");
  }
  if (e.domid != self) {
    return Status::InvalidArgument(what + " is granted to " + Dom(e.domid) + ", not to " + Dom(self));
  }
  if (writable && (e.flags & GTF_readonly)) {
    return Status::ReadOnly(what + " is read-only; the guest refused write access");
  }
  if (e.frame >= d.ram_pages) {
    return Status::OutOfRange(what + " names frame " + std::to_string(e.frame) + " beyond its " +
                              std::to_string(d.ram_pages) + " pages of RAM");
  }
  return Status::Ok();
}

// Pins one ref for `self`; returns the frame. REQUIRES d.pin_mu held.
Result<uint32_t> PinLocked(SimDomain& d, GrantRef ref, DomId self, bool writable) {
  if (ref >= d.grant_entries) {
    return Status::OutOfRange("grant ref " + std::to_string(ref) + " is beyond the " +
                              std::to_string(d.grant_entries) + "-entry grant table of " + Dom(d.domid));
  }
  uint64_t* slot = &d.grant_table[ref];
  const uint64_t bit = writable ? GTF_writing : GTF_reading;
  for (int attempt = 0; attempt < 64; ++attempt) {
    uint64_t seen = __atomic_load_n(slot, __ATOMIC_ACQUIRE);
    Entry e = Decode(seen);
    COWTAP_RETURN_IF_ERROR(CheckEntry(d, ref, e, self, writable));
    if (__atomic_compare_exchange_n(slot, &seen, seen | bit, false, __ATOMIC_ACQ_REL, __ATOMIC_ACQUIRE)) {
      auto& pins = d.pins[ref];
      (writable ? pins.writers : pins.readers)++;
      return e.frame;
    }
  }
  return Status::Busy("grant ref " + std::to_string(ref) + " of " + Dom(d.domid) +
                      " keeps changing under the map; the guest is misbehaving");
}

// REQUIRES d.pin_mu held.
void UnpinLocked(SimDomain& d, GrantRef ref, bool writable) {
  auto it = d.pins.find(ref);
  if (it == d.pins.end()) return;
  uint32_t& count = writable ? it->second.writers : it->second.readers;
  if (count > 0 && --count == 0) {
    const uint64_t bit = writable ? GTF_writing : GTF_reading;
    __atomic_fetch_and(&d.grant_table[ref], ~bit, __ATOMIC_ACQ_REL);
  }
  if (it->second.readers == 0 && it->second.writers == 0) d.pins.erase(it);
}

// An injected unmap failure leaves everything as it was — the range
// mapped (so no later mmap reuses the address), the refs pinned — for good.
class SimMapping final : public GrantMapping {
 public:
  SimMapping(std::shared_ptr<SimDomain> d, std::vector<GrantRef> refs, bool writable, uint8_t* addr,
             std::shared_ptr<SimFaults> faults)
      : d_(std::move(d)), refs_(std::move(refs)), writable_(writable), addr_(addr), faults_(std::move(faults)) {}
  ~SimMapping() override {
    if (!unmapped_) Unmap().IgnoreError();
  }
  Status Unmap() override {
    unmapped_ = true;
    Status injected = faults_->Check(SimFaultPoint::kGrantUnmap, d_->domid);
    if (!injected.ok()) return injected;
    munmap(addr_, refs_.size() * kPageSize);
    std::lock_guard lock(d_->pin_mu);
    for (GrantRef ref : refs_) UnpinLocked(*d_, ref, writable_);
    return Status::Ok();
  }
  uint8_t* addr() const override { return addr_; }
  size_t pages() const override { return refs_.size(); }
  bool writable() const override { return writable_; }

 private:
  std::shared_ptr<SimDomain> d_;
  std::vector<GrantRef> refs_;
  bool writable_;
  uint8_t* addr_;
  std::shared_ptr<SimFaults> faults_;
  bool unmapped_ = false;
};

Status SealAndCheckSize(int fd, uint64_t bytes, const char* what) {
  if (fcntl(fd, F_ADD_SEALS, F_SEAL_SHRINK) != 0) {
    return Status::FromErrno(errno, std::string("sim: sealing the guest's ") + what +
                                        " memfd (create it with MFD_ALLOW_SEALING)");
  }
  struct stat st;
  if (fstat(fd, &st) != 0) return Status::FromErrno(errno, std::string("sim: fstat of the guest's ") + what);
  if (static_cast<uint64_t>(st.st_size) < bytes) {
    return Status::InvalidArgument(std::string("sim: the guest's ") + what + " memfd has " +
                                   std::to_string(st.st_size) + " bytes, needs " + std::to_string(bytes));
  }
  return Status::Ok();
}

}  // namespace

SimDomain::~SimDomain() {
  if (grant_table != nullptr) munmap(grant_table, grant_map_bytes);
}

Result<std::shared_ptr<SimDomain>> SimState::AddDomain(DomId domid, UniqueFd ram_fd, uint32_t ram_pages,
                                                       UniqueFd grant_fd, uint32_t grant_entries) {
  if (ram_pages == 0 || ram_pages > kMaxGuestRamPages) {
    return Status::InvalidArgument("sim: guest RAM of " + std::to_string(ram_pages) + " pages is outside 1.." +
                                   std::to_string(kMaxGuestRamPages));
  }
  if (grant_entries <= kFirstGrantRef || grant_entries > kMaxGrantEntries) {
    return Status::InvalidArgument("sim: grant table of " + std::to_string(grant_entries) +
                                   " entries is outside " + std::to_string(kFirstGrantRef + 1) + ".." +
                                   std::to_string(kMaxGrantEntries));
  }
  if (domid >= kFirstReservedDomId) {
    return Status::InvalidArgument("sim: domid " + std::to_string(domid) + " is reserved");
  }
  auto d = std::make_shared<SimDomain>();
  d->ram_pages = ram_pages;
  d->grant_entries = grant_entries;
  COWTAP_RETURN_IF_ERROR(SealAndCheckSize(ram_fd.get(), uint64_t{ram_pages} * kPageSize, "RAM"));
  uint64_t table_bytes = *AlignUp(uint64_t{grant_entries} * sizeof(uint64_t), kPageSize);
  COWTAP_RETURN_IF_ERROR(SealAndCheckSize(grant_fd.get(), table_bytes, "grant table"));
  void* table = mmap(nullptr, table_bytes, PROT_READ | PROT_WRITE, MAP_SHARED, grant_fd.get(), 0);
  if (table == MAP_FAILED) return Status::FromErrno(errno, "sim: mapping the guest's grant table");
  d->grant_table = static_cast<uint64_t*>(table);
  d->grant_map_bytes = table_bytes;
  d->ram_fd = std::move(ram_fd);
  d->grant_fd = std::move(grant_fd);
  {
    std::lock_guard lock(mu_);
    if (domid == kDom0) {
      for (DomId candidate = 1; candidate < kFirstReservedDomId; ++candidate) {
        if (!AliveLocked(candidate)) {
          domid = candidate;
          break;
        }
      }
      if (domid == kDom0) return Status::NoSpace("sim: no free domid");
    } else if (AliveLocked(domid)) {
      return Status::Busy("sim: " + Dom(domid) + " is already running; pick another domid");
    }
    d->domid = domid;
    domains_[domid] = d;
    ports_.erase(domid);
  }
  xs->IntroduceDomain(domid);
  cv_.notify_all();
  return d;
}

void SimState::KillDomain(const std::shared_ptr<SimDomain>& domain) {
  if (!domain->alive.exchange(false)) return;
  {
    std::lock_guard lock(mu_);
    auto table = ports_.find(domain->domid);
    if (table != ports_.end() && domains_[domain->domid] == domain) {
      for (auto& [port, p] : table->second) {
        if (!p.bound) continue;
        auto peer_table = ports_.find(p.remote);
        if (peer_table == ports_.end()) continue;
        auto peer = peer_table->second.find(p.remote_port);
        if (peer != peer_table->second.end()) peer->second.bound = false;
      }
      ports_.erase(table);
    }
  }
  xs->FireSpecial("@releaseDomain");
  cv_.notify_all();
}

bool SimState::AliveLocked(DomId domid) {
  if (domid == kDom0) return true;
  auto it = domains_.find(domid);
  return it != domains_.end() && it->second->alive.load();
}

std::shared_ptr<SimDomain> SimState::FindDomain(DomId domid) {
  std::lock_guard lock(mu_);
  auto it = domains_.find(domid);
  return it == domains_.end() ? nullptr : it->second;
}

bool SimState::DomainAlive(DomId domid) {
  std::lock_guard lock(mu_);
  return AliveLocked(domid);
}

bool SimState::WaitForDomain(DomId domid, std::chrono::milliseconds timeout) {
  std::unique_lock lock(mu_);
  return cv_.wait_for(lock, timeout, [&] { return AliveLocked(domid); });
}

Result<EvtchnPort> SimState::NewPortLocked(DomId domid) {
  PortTable& table = ports_[domid];
  if (table.size() >= kMaxPortsPerDomain) {
    return Status::NoSpace("sim: " + Dom(domid) + " has too many event-channel ports");
  }
  EvtchnPort port = 1;  // port 0 is never valid in Xen
  for (const auto& [used, p] : table) {
    if (used != port) break;
    ++port;
  }
  return port;
}

Result<PortFds> SimState::Export(EvtchnPort port, const Port& p) {
  PortFds out{port, p.in.Dup(), p.out.Dup()};
  if (!out.in.valid() || !out.out.valid()) return Status::FromErrno(errno, "sim: dup of an event-channel fd");
  return out;
}

Result<PortFds> SimState::BindUnbound(DomId self, DomId remote) {
  UniqueFd a(eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC));
  UniqueFd b(eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC));
  if (!a.valid() || !b.valid()) return Status::FromErrno(errno, "sim: eventfd for an event channel");
  std::lock_guard lock(mu_);
  if (!AliveLocked(self)) return Status::Cancelled("sim: " + Dom(self) + " is dead");
  if (!AliveLocked(remote)) return Status::NotFound("sim: remote " + Dom(remote) + " does not exist");
  COWTAP_ASSIGN_OR_RETURN(EvtchnPort port, NewPortLocked(self));
  Port& p = ports_[self][port];
  p.remote = remote;
  p.in = std::move(a);
  p.out = std::move(b);
  return Export(port, p);
}

Result<PortFds> SimState::BindInterdomain(DomId self, DomId remote, EvtchnPort remote_port) {
  std::lock_guard lock(mu_);
  std::string what = "port " + std::to_string(remote_port) + " of " + Dom(remote);
  if (!AliveLocked(self)) return Status::Cancelled("sim: " + Dom(self) + " is dead");
  if (!AliveLocked(remote)) return Status::InvalidArgument("sim: cannot bind " + what + ": it is dead");
  auto table = ports_.find(remote);
  if (table == ports_.end() || !table->second.count(remote_port)) {
    return Status::NotFound("sim: " + what + " does not exist");
  }
  Port& rp = table->second[remote_port];
  if (rp.bound) return Status::InvalidArgument("sim: " + what + " is already bound");
  if (rp.remote != self) {
    return Status::InvalidArgument("sim: " + what + " is offered to " + Dom(rp.remote) + ", not " + Dom(self));
  }
  UniqueFd in = rp.out.Dup();
  UniqueFd out = rp.in.Dup();
  if (!in.valid() || !out.valid()) return Status::FromErrno(errno, "sim: dup of an event-channel fd");
  COWTAP_ASSIGN_OR_RETURN(EvtchnPort port, NewPortLocked(self));
  Port& p = ports_[self][port];
  p.bound = true;
  p.remote = remote;
  p.remote_port = remote_port;
  p.in = std::move(in);
  p.out = std::move(out);
  rp.bound = true;  // std::map references stay valid across the insertions above
  rp.remote_port = port;
  return Export(port, p);
}

Status SimState::Unbind(DomId self, EvtchnPort port) {
  std::lock_guard lock(mu_);
  auto table = ports_.find(self);
  if (table == ports_.end() || !table->second.count(port)) {
    return Status::NotFound("sim: " + Dom(self) + " has no port " + std::to_string(port));
  }
  Port& p = table->second[port];
  if (p.bound) {
    auto peer_table = ports_.find(p.remote);
    if (peer_table != ports_.end()) {
      auto peer = peer_table->second.find(p.remote_port);
      // The peer goes back to unbound and may be bound again by this domain.
      if (peer != peer_table->second.end()) peer->second.bound = false;
    }
  }
  table->second.erase(port);
  return Status::Ok();
}

size_t SimState::OpenPortCount(DomId domid) {
  std::lock_guard lock(mu_);
  auto table = ports_.find(domid);
  return table == ports_.end() ? 0 : table->second.size();
}

Result<std::unique_ptr<GrantMapping>> SimState::Map(DomId self, DomId granter, std::span<const GrantRef> refs,
                                                    bool writable) {
  if (refs.empty() || refs.size() > GrantTable::kMaxMapBatch) {
    return Status::InvalidArgument("sim: a grant map batch must have 1.." +
                                   std::to_string(GrantTable::kMaxMapBatch) + " refs, got " +
                                   std::to_string(refs.size()));
  }
  COWTAP_RETURN_IF_ERROR(faults->Check(SimFaultPoint::kGrantMap, granter));
  std::shared_ptr<SimDomain> d = FindDomain(granter);
  if (d == nullptr) return Status::NotFound("sim: grant map from unknown " + Dom(granter));
  if (!d->alive.load()) return Status::Cancelled("sim: grant map from " + Dom(granter) + ", which is dead");
  std::vector<uint32_t> frames;
  frames.reserve(refs.size());
  {
    std::lock_guard lock(d->pin_mu);
    for (size_t i = 0; i < refs.size(); ++i) {
      auto frame = PinLocked(*d, refs[i], self, writable);
      if (!frame.ok()) {
        for (size_t j = 0; j < i; ++j) UnpinLocked(*d, refs[j], writable);
        return frame.status().Annotate("sim: grant map segment " + std::to_string(i));
      }
      frames.push_back(*frame);
    }
  }
  auto unpin_all = [&] {
    std::lock_guard lock(d->pin_mu);
    for (GrantRef ref : refs) UnpinLocked(*d, ref, writable);
  };
  size_t bytes = refs.size() * kPageSize;
  void* base = mmap(nullptr, bytes, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (base == MAP_FAILED) {
    unpin_all();
    return Status::FromErrno(errno, "sim: reserving address space for a grant map");
  }
  int prot = PROT_READ | (writable ? PROT_WRITE : 0);
  for (size_t i = 0; i < refs.size();) {
    size_t run = 1;  // coalesce consecutive frames into one mmap
    while (i + run < refs.size() && frames[i + run] == frames[i] + run) ++run;
    void* at = static_cast<uint8_t*>(base) + i * kPageSize;
    void* got = mmap(at, run * kPageSize, prot, MAP_SHARED | MAP_FIXED, d->ram_fd.get(),
                     static_cast<off_t>(uint64_t{frames[i]} * kPageSize));
    if (got == MAP_FAILED) {
      int err = errno;
      munmap(base, bytes);
      unpin_all();
      return Status::FromErrno(err, "sim: mapping guest frames");
    }
    i += run;
  }
  return std::unique_ptr<GrantMapping>(
      new SimMapping(std::move(d), {refs.begin(), refs.end()}, writable, static_cast<uint8_t*>(base), faults));
}

Status SimState::Copy(DomId self, std::span<GrantCopyOp> ops) {
  for (GrantCopyOp& op : ops) {
    op.status = [&]() -> Status {
      if (uint32_t{op.offset} + op.length > kPageSize) {
        return Status::InvalidArgument("sim: grant copy of " + std::to_string(op.length) + " bytes at offset " +
                                       std::to_string(op.offset) + " crosses the page");
      }
      std::shared_ptr<SimDomain> d = FindDomain(op.domid);
      if (d == nullptr) return Status::NotFound("sim: grant copy from unknown " + Dom(op.domid));
      if (!d->alive.load()) return Status::Cancelled("sim: grant copy from " + Dom(op.domid) + ", which is dead");
      if (op.ref >= d->grant_entries) {
        return Status::OutOfRange("grant ref " + std::to_string(op.ref) + " is beyond the grant table of " +
                                  Dom(op.domid));
      }
      bool to_guest = op.direction == GrantCopyOp::Direction::kToGuest;
      Entry e = Decode(__atomic_load_n(&d->grant_table[op.ref], __ATOMIC_ACQUIRE));
      COWTAP_RETURN_IF_ERROR(CheckEntry(*d, op.ref, e, self, to_guest));
      off_t at = static_cast<off_t>(uint64_t{e.frame} * kPageSize + op.offset);
      ssize_t n = to_guest ? pwrite(d->ram_fd.get(), op.local, op.length, at)
                           : pread(d->ram_fd.get(), op.local, op.length, at);
      if (n != op.length) return Status::FromErrno(n < 0 ? errno : EIO, "sim: grant copy");
      return Status::Ok();
    }();
  }
  return Status::Ok();
}

size_t SimState::MappedGrantCount(DomId domid) {
  std::shared_ptr<SimDomain> d = FindDomain(domid);
  if (d == nullptr) return 0;
  std::lock_guard lock(d->pin_mu);
  return d->pins.size();
}

}  // namespace cowtap::xen::sim
