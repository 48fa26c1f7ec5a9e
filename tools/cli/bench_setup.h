// What `cowtap bench` runs and on what: the rows of issue 4 sized from the
// options, and the images they run on — a populated qcow2 base and a fully
// written raw file made once per run, fresh overlays and sparse raw files
// made per peer (so that every allocating peer starts from nothing).
//
// Thread-safety: BenchImages is used by one thread.
#pragma once

#include <cstdint>
#include <cstdio>
#include <string>
#include <vector>

#include "base/status.h"
#include "tools/cli/bench_types.h"

namespace cowtap::cli::bench {

struct RowPlan {
  uint64_t size_bytes = 256ull << 20;  // virtual size of the base images
  bool quick = false;                  // few requests per row (tests, CI)
  bool full = false;                   // include the 1 GiB copy whatever the size
  uint64_t time_limit_ms = 10000;      // per peer
};

// Every row, in the order. A row that cannot run with this plan
// (the 1 GiB copy without --full on smaller images) carries a note in
// *skipped (same index; empty when it runs).
std::vector<RowSpec> BuildRows(const RowPlan& plan, std::vector<std::string>* skipped);

// The names BuildRows uses, for --rows.
std::vector<std::string> RowNames();

class BenchImages {
 public:
  // Writes dir/base.qcow2 (every cluster allocated, non-zero data) and
  // dir/base.raw (every byte written), both size_bytes, flushed; progress
  // lines go to progress.
  static Result<BenchImages> Prepare(const std::string& dir, uint64_t size_bytes, std::FILE* progress);

  const std::string& base_qcow2() const { return base_qcow2_; }
  const std::string& base_raw() const { return base_raw_; }
  // A new, empty qcow2 overlay dir/<name>.qcow2 of size_bytes backed by the
  // base (replacing any earlier file of that name).
  Result<std::string> FreshOverlay(const std::string& name, uint64_t size_bytes);
  // A new sparse raw file dir/<name>.raw of size_bytes.
  Result<std::string> SparseRaw(const std::string& name, uint64_t size_bytes);
  // Removes a file made by FreshOverlay or SparseRaw (best effort).
  static void Remove(const std::string& path);

 private:
  std::string dir_;
  std::string base_qcow2_;
  std::string base_raw_;
};

}  // namespace cowtap::cli::bench
