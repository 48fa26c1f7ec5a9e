#include "cow/formats.h"
namespace cowtap::cow {
Result<std::unique_ptr<Image>> OpenQcow2Image(std::unique_ptr<File>, const std::string& path, const OpenOptions&,
                                             const BackingOpener&) {
  return Status::NotSupported(path + ": qcow2 is not implemented yet");
}
Status CreateQcow2Image(const std::string& path, const CreateOptions&, FileSystem*) {
  return Status::NotSupported(path + ": qcow2 is not implemented yet");
}
}  // namespace cowtap::cow
#include "cow/check.h"
namespace cowtap::cow {
Result<CheckResult> CheckImage(const std::string& path, const CheckOptions&) {
  return Status::NotSupported(path + ": check is not implemented yet");
}
}  // namespace cowtap::cow
