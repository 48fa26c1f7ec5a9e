// Pure xenstore helpers shared by the libxen and sim platforms: permission
// spelling and path building. Stateless; thread-safe.
#include <charconv>
#include <string>

#include "xen-glue/platform.h"

namespace cowtap::xen {

std::string FormatPermission(const XsPermission& perm) {
  char letter = 'n';
  switch (perm.access) {
    case XsAccess::kNone: letter = 'n'; break;
    case XsAccess::kRead: letter = 'r'; break;
    case XsAccess::kWrite: letter = 'w'; break;
    case XsAccess::kReadWrite: letter = 'b'; break;
  }
  return letter + std::to_string(perm.domid);
}

Result<XsPermission> ParsePermission(std::string_view text) {
  auto bad = [&] {
    return Status::InvalidArgument("xenstore permission '" + std::string(text) +
                                   "' is not one of n|r|w|b followed by a domid (e.g. r5)");
  };
  if (text.size() < 2) return bad();
  XsPermission perm;
  switch (text[0]) {
    case 'n': perm.access = XsAccess::kNone; break;
    case 'r': perm.access = XsAccess::kRead; break;
    case 'w': perm.access = XsAccess::kWrite; break;
    case 'b': perm.access = XsAccess::kReadWrite; break;
    default: return bad();
  }
  std::string_view digits = text.substr(1);
  uint32_t domid = 0;
  auto [end, ec] = std::from_chars(digits.data(), digits.data() + digits.size(), domid);
  if (ec != std::errc() || end != digits.data() + digits.size() || domid > 0xffff) return bad();
  perm.domid = static_cast<DomId>(domid);
  return perm;
}

std::string XsJoin(std::string_view a, std::string_view b) {
  while (!a.empty() && a.back() == '/') a.remove_suffix(1);
  while (!b.empty() && b.front() == '/') b.remove_prefix(1);
  std::string out(a);
  if (b.empty()) return out.empty() ? "/" : out;
  out += '/';
  out += b;
  return out;
}

std::string XsBackendDir(DomId backend, std::string_view type, DomId frontend, uint32_t devid) {
  return "/local/domain/" + std::to_string(backend) + "/backend/" + std::string(type) + "/" +
         std::to_string(frontend) + "/" + std::to_string(devid);
}

std::string XsFrontendDir(DomId frontend, std::string_view type, uint32_t devid) {
  return "/local/domain/" + std::to_string(frontend) + "/device/" + std::string(type) + "/" +
         std::to_string(devid);
}

}  // namespace cowtap::xen
