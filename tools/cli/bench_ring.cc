#include "tools/cli/bench_ring.h"

#include <fmt/format.h>
#include <poll.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cstring>

#include "backend/block_device.h"
#include "backend/vbd.h"
#include "cow/image.h"
#include "tools/cli/bench_guest.h"
#include "tools/cli/bench_stats.h"

namespace cowtap::cli::bench {
namespace {

constexpr uint32_t kDevid = 51712;  // xvda
constexpr int kAttachTimeoutMs = 15000;
// Beyond the workload's own limit: handshake, teardown, and a guest that
// waits up to its poll timeout before it reports a dead ring.
constexpr int kReplySlackMs = 60000;

}  // namespace

Result<std::unique_ptr<RingBench>> RingBench::Start(const std::string& dir) {
  std::unique_ptr<RingBench> rb(new RingBench());
  rb->dir_ = dir;
  int fds[2];
  if (::socketpair(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0, fds) != 0) {
    return Status::FromErrno(errno, "bench: socketpair for the guest process");
  }
  std::fflush(nullptr);  // the child must not write out the parent's buffered output again
  const pid_t pid = ::fork();
  if (pid < 0) {
    const int e = errno;
    ::close(fds[0]);
    ::close(fds[1]);
    return Status::FromErrno(e, "bench: fork the guest process");
  }
  if (pid == 0) {
    ::close(fds[0]);
    GuestProcessMain(fds[1]);
  }
  ::close(fds[1]);
  rb->child_ = pid;
  rb->sock_ = fds[0];
  return rb;
}

RingBench::~RingBench() {
  if (sock_ >= 0) ::close(sock_);  // the guest process sees EOF and exits
  if (child_ > 0) {
    int status = 0;
    for (int i = 0; i < 500; ++i) {
      const pid_t got = ::waitpid(child_, &status, WNOHANG);
      if (got == child_ || (got < 0 && errno != EINTR)) {
        child_ = -1;
        break;
      }
      ::usleep(10000);
    }
    if (child_ > 0) {
      ::kill(child_, SIGKILL);
      while (::waitpid(child_, &status, 0) < 0 && errno == EINTR) {
      }
    }
  }
  xs_.reset();
  platform_.reset();
  hv_.reset();
}

Status RingBench::StartHypervisor() {
  if (hv_) return Status::Ok();
  COWTAP_ASSIGN_OR_RETURN(hv_, xen::SimHypervisor::Start(dir_ + "/xen.sock"));
  platform_ = hv_->NewPlatform(xen::kDom0);
  COWTAP_ASSIGN_OR_RETURN(xs_, platform_->OpenXenStore());
  return Status::Ok();
}

Result<PeerResult> RingBench::Run(const Workload& w, const std::string& image_path, const EngineRunOptions& options) {
  if (broken_)
    return Status::Cancelled("bench: the guest process is unusable after an earlier failure: " + broken_why_);
  if (std::string why = ValidateWorkload(w); !why.empty()) return Status::InvalidArgument(why);
  COWTAP_RETURN_IF_ERROR(StartHypervisor());

  const bool read_only = w.read_percent == 100;
  cow::OpenOptions open;
  open.read_only = read_only;
  open.direct_io = options.direct_io;
  open.remap_cache_entries = options.remap_cache_entries;
  COWTAP_ASSIGN_OR_RETURN(std::unique_ptr<cow::Image> opened, cow::OpenImage(image_path, open));
  std::shared_ptr<cow::Image> image(std::move(opened));
  backend::ImageDeviceOptions dev_options;
  dev_options.read_only = read_only;
  std::shared_ptr<backend::BlockDevice> device = backend::NewImageBlockDevice(image, dev_options);

  const xen::DomId domid = next_domid_++;
  xen::SimVbdConfig cfg;
  cfg.frontend_domid = domid;
  cfg.devid = kDevid;
  cfg.params = image_path;
  cfg.writable = !read_only;
  COWTAP_RETURN_IF_ERROR(xen::ToolstackAddVbd(*xs_, cfg));

  GuestRequest req;
  if (hv_->socket_path().size() >= sizeof(req.socket_path)) {
    return Status::InvalidArgument("bench: socket path too long: " + hv_->socket_path());
  }
  std::memcpy(req.socket_path, hv_->socket_path().data(), hv_->socket_path().size());
  req.domid = domid;
  req.devid = kDevid;
  req.workload = w;
  const cow::RemapCacheStats remap0 = image->remap_cache() ? image->remap_cache()->Stats() : cow::RemapCacheStats{};
  ResetPeakRss();
  const double cpu0 = ProcessCpuSeconds();
  if (::send(sock_, &req, sizeof(req), MSG_NOSIGNAL) != static_cast<ssize_t>(sizeof(req))) {
    broken_ = true;
    broken_why_ = fmt::format("send to the guest process: {}", std::strerror(errno));
    return Status::IoError("bench: " + broken_why_);
  }

  // As with xl, the backend attaches once the domain exists (a Vbd treats a
  // domain that is not alive as dead).
  std::unique_ptr<backend::Vbd> vbd;
  Status attach = Status::Ok();
  if (!hv_->WaitForDomain(domid, std::chrono::milliseconds(kAttachTimeoutMs))) {
    attach = Status::Busy(fmt::format("bench: guest domain {} did not connect in {} ms", domid, kAttachTimeoutMs));
  } else {
    backend::VbdOptions vopts;
    vopts.frontend_domid = domid;
    vopts.devid = kDevid;
    auto attached = backend::Vbd::Attach(*platform_, vopts, device);
    if (attached.ok()) {
      vbd = std::move(*attached);
    } else {
      attach = attached.status();
    }
  }

  // Always collect the reply, so that the next request starts in step.
  GuestReply reply;
  const int wait_ms = static_cast<int>(std::min<uint64_t>(w.time_limit_ms, 3600000)) + kReplySlackMs;
  pollfd p{sock_, POLLIN, 0};
  int ready = 0;
  do {
    ready = ::poll(&p, 1, wait_ms);
  } while (ready < 0 && errno == EINTR);
  ssize_t got = -1;
  if (ready == 1) got = ::recv(sock_, &reply, sizeof(reply), 0);
  const double cpu_backend = ProcessCpuSeconds() - cpu0;
  const uint64_t rss = PeakRssBytes();
  if (vbd) vbd->Detach();
  vbd.reset();
  xen::ToolstackRemoveVbd(*xs_, cfg).IgnoreError();
  if (got != static_cast<ssize_t>(sizeof(reply))) {
    broken_ = true;
    broken_why_ = ready == 1 ? "the guest process died" : fmt::format("no reply from the guest in {} ms", wait_ms);
    return Status::IoError("bench: " + broken_why_);
  }
  COWTAP_RETURN_IF_ERROR(attach);
  reply.message[sizeof(reply.message) - 1] = '\0';
  if (!reply.ok) return Status::IoError(reply.message);

  PeerResult r;
  r.peer = Peer::kRing;
  r.ran = true;
  r.ops = reply.ops;
  r.bytes = reply.bytes;
  r.errors = reply.errors;
  r.elapsed_s = reply.elapsed_s;
  r.has_latency = reply.ops > 0;
  r.p50_us = reply.p50_us;
  r.p99_us = reply.p99_us;
  r.guest_cpu_s = reply.cpu_s;
  r.cpu_s = cpu_backend + reply.cpu_s;
  r.peak_rss_bytes = rss;
  if (cow::RemapCache* cache = image->remap_cache()) {
    const cow::RemapCacheStats remap1 = cache->Stats();
    const uint64_t lookups = remap1.lookups - remap0.lookups;
    r.has_remap = true;
    r.remap_lookups = lookups;
    r.remap_hit_rate = lookups ? static_cast<double>(remap1.hits - remap0.hits) / static_cast<double>(lookups) : 0;
    r.remap_mean_probe =
        lookups ? static_cast<double>(remap1.probes - remap0.probes) / static_cast<double>(lookups) : 0;
  }
  device.reset();
  COWTAP_RETURN_IF_ERROR(image->Close());
  r.note =
      fmt::format("{}q order {} {}{}", reply.queues, reply.ring_page_order, reply.persistent ? "persistent" : "map/req",
                  reply.indirect_segments ? fmt::format(" indirect {}", reply.indirect_segments) : "");
  if (r.errors > 0) r.note += fmt::format("; {} requests failed", r.errors);
  return r;
}

}  // namespace cowtap::cli::bench
