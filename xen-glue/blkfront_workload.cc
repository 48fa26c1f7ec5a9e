#include "xen-glue/blkfront_workload.h"

#include <algorithm>
#include <chrono>
#include <cstring>

#include <fmt/format.h>

#include "base/checked_math.h"
#include "base/endian.h"

namespace cowtap::xen {
namespace {

// Model tags are those of workload_journal.h.
constexpr uint32_t kMayBeZero = kTagMayBeZero;
constexpr uint32_t kGenerationMask = kTagGenerationMask;
// Largest region the model covers (8 GiB of 512-byte sectors: 64 MiB of tags).
constexpr uint64_t kMaxModelSectors = uint64_t{1} << 24;
constexpr size_t kMaxLatencySamples = size_t{1} << 20;

uint64_t SplitMix64(uint64_t* state) {
  uint64_t z = (*state += 0x9e3779b97f4a7c15ull);
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  return z ^ (z >> 31);
}

uint64_t NowNs() {
  return std::chrono::duration_cast<std::chrono::nanoseconds>(
             std::chrono::steady_clock::now().time_since_epoch())
      .count();
}

bool AllZero(const uint8_t* p, size_t n) {
  for (size_t i = 0; i < n; ++i) {
    if (p[i] != 0) return false;
  }
  return true;
}

}  // namespace

std::string_view BlkOpName(BlkOp op) {
  switch (op) {
    case BlkOp::kRead: return "read";
    case BlkOp::kWrite: return "write";
    case BlkOp::kWriteBarrier: return "write-barrier";
    case BlkOp::kFlush: return "flush";
    case BlkOp::kDiscard: return "discard";
    case BlkOp::kSecureDiscard: return "secure-discard";
  }
  return "unknown";
}

Result<int16_t> ExecuteSync(BlockTarget& target, const BlkIo& io, int timeout_ms) {
  COWTAP_RETURN_IF_ERROR(target.Submit(io));
  std::vector<BlkCompletion> done;
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::milliseconds(timeout_ms);
  while (true) {
    COWTAP_ASSIGN_OR_RETURN(size_t n, target.Poll(&done, 100));
    for (size_t i = 0; i < n; ++i) {
      if (done[i].cookie == io.cookie) return done[i].status;
    }
    done.clear();
    if (std::chrono::steady_clock::now() > deadline) {
      return Status::Busy(fmt::format("{} of sector {} not answered within {} ms", BlkOpName(io.op),
                                      io.sector, timeout_ms));
    }
  }
}

void FillWorkloadPattern(uint64_t sector, uint32_t generation, uint64_t seed, uint8_t* out) {
  StoreLe64(out, sector);
  StoreLe32(out + 8, generation);
  StoreLe32(out + 12, static_cast<uint32_t>(seed));
  uint64_t state = sector * 0x100000001b3ull ^ (uint64_t{generation} << 40) ^ seed;
  for (size_t i = 16; i < kGuestSectorBytes; i += 8) StoreLe64(out + i, SplitMix64(&state));
}

std::string WorkloadReport::Summary() const {
  return fmt::format(
      "ops={} reads={} writes={} flushes={} discards={} barriers={} read={}B written={}B "
      "elapsed={:.3f}s iops={:.0f} p50={:.1f}us p99={:.1f}us max={:.1f}us verified_sectors={} "
      "errors={} mismatches={}",
      ops, reads, writes, flushes, discards, barriers, bytes_read, bytes_written, elapsed_s,
      elapsed_s > 0 ? ops / elapsed_s : 0.0, p50_us, p99_us, max_us, verified_sectors, errors, mismatches);
}

Workload::Workload(BlockTarget& target, const WorkloadOptions& options)
    : target_(&target), options_(options) {}

Result<Workload> Workload::Create(BlockTarget& target, const WorkloadOptions& options) {
  Workload w(target, options);
  const uint64_t disk = target.sectors();
  w.region_start_ = options.region_start;
  w.region_sectors_ = options.region_sectors != 0 ? options.region_sectors
                      : disk > options.region_start ? disk - options.region_start
                                                    : 0;
  if (w.region_sectors_ == 0 || !RangeWithin(w.region_start_, w.region_sectors_, disk)) {
    return Status::InvalidArgument(fmt::format(
        "workload region [{}, +{}) is empty or beyond the device's {} sectors; pick a smaller region",
        options.region_start, options.region_sectors, disk));
  }
  if (w.region_sectors_ > kMaxModelSectors) {
    return Status::InvalidArgument(fmt::format("workload region of {} sectors exceeds the model limit of {}; "
                                               "set region_sectors",
                                               w.region_sectors_, kMaxModelSectors));
  }
  if (options.block_sectors == 0 || options.block_sectors > target.max_sectors_per_io() ||
      options.block_sectors > w.region_sectors_) {
    return Status::InvalidArgument(fmt::format("block of {} sectors: must be 1..{} (the device's request "
                                               "limit) and fit the region",
                                               options.block_sectors, target.max_sectors_per_io()));
  }
  if (options.queue_depth == 0 || options.queue_depth > 4096) {
    return Status::InvalidArgument("queue depth must be 1..4096");
  }
  if (options.read_percent > 100 || options.discard_percent > 100 || options.barrier_percent > 100) {
    return Status::InvalidArgument("percentages must be 0..100");
  }
  if (options.discard_percent > 0 && !target.Supports(BlkOp::kDiscard)) {
    return Status::NotSupported("the device did not negotiate discard; set discard_percent to 0");
  }
  if (options.flush_every > 0 && !target.Supports(BlkOp::kFlush)) {
    return Status::NotSupported("the device did not negotiate flush; set flush_every to 0");
  }
  if (options.barrier_percent > 0 && !target.Supports(BlkOp::kWriteBarrier)) {
    return Status::NotSupported("the device did not negotiate barriers; set barrier_percent to 0");
  }
  if (!options.initial_tags.empty() && options.initial_tags.size() != w.region_sectors_) {
    return Status::InvalidArgument(fmt::format("initial model has {} tags for a region of {} sectors",
                                               options.initial_tags.size(), w.region_sectors_));
  }
  if (options.first_generation == 0 || options.first_generation >= kGenerationMask) {
    return Status::InvalidArgument(
        fmt::format("first generation {} must be 1..{}", options.first_generation, kGenerationMask - 1));
  }
  if (options.initial_tags.empty()) {
    w.model_.assign(w.region_sectors_, 0);
  } else {
    w.model_ = options.initial_tags;
  }
  w.next_generation_ = options.first_generation;
  w.rng_state_ = options.op_seed != 0 ? options.op_seed : options.seed;
  if (!options.journal_path.empty()) {
    COWTAP_ASSIGN_OR_RETURN(w.journal_, JournalWriter::Create(options.journal_path));
  }
  w.buffers_.resize(options.queue_depth);
  for (uint32_t i = 0; i < options.queue_depth; ++i) {
    w.buffers_[i].resize(size_t{options.block_sectors} * kGuestSectorBytes);
    w.free_buffers_.push_back(i);
  }
  return w;
}

uint64_t Workload::NextRandom() { return SplitMix64(&rng_state_); }

Status Workload::Journal(const JournalRecord& record, bool commit) {
  if (!journal_) return Status::Ok();
  journal_->Add(record);
  if (!commit) return Status::Ok();
  Status s = journal_->Commit();
  if (!s.ok() && journal_status_.ok()) journal_status_ = s;
  return s;
}

bool Workload::Overlaps(uint64_t sector, uint32_t nr) const {
  for (const InFlight& f : in_flight_) {
    if (f.nr_sectors == 0) continue;
    if (sector < f.sector + f.nr_sectors && f.sector < sector + nr) return true;
  }
  return false;
}

Status Workload::IssueNext() {
  if (options_.flush_every > 0 && writes_since_flush_ >= options_.flush_every) {
    writes_since_flush_ = 0;
    return Issue(BlkOp::kFlush, 0, 0);
  }
  uint32_t nr = options_.random_sizes ? 1 + NextRandom() % options_.block_sectors : options_.block_sectors;
  const uint32_t kind = NextRandom() % 100;
  BlkOp op;
  if (kind < options_.discard_percent) {
    op = BlkOp::kDiscard;
  } else if (NextRandom() % 100 < options_.read_percent) {
    op = BlkOp::kRead;
  } else {
    op = NextRandom() % 100 < options_.barrier_percent ? BlkOp::kWriteBarrier : BlkOp::kWrite;
  }
  if (op == BlkOp::kWriteBarrier) nr = std::min(nr, target_->max_sectors_per_barrier());
  // Pick a range no request in flight touches; give up for now (and reap)
  // after a few tries so the exact expected content of every read is known.
  for (int attempt = 0; attempt < 8; ++attempt) {
    uint64_t offset;
    if (options_.sequential) {
      if (seq_cursor_ + nr > region_sectors_) seq_cursor_ = 0;
      offset = seq_cursor_;
    } else {
      offset = NextRandom() % (region_sectors_ - nr + 1);
    }
    const uint64_t sector = region_start_ + offset;
    if (Overlaps(sector, nr)) {
      if (options_.sequential) return Status::Busy("sequential cursor overlaps in-flight I/O");
      continue;
    }
    if (options_.sequential) seq_cursor_ += nr;
    return Issue(op, sector, nr);
  }
  return Status::Busy("no free range");
}

Status Workload::Issue(BlkOp op, uint64_t sector, uint32_t nr) {
  BlkIo io;
  io.op = op;
  io.sector = sector;
  io.nr_sectors = nr;
  io.cookie = next_cookie_++;
  uint32_t buffer_index = UINT32_MAX;
  if (BlkOpHasData(op)) {
    buffer_index = free_buffers_.back();
    io.buffer = buffers_[buffer_index].data();
    if (op != BlkOp::kRead) {
      const uint32_t generation = next_generation_;
      for (uint32_t i = 0; i < nr; ++i) {
        FillWorkloadPattern(sector + i, generation, options_.seed, io.buffer + size_t{i} * kGuestSectorBytes);
      }
    }
  }
  const bool is_write = op == BlkOp::kWrite || op == BlkOp::kWriteBarrier;
  if (journal_) {
    // The intent reaches the journal before the backend can see the request.
    const JournalRecordType type = is_write              ? JournalRecordType::kWriteIssued
                                   : op == BlkOp::kFlush ? JournalRecordType::kFlushIssued
                                                         : JournalRecordType::kDiscardIssued;
    if (op != BlkOp::kRead) {
      COWTAP_RETURN_IF_ERROR(Journal({type, op == BlkOp::kFlush ? 0 : nr, is_write ? next_generation_ : 0,
                                      op == BlkOp::kFlush ? 0 : sector, io.cookie},
                                     true));
    }
  }
  // Cookies and generations are never reused, even when the submit fails,
  // so each journal record names one request.
  if (is_write) next_generation_ = (next_generation_ % (kGenerationMask - 1)) + 1;
  const uint64_t start = NowNs();
  Status s = target_->Submit(io);
  if (!s.ok()) return s;
  if (buffer_index != UINT32_MAX) free_buffers_.pop_back();
  // The model takes the new generation when the write completes OK; no
  // overlapping request is issued meanwhile.
  if (is_write) ++writes_since_flush_;
  in_flight_.push_back({io.cookie, op, op == BlkOp::kFlush ? 0 : sector, op == BlkOp::kFlush ? 0 : nr,
                        buffer_index, start});
  ++issued_;
  return Status::Ok();
}

void Workload::VerifyRead(uint64_t sector, uint32_t nr, const uint8_t* data) {
  uint8_t expected[kGuestSectorBytes];
  for (uint32_t i = 0; i < nr; ++i) {
    const uint64_t s = sector + i;
    const uint32_t tag = model_[s - region_start_];
    const uint32_t generation = tag & kGenerationMask;
    const uint8_t* got = data + size_t{i} * kGuestSectorBytes;
    const bool may_be_zero = (tag & kMayBeZero) != 0;
    bool ok;
    if (tag == kTagZero) {
      ok = AllZero(got, kGuestSectorBytes);
    } else if (generation == 0 && options_.initial == InitialContent::kUnknown) {
      continue;
    } else if (generation == 0 && options_.initial == InitialContent::kZero) {
      ok = AllZero(got, kGuestSectorBytes);
    } else {
      FillWorkloadPattern(s, generation, generation == 0 ? options_.initial_seed : options_.seed, expected);
      ok = std::memcmp(expected, got, kGuestSectorBytes) == 0 || (may_be_zero && AllZero(got, kGuestSectorBytes));
    }
    ++report_.verified_sectors;
    if (ok) continue;
    ++report_.mismatches;
    Journal({JournalRecordType::kReadMismatch, 1, LoadLe32(got + 8), s, 0}, true).IgnoreError();
    if (report_.mismatch_details.size() < options_.max_mismatch_reports) {
      report_.mismatch_details.push_back(fmt::format(
          "sector {}: expected generation {}{}, found a sector stamped (sector {}, generation {}){}", s, generation,
          may_be_zero ? " or zeros" : "", LoadLe64(got), LoadLe32(got + 8),
          AllZero(got, kGuestSectorBytes) ? " [all zeros]" : ""));
    }
  }
}

void Workload::Complete(const BlkCompletion& c) {
  auto it = std::find_if(in_flight_.begin(), in_flight_.end(),
                         [&](const InFlight& f) { return f.cookie == c.cookie; });
  if (it == in_flight_.end()) {
    ++report_.errors;
    return;
  }
  InFlight f = *it;
  *it = in_flight_.back();
  in_flight_.pop_back();
  const uint64_t latency_us = (NowNs() - f.start_ns) / 1000;
  ++latency_samples_seen_;
  if (latencies_us_.size() < kMaxLatencySamples) {
    latencies_us_.push_back(static_cast<uint32_t>(std::min<uint64_t>(latency_us, UINT32_MAX)));
  } else {
    const uint64_t slot = NextRandom() % latency_samples_seen_;
    if (slot < kMaxLatencySamples) latencies_us_[slot] = static_cast<uint32_t>(latency_us);
  }
  ++report_.ops;
  const size_t bytes = size_t{f.nr_sectors} * kGuestSectorBytes;
  const bool ok = c.status == 0;
  if (!ok) ++report_.errors;
  switch (f.op) {
    case BlkOp::kRead:
      ++report_.reads;
      if (ok) {
        report_.bytes_read += bytes;
        VerifyRead(f.sector, f.nr_sectors, buffers_[f.buffer_index].data());
      }
      break;
    case BlkOp::kWrite:
    case BlkOp::kWriteBarrier: {
      ++(f.op == BlkOp::kWrite ? report_.writes : report_.barriers);
      if (ok) report_.bytes_written += bytes;
      // The generation stamped at submit is in the buffer's first header. A
      // failed write is counted as an error and leaves the model unchanged.
      const uint32_t generation = LoadLe32(buffers_[f.buffer_index].data() + 8);
      for (uint32_t i = 0; i < f.nr_sectors; ++i) {
        if (ok) model_[f.sector + i - region_start_] = generation;
      }
      if (ok)
        Journal({JournalRecordType::kWriteAcked, f.nr_sectors, generation, f.sector, f.cookie}, false).IgnoreError();
      break;
    }
    case BlkOp::kFlush:
      ++report_.flushes;
      if (ok) Journal({JournalRecordType::kFlushAcked, 0, 0, 0, f.cookie}, true).IgnoreError();
      break;
    case BlkOp::kDiscard:
    case BlkOp::kSecureDiscard:
      ++report_.discards;
      if (ok) {
        for (uint32_t i = 0; i < f.nr_sectors; ++i) model_[f.sector + i - region_start_] |= kMayBeZero;
        Journal({JournalRecordType::kDiscardAcked, f.nr_sectors, 0, f.sector, f.cookie}, false).IgnoreError();
      }
      break;
  }
  if (f.buffer_index != UINT32_MAX) free_buffers_.push_back(f.buffer_index);
}

Status Workload::Reap(int timeout_ms) {
  std::vector<BlkCompletion> done;
  COWTAP_ASSIGN_OR_RETURN(size_t n, target_->Poll(&done, timeout_ms));
  if (n == 0 && timeout_ms > 0 && !in_flight_.empty()) {
    return Status::IoError(fmt::format("{} request(s) not answered within {} ms; the backend is stuck",
                                       in_flight_.size(), timeout_ms));
  }
  for (const BlkCompletion& c : done) Complete(c);
  return Status::Ok();
}

Status Workload::FinalVerify() {
  std::vector<uint8_t> buf(size_t{options_.block_sectors} * kGuestSectorBytes);
  for (uint64_t off = 0; off < region_sectors_; off += options_.block_sectors) {
    const uint32_t nr = static_cast<uint32_t>(std::min<uint64_t>(options_.block_sectors, region_sectors_ - off));
    BlkIo io{BlkOp::kRead, region_start_ + off, nr, buf.data(), next_cookie_++};
    COWTAP_ASSIGN_OR_RETURN(int16_t status, ExecuteSync(*target_, io, options_.poll_timeout_ms));
    if (status != 0) {
      ++report_.errors;
      continue;
    }
    VerifyRead(io.sector, nr, buf.data());
  }
  return Status::Ok();
}

Result<WorkloadReport> Workload::Run() {
  const uint64_t start = NowNs();
  const uint64_t deadline = options_.duration_ms ? start + options_.duration_ms * 1000000 : UINT64_MAX;
  auto more = [&] { return (options_.ops == 0 || issued_ < options_.ops) && NowNs() < deadline; };
  while (more()) {
    bool issued_any = false;
    while (in_flight_.size() < options_.queue_depth && !free_buffers_.empty() && more()) {
      Status s = IssueNext();
      if (s.code() == ErrorCode::kBusy) break;
      COWTAP_RETURN_IF_ERROR(s);
      issued_any = true;
    }
    if (in_flight_.empty()) {
      if (!issued_any) return Status::Internal("workload made no progress with nothing in flight");
      continue;
    }
    // Reap what is ready; block only when nothing more can be issued.
    const bool can_issue = in_flight_.size() < options_.queue_depth && issued_any;
    COWTAP_RETURN_IF_ERROR(Reap(can_issue ? 0 : options_.poll_timeout_ms));
  }
  while (!in_flight_.empty()) COWTAP_RETURN_IF_ERROR(Reap(options_.poll_timeout_ms));
  COWTAP_RETURN_IF_ERROR(journal_status_);
  if (journal_) COWTAP_RETURN_IF_ERROR(journal_->Commit());
  report_.elapsed_s = (NowNs() - start) / 1e9;
  if (options_.final_verify) COWTAP_RETURN_IF_ERROR(FinalVerify());
  if (!latencies_us_.empty()) {
    std::vector<uint32_t> l = latencies_us_;
    auto pct = [&](double p) {
      size_t k = static_cast<size_t>(p * (l.size() - 1));
      std::nth_element(l.begin(), l.begin() + k, l.end());
      return static_cast<double>(l[k]);
    };
    report_.p50_us = pct(0.50);
    report_.p99_us = pct(0.99);
    report_.max_us = *std::max_element(l.begin(), l.end());
  }
  return report_;
}

}  // namespace cowtap::xen
