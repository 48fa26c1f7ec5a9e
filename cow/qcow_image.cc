#include "cow/formats.h"
namespace cowtap::cow {
Result<std::unique_ptr<Image>> OpenQcowImage(std::unique_ptr<File>, const std::string& path, const OpenOptions&,
                                             const BackingOpener&) {
  return Status::NotSupported(path + ": qcow v1 is not implemented yet");
}
Status CreateQcowImage(const std::string& path, const CreateOptions&, FileSystem*) {
  return Status::NotSupported(path + ": qcow v1 is not implemented yet");
}
}  // namespace cowtap::cow
