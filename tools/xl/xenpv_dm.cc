// cowtap-xenpv-dm pieces: QEMU-style argument parsing, the QMP replies libxl
// needs from a PV device model, the monitor sockets, and the xenstore steps
// (wait for the qdisk backends to be picked up, then say "running").
#include "tools/xl/xenpv_dm.h"

#include <fcntl.h>
#include <poll.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#include <charconv>
#include <cstring>
#include <nlohmann/json.hpp>
#include <thread>

namespace cowtap::xl {
namespace {

std::vector<std::string_view> SplitCommas(std::string_view s) {
  std::vector<std::string_view> out;
  while (true) {
    size_t comma = s.find(',');
    out.push_back(s.substr(0, comma));
    if (comma == std::string_view::npos) return out;
    s.remove_prefix(comma + 1);
  }
}

template <typename T>
bool ParseUnsigned(std::string_view s, T* out) {
  if (s.empty()) return false;
  auto [ptr, ec] = std::from_chars(s.data(), s.data() + s.size(), *out);
  return ec == std::errc() && ptr == s.data() + s.size();
}

std::string Line(const nlohmann::json& j) { return j.dump() + "\r\n"; }

}  // namespace

Result<DmArgs> ParseDmArgs(std::span<const std::string> args) {
  DmArgs out;
  bool have_domid = false;
  for (size_t i = 0; i < args.size(); ++i) {
    const std::string& a = args[i];
    if (a != "-xen-domid" && a != "-chardev") continue;
    if (i + 1 >= args.size()) return Status::InvalidArgument(a + " without a value");
    std::string_view value = args[++i];
    if (a == "-xen-domid") {
      unsigned domid = 0;
      if (!ParseUnsigned(value, &domid) || domid == 0 || domid >= 0x7FF0) {
        return Status::InvalidArgument("-xen-domid " + std::string(value) + " is not a guest domain id");
      }
      out.domid = static_cast<xen::DomId>(domid);
      have_domid = true;
      continue;
    }
    std::vector<std::string_view> parts = SplitCommas(value);
    if (parts[0] != "socket") continue;
    DmArgs::Monitor m;
    for (std::string_view p : parts) {
      if (p.starts_with("path=")) m.path = std::string(p.substr(5));
      if (p.starts_with("fd=") && !ParseUnsigned(p.substr(3), &m.fd)) {
        return Status::InvalidArgument("-chardev " + std::string(value) + ": bad fd");
      }
    }
    if (m.path.empty() && m.fd < 0) {
      return Status::InvalidArgument("-chardev " + std::string(value) + ": neither path= nor fd=");
    }
    out.monitors.push_back(std::move(m));
  }
  if (!have_domid) return Status::InvalidArgument("no -xen-domid: not started by libxl as a device model?");
  return out;
}

std::string QmpSession::Greeting() {
  // libxl reads the QEMU version from here; 7.2 is what Debian 12 ships, so
  // libxl takes the code paths it takes with the real qemu-system-xen.
  nlohmann::json g = {{"QMP",
                       {{"version", {{"qemu", {{"major", 7}, {"minor", 2}, {"micro", 0}}}, {"package", "cowtap"}}},
                        {"capabilities", nlohmann::json::array()}}}};
  return Line(g);
}

QmpSession::Reply QmpSession::Handle(std::string_view line) {
  nlohmann::json req = nlohmann::json::parse(line, nullptr, /*allow_exceptions=*/false);
  auto error = [&](const char* cls, const std::string& desc) {
    nlohmann::json r = {{"error", {{"class", cls}, {"desc", desc}}}};
    if (req.is_object() && req.contains("id")) r["id"] = req["id"];
    return Reply{Line(r), false};
  };
  if (!req.is_object() || !req.contains("execute") || !req["execute"].is_string()) {
    return error("GenericError", "expected a JSON object with a string \"execute\"");
  }
  const std::string cmd = req["execute"].get<std::string>();
  nlohmann::json result;
  bool quit = false;
  if (cmd == "qmp_capabilities") {
    result = nlohmann::json::object();
  } else if (cmd == "query-chardev") {
    result = nlohmann::json::array();  // no serial ptys to report
  } else if (cmd == "query-vnc") {
    result = {{"enabled", false}};
  } else if (cmd == "query-status") {
    result = {{"status", "running"}, {"running", true}, {"singlestep", false}};
  } else if (cmd == "query-block" || cmd == "query-blockstats") {
    result = nlohmann::json::array();  // the disks are cowtapd's: ask `cowtap ctl`
  } else if (cmd == "quit") {
    result = nlohmann::json::object();
    quit = true;
  } else {
    return error("CommandNotFound", "cowtap-xenpv-dm does not implement '" + cmd +
                                        "' (it stands in for QEMU for qdisk disks served by cowtapd)");
  }
  nlohmann::json r = {{"return", result}};
  if (req.contains("id")) r["id"] = req["id"];
  return Reply{Line(r), quit};
}

Result<QmpServer> QmpServer::Listen(const std::vector<DmArgs::Monitor>& monitors) {
  QmpServer s;
  for (const DmArgs::Monitor& m : monitors) {
    if (m.fd >= 0) {
      s.listen_fds_.push_back(m.fd);
      continue;
    }
    sockaddr_un addr{};
    addr.sun_family = AF_UNIX;
    if (m.path.size() >= sizeof(addr.sun_path)) return Status::InvalidArgument("QMP socket path too long: " + m.path);
    std::memcpy(addr.sun_path, m.path.data(), m.path.size());
    int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd < 0) return Status::FromErrno(errno, "socket for " + m.path);
    s.listen_fds_.push_back(fd);
    unlink(m.path.c_str());
    mode_t old = umask(077);
    int rc = bind(fd, reinterpret_cast<sockaddr*>(&addr), sizeof(addr));
    umask(old);
    if (rc != 0) return Status::FromErrno(errno, "bind " + m.path);
    if (listen(fd, 4) != 0) return Status::FromErrno(errno, "listen " + m.path);
    s.paths_.push_back(m.path);
  }
  return s;
}

QmpServer::QmpServer(QmpServer&& other) noexcept
    : listen_fds_(std::move(other.listen_fds_)), paths_(std::move(other.paths_)) {
  other.listen_fds_.clear();
  other.paths_.clear();
}

QmpServer::~QmpServer() {
  for (int fd : listen_fds_) close(fd);
  for (const std::string& p : paths_) unlink(p.c_str());
}

Status QmpServer::Run(int stop_fd) {
  struct Client {
    int fd;
    std::string in;
    QmpSession session;
  };
  std::vector<Client> clients;
  auto drop = [&](size_t i) {
    close(clients[i].fd);
    clients.erase(clients.begin() + static_cast<std::ptrdiff_t>(i));
  };
  auto send_all = [](int fd, const std::string& s) {
    size_t off = 0;
    while (off < s.size()) {
      ssize_t n = send(fd, s.data() + off, s.size() - off, MSG_NOSIGNAL);
      if (n <= 0) return false;
      off += static_cast<size_t>(n);
    }
    return true;
  };
  Status result;
  bool stop = false;
  while (!stop) {
    std::vector<pollfd> fds;
    fds.push_back({stop_fd, POLLIN, 0});
    for (int fd : listen_fds_) fds.push_back({fd, POLLIN, 0});
    for (const Client& c : clients) fds.push_back({c.fd, POLLIN, 0});
    if (poll(fds.data(), fds.size(), -1) < 0) {
      if (errno == EINTR) continue;
      result = Status::FromErrno(errno, "poll on QMP sockets");
      break;
    }
    if (fds[0].revents != 0) break;
    for (size_t i = 0; i < listen_fds_.size(); ++i) {
      if (!(fds[1 + i].revents & POLLIN)) continue;
      int cfd = accept4(listen_fds_[i], nullptr, nullptr, SOCK_CLOEXEC);
      if (cfd < 0) continue;
      if (clients.size() >= kMaxClients || !send_all(cfd, QmpSession::Greeting())) {
        close(cfd);
        continue;
      }
      clients.push_back({cfd, {}, {}});
    }
    // Clients accepted above are not in fds yet: only look at the old ones.
    size_t polled = fds.size() - 1 - listen_fds_.size();
    for (size_t i = polled; i-- > 0;) {
      if (fds[1 + listen_fds_.size() + i].revents == 0) continue;
      Client& c = clients[i];
      char buf[4096];
      ssize_t n = recv(c.fd, buf, sizeof(buf), 0);
      if (n <= 0) {
        drop(i);
        continue;
      }
      c.in.append(buf, static_cast<size_t>(n));
      bool ok = true;
      for (size_t nl; ok && (nl = c.in.find('\n')) != std::string::npos;) {
        std::string line = c.in.substr(0, nl);
        c.in.erase(0, nl + 1);
        if (line.find_first_not_of(" \t\r") == std::string::npos) continue;
        QmpSession::Reply r = c.session.Handle(line);
        ok = send_all(c.fd, r.text);
        stop |= r.quit;
      }
      if (!ok || c.in.size() > kMaxLineBytes) drop(i);
    }
  }
  for (const Client& c : clients) close(c.fd);
  return result;
}

Status WaitForQdiskBackends(xen::XenStore& store, xen::DomId self, xen::DomId domid,
                            std::chrono::milliseconds timeout) {
  const std::string dir = "/local/domain/" + std::to_string(self) + "/backend/qdisk/" + std::to_string(domid);
  const auto deadline = std::chrono::steady_clock::now() + timeout;
  while (true) {
    Result<std::vector<std::string>> devs = store.Directory(dir);
    if (!devs.ok() && devs.status().code() != ErrorCode::kNotFound) return devs.status();
    if (!devs.ok() || devs->empty()) {
      return Status::NotFound("no qdisk disks under " + dir +
                              ": nothing for cowtapd to serve (the disk line needs backendtype=qdisk)");
    }
    std::string waiting;
    for (const std::string& dev : *devs) {
      Result<std::string> state = store.Read(dir + "/" + dev + "/state");
      unsigned value = 0;
      if (!state.ok() || !ParseUnsigned(std::string_view(*state), &value) || value < 2) {
        waiting = dir + "/" + dev;
        break;
      }
    }
    if (waiting.empty()) return Status::Ok();
    if (std::chrono::steady_clock::now() >= deadline) {
      return Status::Busy(waiting +
                          " is still Initialising: no backend picked it up; is cowtapd running with "
                          "--platform xen --backend-type qdisk?");
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(100));
  }
}

Status MarkRunning(xen::XenStore& store, xen::DomId self, xen::DomId domid) {
  return store.Write("/local/domain/" + std::to_string(self) + "/device-model/" + std::to_string(domid) + "/state",
                     "running");
}

}  // namespace cowtap::xl
