// libFuzzer target: the xenstore keys cowtapd parses — a frontend's
// handshake keys (backend::ParseFrontendKeys: protocol, ring-page-order,
// ring-ref / ring-refN, event-channel, feature-persistent,
// multi-queue-num-queues, queue-N/...) and the toolstack's backend keys
// (daemon::ParseDiskSource: target, format, params, mode).
//
// Input: the first byte picks the backend's offer (ring order, queues,
// persistent); the rest is lines "key=value" (key relative to the
// directory, later lines win; a line "key!" makes reading that key fail as
// a xenstore error would). Every line's value is also given to ParseParams.
// Checks what the backend relies on: no crash, and an accepted handshake
// respects the offer (1..max queues, 2^order refs per queue, order <= max,
// persistent only if offered); an accepted disk source has a path and a
// format cowtap serves. Violations abort (libFuzzer reports them).
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <map>
#include <set>
#include <string>
#include <string_view>

#include "backend/frontend_keys.h"
#include "tools/daemon/backend_params.h"

namespace cowtap {
namespace {

constexpr char kFrontendDir[] = "/local/domain/7/device/vbd/51712";
constexpr char kBackendDir[] = "/local/domain/0/backend/qdisk/7/51712";

void Require(bool condition) {
  if (!condition) std::abort();
}

struct Store {
  std::map<std::string, std::string> values;
  std::set<std::string> failing;

  backend::KeyReader Reader(const std::string& dir) const {
    return [this, dir](const std::string& path) -> Result<std::optional<std::string>> {
      Require(path.compare(0, dir.size(), dir) == 0);  // never reads outside the directory it was given
      const std::string key = path.size() > dir.size() ? path.substr(dir.size() + 1) : "";
      if (failing.count(key)) return Status::IoError("injected xenstore read error on " + path);
      auto it = values.find(key);
      if (it == values.end()) return std::optional<std::string>();
      return std::optional<std::string>(it->second);
    };
  }
};

bool KnownFormat(const std::string& f) { return f.empty() || f == "qcow2" || f == "qcow" || f == "raw"; }

void CheckDiskSource(const Result<daemon::DiskSource>& s) {
  if (!s.ok()) {
    Require(!s.status().message().empty());
    return;
  }
  Require(!s->path.empty());
  Require(KnownFormat(s->format));
}

}  // namespace
}  // namespace cowtap

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  using namespace cowtap;
  if (size == 0 || size > 16384) return 0;
  backend::BackendOffer offer;
  offer.max_ring_page_order = data[0] % 5;
  offer.max_queues = 1 + (data[0] >> 3) % 8;
  offer.persistent = (data[0] & 0x80) != 0;
  Store store;
  std::string_view rest(reinterpret_cast<const char*>(data) + 1, size - 1);
  while (!rest.empty()) {
    const size_t nl = rest.find('\n');
    std::string_view line = rest.substr(0, nl);
    rest = nl == std::string_view::npos ? std::string_view() : rest.substr(nl + 1);
    if (!line.empty() && line.back() == '!') {
      store.failing.insert(std::string(line.substr(0, line.size() - 1)));
      continue;
    }
    const size_t eq = line.find('=');
    if (eq == std::string_view::npos) continue;
    std::string value(line.substr(eq + 1));
    CheckDiskSource(daemon::ParseParams(value));
    store.values[std::string(line.substr(0, eq))] = std::move(value);
  }

  auto keys = backend::ParseFrontendKeys(store.Reader(kFrontendDir), kFrontendDir, offer);
  if (keys.ok()) {
    Require(keys->ring_page_order <= offer.max_ring_page_order);
    Require(!keys->queues.empty() && keys->queues.size() <= offer.max_queues);
    for (const auto& q : keys->queues) Require(q.ring_refs.size() == (size_t{1} << keys->ring_page_order));
    Require(!keys->persistent || offer.persistent);
  } else {
    Require(!keys.status().message().empty());
  }
  CheckDiskSource(daemon::ParseDiskSource(store.Reader(kBackendDir), kBackendDir));
  return 0;
}
