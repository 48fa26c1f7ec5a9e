// The control socket's wire format: one JSON object per message, each on its
// own line ('\n'-terminated), request then reply, in order, any number per
// connection.
//
// Requests (at most kMaxControlRequestBytes including the newline):
//   {"cmd":"list"}
//   {"cmd":"attach","domid":5,"devid":51712,"image":"/img/a.qcow2",
//    "format":"qcow2","read_only":false}          (format, read_only optional)
//   {"cmd":"detach"|"pause"|"resume","id":"5/51712"}
//   {"cmd":"stats"}  or  {"cmd":"stats","id":"5/51712"}
//   {"cmd":"set-log-level","level":"debug"}
//   {"cmd":"export","what":"5/51712","address":"unix:/run/x.sock","read_only":true}
//   {"cmd":"unexport","address":"unix:/run/x.sock"}
//   {"cmd":"offload","action":"on"|"off"|"status","what":"/img/a.qcow2"}
//                                         (what optional for status: every offload)
// Any request may carry "version":N; a version newer than ours is refused.
// Unknown keys are refused (a typo should not be silently ignored).
//
// Replies always carry "ok" and "version":
//   {"ok":true,"version":1}                              detach, pause, ...
//   {"ok":true,"version":1,"vbds":[{...},...]}           list, stats
//   {"ok":true,"version":1,"address":"tcp:127.0.0.1:10809"}   export
//   {"ok":true,"version":1,"offloads":[{"image":...,"device":"/dev/mapper/cowtap-a",
//    "segments":3,"linear_sectors":...,"reloads":...,...}]}     offload on, status
//   {"ok":false,"version":1,"code":"not_found","error":"<what, on what, what to do>"}
// Codes: the daemon's Status codes in snake case (invalid_argument,
// not_supported, corrupt, io_error, no_space, out_of_range, read_only,
// not_found, busy, internal, cancelled) and the protocol's own (parse_error,
// bad_request, unknown_command, unsupported_version, too_large,
// permission_denied, too_many_clients).
//
// Pure functions; thread-safe. Decoders never throw and never crash on any
// input (control_fuzz.cc checks it).
#pragma once

#include <cstddef>
#include <cstdint>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "base/status.h"
#include "tools/daemon/control.h"

namespace cowtap::daemon {

inline constexpr int kControlProtocolVersion = 1;
// A request line longer than this (newline included) gets a too_large reply
// and the connection is closed.
inline constexpr size_t kMaxControlRequestBytes = 64 * 1024;
// Replies (a list of many VBDs) may be longer; clients bound them by this.
inline constexpr size_t kMaxControlReplyBytes = 16 * 1024 * 1024;
// Where cowtapd listens unless told otherwise (COWTAP_CONTROL_SOCKET).
inline constexpr std::string_view kDefaultControlSocket = "/run/cowtap/cowtapd.sock";

// Protocol-level error codes (the others come from ErrorCode).
namespace wire {
inline constexpr std::string_view kParseError = "parse_error";
inline constexpr std::string_view kBadRequest = "bad_request";
inline constexpr std::string_view kUnknownCommand = "unknown_command";
inline constexpr std::string_view kUnsupportedVersion = "unsupported_version";
inline constexpr std::string_view kTooLarge = "too_large";
inline constexpr std::string_view kPermissionDenied = "permission_denied";
inline constexpr std::string_view kTooManyClients = "too_many_clients";
}  // namespace wire

enum class ControlCommand : uint8_t {
  kList,
  kAttach,
  kDetach,
  kPause,
  kResume,
  kStats,
  kSetLogLevel,
  kExport,
  kUnexport,
  kOffload,
};

enum class OffloadAction : uint8_t { kOn, kOff, kStatus };

// "list", "attach", ..., "set-log-level", ... as on the wire.
std::string_view ControlCommandName(ControlCommand cmd);

struct ControlRequest {
  ControlCommand cmd = ControlCommand::kList;
  std::string id;                                  // detach, pause, resume; stats ("" = every VBD)
  AttachSpec attach;                               // attach
  std::string level;                               // set-log-level
  std::string what;                                // export: a VBD id or an image path
  std::string address;                             // export, unexport
  bool read_only = false;                          // export
  OffloadAction offload = OffloadAction::kStatus;  // offload (what: the image, "" = all for status)
};

struct ControlReply {
  bool ok = false;
  int version = kControlProtocolVersion;
  std::string code;                       // when !ok
  std::string error;                      // when !ok: what failed, on what, what to do
  std::vector<VbdStatsSnapshot> vbds;     // list, stats
  std::string address;                    // export: the address bound
  std::vector<OffloadSnapshot> offloads;  // offload on, status
};

// The snake-case wire code of a Status ("not_found"); "" for OK.
std::string_view WireCode(ErrorCode code);

// A failed reply with the given code and message.
ControlReply ErrorReply(std::string_view code, std::string message);
// ok for an OK status, else the status's wire code and message.
ControlReply ReplyFromStatus(const Status& status);

// True if id has the form "<domid>/<devid>" (decimal, each fitting 32 bits).
bool IsVbdId(std::string_view id);

// One request line, '\n' included.
std::string EncodeRequest(const ControlRequest& request);
// Decodes one request line (without or with its '\n'). On failure returns
// nullopt and sets *error to the reply to send (parse_error, bad_request,
// unknown_command or unsupported_version, with a message naming the field).
std::optional<ControlRequest> DecodeRequest(std::string_view line, ControlReply* error);

// One reply line, '\n' included. Strings that are not valid UTF-8 (an image
// path, say) are encoded with U+FFFD in place of the bad bytes.
std::string EncodeReply(const ControlReply& reply);
// Decodes one reply line; kInvalidArgument if it is not a reply (not JSON,
// wrong types). Keys this version does not know are ignored, missing figures
// stay 0, so an older `cowtap ctl` can read a newer daemon's stats.
Result<ControlReply> DecodeReply(std::string_view line);

}  // namespace cowtap::daemon
