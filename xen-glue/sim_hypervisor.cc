// SimHypervisor: the socket server that guests connect to, and the
// in-process XenPlatform for the backend. One thread serves every guest
// socket with poll(); requests are answered in order, replies are sent
// without blocking (a guest that does not read its replies is killed, so it
// cannot stall the hypervisor). Everything a guest sends is decoded with
// WireReader and checked before use.
#include <fcntl.h>
#include <poll.h>
#include <sys/eventfd.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include <cerrno>
#include <list>
#include <map>
#include <thread>

#include "base/log.h"
#include "xen-glue/sim.h"
#include "xen-glue/sim_state.h"

namespace cowtap::xen {
namespace sim {
namespace {

constexpr size_t kMaxGuestConnections = 256;
constexpr size_t kMaxXsHandlesPerGuest = 32;

class LocalPortControl final : public PortControl {
 public:
  LocalPortControl(std::shared_ptr<SimState> state, DomId self) : state_(std::move(state)), self_(self) {}
  Result<PortFds> BindUnbound(DomId remote) override { return state_->BindUnbound(self_, remote); }
  Result<PortFds> BindInterdomain(DomId remote, EvtchnPort remote_port) override {
    return state_->BindInterdomain(self_, remote, remote_port);
  }
  Status Unbind(EvtchnPort port) override { return state_->Unbind(self_, port); }

 private:
  std::shared_ptr<SimState> state_;
  DomId self_;
};

class SimGrantTable final : public GrantTable {
 public:
  SimGrantTable(std::shared_ptr<SimState> state, DomId self) : state_(std::move(state)), self_(self) {}
  Result<std::unique_ptr<GrantMapping>> Map(DomId domid, std::span<const GrantRef> refs, bool writable) override {
    return state_->Map(self_, domid, refs, writable);
  }
  Status Copy(std::span<GrantCopyOp> ops) override { return state_->Copy(self_, ops); }

 private:
  std::shared_ptr<SimState> state_;
  DomId self_;
};

// Decorators of the in-process handles that consult SimFaults first and
// forward everything else.
class FaultyEventChannel final : public EventChannel {
 public:
  FaultyEventChannel(std::unique_ptr<EventChannel> inner, std::shared_ptr<SimFaults> faults)
      : inner_(std::move(inner)), faults_(std::move(faults)) {}
  Result<EvtchnPort> BindInterdomain(DomId remote, EvtchnPort remote_port) override {
    COWTAP_RETURN_IF_ERROR(faults_->Check(SimFaultPoint::kEvtchnBind, remote));
    COWTAP_ASSIGN_OR_RETURN(EvtchnPort port, inner_->BindInterdomain(remote, remote_port));
    remotes_[port] = remote;
    return port;
  }
  Result<EvtchnPort> BindUnbound(DomId remote) override {
    COWTAP_ASSIGN_OR_RETURN(EvtchnPort port, inner_->BindUnbound(remote));
    remotes_[port] = remote;
    return port;
  }
  Status Unbind(EvtchnPort local_port) override {
    remotes_.erase(local_port);
    return inner_->Unbind(local_port);
  }
  Status Notify(EvtchnPort local_port) override {
    auto it = remotes_.find(local_port);
    COWTAP_RETURN_IF_ERROR(
        faults_->Check(SimFaultPoint::kEvtchnNotify, it == remotes_.end() ? kAnyDomain : it->second));
    return inner_->Notify(local_port);
  }
  int fd() const override { return inner_->fd(); }
  Result<std::optional<EvtchnPort>> Pending() override { return inner_->Pending(); }
  Status Unmask(EvtchnPort local_port) override { return inner_->Unmask(local_port); }

 private:
  std::unique_ptr<EventChannel> inner_;
  std::shared_ptr<SimFaults> faults_;
  std::map<EvtchnPort, DomId> remotes_;
};

class FaultyXenStore final : public XenStore {
 public:
  FaultyXenStore(std::unique_ptr<XenStore> inner, std::shared_ptr<SimFaults> faults)
      : inner_(std::move(inner)), faults_(std::move(faults)) {}
  Result<std::string> Read(std::string_view path, XsTransaction tx) override {
    COWTAP_RETURN_IF_ERROR(faults_->Check(SimFaultPoint::kXsRead, kAnyDomain, path));
    return inner_->Read(path, tx);
  }
  Status Write(std::string_view path, std::string_view value, XsTransaction tx) override {
    COWTAP_RETURN_IF_ERROR(faults_->Check(SimFaultPoint::kXsWrite, kAnyDomain, path));
    return inner_->Write(path, value, tx);
  }
  Status Mkdir(std::string_view path, XsTransaction tx) override {
    COWTAP_RETURN_IF_ERROR(faults_->Check(SimFaultPoint::kXsWrite, kAnyDomain, path));
    return inner_->Mkdir(path, tx);
  }
  Status Remove(std::string_view path, XsTransaction tx) override {
    COWTAP_RETURN_IF_ERROR(faults_->Check(SimFaultPoint::kXsWrite, kAnyDomain, path));
    return inner_->Remove(path, tx);
  }
  Result<std::vector<std::string>> Directory(std::string_view path, XsTransaction tx) override {
    COWTAP_RETURN_IF_ERROR(faults_->Check(SimFaultPoint::kXsRead, kAnyDomain, path));
    return inner_->Directory(path, tx);
  }
  Result<std::vector<XsPermission>> GetPermissions(std::string_view path, XsTransaction tx) override {
    return inner_->GetPermissions(path, tx);
  }
  Status SetPermissions(std::string_view path, std::span<const XsPermission> perms, XsTransaction tx) override {
    return inner_->SetPermissions(path, perms, tx);
  }
  Status Watch(std::string_view path, std::string_view token) override { return inner_->Watch(path, token); }
  Status Unwatch(std::string_view path, std::string_view token) override { return inner_->Unwatch(path, token); }
  int fd() const override { return inner_->fd(); }
  Result<std::optional<XsWatchEvent>> ReadWatch() override { return inner_->ReadWatch(); }
  Result<XsTransaction> TransactionStart() override { return inner_->TransactionStart(); }
  Status TransactionEnd(XsTransaction tx, bool commit) override { return inner_->TransactionEnd(tx, commit); }

 private:
  std::unique_ptr<XenStore> inner_;
  std::shared_ptr<SimFaults> faults_;
};

class SimPlatform final : public XenPlatform {
 public:
  SimPlatform(std::shared_ptr<SimState> state, DomId self) : state_(std::move(state)), self_(self) {}
  Result<std::unique_ptr<GrantTable>> OpenGrantTable() override {
    return std::unique_ptr<GrantTable>(new SimGrantTable(state_, self_));
  }
  Result<std::unique_ptr<EventChannel>> OpenEventChannel() override {
    COWTAP_ASSIGN_OR_RETURN(auto inner, NewSimEventChannel(std::make_unique<LocalPortControl>(state_, self_)));
    return std::unique_ptr<EventChannel>(new FaultyEventChannel(std::move(inner), state_->faults));
  }
  Result<std::unique_ptr<XenStore>> OpenXenStore() override {
    COWTAP_ASSIGN_OR_RETURN(auto inner, XsDb::Connect(state_->xs, self_));
    return std::unique_ptr<XenStore>(new FaultyXenStore(std::move(inner), state_->faults));
  }
  bool DomainAlive(DomId domid) override { return state_->DomainAlive(domid); }
  DomId self_domid() const override { return self_; }

 private:
  std::shared_ptr<SimState> state_;
  DomId self_;
};

struct XsClient {
  UniqueFd sock;
  std::unique_ptr<XenStore> xs;
};

struct GuestConn {
  UniqueFd sock;
  std::shared_ptr<SimDomain> domain;  // null until the hello succeeded
  std::list<XsClient> xs_clients;
  bool dead = false;
};

// Decodes one xenstore request and runs it on `xs`; returns the reply.
WireWriter ServeXs(XenStore& xs, const Message& m) {
  WireReader r(m.bytes);
  uint32_t type = 0, tx = 0;
  std::string path, value;
  WireWriter w;
  auto malformed = [] {
    WireWriter e;
    e.Put(Status::InvalidArgument("sim: malformed xenstore request"));
    return e;
  };
  if (!r.U32(&type) || !r.U32(&tx)) return malformed();
  switch (static_cast<MsgType>(type)) {
    case MsgType::kXsRead: {
      if (!r.Str(&path, kXsMaxPathBytes)) return malformed();
      auto v = xs.Read(path, tx);
      w.Put(v.status()).Str(v.ok() ? *v : "");
      return w;
    }
    case MsgType::kXsWrite:
      if (!r.Str(&path, kXsMaxPathBytes) || !r.Str(&value, kXsMaxValueBytes)) return malformed();
      w.Put(xs.Write(path, value, tx));
      return w;
    case MsgType::kXsMkdir:
      if (!r.Str(&path, kXsMaxPathBytes)) return malformed();
      w.Put(xs.Mkdir(path, tx));
      return w;
    case MsgType::kXsRemove:
      if (!r.Str(&path, kXsMaxPathBytes)) return malformed();
      w.Put(xs.Remove(path, tx));
      return w;
    case MsgType::kXsDirectory: {
      if (!r.Str(&path, kXsMaxPathBytes)) return malformed();
      auto names = xs.Directory(path, tx);
      size_t bytes = 0;
      if (names.ok()) {
        for (const auto& n : *names) bytes += n.size() + 4;
      }
      if (bytes > kMaxMessageBytes - 1024) {
        w.Put(Status::NoSpace("sim: directory " + path + " is too large to list over the socket"));
        return w;
      }
      w.Put(names.status()).U32(names.ok() ? names->size() : 0);
      if (names.ok()) {
        for (const auto& n : *names) w.Str(n);
      }
      return w;
    }
    case MsgType::kXsGetPerms: {
      if (!r.Str(&path, kXsMaxPathBytes)) return malformed();
      auto perms = xs.GetPermissions(path, tx);
      w.Put(perms.status()).U32(perms.ok() ? perms->size() : 0);
      if (perms.ok()) {
        for (const auto& p : *perms) w.U16(p.domid).U8(static_cast<uint8_t>(p.access));
      }
      return w;
    }
    case MsgType::kXsSetPerms: {
      uint32_t n = 0;
      if (!r.Str(&path, kXsMaxPathBytes) || !r.U32(&n) || n > 1024) return malformed();
      std::vector<XsPermission> perms(n);
      for (auto& p : perms) {
        uint8_t access = 0;
        if (!r.U16(&p.domid) || !r.U8(&access) || access > 3) return malformed();
        p.access = static_cast<XsAccess>(access);
      }
      w.Put(xs.SetPermissions(path, perms, tx));
      return w;
    }
    case MsgType::kXsWatch:
    case MsgType::kXsUnwatch:
      if (!r.Str(&path, kXsMaxPathBytes) || !r.Str(&value, kXsMaxPathBytes)) return malformed();
      w.Put(static_cast<MsgType>(type) == MsgType::kXsWatch ? xs.Watch(path, value) : xs.Unwatch(path, value));
      return w;
    case MsgType::kXsReadWatch: {
      auto e = xs.ReadWatch();
      bool have = e.ok() && e->has_value();
      w.Put(e.status()).U8(have).Str(have ? (*e)->path : "").Str(have ? (*e)->token : "");
      return w;
    }
    case MsgType::kXsTxStart: {
      auto id = xs.TransactionStart();
      w.Put(id.status()).U32(id.ok() ? *id : 0);
      return w;
    }
    case MsgType::kXsTxEnd: {
      uint8_t commit = 0;
      if (!r.U8(&commit)) return malformed();
      w.Put(xs.TransactionEnd(tx, commit != 0));
      return w;
    }
    default:
      return malformed();
  }
}

class SimHypervisorImpl final : public SimHypervisor {
 public:
  SimHypervisorImpl(std::string path, UniqueFd listen_fd, UniqueFd wake_fd)
      : path_(std::move(path)), listen_(std::move(listen_fd)), wake_(std::move(wake_fd)) {
    thread_ = std::thread([this] { Serve(); });
  }
  ~SimHypervisorImpl() override {
    stop_.store(true);
    Wake();
    thread_.join();
    for (auto& g : guests_) {
      if (g.domain) state_->KillDomain(g.domain);
    }
    guests_.clear();
    unlink(path_.c_str());
  }

  const std::string& socket_path() const override { return path_; }
  std::unique_ptr<XenPlatform> NewPlatform(DomId domid) override {
    return std::make_unique<SimPlatform>(state_, domid);
  }
  bool DomainAlive(DomId domid) override { return state_->DomainAlive(domid); }
  bool WaitForDomain(DomId domid, std::chrono::milliseconds timeout) override {
    return state_->WaitForDomain(domid, timeout);
  }
  Status DestroyDomain(DomId domid) override {
    std::shared_ptr<SimDomain> d = state_->FindDomain(domid);
    if (d == nullptr) return Status::NotFound("sim: domain " + std::to_string(domid) + " never connected");
    state_->KillDomain(d);
    Wake();  // the server closes its socket
    return Status::Ok();
  }
  size_t MappedGrantCount(DomId domid) override { return state_->MappedGrantCount(domid); }
  size_t OpenPortCount(DomId domid) override { return state_->OpenPortCount(domid); }
  SimFaults& faults() override { return *state_->faults; }

 private:
  void Wake() {
    uint64_t one = 1;
    if (write(wake_.get(), &one, sizeof(one)) < 0) {
      // Saturated counter: the server is already due to wake.
    }
  }

  void Serve() {
    std::vector<pollfd> fds;
    std::vector<std::pair<GuestConn*, XsClient*>> owners;
    while (!stop_.load()) {
      fds.clear();
      owners.clear();
      fds.push_back({wake_.get(), POLLIN, 0});
      fds.push_back({listen_.get(), POLLIN, 0});
      owners.resize(2);
      for (auto& g : guests_) {
        fds.push_back({g.sock.get(), POLLIN, 0});
        owners.push_back({&g, nullptr});
        for (auto& c : g.xs_clients) {
          fds.push_back({c.sock.get(), POLLIN, 0});
          owners.push_back({&g, &c});
        }
      }
      if (poll(fds.data(), fds.size(), -1) < 0 && errno != EINTR) {
        spdlog::error("sim hypervisor: poll failed: {}", strerror(errno));
        return;
      }
      if (fds[0].revents) {
        uint64_t count;
        if (read(wake_.get(), &count, sizeof(count)) < 0) {
          // EAGAIN: another thread's wake was already consumed.
        }
      }
      if (fds[1].revents & POLLIN) Accept();
      for (size_t i = 2; i < fds.size(); ++i) {
        if (fds[i].revents == 0) continue;
        auto [g, c] = owners[i];
        if (g->dead) continue;
        if (c == nullptr) {
          ServeMain(*g);
        } else {
          auto m = ReceiveMessage(c->sock.get());
          if (!m.ok()) {
            g->xs_clients.remove_if([c = c](const XsClient& x) { return &x == c; });
            continue;
          }
          WireWriter reply = ServeXs(*c->xs, *m);
          if (!SendMessage(c->sock.get(), reply.bytes(), {}, true).ok()) g->dead = true;
        }
      }
      for (auto& g : guests_) {
        if (g.domain && !g.domain->alive.load()) g.dead = true;  // destroyed from another thread
        if (g.dead && g.domain) state_->KillDomain(g.domain);
      }
      guests_.remove_if([](const GuestConn& g) { return g.dead; });
    }
  }

  void Accept() {
    int fd = accept4(listen_.get(), nullptr, nullptr, SOCK_CLOEXEC);
    if (fd < 0) return;
    if (guests_.size() >= kMaxGuestConnections) {
      close(fd);
      if (limit_log_.Allow()) spdlog::warn("sim hypervisor: too many guest connections; refusing one");
      return;
    }
    guests_.emplace_back();
    guests_.back().sock.Reset(fd);
  }

  void ServeMain(GuestConn& g) {
    auto m = ReceiveMessage(g.sock.get());
    if (!m.ok()) {
      g.dead = true;  // EOF: the guest exited, crashed or closed its connection
      return;
    }
    WireReader r(m->bytes);
    uint32_t type = 0;
    WireWriter w;
    std::vector<int> send_fds;
    UniqueFd keep_a, keep_b;  // fds to send, closed after sending
    bool fatal = false;
    if (!r.U32(&type)) type = 0;
    if (g.domain == nullptr && static_cast<MsgType>(type) != MsgType::kHello) {
      g.dead = true;
      return;
    }
    switch (static_cast<MsgType>(type)) {
      case MsgType::kHello: {
        uint16_t domid = 0;
        uint32_t ram_pages = 0, grant_entries = 0;
        Status s;
        if (g.domain != nullptr) {
          s = Status::InvalidArgument("sim: hello sent twice");
        } else if (!r.U16(&domid) || !r.U32(&ram_pages) || !r.U32(&grant_entries) || m->fds.size() != 2) {
          s = Status::InvalidArgument("sim: malformed hello (needs domid, RAM pages, grant entries, 2 memfds)");
        } else {
          auto d = state_->AddDomain(domid, std::move(m->fds[0]), ram_pages, std::move(m->fds[1]), grant_entries);
          s = d.status();
          if (d.ok()) g.domain = *d;
        }
        w.Put(s).U16(g.domain ? g.domain->domid : 0);
        fatal = !s.ok();
        break;
      }
      case MsgType::kOpenXs: {
        Status s;
        int pair[2] = {-1, -1};
        if (g.xs_clients.size() >= kMaxXsHandlesPerGuest) {
          s = Status::NoSpace("sim: too many xenstore handles for this guest");
        } else if (socketpair(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0, pair) != 0) {
          s = Status::FromErrno(errno, "sim: socketpair for a xenstore handle");
        } else {
          auto xs = XsDb::Connect(state_->xs, g.domain->domid);
          s = xs.status();
          if (xs.ok()) {
            keep_a.Reset(pair[1]);
            keep_b = UniqueFd(fcntl((*xs)->fd(), F_DUPFD_CLOEXEC, 0));
            g.xs_clients.push_back({UniqueFd(pair[0]), std::move(xs).value()});
            send_fds = {keep_a.get(), keep_b.get()};
          } else {
            close(pair[0]);
            close(pair[1]);
          }
        }
        w.Put(s);
        break;
      }
      case MsgType::kBindUnbound:
      case MsgType::kBindInterdomain: {
        uint16_t remote = 0;
        uint32_t remote_port = 0;
        Result<PortFds> fds = Status::InvalidArgument("sim: malformed event-channel request");
        bool unbound = static_cast<MsgType>(type) == MsgType::kBindUnbound;
        if (r.U16(&remote) && (unbound || r.U32(&remote_port))) {
          fds = unbound ? state_->BindUnbound(g.domain->domid, remote)
                        : state_->BindInterdomain(g.domain->domid, remote, remote_port);
        }
        w.Put(fds.status()).U32(fds.ok() ? fds->port : 0);
        if (fds.ok()) {
          keep_a = std::move(fds->in);
          keep_b = std::move(fds->out);
          send_fds = {keep_a.get(), keep_b.get()};
        }
        break;
      }
      case MsgType::kUnbind: {
        uint32_t port = 0;
        w.Put(r.U32(&port) ? state_->Unbind(g.domain->domid, port)
                           : Status::InvalidArgument("sim: malformed unbind"));
        break;
      }
      default:
        w.Put(Status::InvalidArgument("sim: unknown request type " + std::to_string(type)));
        break;
    }
    if (!SendMessage(g.sock.get(), w.bytes(), send_fds, true).ok() || fatal) g.dead = true;
  }

  std::shared_ptr<SimState> state_ = std::make_shared<SimState>();
  const std::string path_;
  UniqueFd listen_;
  UniqueFd wake_;
  std::atomic<bool> stop_{false};
  std::list<GuestConn> guests_;  // server thread only
  RateLimiter limit_log_{5, std::chrono::seconds(10)};
  std::thread thread_;
};

}  // namespace
}  // namespace sim

Result<std::unique_ptr<SimHypervisor>> SimHypervisor::Start(const std::string& socket_path) {
  using sim::UniqueFd;
  sockaddr_un addr{};
  if (socket_path.empty() || socket_path.size() >= sizeof(addr.sun_path)) {
    return Status::InvalidArgument("sim: socket path '" + socket_path + "' is empty or longer than " +
                                   std::to_string(sizeof(addr.sun_path) - 1) + " bytes");
  }
  UniqueFd fd(socket(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0));
  if (!fd.valid()) return Status::FromErrno(errno, "sim: socket");
  addr.sun_family = AF_UNIX;
  socket_path.copy(addr.sun_path, socket_path.size());
  unlink(socket_path.c_str());
  if (bind(fd.get(), reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) != 0) {
    return Status::FromErrno(errno, "sim: bind " + socket_path);
  }
  if (listen(fd.get(), 64) != 0) return Status::FromErrno(errno, "sim: listen " + socket_path);
  UniqueFd wake(eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC));
  if (!wake.valid()) return Status::FromErrno(errno, "sim: eventfd");
  return std::unique_ptr<SimHypervisor>(new sim::SimHypervisorImpl(socket_path, std::move(fd), std::move(wake)));
}

}  // namespace cowtap::xen
