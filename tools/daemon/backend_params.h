// What a toolstack's backend directory says about the disk to serve: the
// image path, its format and whether the guest may write it. libxl writes
// `params` as "format:path" for qdisk ("qcow2:/images/a.qcow2", "aio:/x.img",
// "raw:/y"), blktap's "tapdisk:aio:/path" form, or a plain path; newer
// toolstacks (and cowtap's own sim toolstack) may write `target` plus
// `format` instead, which win when present. `mode` is "w" (default) or "r".
//
// Thread-safety: pure functions; ReadDiskSource uses the caller's handle.
#pragma once

#include <string>
#include <string_view>

#include "backend/frontend_keys.h"
#include "base/status.h"
#include "xen-glue/platform.h"

namespace cowtap::daemon {

struct DiskSource {
  std::string path;
  std::string format;  // "qcow2", "qcow", "raw" or "" (probe)
  bool writable = true;
};

// Parses a `params` value. kInvalidArgument for an empty path,
// kNotSupported for a format cowtap does not serve (vhd, ...).
Result<DiskSource> ParseParams(std::string_view params);

// Maps a format word as toolstacks spell it ("qcow2", "qcow", "raw", "aio",
// "" = probe) to cowtap's name; kNotSupported otherwise.
Result<std::string> NormalizeFormat(std::string_view format);

// Reads params / target / format / mode from a backend directory through
// `read` (pure; the fuzz target feeds it a map).
Result<DiskSource> ParseDiskSource(const backend::KeyReader& read, const std::string& backend_path);
// ParseDiskSource over store.
Result<DiskSource> ReadDiskSource(xen::XenStore& store, const std::string& backend_path);

}  // namespace cowtap::daemon
