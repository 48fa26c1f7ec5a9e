// FaultController / FaultInjectingFile / FaultInjectingFileSystem. Pending
// changes of power-loss mode are kept as an ordered log and replayed over the
// inner file's bytes on every read, so what a read sees is exactly what the
// inner file would hold if the log were applied now.
#include "cow/fault_file.h"

#include <algorithm>
#include <cstring>
#include <random>

#include "base/checked_math.h"

namespace cowtap::cow {
namespace {

constexpr uint64_t kSector = 512;

// The overlap of [a, a + al) and [b, b + bl) as [lo, hi); lo >= hi if none.
void Overlap(uint64_t a, uint64_t al, uint64_t b, uint64_t bl, uint64_t* lo, uint64_t* hi) {
  *lo = std::max(a, b);
  *hi = std::min(a + al, b + bl);
}

}  // namespace

void FaultController::AddFault(const Fault& fault) {
  std::lock_guard lock(mu_);
  faults_.push_back({fault, 0});
}

void FaultController::ClearFaults() {
  std::lock_guard lock(mu_);
  faults_.clear();
}

void FaultController::SetPowerLossMode(bool on) {
  std::lock_guard lock(mu_);
  power_loss_ = on;
}

bool FaultController::power_loss_mode() const {
  std::lock_guard lock(mu_);
  return power_loss_;
}

uint64_t FaultController::PendingBytes() const {
  std::lock_guard lock(mu_);
  uint64_t n = 0;
  for (const Pending& p : pending_) n += p.bytes.size();
  return n;
}

bool FaultController::crashed() const {
  std::lock_guard lock(mu_);
  return crashed_;
}

FaultCounters FaultController::counters() const {
  std::lock_guard lock(mu_);
  return counters_;
}

void FaultController::ResetCounters() {
  std::lock_guard lock(mu_);
  counters_ = {};
}

const Fault* FaultController::Check(FaultOp op, const std::string& path) {
  const Fault* fired = nullptr;
  for (ArmedFault& armed : faults_) {
    if (armed.fault.op != op) continue;
    const uint64_t call = ++armed.calls;
    const uint64_t n = armed.fault.n;
    bool fire = false;
    switch (armed.fault.trigger) {
      case FaultTrigger::kNth: fire = call == n; break;
      case FaultTrigger::kEveryNth: fire = n != 0 && call % n == 0; break;
      case FaultTrigger::kAfterN: fire = call > n; break;
    }
    if (fire && !fired) fired = &armed.fault;
  }
  if (fired) ++counters_.faults_fired;
  return fired;
}

Status FaultController::Failure(const Fault& fault, const char* what, const std::string& path, uint64_t offset) {
  return Status::FromErrno(fault.errno_value, std::string("injected fault: ") + what + " " + path + " at offset " +
                                                  std::to_string(offset));
}

Status FaultController::Dead(const std::string& path) const {
  return Status::FromErrno(EIO, "injected power loss: " + path + " is gone until reopened");
}

Status FaultController::ApplyPending(File& inner, const Pending& p) {
  switch (p.kind) {
    case Pending::kWrite: return inner.WriteAt(p.offset, p.bytes);
    case Pending::kTruncate: return inner.Truncate(p.offset);
    case Pending::kPunchHole: return inner.PunchHole(p.offset, p.length);
    case Pending::kExtend: {
      COWTAP_ASSIGN_OR_RETURN(uint64_t size, inner.Size());
      return size < p.offset ? inner.Truncate(p.offset) : Status::Ok();
    }
  }
  return Status::Internal("unknown pending change");
}

Status FaultController::Crash(File& storage, const CrashOptions& options) {
  std::lock_guard lock(mu_);
  std::vector<Pending> log;
  log.swap(pending_);
  crashed_ = true;
  if (options.survive_probability <= 0.0) return Status::Ok();
  std::mt19937_64 rng(options.seed);
  std::bernoulli_distribution survives(std::min(1.0, options.survive_probability));
  for (const Pending& p : log) {
    if (p.kind != Pending::kWrite) {
      if (survives(rng)) COWTAP_RETURN_IF_ERROR(ApplyPending(storage, p));
      continue;
    }
    // Tear the write at absolute sector boundaries: each sector lands or not.
    uint64_t pos = 0;
    while (pos < p.bytes.size()) {
      const uint64_t abs = p.offset + pos;
      const uint64_t piece = std::min<uint64_t>(p.bytes.size() - pos, kSector - abs % kSector);
      if (survives(rng))
        COWTAP_RETURN_IF_ERROR(storage.WriteAt(abs, std::span<const uint8_t>(p.bytes).subspan(pos, piece)));
      pos += piece;
    }
  }
  return Status::Ok();
}

Status FaultController::ReadAt(File& inner, uint64_t offset, std::span<uint8_t> buf) {
  std::lock_guard lock(mu_);
  if (crashed_) return Dead(inner.path());
  ++counters_.reads;
  if (const Fault* f = Check(FaultOp::kRead, inner.path())) return Failure(*f, "read", inner.path(), offset);
  COWTAP_RETURN_IF_ERROR(inner.ReadAt(offset, buf));
  counters_.bytes_read += buf.size();
  const uint64_t len = buf.size();
  for (const Pending& p : pending_) {
    uint64_t lo, hi;
    switch (p.kind) {
      case Pending::kWrite:
        Overlap(offset, len, p.offset, p.bytes.size(), &lo, &hi);
        if (lo < hi) std::memcpy(buf.data() + (lo - offset), p.bytes.data() + (lo - p.offset), hi - lo);
        break;
      case Pending::kPunchHole:
        Overlap(offset, len, p.offset, p.length, &lo, &hi);
        if (lo < hi) std::memset(buf.data() + (lo - offset), 0, hi - lo);
        break;
      case Pending::kTruncate:
        if (p.offset < offset + len) {
          lo = std::max(offset, p.offset);
          std::memset(buf.data() + (lo - offset), 0, offset + len - lo);
        }
        break;
      case Pending::kExtend: break;
    }
  }
  return Status::Ok();
}

Status FaultController::WriteAt(File& inner, uint64_t offset, std::span<const uint8_t> data) {
  std::lock_guard lock(mu_);
  if (crashed_) return Dead(inner.path());
  ++counters_.writes;
  const Fault* f = Check(FaultOp::kWrite, inner.path());
  std::span<const uint8_t> landed = data;
  if (f) landed = data.first(std::min<uint64_t>(f->partial_bytes, data.size()));
  if (!landed.empty()) {
    if (power_loss_) {
      pending_.push_back({Pending::kWrite, offset, landed.size(), {landed.begin(), landed.end()}});
    } else {
      COWTAP_RETURN_IF_ERROR(inner.WriteAt(offset, landed));
    }
    counters_.bytes_written += landed.size();
  }
  if (f) return Failure(*f, "write", inner.path(), offset + landed.size());
  return Status::Ok();
}

Status FaultController::Flush(File& inner) {
  std::lock_guard lock(mu_);
  if (crashed_) return Dead(inner.path());
  ++counters_.flushes;
  if (const Fault* f = Check(FaultOp::kFlush, inner.path())) return Failure(*f, "flush", inner.path(), 0);
  // Apply in order; on an error keep what was not applied yet pending.
  size_t applied = 0;
  Status status;
  for (; applied < pending_.size(); ++applied) {
    status = ApplyPending(inner, pending_[applied]);
    if (!status.ok()) break;
  }
  pending_.erase(pending_.begin(), pending_.begin() + static_cast<ptrdiff_t>(applied));
  COWTAP_RETURN_IF_ERROR(status);
  return inner.Flush();
}

Result<uint64_t> FaultController::Size(File& inner) {
  std::lock_guard lock(mu_);
  if (crashed_) return Dead(inner.path());
  COWTAP_ASSIGN_OR_RETURN(uint64_t size, inner.Size());
  for (const Pending& p : pending_) {
    switch (p.kind) {
      case Pending::kWrite: size = std::max(size, p.offset + p.bytes.size()); break;
      case Pending::kTruncate: size = p.offset; break;
      case Pending::kExtend: size = std::max(size, p.offset); break;
      case Pending::kPunchHole: break;
    }
  }
  return size;
}

Status FaultController::Truncate(File& inner, uint64_t size_bytes) {
  std::lock_guard lock(mu_);
  if (crashed_) return Dead(inner.path());
  ++counters_.truncates;
  if (const Fault* f = Check(FaultOp::kTruncate, inner.path()))
    return Failure(*f, "truncate", inner.path(), size_bytes);
  if (!power_loss_) return inner.Truncate(size_bytes);
  pending_.push_back({Pending::kTruncate, size_bytes, 0, {}});
  return Status::Ok();
}

Status FaultController::Allocate(File& inner, uint64_t offset, uint64_t length, bool keep_size) {
  std::lock_guard lock(mu_);
  if (crashed_) return Dead(inner.path());
  ++counters_.allocates;
  if (const Fault* f = Check(FaultOp::kAllocate, inner.path())) return Failure(*f, "allocate", inner.path(), offset);
  if (!power_loss_) return inner.Allocate(offset, length, keep_size);
  if (keep_size) return Status::Ok();  // reserving space changes no byte
  uint64_t end;
  if (!CheckedAdd(offset, length, &end)) return Status::InvalidArgument("allocate range overflows");
  pending_.push_back({Pending::kExtend, end, 0, {}});
  return Status::Ok();
}

Status FaultController::PunchHole(File& inner, uint64_t offset, uint64_t length) {
  std::lock_guard lock(mu_);
  if (crashed_) return Dead(inner.path());
  ++counters_.punch_holes;
  if (const Fault* f = Check(FaultOp::kPunchHole, inner.path()))
    return Failure(*f, "punch hole", inner.path(), offset);
  if (!power_loss_) return inner.PunchHole(offset, length);
  pending_.push_back({Pending::kPunchHole, offset, length, {}});
  return Status::Ok();
}

FaultInjectingFile::FaultInjectingFile(std::unique_ptr<File> inner, std::shared_ptr<FaultController> controller)
    : inner_(std::move(inner)),
      controller_(controller ? std::move(controller) : std::make_shared<FaultController>()) {}

Status FaultInjectingFile::ReadAt(uint64_t offset, std::span<uint8_t> buf) {
  return controller_->ReadAt(*inner_, offset, buf);
}
Status FaultInjectingFile::WriteAt(uint64_t offset, std::span<const uint8_t> data) {
  return controller_->WriteAt(*inner_, offset, data);
}
Status FaultInjectingFile::Flush() { return controller_->Flush(*inner_); }
Result<uint64_t> FaultInjectingFile::Size() { return controller_->Size(*inner_); }
Status FaultInjectingFile::Truncate(uint64_t size_bytes) { return controller_->Truncate(*inner_, size_bytes); }
Status FaultInjectingFile::Allocate(uint64_t offset, uint64_t length, bool keep_size) {
  return controller_->Allocate(*inner_, offset, length, keep_size);
}
Status FaultInjectingFile::PunchHole(uint64_t offset, uint64_t length) {
  return controller_->PunchHole(*inner_, offset, length);
}

std::shared_ptr<FaultController> FaultInjectingFileSystem::Target(const std::string& path) {
  std::lock_guard lock(mu_);
  auto& slot = targets_[path];
  if (!slot) slot = std::make_shared<FaultController>();
  return slot;
}

Status FaultInjectingFileSystem::Crash(const std::string& path, const CrashOptions& options) {
  std::shared_ptr<FaultController> controller;
  {
    std::lock_guard lock(mu_);
    auto it = targets_.find(path);
    if (it == targets_.end()) return Status::NotFound(path + ": not a fault-injection target");
    controller = it->second;
  }
  FileOpenOptions fo;
  fo.writable = true;
  COWTAP_ASSIGN_OR_RETURN(auto storage, base_->Open(path, fo));
  COWTAP_RETURN_IF_ERROR(controller->Crash(*storage, options));
  {
    // Files opened from now on belong to the machine after the reboot.
    std::lock_guard lock(mu_);
    auto fresh = std::make_shared<FaultController>();
    fresh->SetPowerLossMode(controller->power_loss_mode());
    targets_[path] = std::move(fresh);
  }
  return storage->Flush();
}

Result<std::unique_ptr<File>> FaultInjectingFileSystem::Open(const std::string& path,
                                                             const FileOpenOptions& options) {
  COWTAP_ASSIGN_OR_RETURN(auto file, base_->Open(path, options));
  std::shared_ptr<FaultController> controller;
  {
    std::lock_guard lock(mu_);
    auto it = targets_.find(path);
    if (it == targets_.end()) return file;
    controller = it->second;
  }
  return std::unique_ptr<File>(new FaultInjectingFile(std::move(file), std::move(controller)));
}

}  // namespace cowtap::cow
