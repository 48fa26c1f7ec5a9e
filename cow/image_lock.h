// Image file locking compatible with QEMU's, so that cowtapd and QEMU (and
// two cowtapds) never both open one image read-write, and nobody writes an
// image another process reads as a backing file.
//
// The convention (QEMU's file-posix "locking=on"): each opener holds
// open-file-description byte-range read locks (F_OFD_SETLK, F_RDLCK) on
//   byte 100 + p  for each permission p it holds, and
//   byte 200 + p  for each permission p it does not let others hold,
// with p: 0 consistent read, 1 write, 2 write unchanged, 3 resize,
// 4 graph change (gone from current QEMU, never taken here). Before that an
// opener tests (F_OFD_GETLK with a write lock) the other side's bytes: for
// each permission it wants, 200 + p (does anyone refuse to share it?), and
// for each permission it refuses to share, 100 + p (does anyone hold it?).
// Read locks never conflict with read locks, so only the tests can fail.
//
// cowtap takes what QEMU takes for a qcow2 node's file (read with
// `cat /proc/locks` while qemu-io holds an image):
//   writable:  holds consistent read, write, resize (100, 101, 103);
//              shares neither write nor resize (201, 203).
//   read-only: holds consistent read (100); shares neither write nor
//              resize (201, 203) -- so any number of readers share a base,
//              and nobody may write it while one of them has it open.
// OFD locks belong to the open file description: they are released when the
// last descriptor of it is closed, and two opens in one process conflict
// like two processes do. Thread-safe (no state of its own).
#pragma once

#include <cstdint>
#include <string>

#include "base/status.h"

namespace cowtap::cow {

// QEMU's permission bits, as byte offsets from the lock bases.
enum class ImagePermission : uint8_t {
  kConsistentRead = 0,
  kWrite = 1,
  kWriteUnchanged = 2,
  kResize = 3,
};
inline constexpr uint64_t kImageLockPermBase = 100;
inline constexpr uint64_t kImageLockSharedBase = 200;

// Bit masks over ImagePermission.
struct ImageLockPerms {
  uint32_t held = 0;        // permissions this opener holds
  uint32_t not_shared = 0;  // permissions others may not hold
};

// What cowtap holds for a writable or read-only image (see above).
ImageLockPerms ImageLockPermsFor(bool writable);

// Takes the locks of perms on fd (open on path, readable), then checks that
// no other open file description holds a conflicting lock. On conflict the
// locks just taken are released and kBusy names the image and the
// permission ("image X is in use by another process (cowtapd or QEMU): ...").
// Other failures (locking unsupported by the file system) are kNotSupported
// or the errno's code.
Status LockImageFile(int fd, const std::string& path, const ImageLockPerms& perms);
Status LockImageFile(int fd, const std::string& path, bool writable);

// Releases every lock byte of the convention held through fd.
Status UnlockImageFile(int fd, const std::string& path);

// What the other openers of path hold, as the perms their lock bytes stand
// for (the union over every open file description holding any): the
// conflict test alone, without locking. For diagnostics and tests.
Result<ImageLockPerms> ProbeImageLocks(const std::string& path);

// "consistent read", "write", ... (QEMU's names).
const char* ImagePermissionName(ImagePermission p);

}  // namespace cowtap::cow
