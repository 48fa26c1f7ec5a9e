// A FileSystem that opens every file with QEMU's image locks
// (FileOpenOptions::lock, cow/image_lock.h) and forwards everything else to
// the process's POSIX file system. The daemon opens image chains through it,
// so that two daemons (or cowtapd and QEMU) never have one image open
// read-write at once, while read-only bases stay shareable.
//
// Thread-safety: as the underlying FileSystem (thread-safe).
#pragma once

#include "cow/file.h"

namespace cowtap::daemon {

// Never null; lives as long as the process.
cow::FileSystem* LockingFileSystem();

}  // namespace cowtap::daemon
