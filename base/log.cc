#include "base/log.h"

#include <spdlog/sinks/stdout_color_sinks.h>

#include <string>

namespace cowtap {

void InitLogging(std::string_view level) {
  auto logger = spdlog::stderr_color_mt("cowtap");
  spdlog::set_default_logger(logger);
  auto lvl = spdlog::level::from_str(std::string(level));
  if (lvl == spdlog::level::off && level != "off") lvl = spdlog::level::info;
  spdlog::set_level(lvl);
  spdlog::set_pattern("%Y-%m-%dT%H:%M:%S.%e %^%l%$ %v");
}

bool RateLimiter::Allow() {
  const int64_t now = std::chrono::duration_cast<std::chrono::milliseconds>(
                          std::chrono::steady_clock::now().time_since_epoch())
                          .count();
  int64_t start = window_start_ms_.load(std::memory_order_relaxed);
  if (now - start >= period_.count()) {
    if (window_start_ms_.compare_exchange_strong(start, now)) count_.store(0);
  }
  if (count_.fetch_add(1) < burst_) return true;
  suppressed_.fetch_add(1);
  return false;
}

}  // namespace cowtap
