// The sim's EventChannel handle (see sim_state.h): ports are pairs of
// eventfds; the handle's fd is an epoll set holding each bound port's `in`
// eventfd with EPOLLONESHOT, which is exactly Xen's per-port mask bit:
// after an event is reported the port stays quiet until Unmask re-arms it,
// and notifications that arrive meanwhile are kept in the eventfd counter.
#include <sys/epoll.h>
#include <unistd.h>

#include <cerrno>
#include <map>

#include "xen-glue/sim_state.h"

namespace cowtap::xen::sim {
namespace {

class SimEventChannel final : public EventChannel {
 public:
  SimEventChannel(std::unique_ptr<PortControl> control, UniqueFd epoll_fd)
      : control_(std::move(control)), epoll_(std::move(epoll_fd)) {}
  ~SimEventChannel() override {
    for (auto& [port, fds] : ports_) control_->Unbind(port).IgnoreError();
  }

  Result<EvtchnPort> BindInterdomain(DomId remote, EvtchnPort remote_port) override {
    COWTAP_ASSIGN_OR_RETURN(PortFds fds, control_->BindInterdomain(remote, remote_port));
    return Add(std::move(fds));
  }
  Result<EvtchnPort> BindUnbound(DomId remote) override {
    COWTAP_ASSIGN_OR_RETURN(PortFds fds, control_->BindUnbound(remote));
    return Add(std::move(fds));
  }
  Status Unbind(EvtchnPort local_port) override {
    auto it = ports_.find(local_port);
    if (it == ports_.end()) return NotOurs(local_port);
    epoll_ctl(epoll_.get(), EPOLL_CTL_DEL, it->second.in.get(), nullptr);
    ports_.erase(it);
    return control_->Unbind(local_port);
  }
  Status Notify(EvtchnPort local_port) override {
    auto it = ports_.find(local_port);
    if (it == ports_.end()) return NotOurs(local_port);
    uint64_t one = 1;
    // EAGAIN: the counter is saturated, the peer has plenty pending already.
    if (write(it->second.out.get(), &one, sizeof(one)) < 0 && errno != EAGAIN) {
      return Status::FromErrno(errno, "sim: event-channel notify");
    }
    return Status::Ok();
  }
  int fd() const override { return epoll_.get(); }
  Result<std::optional<EvtchnPort>> Pending() override {
    epoll_event ev;
    int n;
    do {
      n = epoll_wait(epoll_.get(), &ev, 1, 0);
    } while (n < 0 && errno == EINTR);
    if (n < 0) return Status::FromErrno(errno, "sim: epoll_wait on event channels");
    if (n == 0) return std::optional<EvtchnPort>();
    EvtchnPort port = ev.data.u32;
    auto it = ports_.find(port);
    if (it == ports_.end()) return std::optional<EvtchnPort>();
    uint64_t count;
    if (read(it->second.in.get(), &count, sizeof(count)) < 0 && errno != EAGAIN) {
      return Status::FromErrno(errno, "sim: reading an event-channel eventfd");
    }
    return std::optional<EvtchnPort>(port);
  }
  Status Unmask(EvtchnPort local_port) override {
    auto it = ports_.find(local_port);
    if (it == ports_.end()) return NotOurs(local_port);
    return Arm(EPOLL_CTL_MOD, local_port, it->second.in.get());
  }

 private:
  static Status NotOurs(EvtchnPort port) {
    return Status::InvalidArgument("sim: event-channel port " + std::to_string(port) +
                                   " is not bound through this handle");
  }
  Status Arm(int op, EvtchnPort port, int fd) {
    epoll_event ev{};
    ev.events = EPOLLIN | EPOLLONESHOT;
    ev.data.u32 = port;
    if (epoll_ctl(epoll_.get(), op, fd, &ev) != 0) return Status::FromErrno(errno, "sim: epoll_ctl");
    return Status::Ok();
  }
  Result<EvtchnPort> Add(PortFds fds) {
    EvtchnPort port = fds.port;
    Status s = Arm(EPOLL_CTL_ADD, port, fds.in.get());
    if (!s.ok()) {
      control_->Unbind(port).IgnoreError();
      return s;
    }
    ports_[port] = std::move(fds);
    return port;
  }

  std::unique_ptr<PortControl> control_;
  UniqueFd epoll_;
  std::map<EvtchnPort, PortFds> ports_;
};

}  // namespace

Result<std::unique_ptr<EventChannel>> NewSimEventChannel(std::unique_ptr<PortControl> control) {
  UniqueFd epoll_fd(epoll_create1(EPOLL_CLOEXEC));
  if (!epoll_fd.valid()) return Status::FromErrno(errno, "sim: epoll_create1 for an event-channel handle");
  return std::unique_ptr<EventChannel>(new SimEventChannel(std::move(control), std::move(epoll_fd)));
}

}  // namespace cowtap::xen::sim
