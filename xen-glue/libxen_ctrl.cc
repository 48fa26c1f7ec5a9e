// The libxenctrl part of the libxen platform: is a domain alive. Its own
// file because xenctrl.h needs GNU extensions (anonymous unions): CMake
// builds this file alone with -std=gnu++20.
//
// Thread-safety: the caller serialises calls on one handle.
#include <stdint.h>  // the Xen public headers need it first
extern "C" {
#include <xenctrl.h>
}

#include <cerrno>

#include "xen-glue/libxen_util.h"

namespace cowtap::xen::libxen {

struct XcHandle {
  xc_interface* xc;
};

Result<XcHandle*> OpenXc() {
  xc_interface* xc = xc_interface_open(nullptr, nullptr, 0);
  if (xc == nullptr) return XenErrno(errno, "xc_interface_open (not running in dom0?)");
  return new XcHandle{xc};
}

void CloseXc(XcHandle* h) {
  xc_interface_close(h->xc);
  delete h;
}

// Alive = known to Xen and not dying. A domain that is shut down but not yet
// destroyed still counts as alive: its rings stay mapped until the toolstack
// tears the device down.
bool XcDomainAlive(XcHandle* h, DomId domid) {
  xc_domaininfo_t info{};
  int n = xc_domain_getinfolist(h->xc, domid, 1, &info);
  return n == 1 && info.domain == domid && !(info.flags & XEN_DOMINF_dying);
}

}  // namespace cowtap::xen::libxen
