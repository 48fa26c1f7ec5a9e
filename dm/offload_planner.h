// OffloadPlanner: turns what an image knows of its top layer's clusters into
// a DmTable for the kernel offload. Only clusters that a write may overwrite
// in place go linear: allocated in the TOP layer, uncompressed, not zero,
// refcount 1 (qcow2's COPIED flag). The engine's remap cache says exactly
// that with Remap::kWritable (set from COPIED on the L2 path, dropped by
// every discard / CoW / snapshot invalidation), so the planner's source is
// the remap cache through Image::LookupRemap: Image::Map cannot tell
// refcount 1, so Map extents are never trusted for offload.
//
// Runs of clusters contiguous both virtually and on the host become one
// linear segment; everything else is a miss onto the user-space device. At
// most max_segments segments: beyond that the shortest linear runs are
// dropped to miss (a longer run saves more kernel-served I/O per segment).
//
// OffloadPlanner is a value (its options); Plan() is const and thread-safe.
#pragma once

#include <cstdint>
#include <vector>

#include "base/status.h"
#include "cow/image.h"
#include "dm/dm_table.h"

namespace cowtap::dm {

// One in-place writable cluster: virtual cluster index -> byte offset of the
// cluster in the image file.
struct WritableCluster {
  uint64_t virtual_cluster = 0;
  uint64_t host_offset = 0;
  bool operator==(const WritableCluster&) const = default;
};

struct PlannerOptions {
  uint64_t disk_size_bytes = 0;  // the virtual size; must be a multiple of 512
  uint32_t cluster_size = 0;     // power of two, >= 512
  size_t max_segments = 4096;    // >= 1; a table never has more
};

class OffloadPlanner {
 public:
  // kInvalidArgument if the options are unusable (size not in sectors,
  // cluster size not a power of two >= 512, max_segments 0).
  static Result<OffloadPlanner> Make(const PlannerOptions& options);
  // Options for an image: its size and cluster size. kNotSupported where no
  // cluster can be written in place through the image file: raw images (no
  // clusters to track), qcow2 with an external data file (host offsets are
  // in another file), read-only images.
  static Result<PlannerOptions> OptionsFor(const cow::Image& image, size_t max_segments = 4096);

  // The table for the given clusters (any order). Clusters past the disk's
  // end, duplicates with different host offsets, host offsets not
  // cluster-aligned or whose end overflows are refused with
  // kInvalidArgument: they mean the source is broken, and routing anything
  // linear from it would be unsafe. A cluster straddling the disk's end is
  // clamped to it.
  Result<DmTable> Plan(std::vector<WritableCluster> clusters) const;

  const PlannerOptions& options() const { return options_; }
  uint64_t cluster_count() const;

 private:
  explicit OffloadPlanner(const PlannerOptions& o) : options_(o) {}
  PlannerOptions options_;
};

// What the image's top layer currently knows to be writable in place,
// cluster by cluster through Image::LookupRemap (safe during I/O): entries
// with Remap::kWritable, layer 0, not kZero. Clusters the cache does not
// hold are simply not offloaded (a miss is always safe).
std::vector<WritableCluster> CollectWritableClusters(cow::Image& image);

// Priming at attach: a freshly opened image's remap cache is empty, so
// nothing could be offloaded until the guest touched each cluster. This
// finds the top layer's allocated, uncompressed, non-zero extents with
// Image::Map and reads one sector of each of their clusters through the
// engine, which resolves the L2 entry and caches it (kWritable only where
// qcow2's COPIED flag says refcount 1). At most max_clusters clusters (the
// remap cache's capacity is the useful bound; more would evict). Returns
// how many clusters were read. Costs one 512-byte read per cluster.
Result<uint64_t> PrimeRemapCache(cow::Image& image, uint64_t max_clusters);

}  // namespace cowtap::dm
