#include "backend/nbd_protocol.h"

#include <fmt/format.h>

#include <algorithm>

#include "base/checked_math.h"
#include "base/endian.h"

namespace cowtap::backend {
namespace {

void AppendBe16(std::vector<uint8_t>* out, uint16_t v) {
  const size_t at = out->size();
  out->resize(at + 2);
  StoreBe16(out->data() + at, v);
}
void AppendBe32(std::vector<uint8_t>* out, uint32_t v) {
  const size_t at = out->size();
  out->resize(at + 4);
  StoreBe32(out->data() + at, v);
}
void AppendBe64(std::vector<uint8_t>* out, uint64_t v) {
  const size_t at = out->size();
  out->resize(at + 8);
  StoreBe64(out->data() + at, v);
}
void AppendBytes(std::vector<uint8_t>* out, std::string_view s) { out->insert(out->end(), s.begin(), s.end()); }

void AppendOptionReply(std::vector<uint8_t>* out, uint32_t option, uint32_t reply_type,
                       std::span<const uint8_t> payload) {
  const std::vector<uint8_t> reply = EncodeNbdOptionReply(option, reply_type, payload);
  out->insert(out->end(), reply.begin(), reply.end());
}
void AppendOptionReply(std::vector<uint8_t>* out, uint32_t option, uint32_t reply_type, std::string_view message) {
  AppendOptionReply(out, option, reply_type,
                    std::span<const uint8_t>(reinterpret_cast<const uint8_t*>(message.data()), message.size()));
}

std::string_view CutString(std::string_view s) { return s.substr(0, std::min(s.size(), kNbdMaxStringBytes)); }

}  // namespace

uint16_t NbdTransmissionFlags(const NbdExportInfo& info, bool structured_replies) {
  uint16_t flags = kNbdFlagHasFlags;
  if (info.read_only) flags |= kNbdFlagReadOnly;
  if (info.flush) flags |= kNbdFlagSendFlush;
  if (info.flush && !info.read_only) flags |= kNbdFlagSendFua;
  if (info.trim && !info.read_only) flags |= kNbdFlagSendTrim;
  if (info.write_zeroes && !info.read_only) flags |= kNbdFlagSendWriteZeroes;
  // Every READ is answered with one chunk, so "do not fragment" always holds.
  if (structured_replies) flags |= kNbdFlagSendDf;
  if (info.multi_conn) flags |= kNbdFlagCanMultiConn;
  return flags;
}

std::array<uint8_t, kNbdGreetingBytes> EncodeNbdGreeting() {
  std::array<uint8_t, kNbdGreetingBytes> g;
  StoreBe64(g.data(), kNbdMagic);
  StoreBe64(g.data() + 8, kNbdOptionMagic);
  StoreBe16(g.data() + 16, kNbdFlagFixedNewstyle | kNbdFlagNoZeroes);
  return g;
}

Result<NbdOptionHeader> DecodeNbdOptionHeader(std::span<const uint8_t, kNbdOptionHeaderBytes> bytes) {
  const uint64_t magic = LoadBe64(bytes.data());
  if (magic != kNbdOptionMagic) {
    return Status::InvalidArgument(fmt::format("NBD option header has magic {:#x}, expected IHAVEOPT", magic));
  }
  NbdOptionHeader h;
  h.option = LoadBe32(bytes.data() + 8);
  h.length = LoadBe32(bytes.data() + 12);
  if (h.length > kNbdMaxOptionBytes) {
    return Status::InvalidArgument(
        fmt::format("NBD option {} carries {} bytes of data, more than the {} this server accepts", h.option, h.length,
                    kNbdMaxOptionBytes));
  }
  return h;
}

std::vector<uint8_t> EncodeNbdOptionReply(uint32_t option, uint32_t reply_type, std::span<const uint8_t> payload) {
  std::vector<uint8_t> out;
  out.reserve(20 + payload.size());
  AppendBe64(&out, kNbdOptionReplyMagic);
  AppendBe32(&out, option);
  AppendBe32(&out, reply_type);
  AppendBe32(&out, static_cast<uint32_t>(payload.size()));
  out.insert(out.end(), payload.begin(), payload.end());
  return out;
}

std::vector<uint8_t> EncodeNbdOptionReply(uint32_t option, uint32_t reply_type, std::string_view message) {
  message = CutString(message);
  return EncodeNbdOptionReply(
      option, reply_type, std::span<const uint8_t>(reinterpret_cast<const uint8_t*>(message.data()), message.size()));
}

Status NbdNegotiator::AcceptClientFlags(uint32_t client_flags) {
  const uint32_t known = kNbdFlagCFixedNewstyle | kNbdFlagCNoZeroes;
  if (client_flags & ~known) {
    return Status::InvalidArgument(
        fmt::format("NBD client flags {:#x} include bits this server did not offer", client_flags));
  }
  fixed_newstyle_ = client_flags & kNbdFlagCFixedNewstyle;
  no_zeroes_ = client_flags & kNbdFlagCNoZeroes;
  return Status::Ok();
}

NbdNegotiator::Outcome NbdNegotiator::HandleOption(uint32_t option, std::span<const uint8_t> data,
                                                   std::vector<uint8_t>* out) {
  if (option == kNbdOptExportName) {
    const std::string_view name(reinterpret_cast<const char*>(data.data()), data.size());
    // The only refusal this option allows is hanging up.
    if (!NameMatches(name)) return Outcome::kClose;
    AppendBe64(out, info_.size_bytes);
    AppendBe16(out, transmission_flags());
    if (!no_zeroes_) out->resize(out->size() + 124, 0);
    return Outcome::kTransmission;
  }
  // Without fixed newstyle the client cannot read option replies.
  if (!fixed_newstyle_) return Outcome::kClose;

  switch (option) {
    case kNbdOptAbort:
      AppendOptionReply(out, option, kNbdRepAck, std::string_view());
      return Outcome::kClose;
    case kNbdOptList: {
      if (!data.empty()) {
        AppendOptionReply(out, option, kNbdRepErrInvalid, "NBD_OPT_LIST carries no data");
        return Outcome::kContinue;
      }
      std::vector<uint8_t> server;
      AppendBe32(&server, static_cast<uint32_t>(info_.name.size()));
      AppendBytes(&server, info_.name);
      AppendOptionReply(out, option, kNbdRepServer, server);
      AppendOptionReply(out, option, kNbdRepAck, std::string_view());
      return Outcome::kContinue;
    }
    case kNbdOptStructuredReply:
      if (!data.empty()) {
        AppendOptionReply(out, option, kNbdRepErrInvalid, "NBD_OPT_STRUCTURED_REPLY carries no data");
        return Outcome::kContinue;
      }
      structured_replies_ = true;
      AppendOptionReply(out, option, kNbdRepAck, std::string_view());
      return Outcome::kContinue;
    case kNbdOptInfo:
    case kNbdOptGo:
      return HandleInfoOrGo(option, data, out);
    default:
      // STARTTLS, metadata contexts, extended headers and anything newer.
      AppendOptionReply(out, option, kNbdRepErrUnsup, fmt::format("option {} is not supported by cowtap", option));
      return Outcome::kContinue;
  }
}

NbdNegotiator::Outcome NbdNegotiator::HandleInfoOrGo(uint32_t option, std::span<const uint8_t> data,
                                                     std::vector<uint8_t>* out) {
  // u32 name length, name, u16 count, count x u16.
  if (data.size() < 6) {
    AppendOptionReply(out, option, kNbdRepErrInvalid, "NBD_OPT_INFO/GO data is shorter than 6 bytes");
    return Outcome::kContinue;
  }
  const uint32_t name_len = LoadBe32(data.data());
  if (name_len > kNbdMaxStringBytes || name_len > data.size() - 6) {
    AppendOptionReply(out, option, kNbdRepErrInvalid,
                      fmt::format("export name length {} does not fit the option's {} bytes", name_len, data.size()));
    return Outcome::kContinue;
  }
  const std::string_view name(reinterpret_cast<const char*>(data.data() + 4), name_len);
  const uint16_t count = LoadBe16(data.data() + 4 + name_len);
  const size_t rest = data.size() - 6 - name_len;
  if (rest != size_t{count} * 2) {
    AppendOptionReply(
        out, option, kNbdRepErrInvalid,
        fmt::format("{} information requests need {} bytes, the option has {}", count, size_t{count} * 2, rest));
    return Outcome::kContinue;
  }
  if (!NameMatches(name)) {
    AppendOptionReply(
        out, option, kNbdRepErrUnknown,
        fmt::format("no export named '{}' (this server exports '{}')", CutString(name).substr(0, 256), info_.name));
    return Outcome::kContinue;
  }
  bool want_name = false, want_description = false;
  const uint8_t* types = data.data() + 6 + name_len;
  for (uint16_t i = 0; i < count; ++i) {
    const uint16_t type = LoadBe16(types + 2 * i);
    want_name |= type == kNbdInfoName;
    want_description |= type == kNbdInfoDescription;
  }

  std::vector<uint8_t> block;
  AppendBe16(&block, kNbdInfoExport);
  AppendBe64(&block, info_.size_bytes);
  AppendBe16(&block, transmission_flags());
  AppendOptionReply(out, option, kNbdRepInfo, block);
  // Sent whether asked or not (the protocol allows it): clients that honour
  // it never send a READ/WRITE beyond max_block_bytes.
  block.clear();
  AppendBe16(&block, kNbdInfoBlockSize);
  AppendBe32(&block, info_.min_block_bytes);
  AppendBe32(&block, info_.preferred_block_bytes);
  AppendBe32(&block, info_.max_block_bytes);
  AppendOptionReply(out, option, kNbdRepInfo, block);
  if (want_name) {
    block.clear();
    AppendBe16(&block, kNbdInfoName);
    AppendBytes(&block, CutString(info_.name));
    AppendOptionReply(out, option, kNbdRepInfo, block);
  }
  if (want_description && !info_.description.empty()) {
    block.clear();
    AppendBe16(&block, kNbdInfoDescription);
    AppendBytes(&block, CutString(info_.description));
    AppendOptionReply(out, option, kNbdRepInfo, block);
  }
  AppendOptionReply(out, option, kNbdRepAck, std::string_view());
  return option == kNbdOptGo ? Outcome::kTransmission : Outcome::kContinue;
}

Result<NbdRequest> DecodeNbdRequest(std::span<const uint8_t, kNbdRequestBytes> bytes) {
  const uint32_t magic = LoadBe32(bytes.data());
  if (magic != kNbdRequestMagic) {
    return Status::InvalidArgument(fmt::format("NBD request has magic {:#x}, expected {:#x}", magic, kNbdRequestMagic));
  }
  NbdRequest r;
  r.flags = LoadBe16(bytes.data() + 4);
  r.type = LoadBe16(bytes.data() + 6);
  r.handle = LoadBe64(bytes.data() + 8);
  r.offset = LoadBe64(bytes.data() + 16);
  r.length = LoadBe32(bytes.data() + 24);
  return r;
}

NbdCheck CheckNbdRequest(const NbdRequest& r, const NbdTransmissionState& state) {
  const uint16_t tf = state.transmission_flags;
  const bool writes = r.type == kNbdCmdWrite || r.type == kNbdCmdTrim || r.type == kNbdCmdWriteZeroes;
  uint16_t allowed_flags = 0;
  switch (r.type) {
    case kNbdCmdRead:
      if (state.structured_replies) allowed_flags |= kNbdCmdFlagDf;
      break;
    case kNbdCmdWrite:
    case kNbdCmdTrim:
      if (tf & kNbdFlagSendFua) allowed_flags |= kNbdCmdFlagFua;
      break;
    case kNbdCmdWriteZeroes:
      if (tf & kNbdFlagSendFua) allowed_flags |= kNbdCmdFlagFua;
      allowed_flags |= kNbdCmdFlagNoHole;
      break;
    case kNbdCmdFlush:
      if (!(tf & kNbdFlagSendFlush)) return {kNbdEinval, "NBD_CMD_FLUSH was not advertised"};
      break;
    case kNbdCmdDisc:
      break;
    default:
      return {kNbdEinval, fmt::format("command {} is not supported", r.type)};
  }
  if (r.flags & ~allowed_flags) {
    return {kNbdEinval,
            fmt::format("{} with flags {:#x}: only {:#x} allowed", NbdCommandName(r.type), r.flags, allowed_flags)};
  }
  if (writes && (tf & kNbdFlagReadOnly)) return {kNbdEperm, "the export is read-only"};
  if (r.type == kNbdCmdTrim && !(tf & kNbdFlagSendTrim)) return {kNbdEinval, "NBD_CMD_TRIM was not advertised"};
  if (r.type == kNbdCmdWriteZeroes && !(tf & kNbdFlagSendWriteZeroes)) {
    return {kNbdEinval, "NBD_CMD_WRITE_ZEROES was not advertised"};
  }
  if (r.type == kNbdCmdFlush || r.type == kNbdCmdDisc) return {};
  if ((r.type == kNbdCmdRead || r.type == kNbdCmdWrite) && r.length > kNbdMaxPayloadBytes) {
    return {kNbdEoverflow, fmt::format("{} of {} bytes exceeds the maximum of {}", NbdCommandName(r.type), r.length,
                                       kNbdMaxPayloadBytes)};
  }
  if (!RangeWithin(r.offset, r.length, state.size_bytes)) {
    return {r.type == kNbdCmdWrite ? kNbdEnospc : kNbdEinval,
            fmt::format("{} of bytes [{}, +{}) is outside the export of {} bytes", NbdCommandName(r.type), r.offset,
                        r.length, state.size_bytes)};
  }
  return {};
}

uint32_t NbdErrorFromStatus(const Status& status) {
  switch (status.code()) {
    case ErrorCode::kOk:
      return 0;
    case ErrorCode::kInvalidArgument:
    case ErrorCode::kOutOfRange:
      return kNbdEinval;
    case ErrorCode::kNotSupported:
      return kNbdEnotsup;
    case ErrorCode::kNoSpace:
      return kNbdEnospc;
    case ErrorCode::kReadOnly:
      return kNbdEperm;
    case ErrorCode::kCancelled:
      return kNbdEshutdown;
    default:
      return kNbdEio;
  }
}

std::array<uint8_t, kNbdSimpleReplyBytes> EncodeNbdSimpleReply(uint64_t handle, uint32_t error) {
  std::array<uint8_t, kNbdSimpleReplyBytes> out;
  StoreBe32(out.data(), kNbdSimpleReplyMagic);
  StoreBe32(out.data() + 4, error);
  StoreBe64(out.data() + 8, handle);
  return out;
}

std::array<uint8_t, kNbdStructuredHeaderBytes> EncodeNbdStructuredHeader(uint16_t flags, uint16_t type, uint64_t handle,
                                                                         uint32_t payload_bytes) {
  std::array<uint8_t, kNbdStructuredHeaderBytes> out;
  StoreBe32(out.data(), kNbdStructuredReplyMagic);
  StoreBe16(out.data() + 4, flags);
  StoreBe16(out.data() + 6, type);
  StoreBe64(out.data() + 8, handle);
  StoreBe32(out.data() + 16, payload_bytes);
  return out;
}

std::vector<uint8_t> EncodeNbdReadChunkHeader(uint64_t handle, uint64_t offset, uint32_t length) {
  const auto header = EncodeNbdStructuredHeader(kNbdReplyFlagDone, kNbdReplyTypeOffsetData, handle, 8 + length);
  std::vector<uint8_t> out(header.begin(), header.end());
  AppendBe64(&out, offset);
  return out;
}

std::vector<uint8_t> EncodeNbdStructuredError(uint64_t handle, uint32_t error, std::string_view message) {
  message = CutString(message);
  const auto header = EncodeNbdStructuredHeader(kNbdReplyFlagDone, kNbdReplyTypeError, handle,
                                                static_cast<uint32_t>(6 + message.size()));
  std::vector<uint8_t> out(header.begin(), header.end());
  AppendBe32(&out, error);
  AppendBe16(&out, static_cast<uint16_t>(message.size()));
  AppendBytes(&out, message);
  return out;
}

std::array<uint8_t, kNbdStructuredHeaderBytes> EncodeNbdStructuredDone(uint64_t handle) {
  return EncodeNbdStructuredHeader(kNbdReplyFlagDone, kNbdReplyTypeNone, handle, 0);
}

std::string_view NbdCommandName(uint16_t type) {
  switch (type) {
    case kNbdCmdRead:
      return "NBD_CMD_READ";
    case kNbdCmdWrite:
      return "NBD_CMD_WRITE";
    case kNbdCmdDisc:
      return "NBD_CMD_DISC";
    case kNbdCmdFlush:
      return "NBD_CMD_FLUSH";
    case kNbdCmdTrim:
      return "NBD_CMD_TRIM";
    case kNbdCmdCache:
      return "NBD_CMD_CACHE";
    case kNbdCmdWriteZeroes:
      return "NBD_CMD_WRITE_ZEROES";
    case kNbdCmdBlockStatus:
      return "NBD_CMD_BLOCK_STATUS";
    default:
      return "NBD_CMD_(unknown)";
  }
}

}  // namespace cowtap::backend
