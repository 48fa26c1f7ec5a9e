#include "backend/frontend_keys.h"

#include <fmt/format.h>

namespace cowtap::backend {
namespace {

std::string Shown(std::string_view text) {
  // Guest text in a message: bounded and printable.
  std::string out;
  for (char c : text.substr(0, 40)) out += (c >= 0x20 && c < 0x7f) ? c : '?';
  if (text.size() > 40) out += "...";
  return out;
}

Result<uint64_t> ReadNumber(const KeyReader& read, const std::string& path, uint64_t max) {
  COWTAP_ASSIGN_OR_RETURN(std::optional<std::string> v, read(path));
  if (!v) return Status::InvalidArgument(fmt::format("frontend key {} is missing", path));
  return ParseDecimal(*v, max, path);
}

Result<uint64_t> ReadNumberOr(const KeyReader& read, const std::string& path, uint64_t max, uint64_t dflt) {
  COWTAP_ASSIGN_OR_RETURN(std::optional<std::string> v, read(path));
  if (!v) return dflt;
  return ParseDecimal(*v, max, path);
}

Result<QueueKeys> ReadQueue(const KeyReader& read, const std::string& dir, uint32_t order) {
  QueueKeys q;
  const uint32_t pages = 1u << order;
  if (order == 0) {
    // Single page: "ring-ref"; some frontends write "ring-ref0" instead.
    COWTAP_ASSIGN_OR_RETURN(std::optional<std::string> single, read(xen::XsJoin(dir, "ring-ref")));
    std::string path = xen::XsJoin(dir, single ? "ring-ref" : "ring-ref0");
    COWTAP_ASSIGN_OR_RETURN(uint64_t ref, ReadNumber(read, path, UINT32_MAX));
    q.ring_refs.push_back(static_cast<xen::GrantRef>(ref));
  } else {
    for (uint32_t i = 0; i < pages; ++i) {
      COWTAP_ASSIGN_OR_RETURN(uint64_t ref,
                              ReadNumber(read, xen::XsJoin(dir, fmt::format("ring-ref{}", i)), UINT32_MAX));
      q.ring_refs.push_back(static_cast<xen::GrantRef>(ref));
    }
  }
  COWTAP_ASSIGN_OR_RETURN(uint64_t port, ReadNumber(read, xen::XsJoin(dir, "event-channel"), UINT32_MAX));
  q.event_channel = static_cast<xen::EvtchnPort>(port);
  return q;
}

}  // namespace

Result<uint64_t> ParseDecimal(std::string_view text, uint64_t max, std::string_view what) {
  if (text.empty() || text.size() > 20) {
    return Status::InvalidArgument(fmt::format("{} = \"{}\" is not a decimal number", what, Shown(text)));
  }
  uint64_t v = 0;
  for (char c : text) {
    if (c < '0' || c > '9') {
      return Status::InvalidArgument(fmt::format("{} = \"{}\" is not a decimal number", what, Shown(text)));
    }
    if (__builtin_mul_overflow(v, 10, &v) || __builtin_add_overflow(v, static_cast<uint64_t>(c - '0'), &v)) {
      return Status::InvalidArgument(fmt::format("{} = \"{}\" overflows", what, Shown(text)));
    }
  }
  if (v > max) return Status::InvalidArgument(fmt::format("{} = {} exceeds the maximum {}", what, v, max));
  return v;
}

KeyReader StoreKeyReader(xen::XenStore& store) {
  return [&store](const std::string& path) -> Result<std::optional<std::string>> {
    auto v = store.Read(path);
    if (v.ok()) return std::optional<std::string>(std::move(v).value());
    if (v.status().code() == ErrorCode::kNotFound) return std::optional<std::string>();
    return v.status();
  };
}

Result<FrontendKeys> ReadFrontendKeys(xen::XenStore& store, const std::string& frontend_dir,
                                      const BackendOffer& offer) {
  return ParseFrontendKeys(StoreKeyReader(store), frontend_dir, offer);
}

Result<FrontendKeys> ParseFrontendKeys(const KeyReader& read, const std::string& frontend_dir,
                                       const BackendOffer& offer) {
  FrontendKeys keys;
  COWTAP_ASSIGN_OR_RETURN(std::optional<std::string> protocol, read(xen::XsJoin(frontend_dir, "protocol")));
  if (protocol) {
    auto abi = ParseProtocol(*protocol);
    if (!abi.ok()) return Status::InvalidArgument(abi.status().message());
    keys.abi = *abi;
  }

  COWTAP_ASSIGN_OR_RETURN(
      uint64_t order, ReadNumberOr(read, xen::XsJoin(frontend_dir, "ring-page-order"), offer.max_ring_page_order, 0));
  keys.ring_page_order = static_cast<uint32_t>(order);
  COWTAP_ASSIGN_OR_RETURN(uint64_t persistent,
                          ReadNumberOr(read, xen::XsJoin(frontend_dir, "feature-persistent"), 1, 0));
  keys.persistent = offer.persistent && persistent == 1;
  COWTAP_ASSIGN_OR_RETURN(uint64_t large,
                          ReadNumberOr(read, xen::XsJoin(frontend_dir, "feature-large-sector-size"), 1, 0));
  keys.large_sector_size = large == 1;

  COWTAP_ASSIGN_OR_RETURN(std::optional<std::string> nq_text,
                          read(xen::XsJoin(frontend_dir, "multi-queue-num-queues")));
  uint64_t queues = 1;
  if (nq_text) {
    COWTAP_ASSIGN_OR_RETURN(
        queues, ParseDecimal(*nq_text, offer.max_queues, xen::XsJoin(frontend_dir, "multi-queue-num-queues")));
    if (queues == 0) {
      return Status::InvalidArgument(
          fmt::format("{} = 0; at least one queue is needed", xen::XsJoin(frontend_dir, "multi-queue-num-queues")));
    }
  }
  for (uint64_t q = 0; q < queues; ++q) {
    // One queue uses the top-level keys even when the count was written.
    const std::string dir = queues == 1 ? frontend_dir : xen::XsJoin(frontend_dir, fmt::format("queue-{}", q));
    COWTAP_ASSIGN_OR_RETURN(QueueKeys qk, ReadQueue(read, dir, keys.ring_page_order));
    keys.queues.push_back(std::move(qk));
  }
  return keys;
}

}  // namespace cowtap::backend
