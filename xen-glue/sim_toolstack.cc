// The toolstack's half of a VBD, as libxl writes it for a disk: the backend
// and frontend directories, their permissions and initial states, written
// in one xenstore transaction (retried on conflict). Works over any
// XenStore handle with dom0 rights, real or simulated. Stateless.
#include <string>

#include "xen-glue/sim.h"

namespace cowtap::xen {
namespace {

Status WriteVbd(XenStore& xs, const SimVbdConfig& c, XsTransaction tx) {
  const std::string be = XsBackendDir(c.backend_domid, "vbd", c.frontend_domid, c.devid);
  const std::string fe = XsFrontendDir(c.frontend_domid, "vbd", c.devid);
  const std::string domain_dir = "/local/domain/" + std::to_string(c.frontend_domid);
  if (xs.Read(domain_dir, tx).status().code() == ErrorCode::kNotFound) {
    COWTAP_RETURN_IF_ERROR(xs.Mkdir(domain_dir, tx));
    const XsPermission owner[] = {{c.frontend_domid, XsAccess::kNone}};
    COWTAP_RETURN_IF_ERROR(xs.SetPermissions(domain_dir, owner, tx));
  }
  // Permissions first, so every key created below inherits them.
  const XsPermission be_perms[] = {{c.backend_domid, XsAccess::kNone}, {c.frontend_domid, XsAccess::kRead}};
  const XsPermission fe_perms[] = {{c.frontend_domid, XsAccess::kNone}, {c.backend_domid, XsAccess::kRead}};
  COWTAP_RETURN_IF_ERROR(xs.Mkdir(be, tx));
  COWTAP_RETURN_IF_ERROR(xs.SetPermissions(be, be_perms, tx));
  COWTAP_RETURN_IF_ERROR(xs.Mkdir(fe, tx));
  COWTAP_RETURN_IF_ERROR(xs.SetPermissions(fe, fe_perms, tx));
  const std::pair<const char*, std::string> be_keys[] = {
      {"frontend", fe},
      {"frontend-id", std::to_string(c.frontend_domid)},
      {"params", c.params},
      {"type", c.type},
      {"mode", c.writable ? "w" : "r"},
      {"device-type", c.device_type},
      {"online", "1"},
      {"removable", c.removable ? "1" : "0"},
      {"bootable", c.bootable ? "1" : "0"},
      {"state", "1"},
  };
  for (const auto& [key, value] : be_keys) COWTAP_RETURN_IF_ERROR(xs.Write(XsJoin(be, key), value, tx));
  const std::pair<const char*, std::string> fe_keys[] = {
      {"backend", be},
      {"backend-id", std::to_string(c.backend_domid)},
      {"virtual-device", std::to_string(c.devid)},
      {"device-type", c.device_type},
      {"state", "1"},
  };
  for (const auto& [key, value] : fe_keys) COWTAP_RETURN_IF_ERROR(xs.Write(XsJoin(fe, key), value, tx));
  return Status::Ok();
}

}  // namespace

Status ToolstackAddVbd(XenStore& dom0_store, const SimVbdConfig& config) {
  return RunXsTransaction(dom0_store, [&](XsTransaction tx) { return WriteVbd(dom0_store, config, tx); })
      .Annotate("toolstack: adding vbd " + std::to_string(config.devid) + " of domain " +
                std::to_string(config.frontend_domid));
}

Status ToolstackRemoveVbd(XenStore& dom0_store, const SimVbdConfig& c) {
  return RunXsTransaction(dom0_store, [&](XsTransaction tx) -> Status {
           COWTAP_RETURN_IF_ERROR(
               dom0_store.Remove(XsBackendDir(c.backend_domid, "vbd", c.frontend_domid, c.devid), tx));
           return dom0_store.Remove(XsFrontendDir(c.frontend_domid, "vbd", c.devid), tx);
         })
      .Annotate("toolstack: removing vbd " + std::to_string(c.devid) + " of domain " +
                std::to_string(c.frontend_domid));
}

}  // namespace cowtap::xen
