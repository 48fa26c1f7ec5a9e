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
  return ParseDiskSource(backend::StoreKeyReader(store), backend_path);
}

Result<DiskSource> ParseDiskSource(const backend::KeyReader& read_key, const std::string& backend_path) {
  auto read = [&](const char* key) { return read_key(xen::XsJoin(backend_path, key)); };
  DiskSource source;
  auto target = read("target");
  if (target.ok() && *target && !(*target)->empty()) {
    source.path = **target;
    COWTAP_ASSIGN_OR_RETURN(std::optional<std::string> format, read("format"));
    if (format) {
      COWTAP_ASSIGN_OR_RETURN(source.format, NormalizeFormat(*format));
    }
  } else {
    COWTAP_ASSIGN_OR_RETURN(std::optional<std::string> params, read("params"));
    if (!params) {
      return Status::NotFound(fmt::format("{}: neither 'target' nor 'params' names the image", backend_path));
    }
    auto parsed = ParseParams(*params);
    if (!parsed.ok()) return parsed.status().Annotate(xen::XsJoin(backend_path, "params"));
    source = std::move(parsed).value();
  }
  COWTAP_ASSIGN_OR_RETURN(std::optional<std::string> mode, read("mode"));
  if (mode) source.writable = !(mode->size() > 0 && mode->front() == 'r' && *mode != "rw");
  return source;
}

}  // namespace cowtap::daemon
