// XsDb: the simulated xenstored — an in-memory tree of nodes (value,
// permissions), connections with watches and queued watch events, and
// transactions with conflict detection. SimHypervisor serves it to guests
// over a socket; in-process users get a XenStore handle from Connect().
//
// Semantics follow C xenstored (Xen 4.17):
//   * permissions: the first entry names the owner and everyone's default
//     access; dom0 and the owner may do anything; new nodes inherit the
//     parent's list, and a node created by an unprivileged domain is owned
//     by it;
//   * a watch fires once on registration and once per change at or below
//     its path (removing a parent fires the watches below it);
//   * a transaction works on a private copy of the tree and records the
//     generation of every node it touched; commit fails with kBusy (nothing
//     applied) if any of those changed meanwhile, else its operations are
//     replayed on the live tree and fire watches then.
// Unprivileged (domid != 0) connections are held to quotas: value size,
// nodes owned, watches, open transactions; every connection's event queue
// is bounded (the oldest event is dropped, with a rate-limited log).
//
// Thread-safety: thread-safe (one mutex). Each XenStore handle from
// Connect() is one connection; use it from one thread at a time.
#pragma once

#include <cstdint>
#include <deque>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "base/log.h"
#include "base/status.h"
#include "xen-glue/platform.h"

namespace cowtap::xen {

inline constexpr size_t kXsMaxValueBytes = 4096;
inline constexpr size_t kXsMaxPathBytes = 3072;
inline constexpr size_t kXsMaxNodesPerDomain = 2000;
inline constexpr size_t kXsMaxWatchesPerConnection = 256;
inline constexpr size_t kXsMaxTransactionsPerConnection = 16;
inline constexpr size_t kXsMaxQueuedEvents = 4096;

// OK if `path` is an absolute xenstore path ("/" or "/a/b", characters
// [A-Za-z0-9_@-], no empty component, not longer than kXsMaxPathBytes).
Status ValidateXsPath(std::string_view path);

class XsDb {
 public:
  struct Conn;  // one connection's watches, event queue and transactions

  XsDb();
  ~XsDb();
  XsDb(const XsDb&) = delete;
  XsDb& operator=(const XsDb&) = delete;

  // A new connection acting as `domid`. The handle keeps the database alive.
  static Result<std::unique_ptr<XenStore>> Connect(std::shared_ptr<XsDb> db, DomId domid);

  // Fires watches on a special path ("@introduceDomain", "@releaseDomain").
  void FireSpecial(std::string_view special_path);
  // Creates /local/domain/<domid> owned by domid (dom0 may read), if missing.
  void IntroduceDomain(DomId domid);
  // Number of nodes in the tree (tests).
  size_t NodeCount();

 private:
  friend class XsHandle;
  struct Node {
    std::string value;
    std::vector<XsPermission> perms;
    uint64_t generation = 0;
  };
  using Tree = std::map<std::string, Node, std::less<>>;
  struct Op {
    enum Kind { kWrite, kMkdir, kRemove, kSetPerms } kind;
    std::string path;
    std::string value;
    std::vector<XsPermission> perms;
  };
  struct Tx {
    Tree tree;
    std::map<std::string, uint64_t> seen;  // path -> generation at start (0 = absent)
    std::vector<Op> ops;
  };

  // All REQUIRE mu_ held. `tx` null = the live tree (fires watches).
  Tree& TreeFor(Tx* tx) { return tx ? tx->tree : tree_; }
  void Touch(Tx* tx, const std::string& path);
  Status DoWrite(Conn& c, Tx* tx, const std::string& path, std::string_view value, bool only_create);
  Status DoRemove(Conn& c, Tx* tx, const std::string& path);
  Status DoSetPerms(Conn& c, Tx* tx, const std::string& path, std::vector<XsPermission> perms);
  Result<Tx*> FindTx(Conn& c, XsTransaction id);
  void Fire(const std::string& path, bool removed);
  void Enqueue(Conn& c, XsWatchEvent event);
  size_t CountOwned(const Tree& tree, DomId domid) const;

  std::mutex mu_;
  Tree tree_;
  uint64_t generation_ = 1;
  uint32_t next_tx_ = 1;
  std::vector<Conn*> conns_;
  RateLimiter drop_log_{5, std::chrono::seconds(10)};
};

}  // namespace cowtap::xen
