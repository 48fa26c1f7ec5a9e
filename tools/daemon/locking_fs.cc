#include "tools/daemon/locking_fs.h"

#include <memory>
#include <string>

namespace cowtap::daemon {
namespace {

class LockingFs final : public cow::FileSystem {
 public:
  explicit LockingFs(cow::FileSystem* base) : base_(base) {}
  Result<std::unique_ptr<cow::File>> Open(const std::string& path, const cow::FileOpenOptions& options) override {
    cow::FileOpenOptions locked = options;
    locked.lock = true;
    return base_->Open(path, locked);
  }
  bool Exists(const std::string& path) override { return base_->Exists(path); }
  Status Remove(const std::string& path) override { return base_->Remove(path); }
  std::string Identity(const std::string& path) override { return base_->Identity(path); }

 private:
  cow::FileSystem* base_;
};

}  // namespace

cow::FileSystem* LockingFileSystem() {
  static LockingFs* fs = new LockingFs(cow::DefaultFileSystem());
  return fs;
}

}  // namespace cowtap::daemon
