// WorkloadJournal: an append-only record, kept by the guest, of what a
// Workload issued and what the disk answered, so that after the backend is
// killed (SIGKILL, at any moment) a checker can say exactly what every sector
// may hold: what was durable at the last completed flush, or what a request
// not covered by that flush wrote or discarded.
//
// Order, which makes the record sound against a backend that dies at any
// moment:
//   1. an *issued* record reaches the file (one write(2)) before the request
//      is submitted, so nothing the backend saw is missing from the journal;
//   2. *acked* records are queued and written before the next issued record,
//      so every ack precedes, in the file, the flush issued after it;
//   3. a *flush acked* record is written at once.
// A guest killed mid-append leaves a torn last record, which readers ignore
// (its request was never submitted). The guest only loses precision, never
// soundness, when it dies before writing an ack.
//
// Records are 32 bytes, little-endian: type u32, nr_sectors u32, generation
// u32, reserved u32, sector u64, cookie u64.
//
// Thread-safety: a JournalWriter is used by one thread; the free functions
// are pure.
#pragma once

#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "base/status.h"

namespace cowtap::xen {

// A model tag (also the --initial-model / --model-out file format): the
// generation of the last write (0 = initial content), with kTagMayBeZero set
// when a later discard may have zeroed the sector; kTagZero is a sector known
// to read as zeros.
constexpr uint32_t kTagMayBeZero = 0x80000000u;
constexpr uint32_t kTagGenerationMask = 0x7fffffffu;
constexpr uint32_t kTagZero = 0xffffffffu;

enum class JournalRecordType : uint32_t {
  kWriteIssued = 1,
  kWriteAcked = 2,
  kDiscardIssued = 3,
  kDiscardAcked = 4,
  kFlushIssued = 5,
  kFlushAcked = 6,
  kReadMismatch = 7,  // a read the guest verified differed (generation = found tag)
};

struct JournalRecord {
  JournalRecordType type = JournalRecordType::kWriteIssued;
  uint32_t nr_sectors = 0;
  uint32_t generation = 0;
  uint64_t sector = 0;
  uint64_t cookie = 0;
};

constexpr size_t kJournalRecordBytes = 32;

class JournalWriter {
 public:
  // Creates (truncates) path. Fails with the errno of open(2).
  static Result<std::unique_ptr<JournalWriter>> Create(const std::string& path);
  ~JournalWriter();
  JournalWriter(const JournalWriter&) = delete;
  JournalWriter& operator=(const JournalWriter&) = delete;

  // Queues a record; it reaches the file with the next Commit.
  void Add(const JournalRecord& record);
  // Writes every queued record with one write(2). Call before submitting
  // the request an issued record describes.
  [[nodiscard]] Status Commit();

 private:
  JournalWriter(int fd, std::string path) : fd_(fd), path_(std::move(path)) {}
  int fd_;
  std::string path_;
  std::vector<uint8_t> queued_;
};

// A model file: one tag per sector, uint32 LE (cowtap_guest --initial-model
// and --model-out). WriteModelFile writes a temporary file and renames it, so
// a reader sees the old file or the new one, never a part.
Result<std::vector<uint32_t>> ReadModelFile(const std::string& path);
[[nodiscard]] Status WriteModelFile(const std::string& path, const std::vector<uint32_t>& tags);

// Every whole record of the file at path (a torn tail is dropped). Fails
// when the file cannot be read or holds a record of unknown type.
Result<std::vector<JournalRecord>> ReadJournal(const std::string& path);

// What one sector may hold after the backend was killed.
struct SectorAllowance {
  uint32_t durable_tag = 0;                 // the tag as of the last completed flush
  bool zero_later = false;                  // a discard not covered by that flush
  std::vector<uint32_t> later_generations;  // writes not covered by that flush
};

// Replays records over initial_tags (one tag per sector of the region from
// region_start, the content the disk held, durably, when the journal began).
// The durable point is the flush issued last among those acknowledged: every
// write or discard acknowledged before it was issued is in durable_tag; every
// other request issued is "later" (it may or may not have reached the disk).
// Fails on a record outside the region or an acknowledgement without its
// issue.
Result<std::vector<SectorAllowance>> ReplayJournal(const std::vector<uint32_t>& initial_tags, uint64_t region_start,
                                                   const std::vector<JournalRecord>& records);

// The tag a sector's bytes carry: kTagZero for all zeros, g for an exact
// workload pattern of (sector, g) — seed for g > 0, initial_seed for g = 0 —
// or nullopt for anything else (a torn, misplaced or corrupted sector).
std::optional<uint32_t> ObservedTag(uint64_t sector, const uint8_t* data, uint64_t seed, uint64_t initial_seed);

// Empty when observed_tag (nullopt: garbage) is one allow permits for the
// sector; otherwise why not, naming the sector and what was allowed.
std::string CheckSector(uint64_t sector, std::optional<uint32_t> observed_tag, const SectorAllowance& allow);

}  // namespace cowtap::xen
