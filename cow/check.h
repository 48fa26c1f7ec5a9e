// CheckImage: offline consistency check (and repair) of one image file, in
// the spirit of `qemu-img check`: every cluster's refcount against the
// references the metadata makes to it.
//
// Thread-safety: opens the image itself; must not run while another process
// has the image open read-write.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "base/status.h"
#include "cow/file.h"

namespace cowtap::cow {

struct CheckOptions {
  bool repair_leaks = false;  // free clusters with refcount > references
  bool repair_all = false;    // also fix errors (may lose data); implies leaks
  FileSystem* fs = nullptr;   // nullptr: DefaultFileSystem()
};

struct CheckResult {
  bool supported = true;           // false: the format has no check (raw, qcow)
  uint64_t corruptions = 0;        // errors left after any repair
  uint64_t leaks = 0;              // leaked clusters left after any repair
  uint64_t corruptions_fixed = 0;
  uint64_t leaks_fixed = 0;
  uint64_t allocated_clusters = 0; // guest clusters allocated in this layer
  uint64_t total_clusters = 0;     // virtual size in clusters
  uint64_t fragmented_clusters = 0;
  uint64_t image_end_offset = 0;
  std::vector<std::string> messages;  // one line per problem found

  // qemu-img's exit-code convention: 0 clean, 2 corruptions, 3 leaks only,
  // 63 check not supported for the format.
  int ExitCode() const {
    if (!supported) return 63;
    if (corruptions) return 2;
    if (leaks) return 3;
    return 0;
  }
};

// Fails (kCorrupt / kIoError / kNotFound) only when the check itself could
// not run (qemu-img's exit code 1); problems found are in the result.
Result<CheckResult> CheckImage(const std::string& path, const CheckOptions& options = {});

}  // namespace cowtap::cow
