#include "xen-glue/xs_db.h"

#include <sys/eventfd.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <utility>

namespace cowtap::xen {

struct XsDb::Conn {
  DomId domid = 0;
  int event_fd = -1;
  std::vector<std::pair<std::string, std::string>> watches;  // (path, token)
  std::deque<XsWatchEvent> queue;
  std::map<XsTransaction, std::unique_ptr<Tx>> txs;
};

namespace {

bool IsUnder(std::string_view path, std::string_view dir) {
  if (dir == "/") return path.size() > 1 && path[0] == '/';
  return path.size() > dir.size() && path.starts_with(dir) && path[dir.size()] == '/';
}

std::string Parent(std::string_view path) {
  size_t slash = path.rfind('/');
  if (slash == 0 || slash == std::string_view::npos) return "/";
  return std::string(path.substr(0, slash));
}

XsAccess AccessOf(const std::vector<XsPermission>& perms, DomId domid) {
  if (domid == kDom0 || perms.empty() || perms[0].domid == domid) return XsAccess::kReadWrite;
  for (size_t i = 1; i < perms.size(); ++i) {
    if (perms[i].domid == domid) return perms[i].access;
  }
  return perms[0].access;
}
bool CanRead(const std::vector<XsPermission>& perms, DomId domid) {
  XsAccess a = AccessOf(perms, domid);
  return a == XsAccess::kRead || a == XsAccess::kReadWrite;
}
bool CanWrite(const std::vector<XsPermission>& perms, DomId domid) {
  XsAccess a = AccessOf(perms, domid);
  return a == XsAccess::kWrite || a == XsAccess::kReadWrite;
}

Status Denied(DomId domid, std::string_view what, std::string_view path) {
  return Status::FromErrno(EACCES, "xenstore: domain " + std::to_string(domid) + " may not " +
                                       std::string(what) + " " + std::string(path));
}

bool IsSpecialWatch(std::string_view path) {
  return path == "@introduceDomain" || path == "@releaseDomain";
}

}  // namespace

Status ValidateXsPath(std::string_view path) {
  auto bad = [&](std::string_view why) {
    return Status::InvalidArgument("xenstore path '" + std::string(path.substr(0, 80)) + "' " +
                                   std::string(why));
  };
  if (path.empty() || path[0] != '/') return bad("is not absolute");
  if (path.size() > kXsMaxPathBytes) return bad("is too long");
  if (path == "/") return Status::Ok();
  if (path.back() == '/') return bad("ends with '/'");
  for (size_t i = 0; i < path.size(); ++i) {
    char ch = path[i];
    bool ok = (ch >= 'a' && ch <= 'z') || (ch >= 'A' && ch <= 'Z') || (ch >= '0' && ch <= '9') ||
              ch == '_' || ch == '-' || ch == '@' || ch == '/';
    if (!ok) return bad("has a character outside [A-Za-z0-9_@-/]");
    if (ch == '/' && i + 1 < path.size() && path[i + 1] == '/') return bad("has an empty component");
  }
  return Status::Ok();
}

XsDb::XsDb() {
  const std::vector<XsPermission> root_perms = {{kDom0, XsAccess::kNone}};
  for (const char* p : {"/", "/local", "/local/domain", "/local/domain/0"}) {
    tree_[p] = Node{"", root_perms, generation_++};
  }
}

XsDb::~XsDb() = default;

void XsDb::Touch(Tx* tx, const std::string& path) {
  if (tx == nullptr || tx->seen.count(path)) return;
  auto it = tx->tree.find(path);
  tx->seen[path] = it == tx->tree.end() ? 0 : it->second.generation;
}

size_t XsDb::CountOwned(const Tree& tree, DomId domid) const {
  size_t n = 0;
  for (const auto& [path, node] : tree) n += (!node.perms.empty() && node.perms[0].domid == domid);
  return n;
}

Status XsDb::DoWrite(Conn& c, Tx* tx, const std::string& path, std::string_view value,
                     bool only_create) {
  COWTAP_RETURN_IF_ERROR(ValidateXsPath(path));
  if (value.size() > kXsMaxValueBytes) {
    return Status::InvalidArgument("xenstore: value for " + path + " is " + std::to_string(value.size()) +
                                   " bytes, more than " + std::to_string(kXsMaxValueBytes));
  }
  Tree& tree = TreeFor(tx);
  Touch(tx, path);
  if (auto it = tree.find(path); it != tree.end()) {
    if (!CanWrite(it->second.perms, c.domid)) return Denied(c.domid, "write", path);
    if (only_create) return Status::Ok();
    it->second.value = std::string(value);
    it->second.generation = ++generation_;
  } else {
    std::vector<std::string> missing = {path};
    std::string ancestor = Parent(path);
    while (!tree.count(ancestor)) {
      missing.push_back(ancestor);
      ancestor = Parent(ancestor);
    }
    Node& top = tree[ancestor];
    if (!CanWrite(top.perms, c.domid)) return Denied(c.domid, "create below", ancestor);
    if (c.domid != kDom0 && CountOwned(tree, c.domid) + missing.size() > kXsMaxNodesPerDomain) {
      return Status::NoSpace("xenstore: domain " + std::to_string(c.domid) + " owns too many nodes (quota " +
                             std::to_string(kXsMaxNodesPerDomain) + ")");
    }
    for (auto p = missing.rbegin(); p != missing.rend(); ++p) {
      std::string parent = Parent(*p);
      Touch(tx, parent);
      Touch(tx, *p);
      Node& parent_node = tree[parent];
      parent_node.generation = ++generation_;
      Node node;
      node.perms = parent_node.perms;
      if (c.domid != kDom0) node.perms[0].domid = c.domid;
      node.generation = ++generation_;
      if (*p == path) node.value = std::string(value);
      tree[*p] = std::move(node);
    }
  }
  if (tx) {
    tx->ops.push_back(Op{only_create ? Op::kMkdir : Op::kWrite, path, std::string(value), {}});
  } else {
    Fire(path, false);
  }
  return Status::Ok();
}

Status XsDb::DoRemove(Conn& c, Tx* tx, const std::string& path) {
  COWTAP_RETURN_IF_ERROR(ValidateXsPath(path));
  if (path == "/") return Status::InvalidArgument("xenstore: cannot remove /");
  Tree& tree = TreeFor(tx);
  Touch(tx, path);
  auto it = tree.find(path);
  if (it == tree.end()) return Status::Ok();
  if (!CanWrite(it->second.perms, c.domid)) return Denied(c.domid, "remove", path);
  std::string prefix = path + "/";
  auto child = tree.lower_bound(prefix);
  while (child != tree.end() && child->first.starts_with(prefix)) {
    Touch(tx, child->first);
    child = tree.erase(child);
  }
  tree.erase(path);
  std::string parent = Parent(path);
  Touch(tx, parent);
  tree[parent].generation = ++generation_;
  if (tx) {
    tx->ops.push_back(Op{Op::kRemove, path, "", {}});
  } else {
    Fire(path, true);
  }
  return Status::Ok();
}

Status XsDb::DoSetPerms(Conn& c, Tx* tx, const std::string& path, std::vector<XsPermission> perms) {
  COWTAP_RETURN_IF_ERROR(ValidateXsPath(path));
  if (perms.empty()) return Status::InvalidArgument("xenstore: empty permission list for " + path);
  Tree& tree = TreeFor(tx);
  Touch(tx, path);
  auto it = tree.find(path);
  if (it == tree.end()) return Status::NotFound("xenstore: no node " + path);
  Node& node = it->second;
  if (c.domid != kDom0 && (node.perms.empty() || node.perms[0].domid != c.domid ||
                           perms[0].domid != c.domid)) {
    return Denied(c.domid, "change permissions of", path);
  }
  node.perms = perms;
  node.generation = ++generation_;
  if (tx) {
    tx->ops.push_back(Op{Op::kSetPerms, path, "", std::move(perms)});
  } else {
    Fire(path, false);
  }
  return Status::Ok();
}

Result<XsDb::Tx*> XsDb::FindTx(Conn& c, XsTransaction id) {
  if (id == kXsNoTransaction) return static_cast<Tx*>(nullptr);
  auto it = c.txs.find(id);
  if (it == c.txs.end()) {
    return Status::InvalidArgument("xenstore: transaction " + std::to_string(id) +
                                   " is not open on this handle");
  }
  return it->second.get();
}

void XsDb::Enqueue(Conn& c, XsWatchEvent event) {
  bool was_empty = c.queue.empty();
  c.queue.push_back(std::move(event));
  if (c.queue.size() > kXsMaxQueuedEvents) {
    c.queue.pop_front();
    if (drop_log_.Allow()) {
      spdlog::warn("xenstore: domain {} does not read its watch events; dropping the oldest", c.domid);
    }
  }
  if (was_empty && c.event_fd >= 0) {
    uint64_t one = 1;
    if (write(c.event_fd, &one, sizeof(one)) < 0) {
      // The counter cannot overflow with one write per empty->non-empty edge.
    }
  }
}

void XsDb::Fire(const std::string& path, bool removed) {
  auto node = tree_.find(path);
  for (Conn* c : conns_) {
    if (c->domid != kDom0 && node != tree_.end() && !CanRead(node->second.perms, c->domid)) continue;
    for (const auto& [wpath, token] : c->watches) {
      if (path == wpath || IsUnder(path, wpath)) {
        Enqueue(*c, {path, token});
      } else if (removed && IsUnder(wpath, path)) {
        Enqueue(*c, {wpath, token});
      }
    }
  }
}

void XsDb::FireSpecial(std::string_view special_path) {
  std::lock_guard lock(mu_);
  for (Conn* c : conns_) {
    for (const auto& [wpath, token] : c->watches) {
      if (wpath == special_path) Enqueue(*c, {wpath, token});
    }
  }
}

void XsDb::IntroduceDomain(DomId domid) {
  {
    std::lock_guard lock(mu_);
    std::string path = "/local/domain/" + std::to_string(domid);
    if (!tree_.count(path)) {
      Conn root;
      DoWrite(root, nullptr, path, "", true).IgnoreError();
      tree_[path].perms = {{domid, XsAccess::kNone}};
    }
  }
  FireSpecial("@introduceDomain");
}

size_t XsDb::NodeCount() {
  std::lock_guard lock(mu_);
  return tree_.size();
}

// One connection. Every method takes the database lock for its whole run.
class XsHandle final : public XenStore {
 public:
  XsHandle(std::shared_ptr<XsDb> db, std::unique_ptr<XsDb::Conn> conn)
      : db_(std::move(db)), conn_(std::move(conn)) {}
  ~XsHandle() override {
    std::lock_guard lock(db_->mu_);
    std::erase(db_->conns_, conn_.get());
    close(conn_->event_fd);
  }

  Result<std::string> Read(std::string_view path, XsTransaction tx) override {
    COWTAP_RETURN_IF_ERROR(ValidateXsPath(path));
    std::lock_guard lock(db_->mu_);
    COWTAP_ASSIGN_OR_RETURN(XsDb::Tx * t, db_->FindTx(*conn_, tx));
    COWTAP_ASSIGN_OR_RETURN(const XsDb::Node* node, Lookup(t, path));
    if (!CanRead(node->perms, conn_->domid)) return Denied(conn_->domid, "read", path);
    return node->value;
  }
  Status Write(std::string_view path, std::string_view value, XsTransaction tx) override {
    std::lock_guard lock(db_->mu_);
    COWTAP_ASSIGN_OR_RETURN(XsDb::Tx * t, db_->FindTx(*conn_, tx));
    return db_->DoWrite(*conn_, t, std::string(path), value, false);
  }
  Status Mkdir(std::string_view path, XsTransaction tx) override {
    std::lock_guard lock(db_->mu_);
    COWTAP_ASSIGN_OR_RETURN(XsDb::Tx * t, db_->FindTx(*conn_, tx));
    return db_->DoWrite(*conn_, t, std::string(path), "", true);
  }
  Status Remove(std::string_view path, XsTransaction tx) override {
    std::lock_guard lock(db_->mu_);
    COWTAP_ASSIGN_OR_RETURN(XsDb::Tx * t, db_->FindTx(*conn_, tx));
    return db_->DoRemove(*conn_, t, std::string(path));
  }
  Result<std::vector<std::string>> Directory(std::string_view path, XsTransaction tx) override {
    COWTAP_RETURN_IF_ERROR(ValidateXsPath(path));
    std::lock_guard lock(db_->mu_);
    COWTAP_ASSIGN_OR_RETURN(XsDb::Tx * t, db_->FindTx(*conn_, tx));
    COWTAP_ASSIGN_OR_RETURN(const XsDb::Node* node, Lookup(t, path));
    if (!CanRead(node->perms, conn_->domid)) return Denied(conn_->domid, "list", path);
    std::string prefix = path == "/" ? "/" : std::string(path) + "/";
    const XsDb::Tree& tree = db_->TreeFor(t);
    std::vector<std::string> names;
    for (auto it = tree.lower_bound(prefix); it != tree.end() && it->first.starts_with(prefix); ++it) {
      std::string_view rest = std::string_view(it->first).substr(prefix.size());
      if (!rest.empty() && rest.find('/') == std::string_view::npos) names.emplace_back(rest);
    }
    return names;
  }
  Result<std::vector<XsPermission>> GetPermissions(std::string_view path, XsTransaction tx) override {
    COWTAP_RETURN_IF_ERROR(ValidateXsPath(path));
    std::lock_guard lock(db_->mu_);
    COWTAP_ASSIGN_OR_RETURN(XsDb::Tx * t, db_->FindTx(*conn_, tx));
    COWTAP_ASSIGN_OR_RETURN(const XsDb::Node* node, Lookup(t, path));
    if (!CanRead(node->perms, conn_->domid)) return Denied(conn_->domid, "read permissions of", path);
    return node->perms;
  }
  Status SetPermissions(std::string_view path, std::span<const XsPermission> perms,
                        XsTransaction tx) override {
    std::lock_guard lock(db_->mu_);
    COWTAP_ASSIGN_OR_RETURN(XsDb::Tx * t, db_->FindTx(*conn_, tx));
    return db_->DoSetPerms(*conn_, t, std::string(path), {perms.begin(), perms.end()});
  }
  Status Watch(std::string_view path, std::string_view token) override {
    if (!IsSpecialWatch(path)) COWTAP_RETURN_IF_ERROR(ValidateXsPath(path));
    if (token.size() > kXsMaxPathBytes) return Status::InvalidArgument("xenstore: watch token too long");
    std::lock_guard lock(db_->mu_);
    for (const auto& w : conn_->watches) {
      if (w.first == path && w.second == token) {
        return Status::InvalidArgument("xenstore: watch on " + std::string(path) + " with token " +
                                       std::string(token) + " already exists");
      }
    }
    if (conn_->domid != kDom0 && conn_->watches.size() >= kXsMaxWatchesPerConnection) {
      return Status::NoSpace("xenstore: too many watches on this handle");
    }
    conn_->watches.emplace_back(path, token);
    db_->Enqueue(*conn_, {std::string(path), std::string(token)});
    return Status::Ok();
  }
  Status Unwatch(std::string_view path, std::string_view token) override {
    std::lock_guard lock(db_->mu_);
    auto& w = conn_->watches;
    auto it = std::find(w.begin(), w.end(), std::pair<std::string, std::string>(path, token));
    if (it == w.end()) {
      return Status::NotFound("xenstore: no watch on " + std::string(path) + " token " + std::string(token));
    }
    w.erase(it);
    return Status::Ok();
  }
  int fd() const override { return conn_->event_fd; }
  Result<std::optional<XsWatchEvent>> ReadWatch() override {
    std::lock_guard lock(db_->mu_);
    std::optional<XsWatchEvent> event;
    if (!conn_->queue.empty()) {
      event = std::move(conn_->queue.front());
      conn_->queue.pop_front();
    }
    if (conn_->queue.empty()) {
      uint64_t count;
      if (read(conn_->event_fd, &count, sizeof(count)) < 0 && errno != EAGAIN) {
        return Status::FromErrno(errno, "xenstore: reading the watch eventfd");
      }
    }
    return event;
  }
  Result<XsTransaction> TransactionStart() override {
    std::lock_guard lock(db_->mu_);
    if (conn_->domid != kDom0 && conn_->txs.size() >= kXsMaxTransactionsPerConnection) {
      return Status::NoSpace("xenstore: too many open transactions on this handle");
    }
    auto tx = std::make_unique<XsDb::Tx>();
    tx->tree = db_->tree_;
    XsTransaction id = db_->next_tx_++;
    if (id == kXsNoTransaction) id = db_->next_tx_++;
    conn_->txs[id] = std::move(tx);
    return id;
  }
  Status TransactionEnd(XsTransaction tx, bool commit) override {
    std::lock_guard lock(db_->mu_);
    auto it = conn_->txs.find(tx);
    if (it == conn_->txs.end() || tx == kXsNoTransaction) {
      return Status::InvalidArgument("xenstore: transaction " + std::to_string(tx) + " is not open");
    }
    std::unique_ptr<XsDb::Tx> t = std::move(it->second);
    conn_->txs.erase(it);
    if (!commit) return Status::Ok();
    for (const auto& [path, gen] : t->seen) {
      auto live = db_->tree_.find(path);
      uint64_t now = live == db_->tree_.end() ? 0 : live->second.generation;
      if (now != gen) return Status::Busy("xenstore: transaction conflicts with a change to " + path + "; retry");
    }
    for (auto& op : t->ops) {
      Status s;
      switch (op.kind) {
        case XsDb::Op::kWrite: s = db_->DoWrite(*conn_, nullptr, op.path, op.value, false); break;
        case XsDb::Op::kMkdir: s = db_->DoWrite(*conn_, nullptr, op.path, "", true); break;
        case XsDb::Op::kRemove: s = db_->DoRemove(*conn_, nullptr, op.path); break;
        case XsDb::Op::kSetPerms: s = db_->DoSetPerms(*conn_, nullptr, op.path, op.perms); break;
      }
      if (!s.ok()) return Status::Internal("xenstore: replaying a checked transaction failed: " + s.ToString());
    }
    return Status::Ok();
  }

 private:
  Result<const XsDb::Node*> Lookup(XsDb::Tx* t, std::string_view path) {
    std::string p(path);
    db_->Touch(t, p);
    const XsDb::Tree& tree = db_->TreeFor(t);
    auto it = tree.find(p);
    if (it == tree.end()) return Status::NotFound("xenstore: no node " + p);
    return &it->second;
  }

  std::shared_ptr<XsDb> db_;
  std::unique_ptr<XsDb::Conn> conn_;
};

Result<std::unique_ptr<XenStore>> XsDb::Connect(std::shared_ptr<XsDb> db, DomId domid) {
  int efd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
  if (efd < 0) return Status::FromErrno(errno, "xenstore: eventfd for watch events");
  auto conn = std::make_unique<Conn>();
  conn->domid = domid;
  conn->event_fd = efd;
  {
    std::lock_guard lock(db->mu_);
    db->conns_.push_back(conn.get());
  }
  return std::unique_ptr<XenStore>(new XsHandle(std::move(db), std::move(conn)));
}

}  // namespace cowtap::xen
