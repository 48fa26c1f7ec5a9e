#include "tools/cli/bench_setup.h"

#include <fcntl.h>
#include <fmt/format.h>
#include <unistd.h>

#include <algorithm>
#include <cstring>
#include <memory>
#include <vector>

#include "cow/image.h"
#include "tools/cli/bench_stats.h"

namespace cowtap::cli::bench {
namespace {

constexpr uint64_t kKiB = 1024;
constexpr uint64_t kMiB = 1024 * kKiB;
constexpr uint64_t kGiB = 1024 * kMiB;
constexpr size_t kFillChunk = 1 << 20;

// Non-zero bytes that differ per MiB, so nothing can store them as zeros.
void FillChunk(std::vector<uint8_t>* buf, uint64_t offset) {
  for (size_t i = 0; i < buf->size(); i += 8) {
    const uint64_t v = (offset + i) * 0x9E3779B97F4A7C15ull | 1;
    std::memcpy(buf->data() + i, &v, 8);
  }
}

Status WriteRawFile(const std::string& path, uint64_t size_bytes) {
  const int fd = ::open(path.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  if (fd < 0) return Status::FromErrno(errno, "bench: create " + path);
  std::vector<uint8_t> buf(kFillChunk);
  Status s = Status::Ok();
  for (uint64_t off = 0; off < size_bytes && s.ok(); off += kFillChunk) {
    FillChunk(&buf, off);
    const size_t n = static_cast<size_t>(std::min<uint64_t>(kFillChunk, size_bytes - off));
    size_t done = 0;
    while (done < n) {
      const ssize_t w = ::pwrite(fd, buf.data() + done, n - done, static_cast<off_t>(off + done));
      if (w < 0 && errno == EINTR) continue;
      if (w <= 0) {
        s = Status::FromErrno(w < 0 ? errno : ENOSPC, fmt::format("bench: write {} at {}", path, off + done));
        break;
      }
      done += static_cast<size_t>(w);
    }
  }
  if (s.ok() && ::fdatasync(fd) != 0) s = Status::FromErrno(errno, "bench: fdatasync " + path);
  ::close(fd);
  return s;
}

Status WriteQcow2Base(const std::string& path, uint64_t size_bytes) {
  cow::CreateOptions create;
  create.format = cow::ImageFormat::kQcow2;
  create.size_bytes = size_bytes;
  create.overwrite = true;
  COWTAP_RETURN_IF_ERROR(cow::CreateImage(path, create));
  COWTAP_ASSIGN_OR_RETURN(std::unique_ptr<cow::Image> image, cow::OpenImage(path, cow::OpenOptions{}));
  std::vector<uint8_t> buf(kFillChunk);
  for (uint64_t off = 0; off < size_bytes; off += kFillChunk) {
    FillChunk(&buf, off);
    const size_t n = static_cast<size_t>(std::min<uint64_t>(kFillChunk, size_bytes - off));
    const iovec iov = MakeIoVec(buf.data(), n);
    COWTAP_RETURN_IF_ERROR(image->Write(off, IoVecs(&iov, 1)));
  }
  return image->Close();
}

RowSpec NewRow(std::string name, std::string title) {
  RowSpec r;
  r.name = std::move(name);
  r.title = std::move(title);
  return r;
}

Workload Base(const RowPlan& plan) {
  Workload w;
  w.region_bytes = plan.size_bytes;
  w.time_limit_ms = plan.time_limit_ms;
  return w;
}

}  // namespace

std::vector<std::string> RowNames() {
  return {"randread-4k", "seqread-64k", "allocwrite-64k", "cowwrite-4k", "copy-20m", "copy-1g", "bootmix"};
}

std::vector<RowSpec> BuildRows(const RowPlan& plan, std::vector<std::string>* skipped) {
  const uint64_t s = plan.size_bytes;
  std::vector<RowSpec> rows;
  skipped->clear();
  auto add = [&](RowSpec row, std::string skip = "") {
    rows.push_back(std::move(row));
    skipped->push_back(std::move(skip));
  };
  {
    RowSpec r = NewRow("randread-4k", "4 KiB random reads, QD32, allocated data (qcow2 base; raw: full file)");
    r.workload = Base(plan);
    r.workload.ops = plan.quick ? 4096 : std::min<uint64_t>(s / (4 * kKiB), 65536);
    r.image_bytes = s;
    r.qemu_pattern_differs = true;
    add(r);
  }
  {
    RowSpec r = NewRow("seqread-64k", "64 KiB sequential reads, QD32, allocated data (qcow2 base; raw: full file)");
    r.workload = Base(plan);
    r.workload.read_block_bytes = r.workload.write_block_bytes = 64 * kKiB;
    r.workload.sequential = true;
    r.workload.ops = s / (64 * kKiB);
    r.image_bytes = s;
    add(r);
  }
  {
    RowSpec r = NewRow("allocwrite-64k", "64 KiB sequential allocating writes, QD32, empty overlay (raw: sparse file)");
    r.workload = Base(plan);
    r.workload.read_block_bytes = r.workload.write_block_bytes = 64 * kKiB;
    r.workload.sequential = true;
    r.workload.read_percent = 0;
    r.workload.ops = s / (64 * kKiB);
    r.image = ImageKind::kFreshOverlay;
    r.raw_sparse = true;
    r.image_bytes = s;
    add(r);
  }
  {
    // The raw peer overwrites its full file in place: a raw disk has no
    // copy-up, so this is the floor copy-up is measured against. (A sparse
    // file would also cost tens of seconds to delete here: ext4 with online
    // discard frees each of its thousands of scattered 4 KiB extents.)
    RowSpec r = NewRow("cowwrite-4k",
                       "4 KiB random writes, QD32, overlay over a populated base: copy-up (raw: in place, full file)");
    r.workload = Base(plan);
    r.workload.read_percent = 0;
    r.workload.ops = plan.quick ? 2048 : std::min<uint64_t>(s / (16 * kKiB), 16384);
    r.image = ImageKind::kFreshOverlay;
    r.image_bytes = s;
    r.qemu_pattern_differs = true;
    add(r);
  }
  for (const uint64_t copy : {20 * kMiB, kGiB}) {
    const bool big = copy == kGiB;
    RowSpec r =
        NewRow(big ? "copy-1g" : "copy-20m",
               fmt::format("copy {} into a fresh overlay: 1 MiB sequential writes, QD4, flush at end (raw: sparse)",
                           big ? "1 GiB" : "20 MiB"));
    r.workload = Base(plan);
    r.workload.read_block_bytes = r.workload.write_block_bytes = static_cast<uint32_t>(kMiB);
    r.workload.queue_depth = 4;
    r.workload.sequential = true;
    r.workload.read_percent = 0;
    r.workload.region_bytes = copy;
    r.workload.ops = copy / kMiB;
    r.workload.flush_at_end = true;
    // A copy is timed to its end: only the safety limit applies.
    r.workload.time_limit_ms = std::max<uint64_t>(plan.time_limit_ms, 600000);
    r.image = ImageKind::kFreshOverlay;
    r.raw_sparse = true;
    r.image_bytes = std::max(s, copy);
    std::string skip;
    if (big && !plan.full && s < kGiB) {
      skip = "not run: the 1 GiB copy runs with --full or --size 1G and up";
    }
    add(r, skip);
  }
  {
    RowSpec r =
        NewRow("bootmix", "boot-like mix: 90% 32 KiB random reads, 10% 4 KiB writes, QD8, overlay over a shared base");
    r.workload = Base(plan);
    r.workload.read_block_bytes = 32 * kKiB;
    r.workload.queue_depth = 8;
    r.workload.read_percent = 90;
    r.workload.ops = plan.quick ? 2048 : 16384;
    r.image = ImageKind::kFreshOverlay;
    r.image_bytes = s;
    r.qemu_unsupported = "not run: qemu-img bench cannot mix reads and writes";
    add(r);
  }
  return rows;
}

Result<BenchImages> BenchImages::Prepare(const std::string& dir, uint64_t size_bytes, std::FILE* progress) {
  BenchImages images;
  images.dir_ = dir;
  images.base_qcow2_ = dir + "/base.qcow2";
  images.base_raw_ = dir + "/base.raw";
  const uint64_t t0 = NowNs();
  fmt::print(progress, "bench: writing {} MiB into {}\n", size_bytes >> 20, images.base_qcow2_);
  std::fflush(progress);
  COWTAP_RETURN_IF_ERROR(WriteQcow2Base(images.base_qcow2_, size_bytes));
  fmt::print(progress, "bench: writing {} MiB into {}\n", size_bytes >> 20, images.base_raw_);
  std::fflush(progress);
  COWTAP_RETURN_IF_ERROR(WriteRawFile(images.base_raw_, size_bytes));
  fmt::print(progress, "bench: images ready in {:.1f} s\n", static_cast<double>(NowNs() - t0) / 1e9);
  return images;
}

Result<std::string> BenchImages::FreshOverlay(const std::string& name, uint64_t size_bytes) {
  const std::string path = fmt::format("{}/{}.qcow2", dir_, name);
  cow::CreateOptions create;
  create.format = cow::ImageFormat::kQcow2;
  create.size_bytes = size_bytes;
  create.backing_file = base_qcow2_;
  create.backing_format = cow::ImageFormat::kQcow2;
  create.overwrite = true;
  COWTAP_RETURN_IF_ERROR(cow::CreateImage(path, create));
  return path;
}

Result<std::string> BenchImages::SparseRaw(const std::string& name, uint64_t size_bytes) {
  const std::string path = fmt::format("{}/{}.raw", dir_, name);
  const int fd = ::open(path.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  if (fd < 0) return Status::FromErrno(errno, "bench: create " + path);
  const int rc = ::ftruncate(fd, static_cast<off_t>(size_bytes));
  const int e = errno;
  ::close(fd);
  if (rc != 0) return Status::FromErrno(e, "bench: size " + path);
  return path;
}

void BenchImages::Remove(const std::string& path) { ::unlink(path.c_str()); }

}  // namespace cowtap::cli::bench
