// libFuzzer target: the control socket's message decoders.
//
// Input: one message line as a client (DecodeRequest) or a daemon
// (DecodeReply) could send it; both decoders see every input. Checks what the
// server relies on: decoding never crashes or throws, a refused request
// always carries a code and a message, and an accepted message re-encodes to
// one line that decodes to the same thing (so what the server acted on is
// what it would report). Violations abort (libFuzzer reports them).
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <string>
#include <string_view>

#include "tools/daemon/control_protocol.h"

namespace cowtap::daemon {
namespace {

void Require(bool condition) {
  if (!condition) std::abort();
}

bool OneLine(const std::string& s) { return !s.empty() && s.find('\n') == s.size() - 1; }

void CheckRequest(std::string_view line) {
  ControlReply error;
  std::optional<ControlRequest> request = DecodeRequest(line, &error);
  if (!request) {
    Require(!error.ok && !error.code.empty() && !error.error.empty());
    Require(OneLine(EncodeReply(error)));
    return;
  }
  const std::string encoded = EncodeRequest(*request);
  Require(OneLine(encoded));
  ControlReply again_error;
  std::optional<ControlRequest> again = DecodeRequest(encoded, &again_error);
  Require(again.has_value());
  Require(EncodeRequest(*again) == encoded);
}

void CheckReply(std::string_view line) {
  Result<ControlReply> reply = DecodeReply(line);
  if (!reply.ok()) return;
  const std::string encoded = EncodeReply(*reply);
  Require(OneLine(encoded));
  Result<ControlReply> again = DecodeReply(encoded);
  Require(again.ok());
  Require(EncodeReply(*again) == encoded);
}

}  // namespace
}  // namespace cowtap::daemon

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  if (size > cowtap::daemon::kMaxControlRequestBytes) return 0;  // the server never decodes longer lines
  const std::string_view line(reinterpret_cast<const char*>(data), size);
  cowtap::daemon::CheckRequest(line);
  cowtap::daemon::CheckReply(line);
  return 0;
}
