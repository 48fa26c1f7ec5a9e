// The real platform over Debian's libxen 4.17: libxengnttab (batch map,
// unmap, grant copy), libxenevtchn (its fd set non-blocking so Pending()
// never waits), libxenctrl (domain info for DomainAlive, in libxen_ctrl.cc). The xenstore
// handle is in libxen_xenstore.cc. Every open first checks that the device
// node exists, so a machine without Xen gets one clear Status instead of the
// libraries' stderr noise.
//
// Thread-safety as in platform.h: the grant table and platform are
// thread-safe (libxengnttab handles are; xenctrl calls are serialised here).
#include <fcntl.h>
#include <stdint.h>  // the Xen public headers need it first
#include <sys/mman.h>
#include <xen/grant_table.h>
extern "C" {  // the libxen headers have no C++ guards
#include <xenevtchn.h>
#include <xengnttab.h>
}

#include <cerrno>
#include <mutex>
#include <vector>

#include "xen-glue/libxen_util.h"
#include "xen-glue/platform.h"

namespace cowtap::xen {

Result<std::unique_ptr<XenStore>> OpenLibxenXenStore();  // libxen_xenstore.cc

namespace libxen {
// libxen_ctrl.cc (built as GNU C++: xenctrl.h needs the extensions).
struct XcHandle;
Result<XcHandle*> OpenXc();
void CloseXc(XcHandle* xc);
bool XcDomainAlive(XcHandle* xc, DomId domid);
}  // namespace libxen

namespace libxen {
namespace {

struct GnttabHandle {
  explicit GnttabHandle(xengnttab_handle* h) : h(h) {}
  ~GnttabHandle() { xengnttab_close(h); }
  xengnttab_handle* const h;
};

class LibxenMapping final : public GrantMapping {
 public:
  LibxenMapping(std::shared_ptr<GnttabHandle> h, void* addr, size_t pages, bool writable)
      : h_(std::move(h)), addr_(static_cast<uint8_t*>(addr)), pages_(pages), writable_(writable) {}
  ~LibxenMapping() override {
    if (!unmapped_) Unmap().IgnoreError();
  }
  Status Unmap() override {
    unmapped_ = true;
    if (xengnttab_unmap(h_->h, addr_, static_cast<uint32_t>(pages_)) != 0) {
      return Status::FromErrno(errno, "xengnttab_unmap of " + std::to_string(pages_) + " page(s)");
    }
    return Status::Ok();
  }
  uint8_t* addr() const override { return addr_; }
  size_t pages() const override { return pages_; }
  bool writable() const override { return writable_; }

 private:
  std::shared_ptr<GnttabHandle> h_;
  uint8_t* addr_;
  size_t pages_;
  bool writable_;
  bool unmapped_ = false;
};

class LibxenGrantTable final : public GrantTable {
 public:
  explicit LibxenGrantTable(std::shared_ptr<GnttabHandle> h) : h_(std::move(h)) {}

  Result<std::unique_ptr<GrantMapping>> Map(DomId domid, std::span<const GrantRef> refs, bool writable) override {
    if (refs.empty() || refs.size() > kMaxMapBatch) {
      return Status::InvalidArgument("grant map batch of " + std::to_string(refs.size()) + " refs is outside 1.." +
                                     std::to_string(kMaxMapBatch));
    }
    std::vector<uint32_t> copy(refs.begin(), refs.end());
    void* addr = xengnttab_map_domain_grant_refs(h_->h, static_cast<uint32_t>(copy.size()), domid, copy.data(),
                                                 PROT_READ | (writable ? PROT_WRITE : 0));
    if (addr == nullptr) {
      return XenErrno(errno, "mapping " + std::to_string(copy.size()) + " grant refs (first " +
                                 std::to_string(copy[0]) + ") of domain " + std::to_string(domid));
    }
    return std::unique_ptr<GrantMapping>(new LibxenMapping(h_, addr, copy.size(), writable));
  }

  Status Copy(std::span<GrantCopyOp> ops) override {
    std::vector<xengnttab_grant_copy_segment_t> segs;
    std::vector<GrantCopyOp*> sent;
    segs.reserve(ops.size());
    for (GrantCopyOp& op : ops) {
      if (uint32_t{op.offset} + op.length > kPageSize) {
        op.status = Status::InvalidArgument("grant copy of " + std::to_string(op.length) + " bytes at offset " +
                                            std::to_string(op.offset) + " crosses the page");
        continue;
      }
      xengnttab_grant_copy_segment_t seg{};
      seg.len = op.length;
      if (op.direction == GrantCopyOp::Direction::kFromGuest) {
        seg.flags = GNTCOPY_source_gref;
        seg.source.foreign = {op.ref, op.offset, op.domid};
        seg.dest.virt = op.local;
      } else {
        seg.flags = GNTCOPY_dest_gref;
        seg.source.virt = op.local;
        seg.dest.foreign = {op.ref, op.offset, op.domid};
      }
      segs.push_back(seg);
      sent.push_back(&op);
    }
    if (segs.empty()) return Status::Ok();
    if (xengnttab_grant_copy(h_->h, static_cast<uint32_t>(segs.size()), segs.data()) != 0) {
      return XenErrno(errno, "grant copy of " + std::to_string(segs.size()) + " segments");
    }
    for (size_t i = 0; i < segs.size(); ++i) {
      sent[i]->status = GrantCopyStatus(segs[i].status, sent[i]->ref, sent[i]->domid);
    }
    return Status::Ok();
  }

 private:
  std::shared_ptr<GnttabHandle> h_;
};

class LibxenEventChannel final : public EventChannel {
 public:
  explicit LibxenEventChannel(xenevtchn_handle* h) : h_(h) {}
  ~LibxenEventChannel() override { xenevtchn_close(h_); }  // unbinds every port

  Result<EvtchnPort> BindInterdomain(DomId remote, EvtchnPort remote_port) override {
    xenevtchn_port_or_error_t port = xenevtchn_bind_interdomain(h_, remote, remote_port);
    if (port < 0) {
      return XenErrno(errno, "binding port " + std::to_string(remote_port) + " of domain " + std::to_string(remote));
    }
    return static_cast<EvtchnPort>(port);
  }
  Result<EvtchnPort> BindUnbound(DomId remote) override {
    xenevtchn_port_or_error_t port = xenevtchn_bind_unbound_port(h_, remote);
    if (port < 0) return XenErrno(errno, "allocating a port for domain " + std::to_string(remote));
    return static_cast<EvtchnPort>(port);
  }
  Status Unbind(EvtchnPort local_port) override {
    if (xenevtchn_unbind(h_, local_port) != 0) return XenErrno(errno, "unbinding port " + std::to_string(local_port));
    return Status::Ok();
  }
  Status Notify(EvtchnPort local_port) override {
    if (xenevtchn_notify(h_, local_port) != 0) return XenErrno(errno, "notifying port " + std::to_string(local_port));
    return Status::Ok();
  }
  int fd() const override { return xenevtchn_fd(h_); }
  Result<std::optional<EvtchnPort>> Pending() override {
    xenevtchn_port_or_error_t port = xenevtchn_pending(h_);
    if (port < 0) {
      if (errno == EAGAIN || errno == EWOULDBLOCK) return std::optional<EvtchnPort>();
      return XenErrno(errno, "reading pending event-channel ports");
    }
    return std::optional<EvtchnPort>(static_cast<EvtchnPort>(port));
  }
  Status Unmask(EvtchnPort local_port) override {
    if (xenevtchn_unmask(h_, local_port) != 0) return XenErrno(errno, "unmasking port " + std::to_string(local_port));
    return Status::Ok();
  }

 private:
  xenevtchn_handle* const h_;
};

class LibxenPlatform final : public XenPlatform {
 public:
  explicit LibxenPlatform(XcHandle* xc) : xc_(xc) {}
  ~LibxenPlatform() override { CloseXc(xc_); }

  Result<std::unique_ptr<GrantTable>> OpenGrantTable() override {
    COWTAP_RETURN_IF_ERROR(RequireXenDevice("", kGntdev, "the grant-table driver"));
    xengnttab_handle* h = xengnttab_open(nullptr, 0);
    if (h == nullptr) return XenErrno(errno, "xengnttab_open (is the xen_gntdev module loaded?)");
    return std::unique_ptr<GrantTable>(new LibxenGrantTable(std::make_shared<GnttabHandle>(h)));
  }
  Result<std::unique_ptr<EventChannel>> OpenEventChannel() override {
    COWTAP_RETURN_IF_ERROR(RequireXenDevice("", kEvtchn, "event channels"));
    xenevtchn_handle* h = xenevtchn_open(nullptr, 0);
    if (h == nullptr) return XenErrno(errno, "xenevtchn_open (is the xen_evtchn module loaded?)");
    int fd = xenevtchn_fd(h);
    int flags = fcntl(fd, F_GETFL);
    if (flags < 0 || fcntl(fd, F_SETFL, flags | O_NONBLOCK) != 0) {
      int err = errno;
      xenevtchn_close(h);
      return XenErrno(err, "making the event-channel fd non-blocking");
    }
    return std::unique_ptr<EventChannel>(new LibxenEventChannel(h));
  }
  Result<std::unique_ptr<XenStore>> OpenXenStore() override { return OpenLibxenXenStore(); }
  bool DomainAlive(DomId domid) override {
    std::lock_guard lock(mu_);
    return XcDomainAlive(xc_, domid);
  }
  // cowtap's libxen backend runs in dom0 (a driver domain would read
  // "domid" from xenstore; not supported yet).
  DomId self_domid() const override { return kDom0; }

 private:
  std::mutex mu_;
  XcHandle* const xc_;
};

}  // namespace
}  // namespace libxen

Result<std::unique_ptr<XenPlatform>> NewLibxenPlatform() {
  COWTAP_RETURN_IF_ERROR(libxen::RequireXenDevice("", libxen::kPrivcmd, "cowtap's libxen platform"));
  COWTAP_ASSIGN_OR_RETURN(libxen::XcHandle * xc, libxen::OpenXc());
  return std::unique_ptr<XenPlatform>(new libxen::LibxenPlatform(xc));
}

}  // namespace cowtap::xen
