// The toolstack's part of a VBD for the simulated platform, where cowtapd
// plays libxl: the backend directory /local/domain/0/backend/<type>/<domid>/
// <devid> and the frontend directory /local/domain/<domid>/device/vbd/
// <devid>, with libxl's keys, permissions and initial states, in one
// transaction. Like xen::ToolstackAddVbd (xen-glue/sim.h) but for any
// backend type (that one writes backend/vbd only), and it writes `target` +
// `format` beside `params` so the format is never guessed.
//
// Thread-safety: stateless; uses the caller's handle.
#pragma once

#include <string>

#include "base/status.h"
#include "xen-glue/platform.h"

namespace cowtap::daemon {

struct ToolstackDisk {
  xen::DomId domid = 1;
  uint32_t devid = 51712;
  std::string backend_type = "cowtap";
  std::string image;
  std::string format;  // "" = probe
  bool writable = true;
};

Status ToolstackWriteDisk(xen::XenStore& dom0_store, const ToolstackDisk& disk);
// Removes both directories (idempotent).
Status ToolstackRemoveDisk(xen::XenStore& dom0_store, const ToolstackDisk& disk);

}  // namespace cowtap::daemon
