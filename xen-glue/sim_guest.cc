// SimGuest: the guest side of the sim. The guest's RAM and grant table are
// memfds it maps itself and hands to the hypervisor at connect; grant
// entries are written straight into the shared table (no round trip), the
// same way a Linux guest writes its grant table. Event-channel and
// xenstore operations are request/reply messages on sockets: one shared
// "link" socket for the domain (its closing is the domain's death) and one
// socket per xenstore handle.
#include <fcntl.h>
#include <signal.h>
#include <poll.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>
#include <stdint.h>  // the Xen public headers need it first
#include <xen/grant_table.h>

#include <cerrno>
#include <mutex>

#include "base/checked_math.h"
#include "xen-glue/sim.h"
#include "xen-glue/sim_state.h"

namespace cowtap::xen {
namespace sim {
namespace {

// Sends a request on `sock` and waits for its reply; the reply's leading
// status is returned through the reader's Get.
Result<Message> Call(int sock, const WireWriter& request) {
  COWTAP_RETURN_IF_ERROR(SendMessage(sock, request.bytes(), {}));
  auto reply = ReceiveMessage(sock);
  if (!reply.ok()) return reply.status().Annotate("sim guest: the hypervisor connection is gone");
  return reply;
}

Status Malformed() { return Status::Internal("sim guest: malformed reply from the hypervisor"); }

// The domain's connection; shared by the SimGuest and its handles.
struct Link {
  UniqueFd sock;
  std::mutex mu;  // one request/reply at a time
  DomId domid = 0;
};

class RemotePortControl final : public PortControl {
 public:
  explicit RemotePortControl(std::shared_ptr<Link> link) : link_(std::move(link)) {}
  Result<PortFds> BindUnbound(DomId remote) override {
    WireWriter w;
    w.U32(static_cast<uint32_t>(MsgType::kBindUnbound)).U16(remote);
    return Bind(w);
  }
  Result<PortFds> BindInterdomain(DomId remote, EvtchnPort remote_port) override {
    WireWriter w;
    w.U32(static_cast<uint32_t>(MsgType::kBindInterdomain)).U16(remote).U32(remote_port);
    return Bind(w);
  }
  Status Unbind(EvtchnPort port) override {
    WireWriter w;
    w.U32(static_cast<uint32_t>(MsgType::kUnbind)).U32(port);
    std::lock_guard lock(link_->mu);
    COWTAP_ASSIGN_OR_RETURN(Message m, Call(link_->sock.get(), w));
    WireReader r(m.bytes);
    Status s;
    if (!r.Get(&s)) return Malformed();
    return s;
  }

 private:
  Result<PortFds> Bind(const WireWriter& w) {
    std::lock_guard lock(link_->mu);
    COWTAP_ASSIGN_OR_RETURN(Message m, Call(link_->sock.get(), w));
    WireReader r(m.bytes);
    Status s;
    PortFds out;
    if (!r.Get(&s) || !r.U32(&out.port)) return Malformed();
    COWTAP_RETURN_IF_ERROR(s);
    if (m.fds.size() != 2) return Malformed();
    out.in = std::move(m.fds[0]);
    out.out = std::move(m.fds[1]);
    return out;
  }
  std::shared_ptr<Link> link_;
};

class RemoteXenStore final : public XenStore {
 public:
  RemoteXenStore(UniqueFd sock, UniqueFd event_fd) : sock_(std::move(sock)), event_fd_(std::move(event_fd)) {}

  Result<std::string> Read(std::string_view path, XsTransaction tx) override {
    COWTAP_ASSIGN_OR_RETURN(Message m, Do(Req(MsgType::kXsRead, tx).Str(path)));
    WireReader r(m.bytes);
    Status s;
    std::string value;
    if (!r.Get(&s) || !r.Str(&value)) return Malformed();
    COWTAP_RETURN_IF_ERROR(s);
    return value;
  }
  Status Write(std::string_view path, std::string_view value, XsTransaction tx) override {
    return Simple(Req(MsgType::kXsWrite, tx).Str(path).Str(value));
  }
  Status Mkdir(std::string_view path, XsTransaction tx) override {
    return Simple(Req(MsgType::kXsMkdir, tx).Str(path));
  }
  Status Remove(std::string_view path, XsTransaction tx) override {
    return Simple(Req(MsgType::kXsRemove, tx).Str(path));
  }
  Result<std::vector<std::string>> Directory(std::string_view path, XsTransaction tx) override {
    COWTAP_ASSIGN_OR_RETURN(Message m, Do(Req(MsgType::kXsDirectory, tx).Str(path)));
    WireReader r(m.bytes);
    Status s;
    uint32_t n = 0;
    if (!r.Get(&s) || !r.U32(&n)) return Malformed();
    COWTAP_RETURN_IF_ERROR(s);
    std::vector<std::string> names;
    for (uint32_t i = 0; i < n; ++i) {
      std::string name;
      if (!r.Str(&name)) return Malformed();
      names.push_back(std::move(name));
    }
    return names;
  }
  Result<std::vector<XsPermission>> GetPermissions(std::string_view path, XsTransaction tx) override {
    COWTAP_ASSIGN_OR_RETURN(Message m, Do(Req(MsgType::kXsGetPerms, tx).Str(path)));
    WireReader r(m.bytes);
    Status s;
    uint32_t n = 0;
    if (!r.Get(&s) || !r.U32(&n)) return Malformed();
    COWTAP_RETURN_IF_ERROR(s);
    std::vector<XsPermission> perms;
    for (uint32_t i = 0; i < n; ++i) {
      XsPermission p;
      uint8_t access = 0;
      if (!r.U16(&p.domid) || !r.U8(&access) || access > 3) return Malformed();
      p.access = static_cast<XsAccess>(access);
      perms.push_back(p);
    }
    return perms;
  }
  Status SetPermissions(std::string_view path, std::span<const XsPermission> perms, XsTransaction tx) override {
    WireWriter w = Req(MsgType::kXsSetPerms, tx);
    w.Str(path).U32(static_cast<uint32_t>(perms.size()));
    for (const auto& p : perms) w.U16(p.domid).U8(static_cast<uint8_t>(p.access));
    return Simple(w);
  }
  Status Watch(std::string_view path, std::string_view token) override {
    return Simple(Req(MsgType::kXsWatch, 0).Str(path).Str(token));
  }
  Status Unwatch(std::string_view path, std::string_view token) override {
    return Simple(Req(MsgType::kXsUnwatch, 0).Str(path).Str(token));
  }
  int fd() const override { return event_fd_.get(); }
  Result<std::optional<XsWatchEvent>> ReadWatch() override {
    // The hypervisor keeps the shared eventfd readable exactly while events
    // are queued (xs_db.cc), so an idle check costs no round trip: a guest
    // polling for completions would otherwise wake the hypervisor thread
    // once per request. An event queued after this check makes the fd
    // readable for the caller's next poll.
    pollfd pfd{event_fd_.get(), POLLIN, 0};
    if (::poll(&pfd, 1, 0) == 0) return std::optional<XsWatchEvent>();
    COWTAP_ASSIGN_OR_RETURN(Message m, Do(Req(MsgType::kXsReadWatch, 0)));
    WireReader r(m.bytes);
    Status s;
    uint8_t have = 0;
    XsWatchEvent e;
    if (!r.Get(&s) || !r.U8(&have) || !r.Str(&e.path) || !r.Str(&e.token)) return Malformed();
    COWTAP_RETURN_IF_ERROR(s);
    if (!have) return std::optional<XsWatchEvent>();
    return std::optional<XsWatchEvent>(std::move(e));
  }
  Result<XsTransaction> TransactionStart() override {
    COWTAP_ASSIGN_OR_RETURN(Message m, Do(Req(MsgType::kXsTxStart, 0)));
    WireReader r(m.bytes);
    Status s;
    uint32_t id = 0;
    if (!r.Get(&s) || !r.U32(&id)) return Malformed();
    COWTAP_RETURN_IF_ERROR(s);
    return id;
  }
  Status TransactionEnd(XsTransaction tx, bool commit) override {
    return Simple(Req(MsgType::kXsTxEnd, tx).U8(commit ? 1 : 0));
  }

 private:
  static WireWriter Req(MsgType type, XsTransaction tx) {
    WireWriter w;
    w.U32(static_cast<uint32_t>(type)).U32(tx);
    return w;
  }
  Result<Message> Do(const WireWriter& w) { return Call(sock_.get(), w); }
  Status Simple(const WireWriter& w) {
    COWTAP_ASSIGN_OR_RETURN(Message m, Do(w));
    WireReader r(m.bytes);
    Status s;
    if (!r.Get(&s)) return Malformed();
    return s;
  }

  UniqueFd sock_;
  UniqueFd event_fd_;
};

class SimGuestImpl final : public SimGuest {
 public:
  SimGuestImpl(std::shared_ptr<Link> link, const SimGuestOptions& o, uint8_t* ram, uint64_t* table)
      : link_(std::move(link)), ram_pages_(o.ram_pages), grant_entries_(o.grant_entries), ram_(ram),
        table_(table), ref_allocated_(o.grant_entries, false) {}
  ~SimGuestImpl() override {
    shutdown(link_->sock.get(), SHUT_RDWR);  // the domain dies now, even if handles live on
    munmap(ram_, uint64_t{ram_pages_} * kPageSize);
    munmap(table_, TableBytes(grant_entries_));
  }

  static uint64_t TableBytes(uint32_t entries) { return *AlignUp(uint64_t{entries} * 8, kPageSize); }

  DomId domid() const override { return link_->domid; }
  uint32_t ram_pages() const override { return ram_pages_; }
  uint32_t grant_entries() const override { return grant_entries_; }
  uint8_t* Page(uint32_t page_index) override {
    return page_index < ram_pages_ ? ram_ + uint64_t{page_index} * kPageSize : nullptr;
  }
  Result<uint32_t> AllocPage() override {
    std::lock_guard lock(mu_);
    if (!free_pages_.empty()) {
      uint32_t p = free_pages_.back();
      free_pages_.pop_back();
      return p;
    }
    if (next_page_ >= ram_pages_) {
      return Status::NoSpace("sim guest: all " + std::to_string(ram_pages_) + " RAM pages are in use");
    }
    return next_page_++;
  }
  void FreePage(uint32_t page_index) override {
    std::lock_guard lock(mu_);
    if (page_index < next_page_) free_pages_.push_back(page_index);
  }

  Result<GrantRef> GrantAccess(uint32_t page_index, DomId to, bool readonly) override {
    if (page_index >= ram_pages_) {
      return Status::OutOfRange("sim guest: page " + std::to_string(page_index) + " is beyond RAM");
    }
    GrantRef ref;
    {
      std::lock_guard lock(mu_);
      if (!free_refs_.empty()) {
        ref = free_refs_.back();
        free_refs_.pop_back();
      } else if (next_ref_ < grant_entries_) {
        ref = next_ref_++;
      } else {
        return Status::NoSpace("sim guest: grant table full (" + std::to_string(grant_entries_) + " entries)");
      }
      ref_allocated_[ref] = true;
      ++in_use_;
    }
    uint64_t flags = GTF_permit_access | (readonly ? GTF_readonly : 0);
    uint64_t entry = flags | (uint64_t{to} << 16) | (uint64_t{page_index} << 32);
    __atomic_store_n(&table_[ref], entry, __ATOMIC_RELEASE);
    return ref;
  }
  Status EndAccess(GrantRef ref) override {
    std::lock_guard lock(mu_);
    if (ref >= grant_entries_ || !ref_allocated_[ref]) {
      return Status::InvalidArgument("sim guest: grant ref " + std::to_string(ref) + " is not allocated");
    }
    uint64_t seen = __atomic_load_n(&table_[ref], __ATOMIC_ACQUIRE);
    do {
      if (seen & (GTF_reading | GTF_writing)) {
        return Status::Busy("sim guest: grant ref " + std::to_string(ref) +
                            " is still mapped by the backend; end access after it unmaps");
      }
    } while (!__atomic_compare_exchange_n(&table_[ref], &seen, 0, false, __ATOMIC_ACQ_REL, __ATOMIC_ACQUIRE));
    ref_allocated_[ref] = false;
    free_refs_.push_back(ref);
    --in_use_;
    return Status::Ok();
  }
  size_t GrantsInUse() override {
    std::lock_guard lock(mu_);
    return in_use_;
  }

  Result<std::unique_ptr<EventChannel>> OpenEventChannel() override {
    return NewSimEventChannel(std::make_unique<RemotePortControl>(link_));
  }
  Result<std::unique_ptr<XenStore>> OpenXenStore() override {
    WireWriter w;
    w.U32(static_cast<uint32_t>(MsgType::kOpenXs));
    std::lock_guard lock(link_->mu);
    COWTAP_ASSIGN_OR_RETURN(Message m, Call(link_->sock.get(), w));
    WireReader r(m.bytes);
    Status s;
    if (!r.Get(&s)) return Malformed();
    COWTAP_RETURN_IF_ERROR(s);
    if (m.fds.size() != 2) return Malformed();
    return std::unique_ptr<XenStore>(new RemoteXenStore(std::move(m.fds[0]), std::move(m.fds[1])));
  }

  Status WriteRawGrantEntry(GrantRef ref, uint16_t flags, DomId domid, uint32_t frame) override {
    if (ref >= grant_entries_) return Status::OutOfRange("sim guest: ref beyond the grant table");
    uint64_t entry = flags | (uint64_t{domid} << 16) | (uint64_t{frame} << 32);
    __atomic_store_n(&table_[ref], entry, __ATOMIC_RELEASE);
    return Status::Ok();
  }
  Status ForceRevoke(GrantRef ref) override {
    if (ref >= grant_entries_) return Status::OutOfRange("sim guest: ref beyond the grant table");
    __atomic_store_n(&table_[ref], uint64_t{0}, __ATOMIC_RELEASE);
    return Status::Ok();
  }
  [[noreturn]] void DieAbruptly() override {
    kill(getpid(), SIGKILL);
    _exit(137);
  }

 private:
  std::shared_ptr<Link> link_;
  const uint32_t ram_pages_;
  const uint32_t grant_entries_;
  uint8_t* const ram_;
  uint64_t* const table_;
  std::mutex mu_;
  uint32_t next_page_ = 0;
  std::vector<uint32_t> free_pages_;
  GrantRef next_ref_ = kFirstGrantRef;
  std::vector<GrantRef> free_refs_;
  std::vector<bool> ref_allocated_;
  size_t in_use_ = 0;
};

Result<UniqueFd> NewMemfd(const char* name, uint64_t bytes) {
  UniqueFd fd(memfd_create(name, MFD_CLOEXEC | MFD_ALLOW_SEALING));
  if (!fd.valid()) return Status::FromErrno(errno, std::string("sim guest: memfd_create ") + name);
  if (ftruncate(fd.get(), static_cast<off_t>(bytes)) != 0) {
    return Status::FromErrno(errno, std::string("sim guest: sizing ") + name);
  }
  return fd;
}

}  // namespace
}  // namespace sim

Result<std::unique_ptr<SimGuest>> SimGuest::Connect(const std::string& socket_path, const SimGuestOptions& o) {
  using namespace sim;  // NOLINT: local to this factory
  if (o.ram_pages == 0 || o.ram_pages > kMaxGuestRamPages || o.grant_entries <= kFirstGrantRef ||
      o.grant_entries > kMaxGrantEntries) {
    return Status::InvalidArgument("sim guest: RAM pages or grant entries outside the sim's limits");
  }
  uint64_t ram_bytes = uint64_t{o.ram_pages} * kPageSize;
  uint64_t table_bytes = SimGuestImpl::TableBytes(o.grant_entries);
  COWTAP_ASSIGN_OR_RETURN(UniqueFd ram_fd, NewMemfd("cowtap-guest-ram", ram_bytes));
  COWTAP_ASSIGN_OR_RETURN(UniqueFd table_fd, NewMemfd("cowtap-guest-grants", table_bytes));
  void* ram = mmap(nullptr, ram_bytes, PROT_READ | PROT_WRITE, MAP_SHARED, ram_fd.get(), 0);
  if (ram == MAP_FAILED) return Status::FromErrno(errno, "sim guest: mapping RAM");
  void* table = mmap(nullptr, table_bytes, PROT_READ | PROT_WRITE, MAP_SHARED, table_fd.get(), 0);
  if (table == MAP_FAILED) {
    munmap(ram, ram_bytes);
    return Status::FromErrno(errno, "sim guest: mapping the grant table");
  }
  auto unmap = [&] {
    munmap(ram, ram_bytes);
    munmap(table, table_bytes);
  };
  auto link = std::make_shared<Link>();
  link->sock.Reset(socket(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0));
  sockaddr_un addr{};
  addr.sun_family = AF_UNIX;
  if (!link->sock.valid() || socket_path.size() >= sizeof(addr.sun_path)) {
    unmap();
    return Status::InvalidArgument("sim guest: cannot make a socket for " + socket_path);
  }
  socket_path.copy(addr.sun_path, socket_path.size());
  if (connect(link->sock.get(), reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) != 0) {
    int err = errno;
    unmap();
    return Status::FromErrno(err, "sim guest: connecting to the sim hypervisor at " + socket_path +
                                      " (is it running?)");
  }
  WireWriter hello;
  hello.U32(static_cast<uint32_t>(MsgType::kHello)).U16(o.domid).U32(o.ram_pages).U32(o.grant_entries);
  int fds[2] = {ram_fd.get(), table_fd.get()};
  Status sent = SendMessage(link->sock.get(), hello.bytes(), fds);
  auto reply = sent.ok() ? ReceiveMessage(link->sock.get()) : Result<Message>(sent);
  if (!reply.ok()) {
    unmap();
    return reply.status().Annotate("sim guest: hello");
  }
  WireReader r(reply->bytes);
  Status s;
  uint16_t domid = 0;
  if (!r.Get(&s) || !r.U16(&domid)) s = Malformed();
  if (!s.ok()) {
    unmap();
    return s;
  }
  link->domid = domid;
  return std::unique_ptr<SimGuest>(
      new SimGuestImpl(std::move(link), o, static_cast<uint8_t*>(ram), static_cast<uint64_t*>(table)));
}

}  // namespace cowtap::xen
