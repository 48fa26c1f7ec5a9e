// BlkFront: a simulated guest's block frontend that behaves like Linux
// xen-blkfront over the sim guest-side API (SimGuest): the same xenstore keys
// and xenbus state steps, multi-page rings, several queues, persistent
// grants, indirect descriptors, flush / barrier / discard, both request ABIs.
// It is the driver for the end-to-end tests, `cowtap bench` and the demo.
//
// Handshake (Attach / Reconnect): read the frontend dir's `backend` and
// `backend-id`; wait for the backend's InitWait; read its features; allocate
// 2^order ring pages per queue (order <= max-ring-page-order), grant them,
// allocate an unbound event channel per queue; write ring-ref / ring-page-order
// + ring-refN, event-channel, protocol, feature-persistent,
// multi-queue-num-queues + queue-N/… (>= 2 queues) in one transaction, then
// Initialised; wait for Connected; read sectors, info, sector-size,
// physical-sector-size; write Connected. Every feature can be switched off
// by an option to exercise the backend's fallbacks.
//
// Data: each segment is one guest page. With persistent grants, data (and
// indirect) pages stay granted read-write and are reused, as blkfront does;
// without, pages are granted per request (read-only for writes) and access is
// ended on completion. Caller data is copied into and out of those pages.
//
// Misbehaviour (blkfront_misbehave.cc) deliberately breaks the protocol for
// tests: garbage slots, raw requests with any field, grants revoked under a
// request, req_prod racing past the ring, notification floods, dying.
//
// Thread-safety: a BlkFront is used by one thread at a time.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "base/status.h"
#include "xen-glue/blkfront_io.h"
#include "xen-glue/blkfront_ring.h"
#include "xen-glue/platform.h"
#include "xen-glue/sim.h"

namespace cowtap::xen {

struct BlkfrontOptions {
  BlkifAbi abi = BlkifAbi::kX86_64;
  bool write_protocol = true;           // false: leave `protocol` absent (native)
  uint32_t max_ring_page_order = 4;     // capped by the backend's max-ring-page-order
  bool legacy_single_page_keys = false; // order 0 written as ring-ref even if offered more
  uint32_t max_queues = 4;              // capped by multi-queue-max-queues
  bool persistent_grants = true;
  uint32_t max_indirect_segments = 256; // 0: never use indirect descriptors
  bool use_flush = true;
  bool use_barrier = true;
  bool use_discard = true;
  bool wait_for_initwait = true;        // false: write the ring keys without waiting
  int handshake_timeout_ms = 10000;
  // Reject requests beyond the disk locally (false lets them reach the backend).
  bool check_ranges = true;
};

// What the handshake settled on.
struct BlkfrontDevice {
  uint64_t sectors = 0;
  uint32_t sector_size = 512;
  uint32_t physical_sector_size = 512;
  uint32_t info = 0;  // VDISK_CDROM 1, VDISK_REMOVABLE 2, VDISK_READONLY 4
  bool read_only = false;
  uint32_t ring_page_order = 0;
  uint32_t ring_entries = 0;  // per queue
  uint32_t num_queues = 1;
  bool persistent = false;
  uint32_t indirect_segments = 0;  // 0: direct only
  bool flush = false;
  bool barrier = false;
  bool discard = false;
  bool discard_secure = false;
  uint32_t discard_granularity = 0;
  uint32_t discard_alignment = 0;
  std::string backend_path;
  DomId backend_domid = kDom0;
};

struct BlkfrontStats {
  uint64_t submitted = 0;
  uint64_t completed = 0;
  uint64_t notifications_sent = 0;
  uint64_t unexpected_responses = 0;  // ids we never issued (garbage answers)
  uint64_t grants_created = 0;
  uint64_t grants_ended = 0;
  uint64_t indirect_requests = 0;
  uint64_t resize_events = 0;
};

class BlkFront : public BlockTarget {
 public:
  // Attaches to device `devid` of guest's domain (the toolstack has written
  // the xenstore dirs). Fails with kBusy on handshake timeout, kNotSupported
  // on a sector size other than 512, or with the xenstore / grant error.
  static Result<std::unique_ptr<BlkFront>> Attach(SimGuest& guest, uint32_t devid, const BlkfrontOptions& options);
  // Disconnects (if connected) and releases everything.
  ~BlkFront() override;

  const BlkfrontDevice& device() const { return device_; }
  const BlkfrontStats& stats() const { return stats_; }
  bool connected() const { return connected_; }

  // BlockTarget. Submit pushes the request at once (notifying only when the
  // backend asked) and spreads requests over queues round-robin.
  uint64_t sectors() const override { return device_.sectors; }
  uint32_t max_sectors_per_io() const override;
  uint32_t max_sectors_per_barrier() const override { return kBlkifMaxDirectSegments * kBlkifSectorsPerPage; }
  bool Supports(BlkOp op) const override;
  Status Submit(const BlkIo& io) override;
  // Also handles backend xenstore changes: a new `sectors` value (resize) is
  // picked up; a backend leaving Connected fails further polls with kCancelled.
  Result<size_t> Poll(std::vector<BlkCompletion>* out, int timeout_ms) override;
  uint32_t InFlight() const override;

  // Re-reads `sectors` (resize); returns the new value.
  Result<uint64_t> RefreshSectors();

  // Closing -> (backend Closing/Closed) -> Closed; requests still in flight
  // complete with ERROR; every grant is ended (refs the backend still maps
  // are retried until the timeout, then counted in leaked_grants()).
  Status Disconnect();
  // Initialising, then the whole handshake again (after Disconnect).
  Status Reconnect();
  size_t leaked_grants() const { return leaked_grants_; }

  // --- Misbehaviour (blkfront_misbehave.cc) ---
  // Writes `count` slots of random bytes on queue q and pushes them.
  Status InjectGarbage(uint32_t q, uint32_t count, uint64_t seed);
  // Pushes req verbatim on queue q (req.id is replaced by a tracking id so
  // the answer completes with `cookie`). Segment grefs are used as given.
  Status SubmitRaw(uint32_t q, BlkifRequest req, uint64_t cookie);
  // Submits io normally, then force-revokes its data grants (before the
  // push when before_push, else right after it).
  Status SubmitThenRevoke(const BlkIo& io, bool before_push);
  // Publishes req_prod = rsp_cons + ring size + beyond on queue q and notifies.
  Status RaceReqProd(uint32_t q, uint32_t beyond);
  // Sends `count` notifications on queue q.
  Status NotifyFlood(uint32_t q, uint32_t count);
  // Grants a fresh page to the backend and returns its ref (for raw requests).
  Result<GrantRef> GrantScratchPage(bool readonly);

 private:
  struct DataPage {
    uint32_t page = 0;
    GrantRef gref = 0;
  };
  struct Shadow {
    bool in_use = false;
    bool raw = false;
    bool revoked = false;
    BlkIo io;
    std::vector<DataPage> data;
    std::vector<DataPage> indirect;
  };
  struct Queue {
    std::vector<uint32_t> ring_pages;
    std::vector<GrantRef> ring_refs;
    std::unique_ptr<FrontRing> ring;
    EvtchnPort port = 0;
    std::vector<Shadow> shadow;
    std::vector<uint32_t> free_ids;
    uint32_t in_flight = 0;
  };

  BlkFront(SimGuest& guest, uint32_t devid, const BlkfrontOptions& options);
  Status Handshake();
  Status WaitBackendState(std::initializer_list<int> states, int* seen);
  Result<int> ReadBackendState();
  Status ReadBackendFeatures();
  Status SetupQueues();
  Status PublishKeys();
  Status ReadDiskProperties();
  Status SetFrontendState(int state);
  Result<DataPage> GetDataPage(bool for_write_only);
  void PutDataPage(const DataPage& page, bool revoked);
  Status EndGrant(GrantRef ref);
  Status NotifyQueue(Queue& q);
  Status Drain(Queue& q, std::vector<BlkCompletion>* out, size_t* n);
  void Finish(Queue& q, uint32_t id, int16_t status, std::vector<BlkCompletion>* out);
  Status HandleXenstoreEvents();
  void ReleaseQueues();
  Status PushAndNotify(Queue& q);
  Result<uint32_t> PrepareRequest(Queue& q, const BlkIo& io, BlkifRequest* req);

  SimGuest* guest_;
  const uint32_t devid_;
  const BlkfrontOptions options_;
  std::string frontend_path_;
  std::unique_ptr<XenStore> store_;
  std::unique_ptr<EventChannel> evtchn_;
  BlkfrontDevice device_;
  BlkfrontStats stats_;
  std::vector<Queue> queues_;
  std::vector<DataPage> persistent_pool_;
  // Pages whose access could not be ended yet (the backend still maps them).
  std::vector<DataPage> deferred_end_;
  uint32_t next_queue_ = 0;
  bool connected_ = false;
  bool backend_gone_ = false;
  size_t leaked_grants_ = 0;
  // Offered by the backend (before our caps).
  uint32_t backend_max_order_ = 0;
  uint32_t backend_max_queues_ = 1;
  uint32_t backend_indirect_ = 0;
  bool backend_persistent_ = false;
};

}  // namespace cowtap::xen
