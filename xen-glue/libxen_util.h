// Pure helpers of the libxen platform: does this machine have Xen, errno
// and grant-status mapping, xenstore permission bits. Kept apart from the
// libxen calls so they are unit-tested on machines without a hypervisor.
// Stateless; thread-safe.
#pragma once

#include <cstdint>
#include <span>
#include <string_view>

#include "base/status.h"
#include "xen-glue/platform.h"

namespace cowtap::xen::libxen {

// OK if any of `candidates` (absolute paths, looked up under `root`, "" =
// the real root) exists; else "no Xen here: <first> missing; run in dom0 ...".
Status RequireXenDevice(std::string_view root, std::span<const char* const> candidates, std::string_view what);

// The devices each library opens (xengnttab, xenevtchn, xenstore, xenctrl).
inline constexpr const char* kGntdev[] = {"/dev/xen/gntdev"};
inline constexpr const char* kEvtchn[] = {"/dev/xen/evtchn"};
inline constexpr const char* kXenstore[] = {"/dev/xen/xenbus", "/var/run/xenstored/socket",
                                            "/run/xenstored/socket", "/proc/xen/xenbus"};
inline constexpr const char* kPrivcmd[] = {"/dev/xen/privcmd", "/proc/xen/privcmd"};

// errno from a libxen call -> Status: ESRCH (no such domain) and ENOENT are
// kNotFound, EACCES/EPERM kReadOnly (permission denied), EAGAIN kBusy
// (transaction conflict: retry), EEXIST/E2BIG/EINVAL kInvalidArgument.
Status XenErrno(int err, std::string_view what);

// A grant-copy segment status (GNTST_*) -> Status naming ref and domain.
Status GrantCopyStatus(int16_t gntst, GrantRef ref, DomId domid);

// XsAccess <-> XS_PERM_* bits.
unsigned ToXsPermBits(XsAccess access);
XsAccess FromXsPermBits(unsigned bits);

}  // namespace cowtap::xen::libxen
