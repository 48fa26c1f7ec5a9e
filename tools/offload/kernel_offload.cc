#include "tools/offload/kernel_offload.h"

#include <fmt/format.h>
#include <spdlog/spdlog.h>
#include <sys/stat.h>
#include <sys/sysmacros.h>
#include <unistd.h>

#include <condition_variable>
#include <fstream>
#include <thread>
#include <vector>

#include "base/log.h"
#include "dm/loop_device.h"
#include "dm/nbd_device.h"

namespace cowtap::offload {

namespace {

constexpr const char* kDmControl = "/dev/mapper/control";

// One live offload: the attachment and the thread that keeps its table
// following the remap cache.
class KernelOffload : public daemon::ImageOffload {
 public:
  KernelOffload(std::unique_ptr<dm::OffloadAttachment> attachment, std::chrono::milliseconds interval)
      : attachment_(std::move(attachment)), interval_(interval) {
    thread_ = std::thread([this] { ReloadLoop(); });
  }
  ~KernelOffload() override {
    Status s = Stop();
    if (!s.ok()) spdlog::warn("offload {}: stopping: {}", attachment_->device_path(), s.ToString());
  }

  daemon::OffloadSnapshot Snapshot() const override {
    daemon::OffloadSnapshot s;
    s.device = attachment_->device_path();
    const dm::DmTable table = attachment_->controller().live_table();
    s.size_sectors = table.size_sectors();
    const dm::OffloadStats st = attachment_->controller().stats();
    s.segments = st.segments;
    s.linear_sectors = st.linear_sectors;
    s.reloads = st.reloads;
    s.reload_time_us =
        static_cast<uint64_t>(std::chrono::duration_cast<std::chrono::microseconds>(st.reload_time).count());
    s.revokes = st.revokes;
    s.primed_clusters = attachment_->primed_clusters();
    const backend::NbdServerStats miss = attachment_->miss_stats();
    s.miss_requests = miss.requests;
    s.miss_bytes_read = miss.bytes_read;
    s.miss_bytes_written = miss.bytes_written;
    const dm::MissRoutingCounters& rc = attachment_->routing_counters();
    s.zeroes_in_place = rc.in_place_requests.load();
    s.zeroes_to_engine = rc.engine_requests.load();
    if (auto io = ReadBlockDeviceIo(s.device); io.ok()) {
      s.device_io_known = true;
      s.device_sectors_read = io->sectors_read;
      s.device_sectors_written = io->sectors_written;
    }
    return s;
  }

  Status Stop() override {
    {
      std::lock_guard lock(mu_);
      if (stopped_) return first_error_;
      stopped_ = true;
    }
    cv_.notify_all();
    if (thread_.joinable()) thread_.join();
    Status s = attachment_->Detach();
    std::lock_guard lock(mu_);
    if (first_error_.ok()) first_error_ = s;
    return first_error_;
  }

 private:
  void ReloadLoop() {
    std::unique_lock lock(mu_);
    while (!stopped_) {
      cv_.wait_for(lock, interval_, [this] { return stopped_; });
      if (stopped_) break;
      lock.unlock();
      auto r = attachment_->controller().ReloadNow();
      if (!r.ok() && log_.Allow()) {
        spdlog::error("offload {}: reload failed: {}; the old table stays live (misses still go to cowtapd)",
                      attachment_->device_path(), r.status().ToString());
      }
      lock.lock();
    }
  }

  const std::unique_ptr<dm::OffloadAttachment> attachment_;
  const std::chrono::milliseconds interval_;
  RateLimiter log_{3, std::chrono::seconds(60)};
  mutable std::mutex mu_;
  std::condition_variable cv_;
  bool stopped_ = false;  // GUARDED_BY(mu_)
  Status first_error_;    // GUARDED_BY(mu_)
  std::thread thread_;
};

}  // namespace

Status CheckOffloadKernel() {
  std::vector<std::string> missing;
  if (access(kDmControl, R_OK | W_OK) != 0) missing.push_back(fmt::format("{} (modprobe dm_mod)", kDmControl));
  if (!dm::LoopAvailable()) missing.push_back("/dev/loop-control (modprobe loop)");
  if (!dm::NbdAvailable()) missing.push_back("/dev/nbd0 (modprobe nbd)");
  if (missing.empty()) return Status::Ok();
  std::string list;
  for (const auto& m : missing) list += (list.empty() ? "" : ", ") + m;
  return Status::NotSupported(fmt::format(
      "the kernel offload needs device-mapper, loop and nbd; missing or not accessible here: {}; cowtapd must run "
      "as root. The image can still be served as a VBD without offload",
      list));
}

Result<BlockDeviceIo> ReadBlockDeviceIo(const std::string& device_path) {
  struct stat st {};
  if (::stat(device_path.c_str(), &st) != 0) return Status::FromErrno(errno, device_path);
  if (!S_ISBLK(st.st_mode)) return Status::InvalidArgument(device_path + " is not a block device");
  const std::string stat_file = fmt::format("/sys/dev/block/{}:{}/stat", major(st.st_rdev), minor(st.st_rdev));
  std::ifstream in(stat_file);
  // Fields: reads, reads merged, sectors read, ms reading, writes, writes
  // merged, sectors written, ... (Documentation/block/stat.rst).
  uint64_t f[7] = {};
  for (auto& v : f) {
    if (!(in >> v)) return Status::IoError(stat_file + ": unreadable");
  }
  return BlockDeviceIo{.sectors_read = f[2], .sectors_written = f[6]};
}

Result<dm::DeviceMapper*> KernelOffloadProvider::Mapper() {
  std::lock_guard lock(mu_);
  if (!dm_) {
    COWTAP_RETURN_IF_ERROR(CheckOffloadKernel());
    COWTAP_ASSIGN_OR_RETURN(dm_, dm::NewKernelDeviceMapper());
  }
  return dm_.get();
}

Result<std::unique_ptr<daemon::ImageOffload>> KernelOffloadProvider::Start(std::shared_ptr<cow::Image> image,
                                                                           const std::string& image_file,
                                                                           const std::string& dm_name) {
  COWTAP_RETURN_IF_ERROR(CheckOffloadKernel());
  COWTAP_ASSIGN_OR_RETURN(dm::DeviceMapper * mapper, Mapper());
  if (::mkdir(options_.socket_dir.c_str(), 0700) != 0 && errno != EEXIST) {
    return Status::FromErrno(errno, "offload socket directory " + options_.socket_dir);
  }
  dm::OffloadAttachmentOptions ao = options_.attach;
  ao.dm_name = dm_name;
  ao.socket_path = options_.socket_dir + "/" + dm_name + ".nbd";
  ::unlink(ao.socket_path.c_str());  // a stale socket of a killed cowtapd
  COWTAP_ASSIGN_OR_RETURN(auto attachment, dm::OffloadAttachment::Attach(std::move(image), image_file, *mapper, ao));
  return std::unique_ptr<daemon::ImageOffload>(new KernelOffload(std::move(attachment), options_.reload_interval));
}

}  // namespace cowtap::offload
