// Reading what a blkif frontend published in its xenstore directory before
// Initialised: protocol, ring-page-order and ring-ref / ring-refN,
// event-channel, feature-persistent, multi-queue-num-queues with per-queue
// queue-N/ keys, feature-large-sector-size (blkif.h "Frontend XenBus
// Nodes" and "Multiple hardware queues/rings").
//
// Everything a guest writes is untrusted text: numbers must be plain
// decimal (no sign, no spaces, no hex), fit their width and respect what the
// backend advertised; a missing required key, a malformed or out-of-range
// value is kInvalidArgument naming the full key path and the value, so the
// VBD can report it and close instead of guessing.
//
// ParseFrontendKeys is pure over a KeyReader (the fuzz target feeds it a
// map); ReadFrontendKeys runs it over a XenStore handle, thread-safety as
// the handle's.
#pragma once

#include <cstdint>
#include <functional>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "backend/blkif.h"
#include "base/status.h"
#include "xen-glue/platform.h"

namespace cowtap::backend {

// What the backend advertised (the bounds frontend values must respect).
struct BackendOffer {
  uint32_t max_ring_page_order = 4;  // <= 4 (16 pages)
  uint32_t max_queues = 4;
  bool persistent = true;
};

struct QueueKeys {
  std::vector<xen::GrantRef> ring_refs;  // 2^ring_page_order refs
  xen::EvtchnPort event_channel = 0;
};

struct FrontendKeys {
  Abi abi = Abi::kX86_64;
  uint32_t ring_page_order = 0;
  bool persistent = false;  // the frontend wrote feature-persistent=1 and we offered it
  bool large_sector_size = false;
  std::vector<QueueKeys> queues;  // 1..max_queues
};

// Parses an unsigned decimal of at most max (inclusive). kInvalidArgument
// names `what` and the text.
Result<uint64_t> ParseDecimal(std::string_view text, uint64_t max, std::string_view what);

// Reads one xenstore key by full path: its value, nullopt if the node does
// not exist, or why it could not be read.
using KeyReader = std::function<Result<std::optional<std::string>>(const std::string& path)>;
// A KeyReader over a XenStore handle (kNotFound becomes nullopt).
KeyReader StoreKeyReader(xen::XenStore& store);

// Checks the frontend's keys under frontend_dir, read through `read`.
Result<FrontendKeys> ParseFrontendKeys(const KeyReader& read, const std::string& frontend_dir,
                                       const BackendOffer& offer);
// ParseFrontendKeys over store.
Result<FrontendKeys> ReadFrontendKeys(xen::XenStore& store, const std::string& frontend_dir, const BackendOffer& offer);

}  // namespace cowtap::backend
