// In-memory File and FileSystem for unit tests: no disk, deterministic, and
// shared storage so that reopening a path sees the same bytes.
#include <algorithm>
#include <cstring>
#include <map>
#include <mutex>
#include <vector>

#include "cow/file.h"

namespace cowtap::cow {
namespace {

struct MemStorage {
  std::mutex mu;
  std::vector<uint8_t> bytes;  // GUARDED_BY(mu)
};

class MemFile final : public File {
 public:
  MemFile(std::shared_ptr<MemStorage> s, std::string name) : s_(std::move(s)), name_(std::move(name)) {}

  Status ReadAt(uint64_t offset, std::span<uint8_t> buf) override {
    std::lock_guard lock(s_->mu);
    const auto& b = s_->bytes;
    size_t avail = offset < b.size() ? std::min<uint64_t>(b.size() - offset, buf.size()) : 0;
    if (avail) std::memcpy(buf.data(), b.data() + offset, avail);
    std::memset(buf.data() + avail, 0, buf.size() - avail);
    return Status::Ok();
  }

  Status WriteAt(uint64_t offset, std::span<const uint8_t> data) override {
    std::lock_guard lock(s_->mu);
    if (offset + data.size() < offset || offset + data.size() > kMaxSize)
      return Status::NoSpace("in-memory file " + name_ + " would exceed its limit");
    auto& b = s_->bytes;
    if (b.size() < offset + data.size()) b.resize(offset + data.size());
    if (!data.empty()) std::memcpy(b.data() + offset, data.data(), data.size());
    return Status::Ok();
  }

  Status Flush() override { return Status::Ok(); }

  Result<uint64_t> Size() override {
    std::lock_guard lock(s_->mu);
    return static_cast<uint64_t>(s_->bytes.size());
  }

  Status Truncate(uint64_t size_bytes) override {
    std::lock_guard lock(s_->mu);
    if (size_bytes > kMaxSize) return Status::NoSpace("in-memory file " + name_ + " would exceed its limit");
    s_->bytes.resize(size_bytes);
    return Status::Ok();
  }

  Status Allocate(uint64_t offset, uint64_t length, bool keep_size) override {
    if (keep_size) return Status::Ok();
    std::lock_guard lock(s_->mu);
    if (offset + length > kMaxSize) return Status::NoSpace("in-memory file " + name_ + " would exceed its limit");
    if (s_->bytes.size() < offset + length) s_->bytes.resize(offset + length);
    return Status::Ok();
  }

  Status PunchHole(uint64_t offset, uint64_t length) override {
    std::lock_guard lock(s_->mu);
    auto& b = s_->bytes;
    if (offset >= b.size()) return Status::Ok();
    uint64_t end = std::min<uint64_t>(b.size(), offset + length);
    std::memset(b.data() + offset, 0, end - offset);
    return Status::Ok();
  }

  const std::string& path() const override { return name_; }

 private:
  static constexpr uint64_t kMaxSize = 8ull << 30;
  std::shared_ptr<MemStorage> s_;
  std::string name_;
};

class MemFileSystem final : public FileSystem {
 public:
  Result<std::unique_ptr<File>> Open(const std::string& path, const FileOpenOptions& options) override {
    std::lock_guard lock(mu_);
    auto it = files_.find(path);
    if (it == files_.end()) {
      if (!options.create) return Status::NotFound("open " + path + ": no such file");
      it = files_.emplace(path, std::make_shared<MemStorage>()).first;
    } else if (options.create && options.exclusive) {
      return Status::Busy("open " + path + ": file exists");
    }
    return std::unique_ptr<File>(new MemFile(it->second, path));
  }

  bool Exists(const std::string& path) override {
    std::lock_guard lock(mu_);
    return files_.count(path) != 0;
  }

  Status Remove(const std::string& path) override {
    std::lock_guard lock(mu_);
    if (files_.erase(path) == 0) return Status::NotFound("remove " + path + ": no such file");
    return Status::Ok();
  }

 private:
  std::mutex mu_;
  std::map<std::string, std::shared_ptr<MemStorage>> files_;  // GUARDED_BY(mu_)
};

}  // namespace

std::unique_ptr<FileSystem> NewMemFileSystem() { return std::make_unique<MemFileSystem>(); }

std::unique_ptr<File> NewMemFile(std::string name) {
  return std::make_unique<MemFile>(std::make_shared<MemStorage>(), std::move(name));
}

}  // namespace cowtap::cow
