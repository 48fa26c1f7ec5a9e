// Implementation of the seeded workload (see workload.h).
#include "tests/interop/workload.h"

#include <algorithm>
#include <cstdio>

#include "tests/interop/test_util.h"

namespace cowtap::tests {

namespace {

// Writes never exceed this, so 2 MiB-cluster cases stay fast.
constexpr uint64_t kMaxWriteBytes = 512 * 1024;

uint64_t ClampLength(uint64_t offset, uint64_t length, uint64_t size) {
  if (offset >= size) return 0;
  return std::min(length, size - offset);
}

}  // namespace

std::vector<WorkloadOp> GenerateWorkload(uint64_t seed, const WorkloadOptions& options) {
  SeededRandom rng(seed);
  std::vector<WorkloadOp> ops;
  const uint64_t size = options.size_bytes;
  const uint64_t cluster = std::max<uint64_t>(options.cluster_bytes, 512);
  const uint64_t clusters = std::max<uint64_t>(size / cluster, 1);
  const uint64_t max_len = std::min<uint64_t>(kMaxWriteBytes, std::max<uint64_t>(3 * cluster, 4096));
  int since_flush = 0;
  while (static_cast<int>(ops.size()) < options.ops) {
    WorkloadOp op;
    uint64_t pick = rng.Between(0, 99);
    if (options.discards && pick < 10) {
      op.kind = WorkloadOp::kDiscard;
      uint64_t first = rng.Between(0, clusters - 1);
      uint64_t count = rng.Between(1, std::min<uint64_t>(4, clusters - first));
      op.offset = first * cluster;
      op.length = count * cluster;
    } else if (options.zeroes && pick < 25) {
      op.kind = rng.OneIn(2) ? WorkloadOp::kZero : WorkloadOp::kZeroUnmap;
      // Mix whole-cluster and unaligned ranges.
      if (rng.OneIn(2)) {
        uint64_t first = rng.Between(0, clusters - 1);
        op.offset = first * cluster;
        op.length = rng.Between(1, std::min<uint64_t>(3, clusters - first)) * cluster;
      } else {
        op.offset = rng.Between(0, size - 1);
        op.length = rng.Between(1, max_len);
      }
    } else {
      op.kind = WorkloadOp::kWrite;
      op.data_seed = rng.Next();
      uint64_t shape = rng.Between(0, 3);
      if (shape == 0 && !ops.empty()) {
        // Overwrite part of an earlier range.
        const WorkloadOp& earlier = ops[rng.Between(0, ops.size() - 1)];
        op.offset = earlier.offset + rng.Between(0, earlier.length / 2);
        op.length = rng.Between(1, std::max<uint64_t>(earlier.length, 1));
      } else if (shape == 1) {
        // Straddle a cluster boundary by a few bytes.
        uint64_t boundary = rng.Between(1, clusters) * cluster;
        uint64_t before = rng.Between(1, std::min<uint64_t>(cluster, 4096));
        op.offset = boundary > before ? boundary - before : 0;
        op.length = before + rng.Between(0, std::min<uint64_t>(cluster, 4096));
      } else {
        op.offset = rng.Between(0, size - 1);
        op.length = rng.Between(1, max_len);
      }
    }
    op.length = ClampLength(op.offset, op.length, size);
    if (op.length == 0) continue;
    ops.push_back(op);
    if (++since_flush >= options.max_ops_between_flushes || rng.OneIn(5)) {
      ops.push_back(WorkloadOp{WorkloadOp::kFlush, 0, 0, 0});
      since_flush = 0;
    }
  }
  ops.push_back(WorkloadOp{WorkloadOp::kFlush, 0, 0, 0});
  return ops;
}

std::vector<uint8_t> OpData(const WorkloadOp& op) {
  std::vector<uint8_t> data(op.length);
  SeededRandom rng(op.data_seed);
  // Runs of one byte value make zero-detection and misplacement visible,
  // random bytes catch shifted copies; mix both.
  size_t i = 0;
  while (i < data.size()) {
    size_t run = std::min<size_t>(data.size() - i, rng.Between(1, 1024));
    if (rng.OneIn(3)) {
      std::fill(data.begin() + i, data.begin() + i + run, static_cast<uint8_t>(rng.Between(1, 255)));
    } else {
      for (size_t j = 0; j < run; ++j) data[i + j] = static_cast<uint8_t>(rng.Next());
    }
    i += run;
  }
  return data;
}

std::string DescribeOp(const WorkloadOp& op) {
  static const char* const kNames[] = {"write", "write-zeroes", "write-zeroes(unmap)", "discard", "flush"};
  if (op.kind == WorkloadOp::kFlush) return "flush";
  char buf[128];
  std::snprintf(buf, sizeof(buf), "%s offset=%llu (0x%llx) length=%llu", kNames[op.kind],
                static_cast<unsigned long long>(op.offset), static_cast<unsigned long long>(op.offset),
                static_cast<unsigned long long>(op.length));
  return buf;
}

Status ApplyOp(cow::Image& image, const WorkloadOp& op) {
  switch (op.kind) {
    case WorkloadOp::kWrite: {
      std::vector<uint8_t> data = OpData(op);
      iovec iov = MakeIoVec(data.data(), data.size());
      return image.Write(op.offset, IoVecs(&iov, 1));
    }
    case WorkloadOp::kZero:
      return image.WriteZeroes(op.offset, op.length, /*may_unmap=*/false);
    case WorkloadOp::kZeroUnmap:
      return image.WriteZeroes(op.offset, op.length, /*may_unmap=*/true);
    case WorkloadOp::kDiscard:
      return image.Discard(op.offset, op.length);
    case WorkloadOp::kFlush:
      return image.Flush();
  }
  return Status::Internal("unknown workload op");
}

void ApplyOpToModel(const WorkloadOp& op, std::vector<uint8_t>* model) {
  if (op.kind == WorkloadOp::kFlush) return;
  if (op.kind == WorkloadOp::kWrite) {
    std::vector<uint8_t> data = OpData(op);
    std::copy(data.begin(), data.end(), model->begin() + static_cast<ptrdiff_t>(op.offset));
  } else {
    std::fill_n(model->begin() + static_cast<ptrdiff_t>(op.offset), op.length, 0);
  }
}

Result<std::vector<std::string>> QemuIoArgs(const std::vector<WorkloadOp>& ops, const std::string& data_dir) {
  std::vector<std::string> args;
  for (size_t i = 0; i < ops.size(); ++i) {
    const WorkloadOp& op = ops[i];
    std::string range = std::to_string(op.offset) + " " + std::to_string(op.length);
    std::string cmd;
    switch (op.kind) {
      case WorkloadOp::kWrite: {
        std::string file = data_dir + "/op" + std::to_string(i) + ".bin";
        COWTAP_RETURN_IF_ERROR(WriteWholeFile(file, OpData(op)));
        cmd = "write -q -s " + file + " " + range;
        break;
      }
      case WorkloadOp::kZero:
        cmd = "write -q -z " + range;
        break;
      case WorkloadOp::kZeroUnmap:
        cmd = "write -q -z -u " + range;
        break;
      case WorkloadOp::kDiscard:
        cmd = "discard -q " + range;
        break;
      case WorkloadOp::kFlush:
        cmd = "flush";
        break;
    }
    args.push_back("-c");
    args.push_back(cmd);
  }
  return args;
}

}  // namespace cowtap::tests
