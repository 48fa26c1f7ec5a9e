// OffloadMissDevice: the BlockDevice an offload's miss path (the NbdServer
// the kernel's nbd client talks to) serves, a decorator over the engine's
// device that keeps every cluster the dm table may route linear writable in
// place while the offload is on.
//
// Why: a linear segment sends the guest's I/O straight to the image file.
// That is only right while the cluster behind it stays allocated, in place
// and not flagged zero. Discard frees clusters, and qcow2 write-zeroes sets
// the zero flag (v3: zero-alloc keeps the host cluster but a later linear
// write would be hidden behind the flag). Until the engine revokes a range
// (RemapRevoker) before such a change, this device:
//   * offers no discard (supports_discard() is false, so the nbd client and
//     the dm device above it advertise none; a Discard that comes anyway is
//     kNotSupported, which the NBD server answers with an error);
//   * turns write-zeroes into plain writes of zero bytes, which change data
//     only, never metadata flags.
// Everything else forwards unchanged.
//
// Thread-safety: as the device it wraps.
#pragma once

#include <memory>

#include "backend/block_device.h"

namespace cowtap::dm {

std::unique_ptr<backend::BlockDevice> NewOffloadMissDevice(std::shared_ptr<backend::BlockDevice> inner);

}  // namespace cowtap::dm
