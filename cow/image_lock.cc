// QEMU-compatible image locks over OFD byte-range locks; see image_lock.h.
// Order matters: the locks are taken before the conflict test, so that of two
// openers racing, at least one sees the other (both may fail; neither may
// succeed wrongly).
#include "cow/image_lock.h"

#include <fcntl.h>
#include <unistd.h>

#include <array>

namespace cowtap::cow {
namespace {

constexpr std::array<ImagePermission, 4> kPermissions = {ImagePermission::kConsistentRead, ImagePermission::kWrite,
                                                         ImagePermission::kWriteUnchanged, ImagePermission::kResize};
// Bytes of the convention that may be held: the four permissions above and
// graph change (4), which older QEMU took.
constexpr uint64_t kPermissionSlots = 5;

constexpr uint32_t Bit(ImagePermission p) { return 1u << static_cast<uint32_t>(p); }

Status LockError(int err, const std::string& path, const char* what, uint64_t byte) {
  std::string where = std::string(what) + " on " + path + " (byte " + std::to_string(byte) + ")";
  if (err == EINVAL || err == ENOLCK || err == EOPNOTSUPP)
    return Status(ErrorCode::kNotSupported,
                  where +
                      ": the file system does not support open-file-description locks; "
                      "open the image without locking",
                  err);
  return Status::FromErrno(err, where);
}

Status SetByte(int fd, const std::string& path, uint64_t byte, short type) {
  struct flock fl = {};
  fl.l_type = type;
  fl.l_whence = SEEK_SET;
  fl.l_start = static_cast<off_t>(byte);
  fl.l_len = 1;
  while (::fcntl(fd, F_OFD_SETLK, &fl) != 0) {
    if (errno == EINTR) continue;
    return LockError(errno, path, type == F_UNLCK ? "unlock" : "lock", byte);
  }
  return Status::Ok();
}

// Whether an open file description other than fd's holds a lock on byte.
Result<bool> HeldByOther(int fd, const std::string& path, uint64_t byte) {
  struct flock fl = {};
  fl.l_type = F_WRLCK;  // conflicts with any lock another description holds
  fl.l_whence = SEEK_SET;
  fl.l_start = static_cast<off_t>(byte);
  fl.l_len = 1;
  while (::fcntl(fd, F_OFD_GETLK, &fl) != 0) {
    if (errno == EINTR) continue;
    return LockError(errno, path, "test lock", byte);
  }
  return fl.l_type != F_UNLCK;
}

Status Busy(const std::string& path, ImagePermission p, bool we_want_it) {
  std::string why =
      we_want_it
          ? std::string("another opener does not share the \"") + ImagePermissionName(p) + "\" permission cowtap needs"
          : std::string("another opener holds the \"") + ImagePermissionName(p) + "\" permission cowtap does not share";
  return Status::Busy("image " + path + " is in use by another process (cowtapd or QEMU): " + why +
                      "; stop the other user first (a base shared by several guests must be opened read-only "
                      "by all of them)");
}

Status CheckConflicts(int fd, const std::string& path, const ImageLockPerms& perms) {
  for (ImagePermission p : kPermissions) {
    const auto i = static_cast<uint64_t>(p);
    if (perms.held & Bit(p)) {
      COWTAP_ASSIGN_OR_RETURN(bool refused, HeldByOther(fd, path, kImageLockSharedBase + i));
      if (refused) return Busy(path, p, true);
    }
    if (perms.not_shared & Bit(p)) {
      COWTAP_ASSIGN_OR_RETURN(bool held, HeldByOther(fd, path, kImageLockPermBase + i));
      if (held) return Busy(path, p, false);
    }
  }
  return Status::Ok();
}

}  // namespace

const char* ImagePermissionName(ImagePermission p) {
  switch (p) {
    case ImagePermission::kConsistentRead:
      return "consistent read";
    case ImagePermission::kWrite:
      return "write";
    case ImagePermission::kWriteUnchanged:
      return "write unchanged";
    case ImagePermission::kResize:
      return "resize";
  }
  return "?";
}

ImageLockPerms ImageLockPermsFor(bool writable) {
  ImageLockPerms perms;
  perms.held = Bit(ImagePermission::kConsistentRead);
  if (writable) perms.held |= Bit(ImagePermission::kWrite) | Bit(ImagePermission::kResize);
  perms.not_shared = Bit(ImagePermission::kWrite) | Bit(ImagePermission::kResize);
  return perms;
}

Status LockImageFile(int fd, const std::string& path, const ImageLockPerms& perms) {
  Status s;
  for (ImagePermission p : kPermissions) {
    const auto i = static_cast<uint64_t>(p);
    if (s.ok() && (perms.held & Bit(p))) s = SetByte(fd, path, kImageLockPermBase + i, F_RDLCK);
    if (s.ok() && (perms.not_shared & Bit(p))) s = SetByte(fd, path, kImageLockSharedBase + i, F_RDLCK);
  }
  if (s.ok()) s = CheckConflicts(fd, path, perms);
  if (!s.ok()) UnlockImageFile(fd, path).IgnoreError();  // best effort: the caller closes fd anyway
  return s;
}

Status LockImageFile(int fd, const std::string& path, bool writable) {
  return LockImageFile(fd, path, ImageLockPermsFor(writable));
}

Status UnlockImageFile(int fd, const std::string& path) {
  for (uint64_t i = 0; i < kPermissionSlots; ++i) {
    COWTAP_RETURN_IF_ERROR(SetByte(fd, path, kImageLockPermBase + i, F_UNLCK));
    COWTAP_RETURN_IF_ERROR(SetByte(fd, path, kImageLockSharedBase + i, F_UNLCK));
  }
  return Status::Ok();
}

Result<ImageLockPerms> ProbeImageLocks(const std::string& path) {
  int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) return Status::FromErrno(errno, "open " + path + " to test its locks");
  ImageLockPerms found;
  Status s;
  for (ImagePermission p : kPermissions) {
    const auto i = static_cast<uint64_t>(p);
    auto held = HeldByOther(fd, path, kImageLockPermBase + i);
    auto refused = held.ok() ? HeldByOther(fd, path, kImageLockSharedBase + i) : held;
    if (!refused.ok()) {
      s = refused.status();
      break;
    }
    if (*held) found.held |= Bit(p);
    if (*refused) found.not_shared |= Bit(p);
  }
  ::close(fd);
  if (!s.ok()) return s;
  return found;
}

}  // namespace cowtap::cow
