// Workload: drives a BlockTarget with a seeded mix of reads, writes, flushes
// and discards at a queue depth, keeps a model of what the disk must hold,
// and verifies every byte it reads against that model.
//
// The model is one generation tag per sector of the region under test. Every
// write stamps each sector with a self-describing pattern (sector number,
// generation, seed, then pseudo-random bytes derived from them), so a wrong
// byte is caught and a misplaced sector is identified (its header says where
// it came from). Requests in flight never overlap, so the expected content of
// every read is exact. A discard makes its sectors "zero or previous" (the
// backend may leave unaligned heads and tails unchanged).
//
// With a journal (workload_journal.h) the workload also records every request
// it issues and every answer, so a checker can tell what the disk must hold
// after the backend was killed; with initial tags and a first generation it
// continues on a disk an earlier run left behind.
//
// Thread-safety: one Workload is run by one thread.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "base/status.h"
#include "xen-glue/blkfront_io.h"
#include "xen-glue/workload_journal.h"

namespace cowtap::xen {

enum class InitialContent : uint8_t {
  kUnknown,  // sectors never written by this workload are not verified
  kZero,     // the disk starts as zeros
  kPattern,  // the disk starts as WorkloadPattern(generation 0, initial_seed)
};

struct WorkloadOptions {
  bool sequential = false;
  uint32_t read_percent = 50;     // of data ops
  uint32_t discard_percent = 0;   // of all ops (needs the device's discard)
  uint32_t flush_every = 0;       // a flush after every N writes (0: never)
  uint32_t barrier_percent = 0;   // of writes sent as WRITE_BARRIER
  uint32_t block_sectors = 8;     // sectors per data op
  bool random_sizes = false;      // 1..block_sectors sectors per op
  uint32_t queue_depth = 8;
  uint64_t ops = 1000;            // stop after this many ops (0: no limit)
  uint64_t duration_ms = 0;       // stop after this long (0: no limit)
  uint64_t seed = 1;
  uint64_t region_start = 0;      // first sector used
  uint64_t region_sectors = 0;    // 0: to the end of the device
  InitialContent initial = InitialContent::kUnknown;
  uint64_t initial_seed = 0;
  bool final_verify = true;       // read the whole region back at the end
  uint32_t max_mismatch_reports = 8;
  int poll_timeout_ms = 10000;    // a request not answered in this time is an error
  // What each sector of the region holds at start, as model tags
  // (workload_journal.h); empty: every sector holds its initial content.
  std::vector<uint32_t> initial_tags;
  uint32_t first_generation = 1;  // generation of the first write (1..kTagGenerationMask-1)
  uint64_t op_seed = 0;           // seeds the choice of ops (0: seed); seed stamps the data
  std::string journal_path;       // record requests and answers here (empty: no journal)
};

struct WorkloadReport {
  uint64_t ops = 0;
  uint64_t reads = 0, writes = 0, flushes = 0, discards = 0, barriers = 0;
  uint64_t bytes_read = 0, bytes_written = 0;
  uint64_t errors = 0;          // completions with a non-OK status
  uint64_t mismatches = 0;      // sectors whose content differed from the model
  uint64_t verified_sectors = 0;
  double elapsed_s = 0;
  double p50_us = 0, p99_us = 0, max_us = 0;
  std::vector<std::string> mismatch_details;  // first few, human-readable
  std::string Summary() const;
  bool passed() const { return errors == 0 && mismatches == 0; }
};

// Fills one sector with the workload pattern for (sector, generation, seed).
void FillWorkloadPattern(uint64_t sector, uint32_t generation, uint64_t seed, uint8_t* out);

class Workload {
 public:
  // Fails with kInvalidArgument on options that cannot run on target (region
  // beyond the device, a model too large, block bigger than a request).
  static Result<Workload> Create(BlockTarget& target, const WorkloadOptions& options);

  // Runs to completion. Non-OK only when the target itself failed (ring
  // broken, request timed out); data errors are counted in the report.
  Result<WorkloadReport> Run();

  // The model tag of a sector of the region: the generation the model
  // expects, flagged as in workload_journal.h (tests, --model-out).
  uint32_t ModelGeneration(uint64_t sector) const { return model_[sector - region_start_]; }

 private:
  struct InFlight {
    uint64_t cookie;
    BlkOp op;
    uint64_t sector;
    uint32_t nr_sectors;
    uint32_t buffer_index;
    uint64_t start_ns;
  };

  Workload(BlockTarget& target, const WorkloadOptions& options);
  bool Overlaps(uint64_t sector, uint32_t nr) const;
  Status IssueNext();
  Status Issue(BlkOp op, uint64_t sector, uint32_t nr);
  Status Reap(int timeout_ms);
  void Complete(const BlkCompletion& c);
  void VerifyRead(uint64_t sector, uint32_t nr, const uint8_t* data);
  Status Journal(const JournalRecord& record, bool commit);
  Status FinalVerify();
  uint64_t NextRandom();

  BlockTarget* target_;
  WorkloadOptions options_;
  uint64_t region_start_ = 0;
  uint64_t region_sectors_ = 0;
  std::vector<uint32_t> model_;
  uint32_t next_generation_ = 1;
  uint64_t rng_state_ = 0;
  uint64_t seq_cursor_ = 0;
  uint64_t writes_since_flush_ = 0;
  uint64_t next_cookie_ = 1;
  uint64_t issued_ = 0;
  std::vector<std::vector<uint8_t>> buffers_;
  std::vector<uint32_t> free_buffers_;
  std::vector<InFlight> in_flight_;
  std::vector<uint32_t> latencies_us_;
  uint64_t latency_samples_seen_ = 0;
  WorkloadReport report_;
  std::unique_ptr<JournalWriter> journal_;
  Status journal_status_;
};

}  // namespace cowtap::xen
