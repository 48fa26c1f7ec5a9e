// cowtap_vm_offload_e2e: the kernel offload end to end, run inside the VM of
// tests/vm/run.sh (needs dm_mod, loop, nbd and root).
//
//   fill-base FILE SIZE     a raw file: a pattern in its first half, zeros after
//   run IMAGE EXPECTED      attach IMAGE (a fresh qcow2 overlay over that base)
//                           with dm::OffloadAttachment, run a verified random
//                           workload on /dev/mapper/<name> with reloads and
//                           revokes under load, check that I/O inside linear
//                           segments never reaches user space, detach; attach
//                           again (priming alone must go linear), more load,
//                           detach; re-read the image through the engine and
//                           write the model to EXPECTED
//   device-load DEVICE SIZE OPS SEED MODEL_IN MODEL_OUT
//                           a verified random load on DEVICE (the dm device
//                           cowtapd offloads), from the base's content or
//                           MODEL_IN ('' for the base); writes MODEL_OUT
//
// Prints "VMCHECK e2e_<name> PASS|FAIL <detail>" per check and
// "E2E <name> <seconds> s" per phase; exits 1 if any check failed.
#include <fcntl.h>
#include <fmt/format.h>
#include <linux/fs.h>
#include <sys/ioctl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <mutex>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "cow/image.h"
#include "dm/device_mapper.h"
#include "dm/offload_attachment.h"

namespace {

using cowtap::Status;
namespace dm = cowtap::dm;

constexpr uint64_t kBlock = 4096;
constexpr uint64_t kChunk = 256 << 10;   // a workload thread owns every kThreads-th chunk
constexpr uint64_t kCluster = 64 << 10;  // the images' cluster size (tests/vm/run.sh)
constexpr int kThreads = 2;

int failures = 0;
std::atomic<uint64_t> discards{0}, zeroouts{0};
void Check(const std::string& name, bool ok, const std::string& detail = "") {
  std::printf("VMCHECK e2e_%s %s %s\n", name.c_str(), ok ? "PASS" : "FAIL", detail.c_str());
  std::fflush(stdout);
  if (!ok) ++failures;
}

double Seconds(std::chrono::steady_clock::time_point t0) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

// The base's content: block i of the first half starts with its index.
void BaseBlock(uint64_t i, uint8_t* out) {
  std::mt19937_64 rng(i * 0x9e3779b97f4a7c15ULL + 1);
  for (uint64_t j = 0; j < kBlock; j += 8) {
    uint64_t v = j == 0 ? i : rng();
    std::memcpy(out + j, &v, 8);
  }
}

std::vector<uint8_t> BaseContent(uint64_t size) {
  std::vector<uint8_t> m(size, 0);
  for (uint64_t i = 0; i < size / 2 / kBlock; ++i) BaseBlock(i, m.data() + i * kBlock);
  return m;
}

int FillBase(const char* path, uint64_t size) {
  std::vector<uint8_t> m = BaseContent(size);
  int fd = open(path, O_WRONLY | O_CREAT | O_TRUNC, 0644);
  if (fd < 0 || pwrite(fd, m.data(), size / 2, 0) != static_cast<ssize_t>(size / 2) ||
      ftruncate(fd, static_cast<off_t>(size)) != 0 || close(fd) != 0) {
    std::perror(path);
    return 1;
  }
  return 0;
}

struct AlignedBuf {
  explicit AlignedBuf(size_t n) {
    if (posix_memalign(&p, kBlock, n) != 0) std::abort();
  }
  ~AlignedBuf() { free(p); }
  uint8_t* data() { return static_cast<uint8_t*>(p); }
  void* p = nullptr;
};

// Reads [0, size) of fd and compares with model; "" or where it differs.
std::string CompareDevice(int fd, const std::vector<uint8_t>& model) {
  const size_t step = 1 << 20;
  AlignedBuf buf(step);
  for (uint64_t off = 0; off < model.size(); off += step) {
    const size_t n = std::min<uint64_t>(step, model.size() - off);
    if (pread(fd, buf.data(), n, static_cast<off_t>(off)) != static_cast<ssize_t>(n)) {
      return "short read at " + std::to_string(off) + ": " + std::strerror(errno);
    }
    if (std::memcmp(buf.data(), model.data() + off, n) != 0) {
      for (size_t i = 0; i < n; ++i) {
        if (buf.data()[i] != model[off + i]) return "differs at byte " + std::to_string(off + i);
      }
    }
  }
  return "";
}

// One workload thread: random writes and verified reads inside its own
// chunks. Returns the first mismatch or I/O error, "" if none.
std::string Workload(int fd, std::vector<uint8_t>& model, int thread, uint64_t ops, uint64_t seed,
                     const std::vector<std::pair<uint64_t, uint64_t>>* only_ranges = nullptr) {
  std::mt19937_64 rng(seed * 1000 + thread);
  AlignedBuf buf(kChunk);
  const uint64_t chunks = model.size() / kChunk;
  for (uint64_t op = 0; op < ops; ++op) {
    uint64_t off, len;
    if (only_ranges) {  // inside one of the given byte ranges (block aligned)
      const auto& [rs, rl] = (*only_ranges)[rng() % only_ranges->size()];
      len = std::min<uint64_t>((1 + rng() % 16) * kBlock, rl);
      off = rs + (rng() % ((rl - len) / kBlock + 1)) * kBlock;
      if ((off / kChunk) % kThreads != static_cast<uint64_t>(thread)) continue;
      if (off / kChunk != (off + len - 1) / kChunk) len = (off / kChunk + 1) * kChunk - off;
    } else {
      uint64_t chunk = (rng() % (chunks / kThreads)) * kThreads + thread;
      len = (1 + rng() % 16) * kBlock;
      off = chunk * kChunk + (rng() % ((kChunk - len) / kBlock + 1)) * kBlock;
    }
    const uint64_t kind = rng() % 20;
    if (!only_ranges && kind < 3) {
      // Write-zeroes of the range (2 in 20), or a discard of the whole
      // cluster it starts in (1 in 20): both read as zeros afterwards. The
      // miss path frees or zero-flags what is not linear and zeroes linear
      // clusters in place; freed clusters are reused by later writes.
      uint64_t range[2] = {off, len};
      unsigned long ioc = BLKZEROOUT;
      if (kind == 0) {
        range[0] = off / kCluster * kCluster;
        range[1] = kCluster;
        ioc = BLKDISCARD;
      }
      if (ioctl(fd, ioc, range) != 0) {
        return std::string(ioc == BLKDISCARD ? "discard" : "zeroout") + " at " + std::to_string(range[0]) + ": " +
               std::strerror(errno);
      }
      std::memset(model.data() + range[0], 0, range[1]);
      ioc == BLKDISCARD ? ++discards : ++zeroouts;
      continue;
    }
    if (rng() % 2 == 0) {
      for (uint64_t j = 0; j < len; j += 8) {
        uint64_t v = rng();
        std::memcpy(buf.data() + j, &v, 8);
      }
      if (pwrite(fd, buf.data(), len, static_cast<off_t>(off)) != static_cast<ssize_t>(len)) {
        return "write at " + std::to_string(off) + ": " + std::strerror(errno);
      }
      std::memcpy(model.data() + off, buf.data(), len);
    } else {
      if (pread(fd, buf.data(), len, static_cast<off_t>(off)) != static_cast<ssize_t>(len)) {
        return "read at " + std::to_string(off) + ": " + std::strerror(errno);
      }
      if (std::memcmp(buf.data(), model.data() + off, len) != 0) {
        return "read at " + std::to_string(off) + " len " + std::to_string(len) + " differs from the model";
      }
    }
  }
  return "";
}

// kThreads workload threads (each owns its chunks of the shared model, so
// no locking), and, when reloads is set, a thread that reloads and revokes
// while they run. Returns the first error.
std::string RunLoad(int fd, std::vector<uint8_t>& model, uint64_t ops, uint64_t seed, dm::OffloadController* ctl,
                    uint64_t cluster_count, int* reloads_done, int* revokes_done,
                    const std::vector<std::pair<uint64_t, uint64_t>>* only_ranges = nullptr) {
  std::vector<std::string> errs(kThreads + 1);
  std::atomic<int> running{kThreads};
  std::vector<std::thread> ts;
  for (int t = 0; t < kThreads; ++t) {
    ts.emplace_back([&, t] {
      errs[t] = Workload(fd, model, t, ops, seed, only_ranges);
      --running;
    });
  }
  if (ctl) {
    ts.emplace_back([&] {
      std::mt19937_64 rng(seed);
      while (running.load() > 0) {
        std::this_thread::sleep_for(std::chrono::milliseconds(100));
        auto r = ctl->ReloadNow();
        if (!r.ok()) {
          errs[kThreads] = "reload: " + r.status().ToString();
          return;
        }
        if (*r) ++*reloads_done;
        if (rng() % 3 == 0) {  // revoke a few clusters (they are not reused: the data stays valid)
          Status s = ctl->RevokeBeforeReuse(rng() % cluster_count, 1 + rng() % 8);
          if (!s.ok()) {
            errs[kThreads] = "revoke: " + s.ToString();
            return;
          }
          ++*revokes_done;
        }
      }
    });
  }
  for (auto& t : ts) t.join();
  for (auto& e : errs) {
    if (!e.empty()) return e;
  }
  return "";
}

int Run(const std::string& image_path, const std::string& expected_path) {
  auto t_all = std::chrono::steady_clock::now();
  cowtap::cow::OpenOptions oo;
  oo.direct_io = true;
  auto opened = cowtap::cow::OpenImage(image_path, oo);
  if (!opened.ok()) {
    Check("open", false, opened.status().ToString());
    return 1;
  }
  std::shared_ptr<cowtap::cow::Image> image = std::move(opened).value();
  const uint64_t size = image->size_bytes();
  const uint64_t cluster = image->info().cluster_size;
  std::vector<uint8_t> model = BaseContent(size);

  auto kdm = dm::NewKernelDeviceMapper();
  if (!kdm.ok()) {
    Check("device_mapper", false, kdm.status().ToString());
    return 1;
  }
  dm::OffloadAttachmentOptions ao;
  ao.dm_name = "cowtap-e2e";
  ao.socket_path = "/tmp/cowtap-e2e.sock";
  auto t0 = std::chrono::steady_clock::now();
  auto att = dm::OffloadAttachment::Attach(image, image_path, **kdm, ao);
  Check("attach", att.ok(),
        att.ok() ? (*att)->devices().linear_device + " + " + (*att)->devices().miss_device : att.status().ToString());
  if (!att.ok()) return 1;
  dm::OffloadAttachment& a = **att;
  std::printf("E2E attach %.2f s\n", Seconds(t0));
  Check("fresh_overlay_all_miss", a.controller().live_table().linear_sectors() == 0,
        std::to_string(a.controller().live_table().linear_sectors()) + " linear sectors");

  int fd = open(a.device_path().c_str(), O_RDWR | O_DIRECT);
  Check("open_dm_device", fd >= 0, a.device_path());
  if (fd < 0) return 1;
  Check("initial_content", CompareDevice(fd, model).empty(), "whole device equals the base");

  // Phase 1: every cluster starts on the miss path (allocations through
  // nbd into the engine); reloads move them linear while I/O runs.
  t0 = std::chrono::steady_clock::now();
  int reloads = 0, revokes = 0;
  std::string err = RunLoad(fd, model, 1500, 1, &a.controller(), size / cluster, &reloads, &revokes);
  Check("load_with_reloads", err.empty(),
        err.empty() ? fmt::format("{} reloads, {} revokes, {} discards, {} zeroouts under load", reloads, revokes,
                                  discards.load(), zeroouts.load())
                    : err);
  std::printf("E2E load_with_reloads %.2f s\n", Seconds(t0));
  auto r = a.controller().ReloadNow();
  Check("reload_after_load", r.ok(), r.ok() ? "" : r.status().ToString());
  {
    const dm::MissRoutingCounters& rc = a.routing_counters();
    // dm sends the linear part of a discard to the loop device itself; what
    // reaches the miss path is miss in the live table, so zeroing in place
    // there happens only when a reload raced the request.
    Check("discards_reached_the_engine", rc.engine_requests > 0,
          fmt::format("{} zeroed in place ({} KiB, linear in a table being loaded), {} to the engine ({} KiB)",
                      rc.in_place_requests.load(), rc.in_place_bytes.load() >> 10, rc.engine_requests.load(),
                      rc.engine_bytes.load() >> 10));
  }
  const dm::DmTable table = a.controller().live_table();
  const dm::OffloadStats st = a.controller().stats();
  Check("clusters_went_linear", table.linear_sectors() > 0,
        std::to_string(table.linear_sectors() * 512 >> 10) + " KiB linear in " +
            std::to_string(table.linear_segment_count()) + " segments, " + std::to_string(st.reloads) + " reloads, " +
            std::to_string(std::chrono::duration<double, std::milli>(st.reload_time).count()) + " ms reloading");
  std::string cmp = CompareDevice(fd, model);
  Check("content_after_load", cmp.empty(), cmp);

  // Phase 2: I/O only inside linear segments never reaches user space.
  std::vector<std::pair<uint64_t, uint64_t>> linear;
  for (const auto& s : table.segments()) {
    if (s.kind == dm::DmSegment::Kind::kLinear && s.sector_count * 512 >= kBlock) {
      const uint64_t b = (s.start_sector * 512 + kBlock - 1) / kBlock * kBlock;
      const uint64_t e = s.end_sector() * 512 / kBlock * kBlock;
      if (e > b) linear.emplace_back(b, e - b);
    }
  }
  if (!linear.empty()) {
    t0 = std::chrono::steady_clock::now();
    const uint64_t before = a.miss_stats().requests;
    err = RunLoad(fd, model, 1000, 2, nullptr, 0, &reloads, &revokes, &linear);
    const uint64_t after = a.miss_stats().requests;
    Check("linear_io_verified", err.empty(), err);
    Check("linear_io_bypasses_user_space", after == before,
          std::to_string(after - before) + " requests reached the NBD server");
    std::printf("E2E linear_only %.2f s\n", Seconds(t0));
  }
  const int fsync_rc = fsync(fd);
  Check("fsync", fsync_rc == 0, fsync_rc == 0 ? "" : std::strerror(errno));
  close(fd);

  t0 = std::chrono::steady_clock::now();
  Status s = a.Detach();
  Check("detach", s.ok(), s.ToString());
  std::printf("E2E detach %.2f s\n", Seconds(t0));
  att->reset();
  s = image->Close();
  Check("close", s.ok(), s.ToString());
  image.reset();

  // Phase 3: attach again. The image now owns its clusters, so priming
  // alone must route them linear before any guest I/O, with the content
  // intact; then more load with reloads, and a second teardown.
  {
    t0 = std::chrono::steady_clock::now();
    auto reopened = cowtap::cow::OpenImage(image_path, oo);
    if (!reopened.ok()) {
      Check("reopen_rw", false, reopened.status().ToString());
      return 1;
    }
    std::shared_ptr<cowtap::cow::Image> img2 = std::move(reopened).value();
    auto att2 = dm::OffloadAttachment::Attach(img2, image_path, **kdm, ao);
    Check("reattach", att2.ok(), att2.ok() ? "" : att2.status().ToString());
    if (!att2.ok()) return 1;
    dm::OffloadAttachment& b = **att2;
    const dm::DmTable primed = b.controller().live_table();
    Check("primed_table_linear", primed.linear_sectors() > 0,
          std::to_string(b.primed_clusters()) + " clusters primed, " +
              std::to_string(primed.linear_sectors() * 512 >> 10) + " KiB linear in " +
              std::to_string(primed.linear_segment_count()) + " segments at attach");
    std::printf("E2E reattach %.2f s\n", Seconds(t0));
    int fd2 = open(b.device_path().c_str(), O_RDWR | O_DIRECT);
    Check("open_dm_device_again", fd2 >= 0, b.device_path());
    if (fd2 < 0) return 1;
    cmp = CompareDevice(fd2, model);
    Check("content_after_reattach", cmp.empty(), cmp);
    t0 = std::chrono::steady_clock::now();
    err = RunLoad(fd2, model, 500, 3, &b.controller(), size / cluster, &reloads, &revokes);
    Check("load_after_reattach", err.empty(), err);
    std::printf("E2E load_after_reattach %.2f s\n", Seconds(t0));
    cmp = CompareDevice(fd2, model);
    Check("content_after_second_load", cmp.empty(), cmp);
    Check("fsync_again", fsync(fd2) == 0, "");
    close(fd2);
    s = b.Detach();
    Check("detach_again", s.ok(), s.ToString());
    att2->reset();
    s = img2->Close();
    Check("close_again", s.ok(), s.ToString());
  }

  // The image through the engine alone, after teardown.
  cowtap::cow::OpenOptions ro;
  ro.read_only = true;
  auto again = cowtap::cow::OpenImage(image_path, ro);
  if (!again.ok()) {
    Check("reopen", false, again.status().ToString());
    return 1;
  }
  std::vector<uint8_t> back(size);
  iovec v{back.data(), back.size()};
  s = (*again)->Read(0, {&v, 1});
  Check("engine_reads_model", s.ok() && back == model, s.ok() ? "" : s.ToString());
  (void)(*again)->Close();

  int out = open(expected_path.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
  const bool wrote = out >= 0 && pwrite(out, model.data(), size, 0) == static_cast<ssize_t>(size) && close(out) == 0;
  Check("write_model", wrote, expected_path);
  std::printf("E2E total %.2f s\n", Seconds(t_all));
  return failures == 0 ? 0 : 1;
}

bool ReadFile(const std::string& path, std::vector<uint8_t>* out) {
  const int fd = open(path.c_str(), O_RDONLY);
  if (fd < 0) return false;
  const ssize_t n = pread(fd, out->data(), out->size(), 0);
  close(fd);
  return n == static_cast<ssize_t>(out->size());
}

// The service stage's workload (init.sh): a verified random load on a block
// device cowtapd offloads (`cowtap ctl offload on`; its reload thread
// reloads under the load). The model starts as the base's content, or as
// model_in, the model an earlier pass wrote; it is written to model_out.
int DeviceLoad(const std::string& device, uint64_t size, uint64_t ops, uint64_t seed, const std::string& model_in,
               const std::string& model_out) {
  const std::string tag = "service_load" + std::to_string(seed);
  std::vector<uint8_t> model = BaseContent(size);
  if (!model_in.empty() && !ReadFile(model_in, &model)) {
    Check(tag, false, "cannot read " + model_in);
    return 1;
  }
  const int fd = open(device.c_str(), O_RDWR | O_DIRECT);
  if (fd < 0) {
    Check(tag, false, device + ": " + std::strerror(errno));
    return 1;
  }
  std::string cmp = CompareDevice(fd, model);
  Check(tag + "_content_before", cmp.empty(), cmp.empty() ? "the device holds the model" : cmp);
  const auto t0 = std::chrono::steady_clock::now();
  int reloads = 0, revokes = 0;
  const std::string err = RunLoad(fd, model, ops, seed, nullptr, 0, &reloads, &revokes);
  Check(tag, err.empty(),
        err.empty() ? fmt::format("{} ops x {} threads verified, {} discards, {} zeroouts among them", ops, kThreads,
                                  discards.load(), zeroouts.load())
                    : err);
  std::printf("E2E %s %.2f s\n", tag.c_str(), Seconds(t0));
  cmp = CompareDevice(fd, model);
  Check(tag + "_content_after", cmp.empty(), cmp);
  Check(tag + "_fsync", fsync(fd) == 0, "");
  close(fd);
  const int out = open(model_out.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
  const bool wrote = out >= 0 && pwrite(out, model.data(), size, 0) == static_cast<ssize_t>(size) && close(out) == 0;
  Check(tag + "_model", wrote, model_out);
  return failures == 0 ? 0 : 1;
}

}  // namespace

int main(int argc, char** argv) {
  const std::string cmd = argc > 1 ? argv[1] : "";
  if (cmd == "fill-base" && argc == 4) return FillBase(argv[2], std::strtoull(argv[3], nullptr, 0));
  if (cmd == "run" && argc == 4) return Run(argv[2], argv[3]);
  if (cmd == "device-load" && argc == 8) {
    return DeviceLoad(argv[2], std::strtoull(argv[3], nullptr, 0), std::strtoull(argv[4], nullptr, 0),
                      std::strtoull(argv[5], nullptr, 0), argv[6], argv[7]);
  }
  std::fprintf(stderr,
               "usage: %s fill-base FILE SIZE | run IMAGE EXPECTED | device-load DEVICE SIZE OPS SEED MODEL_IN|'' "
               "MODEL_OUT\n",
               argv[0]);
  return 2;
}
