#include "tools/daemon/control_protocol.h"

#include <fmt/format.h>

#include <algorithm>
#include <array>
#include <charconv>
#include <cmath>
#include <limits>
#include <nlohmann/json.hpp>
#include <utility>

namespace cowtap::daemon {
namespace {

using Json = nlohmann::json;

// Longest latency histogram a reply may carry (2^63 us is beyond any clock).
constexpr size_t kMaxHistogramBuckets = 64;

struct CommandEntry {
  ControlCommand cmd;
  std::string_view name;
  // Keys the request may carry besides "cmd" and "version".
  std::array<std::string_view, 5> keys;
};

constexpr std::array<CommandEntry, 10> kCommands = {{
    {ControlCommand::kList, "list", {}},
    {ControlCommand::kAttach, "attach", {"domid", "devid", "image", "format", "read_only"}},
    {ControlCommand::kDetach, "detach", {"id"}},
    {ControlCommand::kPause, "pause", {"id"}},
    {ControlCommand::kResume, "resume", {"id"}},
    {ControlCommand::kStats, "stats", {"id"}},
    {ControlCommand::kSetLogLevel, "set-log-level", {"level"}},
    {ControlCommand::kExport, "export", {"what", "address", "read_only"}},
    {ControlCommand::kUnexport, "unexport", {"address"}},
    {ControlCommand::kOffload, "offload", {"action", "what"}},
}};

// At most this many offloads in one reply (one per image the daemon holds).
constexpr size_t kMaxOffloadsPerReply = 4096;

std::string_view OffloadActionName(OffloadAction a) {
  switch (a) {
    case OffloadAction::kOn:
      return "on";
    case OffloadAction::kOff:
      return "off";
    case OffloadAction::kStatus:
      return "status";
  }
  return "status";
}

// At most 64 bytes of text a client sent, for quoting it in a message.
std::string Quote(std::string_view text) {
  constexpr size_t kMax = 64;
  if (text.size() <= kMax) return fmt::format("'{}'", text);
  return fmt::format("'{}...'", text.substr(0, kMax));
}

std::string TypeName(const Json& v) { return v.type_name(); }

// Reads typed fields out of a request object; the first failure is kept.
class FieldReader {
 public:
  FieldReader(const Json& object, std::string_view cmd) : object_(object), cmd_(cmd) {}

  const std::string& error() const { return error_; }

  bool String(std::string_view key, bool required, std::string* out) {
    const Json* v = Find(key, required);
    if (!v) return error_.empty();
    if (!v->is_string()) return Fail(fmt::format("'{}' must be a string, not {}", key, TypeName(*v)));
    *out = v->get_ref<const std::string&>();
    return true;
  }

  bool Uint32(std::string_view key, bool required, uint32_t* out) {
    const Json* v = Find(key, required);
    if (!v) return error_.empty();
    if (!v->is_number_unsigned() || v->get<uint64_t>() > std::numeric_limits<uint32_t>::max()) {
      return Fail(fmt::format("'{}' must be an integer from 0 to 4294967295, not {}", key, v->dump()));
    }
    *out = static_cast<uint32_t>(v->get<uint64_t>());
    return true;
  }

  bool Bool(std::string_view key, bool* out) {
    const Json* v = Find(key, /*required=*/false);
    if (!v) return error_.empty();
    if (!v->is_boolean()) return Fail(fmt::format("'{}' must be true or false, not {}", key, TypeName(*v)));
    *out = v->get<bool>();
    return true;
  }

  bool Fail(std::string message) {
    if (error_.empty()) error_ = fmt::format("bad '{}' request: {}", cmd_, message);
    return false;
  }

 private:
  const Json* Find(std::string_view key, bool required) {
    auto it = object_.find(key);
    if (it == object_.end()) {
      if (required) Fail(fmt::format("'{}' is missing", key));
      return nullptr;
    }
    return &*it;
  }

  const Json& object_;
  const std::string_view cmd_;
  std::string error_;
};

std::optional<ControlRequest> Refuse(ControlReply* error, std::string_view code, std::string message) {
  *error = ErrorReply(code, std::move(message));
  return std::nullopt;
}

bool ReadId(FieldReader& r, bool required, std::string* id) {
  if (!r.String("id", required, id)) return false;
  if ((required || !id->empty()) && !IsVbdId(*id)) {
    return r.Fail(
        fmt::format("VBD id {} is not <domid>/<devid> (e.g. 5/51712); 'cowtap ctl list' shows them", Quote(*id)));
  }
  return true;
}

Json StatsToJson(const VbdStatsSnapshot& s) {
  Json j = Json::object();
  j["id"] = s.id;
  j["image"] = s.image;
  j["format"] = s.format;
  j["state"] = s.state;
  j["paused"] = s.paused;
  j["reads"] = s.reads;
  j["writes"] = s.writes;
  j["flushes"] = s.flushes;
  j["discards"] = s.discards;
  j["errors"] = s.errors;
  j["bytes_read"] = s.bytes_read;
  j["bytes_written"] = s.bytes_written;
  j["queues"] = s.queues;
  j["queue_depth"] = s.queue_depth;
  j["latency_us_log2"] = s.latency_us_log2;
  j["remap_lookups"] = s.remap_lookups;
  j["remap_hits"] = s.remap_hits;
  // JSON has no NaN or infinity (nlohmann would write null).
  j["remap_mean_probe"] = std::isfinite(s.remap_mean_probe) ? s.remap_mean_probe : 0.0;
  j["fast_path_ios"] = s.fast_path_ios;
  j["slow_path_ios"] = s.slow_path_ios;
  j["allocations"] = s.allocations;
  j["memory_bytes"] = s.memory_bytes;
  j["leaked_pages"] = s.leaked_pages;
  j["notify_failures"] = s.notify_failures;
  return j;
}

Json OffloadToJson(const OffloadSnapshot& s) {
  Json j = Json::object();
  j["image"] = s.image;
  j["device"] = s.device;
  j["size_sectors"] = s.size_sectors;
  j["segments"] = s.segments;
  j["linear_sectors"] = s.linear_sectors;
  j["reloads"] = s.reloads;
  j["reload_time_us"] = s.reload_time_us;
  j["revokes"] = s.revokes;
  j["primed_clusters"] = s.primed_clusters;
  j["miss_requests"] = s.miss_requests;
  j["miss_bytes_read"] = s.miss_bytes_read;
  j["miss_bytes_written"] = s.miss_bytes_written;
  j["zeroes_in_place"] = s.zeroes_in_place;
  j["zeroes_to_engine"] = s.zeroes_to_engine;
  j["device_io_known"] = s.device_io_known;
  j["device_sectors_read"] = s.device_sectors_read;
  j["device_sectors_written"] = s.device_sectors_written;
  return j;
}

// Typed reads of an optional key of a reply object.
bool GetU64(const Json& o, const char* key, uint64_t* out, std::string* error) {
  auto it = o.find(key);
  if (it == o.end()) return true;
  if (!it->is_number_unsigned()) {
    *error = fmt::format("'{}' is {}, not an unsigned integer", key, TypeName(*it));
    return false;
  }
  *out = it->get<uint64_t>();
  return true;
}

bool GetU32(const Json& o, const char* key, uint32_t* out, std::string* error) {
  uint64_t v = *out;
  if (!GetU64(o, key, &v, error)) return false;
  if (v > std::numeric_limits<uint32_t>::max()) {
    *error = fmt::format("'{}' = {} does not fit 32 bits", key, v);
    return false;
  }
  *out = static_cast<uint32_t>(v);
  return true;
}

bool GetString(const Json& o, const char* key, std::string* out, std::string* error) {
  auto it = o.find(key);
  if (it == o.end()) return true;
  if (!it->is_string()) {
    *error = fmt::format("'{}' is {}, not a string", key, TypeName(*it));
    return false;
  }
  *out = it->get_ref<const std::string&>();
  return true;
}

bool GetBool(const Json& o, const char* key, bool* out, std::string* error) {
  auto it = o.find(key);
  if (it == o.end()) return true;
  if (!it->is_boolean()) {
    *error = fmt::format("'{}' is {}, not a boolean", key, TypeName(*it));
    return false;
  }
  *out = it->get<bool>();
  return true;
}

bool StatsFromJson(const Json& j, VbdStatsSnapshot* s, std::string* error) {
  if (!j.is_object()) {
    *error = fmt::format("a VBD entry is {}, not an object", TypeName(j));
    return false;
  }
  bool ok = GetString(j, "id", &s->id, error) && GetString(j, "image", &s->image, error) &&
            GetString(j, "format", &s->format, error) && GetString(j, "state", &s->state, error) &&
            GetBool(j, "paused", &s->paused, error) && GetU64(j, "reads", &s->reads, error) &&
            GetU64(j, "writes", &s->writes, error) && GetU64(j, "flushes", &s->flushes, error) &&
            GetU64(j, "discards", &s->discards, error) && GetU64(j, "errors", &s->errors, error) &&
            GetU64(j, "bytes_read", &s->bytes_read, error) && GetU64(j, "bytes_written", &s->bytes_written, error) &&
            GetU32(j, "queues", &s->queues, error) && GetU32(j, "queue_depth", &s->queue_depth, error) &&
            GetU64(j, "remap_lookups", &s->remap_lookups, error) && GetU64(j, "remap_hits", &s->remap_hits, error) &&
            GetU64(j, "fast_path_ios", &s->fast_path_ios, error) &&
            GetU64(j, "slow_path_ios", &s->slow_path_ios, error) && GetU64(j, "allocations", &s->allocations, error) &&
            GetU64(j, "memory_bytes", &s->memory_bytes, error) && GetU64(j, "leaked_pages", &s->leaked_pages, error) &&
            GetU64(j, "notify_failures", &s->notify_failures, error);
  if (!ok) return false;
  if (auto it = j.find("remap_mean_probe"); it != j.end()) {
    if (!it->is_number()) {
      *error = fmt::format("'remap_mean_probe' is {}, not a number", TypeName(*it));
      return false;
    }
    s->remap_mean_probe = it->get<double>();
  }
  if (auto it = j.find("latency_us_log2"); it != j.end()) {
    if (!it->is_array() || it->size() > kMaxHistogramBuckets) {
      *error = fmt::format("'latency_us_log2' must be an array of at most {} counts", kMaxHistogramBuckets);
      return false;
    }
    s->latency_us_log2.clear();
    for (const Json& bucket : *it) {
      if (!bucket.is_number_unsigned()) {
        *error = fmt::format("'latency_us_log2' holds {}, not a count", TypeName(bucket));
        return false;
      }
      s->latency_us_log2.push_back(bucket.get<uint64_t>());
    }
  }
  return true;
}

bool OffloadFromJson(const Json& j, OffloadSnapshot* s, std::string* error) {
  if (!j.is_object()) {
    *error = fmt::format("an offload entry is {}, not an object", TypeName(j));
    return false;
  }
  return GetString(j, "image", &s->image, error) && GetString(j, "device", &s->device, error) &&
         GetU64(j, "size_sectors", &s->size_sectors, error) && GetU64(j, "segments", &s->segments, error) &&
         GetU64(j, "linear_sectors", &s->linear_sectors, error) && GetU64(j, "reloads", &s->reloads, error) &&
         GetU64(j, "reload_time_us", &s->reload_time_us, error) && GetU64(j, "revokes", &s->revokes, error) &&
         GetU64(j, "primed_clusters", &s->primed_clusters, error) &&
         GetU64(j, "miss_requests", &s->miss_requests, error) &&
         GetU64(j, "miss_bytes_read", &s->miss_bytes_read, error) &&
         GetU64(j, "miss_bytes_written", &s->miss_bytes_written, error) &&
         GetU64(j, "zeroes_in_place", &s->zeroes_in_place, error) &&
         GetU64(j, "zeroes_to_engine", &s->zeroes_to_engine, error) &&
         GetBool(j, "device_io_known", &s->device_io_known, error) &&
         GetU64(j, "device_sectors_read", &s->device_sectors_read, error) &&
         GetU64(j, "device_sectors_written", &s->device_sectors_written, error);
}

// Parses one line into a JSON value; message on failure.
std::optional<Json> ParseLine(std::string_view line, std::string* error) {
  if (!line.empty() && line.back() == '\n') line.remove_suffix(1);
  if (!line.empty() && line.back() == '\r') line.remove_suffix(1);
  try {
    return Json::parse(line.begin(), line.end());
  } catch (const Json::exception& e) {
    *error = e.what();
    return std::nullopt;
  }
}

std::string Dump(const Json& j) {
  return j.dump(-1, ' ', /*ensure_ascii=*/false, Json::error_handler_t::replace) + "\n";
}

}  // namespace

double OffloadLinearFraction(const OffloadSnapshot& s) {
  if (s.size_sectors == 0) return 0;
  return std::min(1.0, static_cast<double>(s.linear_sectors) / static_cast<double>(s.size_sectors));
}

double OffloadKernelFraction(const OffloadSnapshot& s) {
  const double device_bytes = 512.0 * static_cast<double>(s.device_sectors_read + s.device_sectors_written);
  if (!s.device_io_known || device_bytes <= 0) return -1;
  const double miss_bytes = static_cast<double>(s.miss_bytes_read + s.miss_bytes_written);
  return std::clamp(1.0 - miss_bytes / device_bytes, 0.0, 1.0);
}

std::string_view ControlCommandName(ControlCommand cmd) {
  for (const auto& e : kCommands)
    if (e.cmd == cmd) return e.name;
  return "?";
}

std::string_view WireCode(ErrorCode code) {
  switch (code) {
    case ErrorCode::kOk:
      return "";
    case ErrorCode::kInvalidArgument:
      return "invalid_argument";
    case ErrorCode::kNotSupported:
      return "not_supported";
    case ErrorCode::kCorrupt:
      return "corrupt";
    case ErrorCode::kIoError:
      return "io_error";
    case ErrorCode::kNoSpace:
      return "no_space";
    case ErrorCode::kOutOfRange:
      return "out_of_range";
    case ErrorCode::kReadOnly:
      return "read_only";
    case ErrorCode::kNotFound:
      return "not_found";
    case ErrorCode::kBusy:
      return "busy";
    case ErrorCode::kInternal:
      return "internal";
    case ErrorCode::kCancelled:
      return "cancelled";
  }
  return "internal";
}

ControlReply ErrorReply(std::string_view code, std::string message) {
  ControlReply r;
  r.ok = false;
  r.code = std::string(code);
  r.error = std::move(message);
  return r;
}

ControlReply ReplyFromStatus(const Status& status) {
  if (status.ok()) {
    ControlReply r;
    r.ok = true;
    return r;
  }
  std::string message = status.message().empty() ? std::string(ErrorCodeName(status.code())) : status.message();
  return ErrorReply(WireCode(status.code()), std::move(message));
}

bool IsVbdId(std::string_view id) {
  const size_t slash = id.find('/');
  if (slash == std::string_view::npos) return false;
  auto number = [](std::string_view s) {
    if (s.empty() || s.size() > 10) return false;
    uint32_t v = 0;
    auto [end, ec] = std::from_chars(s.data(), s.data() + s.size(), v);
    return ec == std::errc() && end == s.data() + s.size();
  };
  return number(id.substr(0, slash)) && number(id.substr(slash + 1));
}

std::string EncodeRequest(const ControlRequest& request) {
  Json j = Json::object();
  j["cmd"] = std::string(ControlCommandName(request.cmd));
  switch (request.cmd) {
    case ControlCommand::kList:
      break;
    case ControlCommand::kAttach:
      j["domid"] = request.attach.domid;
      j["devid"] = request.attach.devid;
      j["image"] = request.attach.image;
      if (!request.attach.format.empty()) j["format"] = request.attach.format;
      j["read_only"] = !request.attach.writable;
      break;
    case ControlCommand::kDetach:
    case ControlCommand::kPause:
    case ControlCommand::kResume:
      j["id"] = request.id;
      break;
    case ControlCommand::kStats:
      if (!request.id.empty()) j["id"] = request.id;
      break;
    case ControlCommand::kSetLogLevel:
      j["level"] = request.level;
      break;
    case ControlCommand::kExport:
      j["what"] = request.what;
      j["address"] = request.address;
      j["read_only"] = request.read_only;
      break;
    case ControlCommand::kUnexport:
      j["address"] = request.address;
      break;
    case ControlCommand::kOffload:
      j["action"] = std::string(OffloadActionName(request.offload));
      if (!request.what.empty()) j["what"] = request.what;
      break;
  }
  return Dump(j);
}

std::optional<ControlRequest> DecodeRequest(std::string_view line, ControlReply* error) {
  std::string parse_error;
  std::optional<Json> parsed = ParseLine(line, &parse_error);
  if (!parsed) {
    return Refuse(error, wire::kParseError,
                  fmt::format("the request is not valid JSON ({}); send one JSON object per line", parse_error));
  }
  const Json& j = *parsed;
  if (!j.is_object()) {
    return Refuse(error, wire::kBadRequest,
                  fmt::format("the request is {}, not a JSON object like {{\"cmd\":\"list\"}}", TypeName(j)));
  }
  if (auto v = j.find("version"); v != j.end()) {
    if (!v->is_number_unsigned() || v->get<uint64_t>() == 0) {
      return Refuse(error, wire::kBadRequest, fmt::format("'version' must be a positive integer, not {}", v->dump()));
    }
    if (v->get<uint64_t>() > static_cast<uint64_t>(kControlProtocolVersion)) {
      return Refuse(error, wire::kUnsupportedVersion,
                    fmt::format("this cowtapd speaks control protocol version {}, the request wants {}; "
                                "use a cowtap ctl as old as the daemon or upgrade the daemon",
                                kControlProtocolVersion, v->get<uint64_t>()));
    }
  }
  auto c = j.find("cmd");
  if (c == j.end()) return Refuse(error, wire::kBadRequest, "the request has no 'cmd' (e.g. {\"cmd\":\"list\"})");
  if (!c->is_string()) {
    return Refuse(error, wire::kBadRequest, fmt::format("'cmd' must be a string, not {}", TypeName(*c)));
  }
  const std::string& name = c->get_ref<const std::string&>();
  const CommandEntry* entry = nullptr;
  for (const auto& e : kCommands)
    if (e.name == name) entry = &e;
  if (!entry) {
    return Refuse(error, wire::kUnknownCommand,
                  fmt::format("unknown command {}; known: list, attach, detach, pause, resume, stats, "
                              "set-log-level, export, unexport, offload",
                              Quote(name)));
  }

  FieldReader r(j, entry->name);
  for (const auto& [key, value] : j.items()) {
    if (key == "cmd" || key == "version") continue;
    bool known = false;
    for (std::string_view k : entry->keys) known = known || (!k.empty() && k == key);
    if (!known) r.Fail(fmt::format("unknown key {}", Quote(key)));
  }

  ControlRequest req;
  req.cmd = entry->cmd;
  switch (req.cmd) {
    case ControlCommand::kList:
      break;
    case ControlCommand::kAttach: {
      bool read_only = false;
      r.Uint32("domid", true, &req.attach.domid) && r.Uint32("devid", true, &req.attach.devid) &&
          r.String("image", true, &req.attach.image) && r.String("format", false, &req.attach.format) &&
          r.Bool("read_only", &read_only);
      req.attach.writable = !read_only;
      if (r.error().empty() && req.attach.image.empty()) r.Fail("'image' is empty; give the path of the top image");
      const std::string& f = req.attach.format;
      if (r.error().empty() && !f.empty() && f != "qcow2" && f != "qcow" && f != "raw") {
        r.Fail(fmt::format("format {} is not qcow2, qcow or raw (omit it to probe the image)", Quote(f)));
      }
      break;
    }
    case ControlCommand::kDetach:
    case ControlCommand::kPause:
    case ControlCommand::kResume:
      ReadId(r, /*required=*/true, &req.id);
      break;
    case ControlCommand::kStats:
      ReadId(r, /*required=*/false, &req.id);
      break;
    case ControlCommand::kSetLogLevel:
      r.String("level", true, &req.level);
      break;
    case ControlCommand::kExport:
      r.String("what", true, &req.what) && r.String("address", true, &req.address) &&
          r.Bool("read_only", &req.read_only);
      if (r.error().empty() && req.what.empty()) r.Fail("'what' is empty; give a VBD id or an image path");
      if (r.error().empty() && req.address.empty()) r.Fail("'address' is empty; give unix:/path or tcp:127.0.0.1:port");
      break;
    case ControlCommand::kUnexport:
      r.String("address", true, &req.address);
      if (r.error().empty() && req.address.empty()) r.Fail("'address' is empty; give the address export returned");
      break;
    case ControlCommand::kOffload: {
      std::string action;
      r.String("action", true, &action) && r.String("what", false, &req.what);
      if (!r.error().empty()) break;
      if (action == "on") {
        req.offload = OffloadAction::kOn;
      } else if (action == "off") {
        req.offload = OffloadAction::kOff;
      } else if (action == "status") {
        req.offload = OffloadAction::kStatus;
      } else {
        r.Fail(fmt::format("action {} is not on, off or status", Quote(action)));
        break;
      }
      if (req.offload != OffloadAction::kStatus && req.what.empty()) {
        r.Fail(fmt::format("offload {} needs 'what', the image path", action));
      }
      break;
    }
  }
  if (!r.error().empty()) return Refuse(error, wire::kBadRequest, r.error());
  return req;
}

std::string EncodeReply(const ControlReply& reply) {
  Json j = Json::object();
  j["ok"] = reply.ok;
  j["version"] = reply.version;
  if (!reply.ok) {
    j["code"] = reply.code;
    j["error"] = reply.error;
  }
  if (!reply.vbds.empty()) {
    Json vbds = Json::array();
    for (const auto& s : reply.vbds) vbds.push_back(StatsToJson(s));
    j["vbds"] = std::move(vbds);
  }
  if (!reply.address.empty()) j["address"] = reply.address;
  if (!reply.offloads.empty()) {
    Json offloads = Json::array();
    for (const auto& o : reply.offloads) offloads.push_back(OffloadToJson(o));
    j["offloads"] = std::move(offloads);
  }
  return Dump(j);
}

Result<ControlReply> DecodeReply(std::string_view line) {
  std::string error;
  std::optional<Json> parsed = ParseLine(line, &error);
  if (!parsed) return Status::InvalidArgument(fmt::format("the daemon's reply is not valid JSON: {}", error));
  const Json& j = *parsed;
  auto bad = [](std::string_view what) {
    return Status::InvalidArgument(fmt::format("the daemon's reply is not a control reply: {}", what));
  };
  if (!j.is_object()) return bad(fmt::format("it is {}, not an object", TypeName(j)));
  auto ok = j.find("ok");
  if (ok == j.end() || !ok->is_boolean()) return bad("'ok' is missing or not a boolean");
  ControlReply r;
  r.ok = ok->get<bool>();
  uint32_t version = 0;
  if (!GetU32(j, "version", &version, &error)) return bad(error);
  if (version > static_cast<uint32_t>(std::numeric_limits<int>::max())) return bad("'version' is out of range");
  r.version = static_cast<int>(version);
  if (!GetString(j, "code", &r.code, &error) || !GetString(j, "error", &r.error, &error) ||
      !GetString(j, "address", &r.address, &error)) {
    return bad(error);
  }
  if (!r.ok && r.code.empty()) return bad("a failed reply has no 'code'");
  if (auto v = j.find("vbds"); v != j.end()) {
    if (!v->is_array()) return bad(fmt::format("'vbds' is {}, not an array", TypeName(*v)));
    for (const Json& entry : *v) {
      VbdStatsSnapshot s;
      if (!StatsFromJson(entry, &s, &error)) return bad(error);
      r.vbds.push_back(std::move(s));
    }
  }
  if (auto v = j.find("offloads"); v != j.end()) {
    if (!v->is_array() || v->size() > kMaxOffloadsPerReply) {
      return bad(fmt::format("'offloads' must be an array of at most {} entries", kMaxOffloadsPerReply));
    }
    for (const Json& entry : *v) {
      OffloadSnapshot o;
      if (!OffloadFromJson(entry, &o, &error)) return bad(error);
      r.offloads.push_back(std::move(o));
    }
  }
  return r;
}

}  // namespace cowtap::daemon
