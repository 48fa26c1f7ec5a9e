// XenStore over libxenstore (xs_open). Watch events: libxenstore queues them
// and makes xs_fileno() readable; ReadWatch uses xs_check_watch, which never
// blocks. Transactions end with EAGAIN on conflict -> kBusy.
//
// Thread-safety: one thread at a time per handle (platform.h).
#include <stdint.h>  // the Xen public headers need it first
extern "C" {  // the libxen headers have no C++ guards
#include <xenstore.h>
}

#include <cerrno>
#include <cstdlib>
#include <memory>

#include "xen-glue/libxen_util.h"
#include "xen-glue/platform.h"

namespace cowtap::xen {
namespace libxen {
namespace {

struct FreeDeleter {
  void operator()(void* p) const { std::free(p); }
};
template <typename T>
using Malloced = std::unique_ptr<T, FreeDeleter>;

class LibxenXenStore final : public XenStore {
 public:
  explicit LibxenXenStore(xs_handle* h) : h_(h) {}
  ~LibxenXenStore() override { xs_close(h_); }

  Result<std::string> Read(std::string_view path, XsTransaction tx) override {
    std::string p(path);
    unsigned int len = 0;
    Malloced<char> v(static_cast<char*>(xs_read(h_, tx, p.c_str(), &len)));
    if (!v) return XenErrno(errno, "xenstore read " + p);
    return std::string(v.get(), len);
  }
  Status Write(std::string_view path, std::string_view value, XsTransaction tx) override {
    std::string p(path);
    if (!xs_write(h_, tx, p.c_str(), value.data(), static_cast<unsigned>(value.size()))) {
      return XenErrno(errno, "xenstore write " + p);
    }
    return Status::Ok();
  }
  Status Mkdir(std::string_view path, XsTransaction tx) override {
    std::string p(path);
    if (!xs_mkdir(h_, tx, p.c_str())) return XenErrno(errno, "xenstore mkdir " + p);
    return Status::Ok();
  }
  Status Remove(std::string_view path, XsTransaction tx) override {
    std::string p(path);
    if (!xs_rm(h_, tx, p.c_str()) && errno != ENOENT) return XenErrno(errno, "xenstore rm " + p);
    return Status::Ok();
  }
  Result<std::vector<std::string>> Directory(std::string_view path, XsTransaction tx) override {
    std::string p(path);
    unsigned int num = 0;
    Malloced<char*> names(xs_directory(h_, tx, p.c_str(), &num));
    if (!names) return XenErrno(errno, "xenstore directory " + p);
    return std::vector<std::string>(names.get(), names.get() + num);
  }
  Result<std::vector<XsPermission>> GetPermissions(std::string_view path, XsTransaction tx) override {
    std::string p(path);
    unsigned int num = 0;
    Malloced<xs_permissions> perms(xs_get_permissions(h_, tx, p.c_str(), &num));
    if (!perms) return XenErrno(errno, "xenstore get-perms " + p);
    std::vector<XsPermission> out;
    for (unsigned i = 0; i < num; ++i) {
      out.push_back({static_cast<DomId>(perms.get()[i].id), FromXsPermBits(perms.get()[i].perms)});
    }
    return out;
  }
  Status SetPermissions(std::string_view path, std::span<const XsPermission> perms, XsTransaction tx) override {
    std::string p(path);
    if (perms.empty()) return Status::InvalidArgument("xenstore: empty permission list for " + p);
    std::vector<xs_permissions> raw;
    for (const auto& perm : perms) raw.push_back({perm.domid, ToXsPermBits(perm.access)});
    if (!xs_set_permissions(h_, tx, p.c_str(), raw.data(), static_cast<unsigned>(raw.size()))) {
      return XenErrno(errno, "xenstore set-perms " + p);
    }
    return Status::Ok();
  }
  Status Watch(std::string_view path, std::string_view token) override {
    std::string p(path), t(token);
    if (!xs_watch(h_, p.c_str(), t.c_str())) return XenErrno(errno, "xenstore watch " + p);
    return Status::Ok();
  }
  Status Unwatch(std::string_view path, std::string_view token) override {
    std::string p(path), t(token);
    if (!xs_unwatch(h_, p.c_str(), t.c_str())) return XenErrno(errno, "xenstore unwatch " + p);
    return Status::Ok();
  }
  int fd() const override { return xs_fileno(h_); }
  Result<std::optional<XsWatchEvent>> ReadWatch() override {
    Malloced<char*> vec(xs_check_watch(h_));
    if (!vec) {
      if (errno == EAGAIN) return std::optional<XsWatchEvent>();
      return XenErrno(errno, "xenstore reading a watch event");
    }
    return std::optional<XsWatchEvent>(XsWatchEvent{vec.get()[XS_WATCH_PATH], vec.get()[XS_WATCH_TOKEN]});
  }
  Result<XsTransaction> TransactionStart() override {
    xs_transaction_t t = xs_transaction_start(h_);
    if (t == XBT_NULL) return XenErrno(errno, "xenstore transaction start");
    return static_cast<XsTransaction>(t);
  }
  Status TransactionEnd(XsTransaction tx, bool commit) override {
    if (!xs_transaction_end(h_, tx, !commit)) {
      return XenErrno(errno, commit ? "xenstore transaction commit" : "xenstore transaction abort");
    }
    return Status::Ok();
  }

 private:
  xs_handle* const h_;
};

}  // namespace
}  // namespace libxen

Result<std::unique_ptr<XenStore>> OpenLibxenXenStore() {
  COWTAP_RETURN_IF_ERROR(libxen::RequireXenDevice("", libxen::kXenstore, "xenstore access"));
  xs_handle* h = xs_open(0);
  if (h == nullptr) return libxen::XenErrno(errno, "xs_open (is xenstored running?)");
  return std::unique_ptr<XenStore>(new libxen::LibxenXenStore(h));
}

}  // namespace cowtap::xen
