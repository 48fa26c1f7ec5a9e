// Implementation of CrashModel (see crash_model.h).
#include "tests/crash/crash_model.h"

#include <cstdio>

namespace cowtap::tests {

CrashModel::CrashModel(std::vector<uint8_t> before)
    : before_(before), flushed_(before), current_(std::move(before)), touched_(before_.size(), 0) {}

void CrashModel::Begin(const WorkloadOp& op) {
  if (op.kind == WorkloadOp::kFlush) return;
  std::fill_n(touched_.begin() + static_cast<ptrdiff_t>(op.offset), op.length, 1);
  pending_.push_back(op);
}

void CrashModel::Done(const WorkloadOp& op) {
  if (op.kind == WorkloadOp::kFlush) {
    flushed_ = current_;
    pending_.clear();
    return;
  }
  ApplyOpToModel(op, &current_);
}

std::string CrashModel::Verify(const std::vector<uint8_t>& actual, bool strict_unflushed) const {
  if (actual.size() != before_.size())
    return "image size changed: " + std::to_string(before_.size()) + " -> " + std::to_string(actual.size());
  const size_t n = actual.size();
  // Which bytes some op since the last flush covered, and their possible values.
  std::vector<uint8_t> pending_mask(n, 0);
  std::vector<std::vector<uint8_t>> data(pending_.size());
  for (size_t k = 0; k < pending_.size(); ++k) {
    const WorkloadOp& op = pending_[k];
    std::fill_n(pending_mask.begin() + static_cast<ptrdiff_t>(op.offset), op.length, 1);
    if (op.kind == WorkloadOp::kWrite) data[k] = OpData(op);
  }
  auto allowed = [&](size_t i) -> bool {
    if (!touched_[i]) return actual[i] == before_[i];
    if (!pending_mask[i]) return actual[i] == flushed_[i];
    if (!strict_unflushed || actual[i] == flushed_[i]) return true;
    for (size_t k = 0; k < pending_.size(); ++k) {
      const WorkloadOp& op = pending_[k];
      if (i < op.offset || i >= op.offset + op.length) continue;
      uint8_t v = op.kind == WorkloadOp::kWrite ? data[k][i - op.offset] : 0;
      if (actual[i] == v) return true;
    }
    return false;
  };
  size_t bad = 0, first = n;
  for (size_t i = 0; i < n; ++i) {
    if (!allowed(i)) {
      if (first == n) first = i;
      ++bad;
    }
  }
  if (!bad) return "";
  size_t end = first;
  while (end < n && !allowed(end)) ++end;
  const char* rule = !touched_[first]       ? "never written, must read as before the workload"
                     : !pending_mask[first] ? "written and flushed, must read back"
                                            : "written after the last flush, must read as old or new data";
  char buf[320];
  std::snprintf(buf, sizeof(buf),
                "bytes [0x%zx, 0x%zx) (%s): byte 0x%zx is 0x%02x; before 0x%02x, at last flush 0x%02x; "
                "%zu bad bytes in all; %zu ops since the last flush",
                first, end, rule, first, actual[first], before_[first], flushed_[first], bad, pending_.size());
  return buf;
}

}  // namespace cowtap::tests
