#include "tests/daemon/daemon_rig.h"

#include <dirent.h>
#include <stdio.h>
#include <stdlib.h>
#include <unistd.h>

#include <chrono>
#include <fstream>
#include <functional>
#include <thread>

#include "cow/image.h"

namespace cowtap::daemon_test {

Result<std::unique_ptr<DaemonRig>> DaemonRig::Create(daemon::DaemonOptions options) {
  std::unique_ptr<DaemonRig> rig(new DaemonRig());
  char tmpl[] = "/tmp/cowtapd-test-XXXXXX";
  if (::mkdtemp(tmpl) == nullptr) return Status::FromErrno(errno, "mkdtemp");
  rig->dir_ = tmpl;
  options.platform = "sim";
  options.sim_socket = rig->socket();
  COWTAP_ASSIGN_OR_RETURN(rig->daemon_, daemon::Daemon::Start(options));
  COWTAP_ASSIGN_OR_RETURN(rig->xs_, rig->daemon_->platform().OpenXenStore());
  return rig;
}

DaemonRig::~DaemonRig() {
  xs_.reset();
  if (daemon_) daemon_->Shutdown();
  daemon_.reset();
  // Deleting dozens of grown-ahead images can take long on a busy disk;
  // nothing waits for it.
  RunShell("(rm -rf '" + dir_ + "' > /dev/null 2>&1 &)");
}

Status DaemonRig::MakeOverlay(const std::string& name, uint64_t size_bytes) {
  if (!have_base_) {
    cow::CreateOptions base;
    base.size_bytes = size_bytes;
    COWTAP_RETURN_IF_ERROR(cow::CreateImage(Path("base.qcow2"), base));
    have_base_ = true;
  }
  cow::CreateOptions o;
  o.backing_file = "base.qcow2";
  o.backing_format = cow::ImageFormat::kQcow2;
  return cow::CreateImage(Path(name), o);
}

std::string DaemonRig::BackendKey(xen::DomId domid, uint32_t devid, const std::string& key) {
  auto v = xs_->Read(xen::XsJoin(xen::XsBackendDir(xen::kDom0, "cowtap", domid, devid), key));
  return v.ok() ? *v : "<absent>";
}

std::vector<std::string> DaemonRig::GuestArgs(xen::DomId domid, uint32_t devid, std::vector<std::string> extra) const {
  std::vector<std::string> args = {
      "--socket", socket(),          "--domid", std::to_string(domid), "--devid", std::to_string(devid), "--ram-pages",
      "4096",     "--grant-entries", "4096"};
  args.insert(args.end(), extra.begin(), extra.end());
  return args;
}

size_t OpenFdCount() {
  size_t n = 0;
  DIR* d = ::opendir("/proc/self/fd");
  if (!d) return 0;
  while (::readdir(d) != nullptr) ++n;
  ::closedir(d);
  return n;
}

size_t RssKib() {
  std::ifstream in("/proc/self/status");
  std::string line;
  while (std::getline(in, line)) {
    if (line.rfind("VmRSS:", 0) == 0) return std::stoul(line.substr(6));
  }
  return 0;
}

int RunShell(const std::string& command, std::string* out) {
  FILE* p = ::popen((command + " 2>&1").c_str(), "r");
  if (!p) return -1;
  char buf[4096];
  std::string text;
  size_t n;
  while ((n = fread(buf, 1, sizeof(buf), p)) > 0) text.append(buf, n);
  const int rc = ::pclose(p);
  if (out) *out = text;
  return WIFEXITED(rc) ? WEXITSTATUS(rc) : -1;
}

bool HaveQemuImg() { return RunShell("qemu-img --version") == 0; }

bool WaitFor(const std::function<bool()>& cond, int timeout_ms) {
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::milliseconds(timeout_ms);
  while (std::chrono::steady_clock::now() < deadline) {
    if (cond()) return true;
    std::this_thread::sleep_for(std::chrono::milliseconds(5));
  }
  return cond();
}

}  // namespace cowtap::daemon_test
