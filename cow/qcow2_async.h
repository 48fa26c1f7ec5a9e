// Private to the qcow2 engine: the state of an asynchronous guest request
// and of an allocation in flight (see qcow2_image.h for the design). Used by
// qcow2_async.cc and qcow2_alloc.cc only.
//
// Thread-safety: as documented per member.
#pragma once

#include <atomic>
#include <list>
#include <memory>
#include <mutex>
#include <vector>

#include "cow/qcow2_image.h"

namespace cowtap::cow {

// One guest request in progress. pending counts the submitter's own
// reference plus every sub-I/O and allocation not yet finished; the last
// Put() leaves the epoch and calls done.
struct Qcow2Image::AsyncOp {
  AsyncOp(Qcow2Image* image, uint64_t off, IoVecs v, ImageCompletion d)
      : img(image), offset(off), iov(v), length(TotalLength(v)), done(std::move(d)) {}

  void Fail(const Status& s) {
    std::lock_guard lock(mu);
    if (status.ok()) status = s;
  }
  void Ref() { pending.fetch_add(1); }
  void Put() {
    if (pending.fetch_sub(1) != 1) return;
    if (gate >= 0) img->gate_.Exit(gate);
    Status s;
    {
      std::lock_guard lock(mu);
      s = status;
    }
    ImageCompletion d = std::move(done);
    d(std::move(s));
  }

  Qcow2Image* const img;
  const uint64_t offset;
  const IoVecs iov;
  const uint64_t length;
  ImageCompletion done;
  std::atomic<int> pending{1};
  int gate = -1;  // epoch held while host offsets are in use
  std::mutex mu;
  Status status;  // GUARDED_BY(mu): the first error
  // Vector arrays of sub-I/Os (a list: elements never move). Only the
  // thread holding the submitter's reference appends.
  std::list<std::vector<iovec>> iovs;
};

// Clusters reserved for one run of an allocating write, from reservation
// until linked (or given back).
struct Qcow2Image::PendingAlloc {
  std::shared_ptr<AsyncOp> op;
  uint64_t vc = 0;  // first virtual cluster
  uint64_t k = 0;   // clusters
  uint64_t host = 0;
  bool reused = false;  // a preallocated zero cluster, not ours to give back
  uint64_t write_at = 0;
  uint64_t data_length = 0;                       // guest bytes covered
  std::vector<uint8_t> head, tail;                // copy-on-write areas
  std::vector<iovec> io;                          // head + guest data + tail
  Status status;                                  // of the data write
  std::vector<std::shared_ptr<AsyncOp>> waiters;  // writes to these clusters
};

}  // namespace cowtap::cow
