#include "tools/daemon/backend_params.h"

#include <fmt/format.h>

namespace cowtap::daemon {

Result<std::string> NormalizeFormat(std::string_view format) {
  if (format.empty()) return std::string();
  if (format == "qcow2" || format == "qcow" || format == "raw") return std::string(format);
  if (format == "aio" || format == "file" || format == "host_device") return std::string("raw");
  return Status::NotSupported(
      fmt::format("disk format \"{}\" is not served by cowtap (qcow2, qcow, raw/aio only)", format));
}

Result<DiskSource> ParseParams(std::string_view params) {
  std::string_view rest = params;
  std::string format;
  // blktap's "tapdisk:<format>:<path>" and qdisk's "<format>:<path>". A path
  // may itself contain ':'; only a known (or clearly format-like) prefix
  // before the first ':' is taken as a format.
  if (rest.substr(0, 8) == "tapdisk:") rest.remove_prefix(8);
  const size_t colon = rest.find(':');
  if (colon != std::string_view::npos && colon > 0 && rest.substr(0, colon).find('/') == std::string_view::npos) {
    COWTAP_ASSIGN_OR_RETURN(format, NormalizeFormat(rest.substr(0, colon)));
    rest.remove_prefix(colon + 1);
  }
  if (rest.empty()) {
    return Status::InvalidArgument(fmt::format("params \"{}\" names no image path", params));
  }
  return DiskSource{std::string(rest), format, true};
}

Result<DiskSource> ReadDiskSource(xen::XenStore& store, const std::string& backend_path) {
  auto read = [&](const char* key) { return store.Read(xen::XsJoin(backend_path, key)); };
  DiskSource source;
  auto target = read("target");
  if (target.ok() && !target->empty()) {
    source.path = *target;
    auto format = read("format");
    if (format.ok()) {
      COWTAP_ASSIGN_OR_RETURN(source.format, NormalizeFormat(*format));
    } else if (format.status().code() != ErrorCode::kNotFound) {
      return format.status();
    }
  } else {
    auto params = read("params");
    if (!params.ok()) {
      return params.status().Annotate(fmt::format("{}: neither 'target' nor 'params' names the image", backend_path));
    }
    auto parsed = ParseParams(*params);
    if (!parsed.ok()) return parsed.status().Annotate(xen::XsJoin(backend_path, "params"));
    source = std::move(parsed).value();
  }
  auto mode = read("mode");
  if (mode.ok()) {
    source.writable = !(mode->size() > 0 && mode->front() == 'r' && *mode != "rw");
  } else if (mode.status().code() != ErrorCode::kNotFound) {
    return mode.status();
  }
  return source;
}

}  // namespace cowtap::daemon
