// CheckImage: dispatch on the image format. Only qcow2 has refcounts to
// check; raw and qcow v1 report "not supported" (qemu-img's exit code 63).
#include "cow/check.h"

#include "cow/image.h"
#include "cow/qcow2_check.h"

namespace cowtap::cow {

Result<CheckResult> CheckImage(const std::string& path, const CheckOptions& options) {
  FileSystem* fs = options.fs ? options.fs : DefaultFileSystem();
  FileOpenOptions fo;
  fo.writable = options.repair_leaks || options.repair_all;
  COWTAP_ASSIGN_OR_RETURN(auto file, fs->Open(path, fo));
  COWTAP_ASSIGN_OR_RETURN(ImageFormat format, ProbeFormat(*file));
  if (format != ImageFormat::kQcow2) {
    CheckResult r;
    r.supported = false;
    r.messages.push_back(path + ": " + std::string(FormatName(format)) + " images have no consistency check");
    return r;
  }
  return CheckQcow2Image(*file, path, options);
}

}  // namespace cowtap::cow
