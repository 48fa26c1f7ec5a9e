// SimFaults: the rule table behind the sim's injected faults (sim.h).
#include <string>

#include "xen-glue/sim.h"

namespace cowtap::xen {
namespace {

const char* PointName(SimFaultPoint point) {
  switch (point) {
    case SimFaultPoint::kGrantMap:
      return "grant map";
    case SimFaultPoint::kGrantUnmap:
      return "grant unmap";
    case SimFaultPoint::kEvtchnBind:
      return "event-channel bind";
    case SimFaultPoint::kEvtchnNotify:
      return "event-channel notify";
    case SimFaultPoint::kXsRead:
      return "xenstore read";
    case SimFaultPoint::kXsWrite:
      return "xenstore write";
  }
  return "?";
}

bool IsXenstore(SimFaultPoint point) { return point == SimFaultPoint::kXsRead || point == SimFaultPoint::kXsWrite; }

}  // namespace

void SimFaults::Set(SimFaultPoint point, SimFaultRule rule) {
  std::lock_guard lock(mu_);
  armed_[static_cast<size_t>(point)] = Armed{true, std::move(rule), 0};
}

void SimFaults::Clear(SimFaultPoint point) {
  std::lock_guard lock(mu_);
  armed_[static_cast<size_t>(point)] = Armed{};
}

void SimFaults::ClearAll() {
  std::lock_guard lock(mu_);
  armed_.fill(Armed{});
}

uint64_t SimFaults::fired(SimFaultPoint point) const {
  std::lock_guard lock(mu_);
  return fired_[static_cast<size_t>(point)];
}

Status SimFaults::Check(SimFaultPoint point, DomId domid, std::string_view path) {
  std::lock_guard lock(mu_);
  Armed& a = armed_[static_cast<size_t>(point)];
  if (!a.set) return Status::Ok();
  if (IsXenstore(point)) {
    if (path.find(a.rule.path_contains) == std::string_view::npos) return Status::Ok();
  } else if (a.rule.domid != kAnyDomain && a.rule.domid != domid) {
    return Status::Ok();
  }
  const uint64_t n = a.seen++;
  if (n < a.rule.skip) return Status::Ok();
  if (a.rule.count != kEveryCall && n - a.rule.skip >= a.rule.count) return Status::Ok();
  ++fired_[static_cast<size_t>(point)];
  std::string what = std::string("sim: injected ") + PointName(point) + " failure";
  if (IsXenstore(point)) {
    what += " on " + std::string(path);
  } else {
    what += " for domain " + std::to_string(domid);
  }
  return Status(a.rule.code, what);
}

}  // namespace cowtap::xen
