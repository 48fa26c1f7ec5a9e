// Logging set-up over spdlog, and a rate limiter for messages a guest or an
// image can trigger (so a hostile guest cannot flood dom0's logs).
//
// InitLogging is called once by a main before threads start. RateLimiter is
// thread-safe.
#pragma once

#include <spdlog/spdlog.h>

#include <atomic>
#include <chrono>
#include <cstdint>
#include <string_view>

namespace cowtap {

// Sets the default logger's level ("trace".."critical", "off") and pattern.
// Unknown level names fall back to "info".
void InitLogging(std::string_view level = "info");

// Allows at most `burst` events per `period`; Allow() says whether this one
// may be logged, and Suppressed() how many were dropped since the last allowed.
class RateLimiter {
 public:
  RateLimiter(uint32_t burst, std::chrono::milliseconds period) : burst_(burst), period_(period) {}
  bool Allow();
  uint64_t TakeSuppressed() { return suppressed_.exchange(0); }

 private:
  const uint32_t burst_;
  const std::chrono::milliseconds period_;
  std::atomic<int64_t> window_start_ms_{0};
  std::atomic<uint32_t> count_{0};
  std::atomic<uint64_t> suppressed_{0};
};

}  // namespace cowtap
