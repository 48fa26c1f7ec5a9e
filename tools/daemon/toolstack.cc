#include "tools/daemon/toolstack.h"

#include <fmt/format.h>

#include <utility>

namespace cowtap::daemon {
namespace {

Status Write(xen::XenStore& xs, const ToolstackDisk& d, xen::XsTransaction tx) {
  const std::string be = xen::XsBackendDir(xen::kDom0, d.backend_type, d.domid, d.devid);
  const std::string fe = xen::XsFrontendDir(d.domid, "vbd", d.devid);
  const std::string domain_dir = "/local/domain/" + std::to_string(d.domid);
  if (xs.Read(domain_dir, tx).status().code() == ErrorCode::kNotFound) {
    COWTAP_RETURN_IF_ERROR(xs.Mkdir(domain_dir, tx));
    const xen::XsPermission owner[] = {{d.domid, xen::XsAccess::kNone}};
    COWTAP_RETURN_IF_ERROR(xs.SetPermissions(domain_dir, owner, tx));
  }
  // Permissions first, so every key below inherits them.
  const xen::XsPermission be_perms[] = {{xen::kDom0, xen::XsAccess::kNone}, {d.domid, xen::XsAccess::kRead}};
  const xen::XsPermission fe_perms[] = {{d.domid, xen::XsAccess::kNone}, {xen::kDom0, xen::XsAccess::kRead}};
  COWTAP_RETURN_IF_ERROR(xs.Mkdir(be, tx));
  COWTAP_RETURN_IF_ERROR(xs.SetPermissions(be, be_perms, tx));
  COWTAP_RETURN_IF_ERROR(xs.Mkdir(fe, tx));
  COWTAP_RETURN_IF_ERROR(xs.SetPermissions(fe, fe_perms, tx));
  const std::string params = d.format.empty() ? d.image : d.format + ":" + d.image;
  const std::pair<const char*, std::string> be_keys[] = {
      {"frontend", fe},
      {"frontend-id", std::to_string(d.domid)},
      {"params", params},
      {"target", d.image},
      {"format", d.format},
      {"type", d.backend_type},
      {"mode", d.writable ? "w" : "r"},
      {"device-type", "disk"},
      {"online", "1"},
      {"removable", "0"},
      {"bootable", "1"},
      {"state", "1"},
  };
  for (const auto& [key, value] : be_keys) COWTAP_RETURN_IF_ERROR(xs.Write(xen::XsJoin(be, key), value, tx));
  const std::pair<const char*, std::string> fe_keys[] = {
      {"backend", be},         {"backend-id", "0"}, {"virtual-device", std::to_string(d.devid)},
      {"device-type", "disk"}, {"state", "1"},
  };
  for (const auto& [key, value] : fe_keys) COWTAP_RETURN_IF_ERROR(xs.Write(xen::XsJoin(fe, key), value, tx));
  return Status::Ok();
}

}  // namespace

Status ToolstackWriteDisk(xen::XenStore& dom0_store, const ToolstackDisk& disk) {
  return xen::RunXsTransaction(dom0_store, [&](xen::XsTransaction tx) { return Write(dom0_store, disk, tx); })
      .Annotate(fmt::format("toolstack: adding disk {}/{}", disk.domid, disk.devid));
}

Status ToolstackRemoveDisk(xen::XenStore& dom0_store, const ToolstackDisk& d) {
  return xen::RunXsTransaction(dom0_store,
                               [&](xen::XsTransaction tx) -> Status {
                                 COWTAP_RETURN_IF_ERROR(dom0_store.Remove(
                                     xen::XsBackendDir(xen::kDom0, d.backend_type, d.domid, d.devid), tx));
                                 return dom0_store.Remove(xen::XsFrontendDir(d.domid, "vbd", d.devid), tx);
                               })
      .Annotate(fmt::format("toolstack: removing disk {}/{}", d.domid, d.devid));
}

}  // namespace cowtap::daemon
