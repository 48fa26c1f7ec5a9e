#include "xen-glue/libxen_util.h"

#include <stdint.h>  // the Xen public headers need it first
#include <unistd.h>
#include <xen/grant_table.h>
#include <xenstore_lib.h>

#include <cerrno>
#include <string>

namespace cowtap::xen::libxen {

Status RequireXenDevice(std::string_view root, std::span<const char* const> candidates, std::string_view what) {
  for (const char* path : candidates) {
    std::string full = std::string(root) + path;
    if (access(full.c_str(), F_OK) == 0) return Status::Ok();
  }
  std::string first = candidates.empty() ? std::string("/dev/xen") : std::string(root) + candidates[0];
  return Status::NotSupported("no Xen here: " + first + " missing; run " + std::string(what) +
                              " in dom0 (or use the sim platform)");
}

Status XenErrno(int err, std::string_view what) {
  std::string msg(what);
  switch (err) {
    case ESRCH:
      return Status(ErrorCode::kNotFound, msg + ": no such domain", err);
    case EEXIST:
      return Status(ErrorCode::kInvalidArgument, msg + ": already exists", err);
    case E2BIG:
      return Status(ErrorCode::kInvalidArgument, msg + ": too large", err);
    case EACCES:
    case EPERM:
      return Status(ErrorCode::kReadOnly, msg + ": permission denied", err);
    case EAGAIN:
      return Status(ErrorCode::kBusy, msg + ": conflict or temporarily unavailable; retry", err);
    default:
      return Status::FromErrno(err, what);
  }
}

Status GrantCopyStatus(int16_t gntst, GrantRef ref, DomId domid) {
  std::string what = "grant copy of ref " + std::to_string(ref) + " of domain " + std::to_string(domid);
  switch (gntst) {
    case GNTST_okay:
      return Status::Ok();
    case GNTST_bad_domain:
      return Status::NotFound(what + ": unknown domain");
    case GNTST_bad_gntref:
      return Status::InvalidArgument(what + ": bad or revoked grant ref");
    case GNTST_permission_denied:
      return Status::ReadOnly(what + ": permission denied (read-only grant?)");
    case GNTST_bad_copy_arg:
      return Status::InvalidArgument(what + ": offset + length crosses the page");
    case GNTST_eagain:
      return Status::Busy(what + ": try again");
    case GNTST_bad_page:
      return Status::InvalidArgument(what + ": bad page");
    default:
      return Status::IoError(what + ": failed with grant status " + std::to_string(gntst));
  }
}

unsigned ToXsPermBits(XsAccess access) {
  switch (access) {
    case XsAccess::kNone: return XS_PERM_NONE;
    case XsAccess::kRead: return XS_PERM_READ;
    case XsAccess::kWrite: return XS_PERM_WRITE;
    case XsAccess::kReadWrite: return XS_PERM_READ | XS_PERM_WRITE;
  }
  return XS_PERM_NONE;
}

XsAccess FromXsPermBits(unsigned bits) {
  bool r = bits & XS_PERM_READ, w = bits & XS_PERM_WRITE;
  if (r && w) return XsAccess::kReadWrite;
  if (r) return XsAccess::kRead;
  if (w) return XsAccess::kWrite;
  return XsAccess::kNone;
}

}  // namespace cowtap::xen::libxen
