// The qcow2 half of CheckImage (cow/check.h): refcounts against references,
// COPIED flags, and repair. Thread-safety: operates on a file it is given;
// nobody else may have the image open read-write.
#pragma once

#include <memory>
#include <string>

#include "cow/check.h"
#include "cow/file.h"

namespace cowtap::cow {

// file must be open writable when options ask for a repair.
Result<CheckResult> CheckQcow2Image(File& file, const std::string& path, const CheckOptions& options);

}  // namespace cowtap::cow
