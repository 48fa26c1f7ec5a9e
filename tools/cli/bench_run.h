// RunBench: the whole of `cowtap bench` behind its flags — make a work dir,
// fork the guest process, prepare the images, run every selected row on
// every peer (progress lines on a stream), measure the remap cache alone,
// and return the report to print. Failures of one peer are notes in the
// report, not errors: the bench measures, it does not gate.
//
// Thread-safety: call from a process that has no other thread yet (the
// guest process is forked first; see bench_ring.h).
#pragma once

#include <cstdint>
#include <cstdio>
#include <string>
#include <vector>

#include "base/status.h"
#include "tools/cli/bench_types.h"

namespace cowtap::cli::bench {

struct BenchOptions {
  uint64_t size_bytes = 0;        // 0: 256 MiB, or 32 MiB with quick
  std::vector<std::string> rows;  // empty: every row
  bool quick = false;
  bool full = false;
  std::string dir;    // empty: a new temp dir, removed at the end
  bool keep = false;  // keep the images
  bool direct_io = true;
  double seconds_per_peer = 0;  // 0: 10 s, or 3 s with quick
};

// Fails only when nothing can be measured (bad options, no work dir, the
// base images cannot be written).
Result<BenchReport> RunBench(const BenchOptions& options, std::FILE* progress);

}  // namespace cowtap::cli::bench
