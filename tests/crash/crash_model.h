// CrashModel: what a guest may see after a power cut, byte by byte. It
// tracks the image's content before the workload (backing data or zeros),
// the content at the last successful Flush(), which bytes any op ever
// touched, and the ops attempted since that flush (including one that failed
// because the crash hit it). Verify() then applies the crash-consistency
// rules:
//   - a byte no op ever touched reads as before the workload;
//   - a byte last touched before the last successful flush reads as then;
//   - a byte touched since (strict mode) reads as at the flush or as one of
//     the values an op since the flush put there; (lenient mode) anything.
//
// Thread-safety: a plain value; one thread.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "tests/interop/workload.h"

namespace cowtap::tests {

class CrashModel {
 public:
  explicit CrashModel(std::vector<uint8_t> before);

  // Call before issuing op to the image.
  void Begin(const WorkloadOp& op);
  // Call when op returned OK.
  void Done(const WorkloadOp& op);

  // Empty when `actual` obeys the rules; otherwise a description of the first
  // offending run of bytes and how many bytes offend in all.
  std::string Verify(const std::vector<uint8_t>& actual, bool strict_unflushed) const;

  // Ops attempted since the last successful flush (for reporting).
  uint64_t PendingOps() const { return pending_.size(); }

 private:
  std::vector<uint8_t> before_;
  std::vector<uint8_t> flushed_;
  std::vector<uint8_t> current_;
  std::vector<uint8_t> touched_;  // 1 if any op ever covered the byte
  std::vector<WorkloadOp> pending_;
};

}  // namespace cowtap::tests
