#include "xen-glue/workload_journal.h"

#include <fcntl.h>
#include <fmt/format.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <map>

#include "base/checked_math.h"
#include "base/endian.h"
#include "xen-glue/blkfront_io.h"
#include "xen-glue/blkfront_workload.h"

namespace cowtap::xen {
namespace {

std::string DescribeTag(uint32_t tag) {
  if (tag == kTagZero) return "zeros";
  const std::string gen = fmt::format("generation {}", tag & kTagGenerationMask);
  return (tag & kTagMayBeZero) != 0 ? gen + " or zeros" : gen;
}

bool RangeWithinRegion(uint64_t sector, uint32_t nr, uint64_t region_start, uint64_t region_sectors) {
  return sector >= region_start && RangeWithin(sector - region_start, nr, region_sectors);
}

bool IsIssue(JournalRecordType t) {
  return t == JournalRecordType::kWriteIssued || t == JournalRecordType::kDiscardIssued ||
         t == JournalRecordType::kFlushIssued;
}

bool IsAck(JournalRecordType t) {
  return t == JournalRecordType::kWriteAcked || t == JournalRecordType::kDiscardAcked ||
         t == JournalRecordType::kFlushAcked;
}

}  // namespace

Result<std::unique_ptr<JournalWriter>> JournalWriter::Create(const std::string& path) {
  const int fd = ::open(path.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_APPEND | O_CLOEXEC, 0644);
  if (fd < 0) return Status::FromErrno(errno, "create workload journal " + path);
  return std::unique_ptr<JournalWriter>(new JournalWriter(fd, path));
}

JournalWriter::~JournalWriter() { ::close(fd_); }

void JournalWriter::Add(const JournalRecord& r) {
  uint8_t b[kJournalRecordBytes] = {};
  StoreLe32(b, static_cast<uint32_t>(r.type));
  StoreLe32(b + 4, r.nr_sectors);
  StoreLe32(b + 8, r.generation);
  StoreLe64(b + 16, r.sector);
  StoreLe64(b + 24, r.cookie);
  queued_.insert(queued_.end(), b, b + sizeof(b));
}

Status JournalWriter::Commit() {
  size_t done = 0;
  while (done < queued_.size()) {
    const ssize_t n = ::write(fd_, queued_.data() + done, queued_.size() - done);
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) return Status::FromErrno(errno, "append to workload journal " + path_);
    done += static_cast<size_t>(n);
  }
  queued_.clear();
  return Status::Ok();
}

namespace {

Result<std::vector<uint8_t>> ReadAll(const std::string& path) {
  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) return Status::FromErrno(errno, "open " + path);
  std::vector<uint8_t> bytes;
  uint8_t buf[1 << 16];
  while (true) {
    const ssize_t n = ::read(fd, buf, sizeof(buf));
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) {
      const int e = errno;
      ::close(fd);
      return Status::FromErrno(e, "read " + path);
    }
    if (n == 0) break;
    bytes.insert(bytes.end(), buf, buf + n);
  }
  ::close(fd);
  return bytes;
}

}  // namespace

Result<std::vector<uint32_t>> ReadModelFile(const std::string& path) {
  COWTAP_ASSIGN_OR_RETURN(std::vector<uint8_t> bytes, ReadAll(path));
  if (bytes.size() % 4 != 0) {
    return Status::Corrupt(
        fmt::format("model file {}: {} bytes is not a whole number of 4-byte tags", path, bytes.size()));
  }
  std::vector<uint32_t> tags(bytes.size() / 4);
  for (size_t i = 0; i < tags.size(); ++i) tags[i] = LoadLe32(bytes.data() + 4 * i);
  return tags;
}

Status WriteModelFile(const std::string& path, const std::vector<uint32_t>& tags) {
  std::vector<uint8_t> bytes(tags.size() * 4);
  for (size_t i = 0; i < tags.size(); ++i) StoreLe32(bytes.data() + 4 * i, tags[i]);
  const std::string tmp = path + ".tmp";
  const int fd = ::open(tmp.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  if (fd < 0) return Status::FromErrno(errno, "create " + tmp);
  size_t done = 0;
  while (done < bytes.size()) {
    const ssize_t n = ::write(fd, bytes.data() + done, bytes.size() - done);
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) {
      const int e = errno;
      ::close(fd);
      return Status::FromErrno(e, "write " + tmp);
    }
    done += static_cast<size_t>(n);
  }
  if (::close(fd) != 0) return Status::FromErrno(errno, "close " + tmp);
  if (::rename(tmp.c_str(), path.c_str()) != 0) return Status::FromErrno(errno, "rename " + tmp + " to " + path);
  return Status::Ok();
}

Result<std::vector<JournalRecord>> ReadJournal(const std::string& path) {
  COWTAP_ASSIGN_OR_RETURN(std::vector<uint8_t> bytes, ReadAll(path));
  std::vector<JournalRecord> records;
  for (size_t off = 0; off + kJournalRecordBytes <= bytes.size(); off += kJournalRecordBytes) {
    const uint8_t* b = bytes.data() + off;
    const uint32_t type = LoadLe32(b);
    if (type < 1 || type > static_cast<uint32_t>(JournalRecordType::kReadMismatch)) {
      return Status::Corrupt(
          fmt::format("workload journal {}: record {} has unknown type {}", path, off / kJournalRecordBytes, type));
    }
    records.push_back(
        {static_cast<JournalRecordType>(type), LoadLe32(b + 4), LoadLe32(b + 8), LoadLe64(b + 16), LoadLe64(b + 24)});
  }
  return records;
}

Result<std::vector<SectorAllowance>> ReplayJournal(const std::vector<uint32_t>& initial_tags, uint64_t region_start,
                                                   const std::vector<JournalRecord>& records) {
  // Pass 1: the durable point, the issue record of the last-issued flush that
  // was acknowledged (-1: none, the initial content is all that is durable).
  std::map<uint64_t, size_t> issue_index;  // cookie -> record index
  ptrdiff_t durable = -1;
  for (size_t i = 0; i < records.size(); ++i) {
    const JournalRecord& r = records[i];
    const bool has_range = r.type != JournalRecordType::kFlushIssued && r.type != JournalRecordType::kFlushAcked &&
                           r.type != JournalRecordType::kReadMismatch;
    if (has_range && !RangeWithinRegion(r.sector, r.nr_sectors, region_start, initial_tags.size())) {
      return Status::InvalidArgument(
          fmt::format("journal record {} covers sectors [{}, +{}) outside the region", i, r.sector, r.nr_sectors));
    }
    if (IsIssue(r.type)) issue_index[r.cookie] = i;
    if (IsAck(r.type) && issue_index.find(r.cookie) == issue_index.end()) {
      return Status::InvalidArgument(fmt::format("journal record {} acknowledges cookie {} never issued", i, r.cookie));
    }
    if (r.type == JournalRecordType::kFlushAcked) {
      durable = std::max(durable, static_cast<ptrdiff_t>(issue_index[r.cookie]));
    }
  }
  // Pass 2: acks before the durable point build the durable tags; requests
  // still unacknowledged there, and all issued after it, are "later".
  std::vector<uint32_t> tags = initial_tags;
  std::map<uint64_t, const JournalRecord*> unacked;
  std::vector<const JournalRecord*> later;
  for (ptrdiff_t i = 0; i < static_cast<ptrdiff_t>(records.size()); ++i) {
    const JournalRecord& r = records[i];
    if (i >= durable) {
      if (r.type == JournalRecordType::kWriteIssued || r.type == JournalRecordType::kDiscardIssued) {
        later.push_back(&r);
      }
      continue;
    }
    switch (r.type) {
      case JournalRecordType::kWriteIssued:
      case JournalRecordType::kDiscardIssued:
        unacked[r.cookie] = &r;
        break;
      case JournalRecordType::kWriteAcked:
        for (uint32_t k = 0; k < r.nr_sectors; ++k) tags[r.sector + k - region_start] = r.generation;
        unacked.erase(r.cookie);
        break;
      case JournalRecordType::kDiscardAcked:
        for (uint32_t k = 0; k < r.nr_sectors; ++k) tags[r.sector + k - region_start] |= kTagMayBeZero;
        unacked.erase(r.cookie);
        break;
      default:
        break;
    }
  }
  for (const auto& [cookie, r] : unacked) later.push_back(r);
  std::vector<SectorAllowance> allow(tags.size());
  for (size_t s = 0; s < tags.size(); ++s) allow[s].durable_tag = tags[s];
  for (const JournalRecord* r : later) {
    for (uint32_t k = 0; k < r->nr_sectors; ++k) {
      SectorAllowance& a = allow[r->sector + k - region_start];
      if (r->type == JournalRecordType::kDiscardIssued) {
        a.zero_later = true;
      } else {
        a.later_generations.push_back(r->generation);
      }
    }
  }
  return allow;
}

std::optional<uint32_t> ObservedTag(uint64_t sector, const uint8_t* data, uint64_t seed, uint64_t initial_seed) {
  if (std::all_of(data, data + kGuestSectorBytes, [](uint8_t b) { return b == 0; })) return kTagZero;
  const uint32_t generation = LoadLe32(data + 8);
  if (LoadLe64(data) != sector || (generation & kTagMayBeZero) != 0) return std::nullopt;
  uint8_t expected[kGuestSectorBytes];
  FillWorkloadPattern(sector, generation, generation == 0 ? initial_seed : seed, expected);
  if (std::memcmp(expected, data, kGuestSectorBytes) != 0) return std::nullopt;
  return generation;
}

std::string CheckSector(uint64_t sector, std::optional<uint32_t> observed, const SectorAllowance& a) {
  const uint32_t d = a.durable_tag;
  if (observed == kTagZero) {
    if (d == kTagZero || (d & kTagMayBeZero) != 0 || a.zero_later) return "";
  } else if (observed) {
    if (d != kTagZero && (d & kTagGenerationMask) == *observed) return "";
    if (std::find(a.later_generations.begin(), a.later_generations.end(), *observed) != a.later_generations.end()) {
      return "";
    }
  }
  std::string later;
  for (uint32_t g : a.later_generations) later += fmt::format(" {}", g);
  return fmt::format(
      "sector {}: holds {}; allowed: durable {}{}{}", sector,
      !observed ? std::string("bytes that are no valid pattern (torn or corrupted)") : DescribeTag(*observed),
      DescribeTag(d), a.zero_later ? ", zeros (later discard)" : "",
      later.empty() ? "" : ", later writes of generation" + later);
}

}  // namespace cowtap::xen
