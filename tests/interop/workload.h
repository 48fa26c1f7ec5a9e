// A seeded random guest workload (writes at unaligned offsets and lengths,
// overwrites, write-zeroes with and without unmap, cluster-aligned discards,
// flushes) that can be applied three ways: through a cowtap Image, as qemu-io
// commands on a twin image, and to an in-memory byte model of the disk.
//
// Discards are kept cluster-aligned on purpose: for unaligned heads and tails
// both QEMU and cowtap may leave data unchanged (Image::Discard's contract),
// so unaligned discards would make a byte-exact comparison meaningless.
//
// Thread-safety: pure functions and plain values.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "base/status.h"
#include "cow/image.h"

namespace cowtap::tests {

struct WorkloadOp {
  enum Kind : uint8_t { kWrite, kZero, kZeroUnmap, kDiscard, kFlush } kind = kWrite;
  uint64_t offset = 0;
  uint64_t length = 0;
  uint64_t data_seed = 0;  // kWrite: the bytes are OpData(op)
};

struct WorkloadOptions {
  uint64_t size_bytes = 0;
  uint64_t cluster_bytes = 65536;
  int ops = 40;
  bool zeroes = true;
  bool discards = true;
  int max_ops_between_flushes = 6;  // a kFlush at least this often
};

std::vector<WorkloadOp> GenerateWorkload(uint64_t seed, const WorkloadOptions& options);

// The bytes a kWrite op writes (deterministic from data_seed and length).
std::vector<uint8_t> OpData(const WorkloadOp& op);

// "write 4096+100 at 0x1234 (seed 7)" for failure messages.
std::string DescribeOp(const WorkloadOp& op);

// Applies op to image; a kFlush calls Flush().
Status ApplyOp(cow::Image& image, const WorkloadOp& op);

// Applies op to a flat model of the guest disk (discard/zeroes read as zeros).
void ApplyOpToModel(const WorkloadOp& op, std::vector<uint8_t>* model);

// qemu-io arguments ("-c", "write -q -s <file> off len", ...) doing the same
// as ops; the write payloads are stored as files in data_dir.
Result<std::vector<std::string>> QemuIoArgs(const std::vector<WorkloadOp>& ops, const std::string& data_dir);

}  // namespace cowtap::tests
