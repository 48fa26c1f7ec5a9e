#include "cow/file.h"

#include <vector>

namespace cowtap::cow {

Status File::ReadvAt(uint64_t offset, IoVecs iov) {
  for (const iovec& v : iov) {
    COWTAP_RETURN_IF_ERROR(ReadAt(offset, {static_cast<uint8_t*>(v.iov_base), v.iov_len}));
    offset += v.iov_len;
  }
  return Status::Ok();
}

Status File::WritevAt(uint64_t offset, IoVecs iov) {
  for (const iovec& v : iov) {
    COWTAP_RETURN_IF_ERROR(WriteAt(offset, {static_cast<const uint8_t*>(v.iov_base), v.iov_len}));
    offset += v.iov_len;
  }
  return Status::Ok();
}

void File::SubmitReadv(uint64_t offset, IoVecs iov, FileCompletion done) { done(ReadvAt(offset, iov)); }

void File::SubmitWritev(uint64_t offset, IoVecs iov, FileCompletion done) { done(WritevAt(offset, iov)); }

void File::SubmitFlush(FileCompletion done) { done(Flush()); }

std::string ResolveRelativePath(const std::string& relative_to, const std::string& name) {
  if (name.empty() || name[0] == '/') return name;
  auto slash = relative_to.rfind('/');
  if (slash == std::string::npos) return name;
  return relative_to.substr(0, slash + 1) + name;
}

}  // namespace cowtap::cow
