// The NBD wire protocol (newstyle fixed handshake and transmission phase), as
// pure codecs and checks with no I/O, so that the server (nbd_server.h) only
// moves bytes and every decision a client can influence is unit-tested and
// fuzzed (nbd_fuzz.cc).
//
// Protocol facts (NetworkBlockDevice doc/proto.md; all fields big-endian):
//   * Server greeting: "NBDMAGIC", "IHAVEOPT", u16 handshake flags
//     (FIXED_NEWSTYLE | NO_ZEROES). Client answers u32 client flags; unknown
//     bits mean the client speaks something else: hang up.
//   * Options: "IHAVEOPT", u32 option, u32 length, data. Replies:
//     0x3e889045565a9, u32 option, u32 reply type, u32 length, data. Error
//     replies have bit 31 set and may carry a message for a human.
//   * NBD_OPT_EXPORT_NAME ends negotiation without an option reply: u64 size,
//     u16 transmission flags, then 124 zero bytes unless NO_ZEROES was agreed.
//     An unknown name can only be refused by hanging up.
//   * NBD_OPT_INFO / NBD_OPT_GO: u32 name length, name, u16 count, u16 info
//     types. The server answers NBD_REP_INFO blocks (NBD_INFO_EXPORT always)
//     then NBD_REP_ACK; after GO's ACK the transmission phase begins.
//   * Requests: u32 0x25609513, u16 flags, u16 type, u64 handle, u64 offset,
//     u32 length, then length bytes for NBD_CMD_WRITE. Simple replies:
//     u32 0x67446698, u32 error, u64 handle (+ data for a successful READ).
//     Structured replies (after NBD_OPT_STRUCTURED_REPLY): u32 0x668e33ef,
//     u16 flags (DONE), u16 type, u64 handle, u32 length, payload; a READ
//     must then always be answered this way (OFFSET_DATA or ERROR chunks).
//
// Thread-safety: functions are pure; an NbdNegotiator belongs to one
// connection's thread.
#pragma once

#include <array>
#include <cstdint>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "base/status.h"

namespace cowtap::backend {

// --- magic numbers ---
inline constexpr uint64_t kNbdMagic = 0x4e42444d41474943;        // "NBDMAGIC"
inline constexpr uint64_t kNbdOptionMagic = 0x49484156454f5054;  // "IHAVEOPT"
inline constexpr uint64_t kNbdOptionReplyMagic = 0x0003e889045565a9;
inline constexpr uint32_t kNbdRequestMagic = 0x25609513;
inline constexpr uint32_t kNbdSimpleReplyMagic = 0x67446698;
inline constexpr uint32_t kNbdStructuredReplyMagic = 0x668e33ef;

// --- handshake flags (server) and client flags ---
inline constexpr uint16_t kNbdFlagFixedNewstyle = 1 << 0;
inline constexpr uint16_t kNbdFlagNoZeroes = 1 << 1;
inline constexpr uint32_t kNbdFlagCFixedNewstyle = 1 << 0;
inline constexpr uint32_t kNbdFlagCNoZeroes = 1 << 1;

// --- options ---
inline constexpr uint32_t kNbdOptExportName = 1;
inline constexpr uint32_t kNbdOptAbort = 2;
inline constexpr uint32_t kNbdOptList = 3;
inline constexpr uint32_t kNbdOptStartTls = 5;
inline constexpr uint32_t kNbdOptInfo = 6;
inline constexpr uint32_t kNbdOptGo = 7;
inline constexpr uint32_t kNbdOptStructuredReply = 8;
inline constexpr uint32_t kNbdOptListMetaContext = 9;
inline constexpr uint32_t kNbdOptSetMetaContext = 10;

// --- option reply types ---
inline constexpr uint32_t kNbdRepAck = 1;
inline constexpr uint32_t kNbdRepServer = 2;
inline constexpr uint32_t kNbdRepInfo = 3;
inline constexpr uint32_t kNbdRepErrUnsup = 0x80000001;
inline constexpr uint32_t kNbdRepErrPolicy = 0x80000002;
inline constexpr uint32_t kNbdRepErrInvalid = 0x80000003;
inline constexpr uint32_t kNbdRepErrUnknown = 0x80000006;

// --- NBD_REP_INFO types ---
inline constexpr uint16_t kNbdInfoExport = 0;
inline constexpr uint16_t kNbdInfoName = 1;
inline constexpr uint16_t kNbdInfoDescription = 2;
inline constexpr uint16_t kNbdInfoBlockSize = 3;

// --- transmission flags ---
inline constexpr uint16_t kNbdFlagHasFlags = 1 << 0;
inline constexpr uint16_t kNbdFlagReadOnly = 1 << 1;
inline constexpr uint16_t kNbdFlagSendFlush = 1 << 2;
inline constexpr uint16_t kNbdFlagSendFua = 1 << 3;
inline constexpr uint16_t kNbdFlagSendTrim = 1 << 5;
inline constexpr uint16_t kNbdFlagSendWriteZeroes = 1 << 6;
inline constexpr uint16_t kNbdFlagSendDf = 1 << 7;
inline constexpr uint16_t kNbdFlagCanMultiConn = 1 << 8;

// --- commands and command flags ---
inline constexpr uint16_t kNbdCmdRead = 0;
inline constexpr uint16_t kNbdCmdWrite = 1;
inline constexpr uint16_t kNbdCmdDisc = 2;
inline constexpr uint16_t kNbdCmdFlush = 3;
inline constexpr uint16_t kNbdCmdTrim = 4;
inline constexpr uint16_t kNbdCmdCache = 5;
inline constexpr uint16_t kNbdCmdWriteZeroes = 6;
inline constexpr uint16_t kNbdCmdBlockStatus = 7;
inline constexpr uint16_t kNbdCmdFlagFua = 1 << 0;
inline constexpr uint16_t kNbdCmdFlagNoHole = 1 << 1;
inline constexpr uint16_t kNbdCmdFlagDf = 1 << 2;

// --- error values (the protocol's own numbering, equal to Linux errno) ---
inline constexpr uint32_t kNbdEperm = 1;
inline constexpr uint32_t kNbdEio = 5;
inline constexpr uint32_t kNbdEnomem = 12;
inline constexpr uint32_t kNbdEinval = 22;
inline constexpr uint32_t kNbdEnospc = 28;
inline constexpr uint32_t kNbdEoverflow = 75;
inline constexpr uint32_t kNbdEnotsup = 95;
inline constexpr uint32_t kNbdEshutdown = 108;

// --- structured replies ---
inline constexpr uint16_t kNbdReplyFlagDone = 1 << 0;
inline constexpr uint16_t kNbdReplyTypeNone = 0;
inline constexpr uint16_t kNbdReplyTypeOffsetData = 1;
inline constexpr uint16_t kNbdReplyTypeError = 0x8001;

// --- sizes ---
inline constexpr size_t kNbdGreetingBytes = 18;
inline constexpr size_t kNbdOptionHeaderBytes = 16;
inline constexpr size_t kNbdRequestBytes = 28;
inline constexpr size_t kNbdSimpleReplyBytes = 16;
inline constexpr size_t kNbdStructuredHeaderBytes = 20;
// Largest READ/WRITE payload served (the protocol's interoperable maximum).
inline constexpr uint32_t kNbdMaxPayloadBytes = 32u << 20;
// Largest option data accepted; a longer option is a hostile client (names
// are at most 4096 bytes) and the connection is dropped without reading it.
inline constexpr uint32_t kNbdMaxOptionBytes = 64u << 10;
inline constexpr size_t kNbdMaxStringBytes = 4096;

// What the server exports, as the handshake describes it.
struct NbdExportInfo {
  std::string name;         // the export's name; "" (the default export) also selects it
  std::string description;  // NBD_INFO_DESCRIPTION, sent when asked and non-empty
  uint64_t size_bytes = 0;
  bool read_only = false;
  bool flush = true;         // NBD_CMD_FLUSH and FUA
  bool trim = false;         // NBD_CMD_TRIM
  bool write_zeroes = true;  // NBD_CMD_WRITE_ZEROES
  bool multi_conn = false;   // flush on one connection covers writes of all
  uint32_t min_block_bytes = 1;
  uint32_t preferred_block_bytes = 4096;
  uint32_t max_block_bytes = kNbdMaxPayloadBytes;
};

// The transmission flags for an export (SEND_DF only with structured replies).
uint16_t NbdTransmissionFlags(const NbdExportInfo& info, bool structured_replies);

// The server's first 18 bytes.
std::array<uint8_t, kNbdGreetingBytes> EncodeNbdGreeting();

struct NbdOptionHeader {
  uint32_t option = 0;
  uint32_t length = 0;
};
// Decodes an option header. kInvalidArgument if the magic is wrong or the
// data is longer than kNbdMaxOptionBytes; the caller then hangs up.
Result<NbdOptionHeader> DecodeNbdOptionHeader(std::span<const uint8_t, kNbdOptionHeaderBytes> bytes);

// An option reply with its payload.
std::vector<uint8_t> EncodeNbdOptionReply(uint32_t option, uint32_t reply_type, std::span<const uint8_t> payload);
std::vector<uint8_t> EncodeNbdOptionReply(uint32_t option, uint32_t reply_type, std::string_view message);

// The fixed newstyle handshake after the greeting, one option at a time.
// The caller reads the client flags and each option header and data, and
// sends what HandleOption appends to *out.
class NbdNegotiator {
 public:
  enum class Outcome {
    kContinue,      // read the next option
    kTransmission,  // send *out, then serve requests
    kClose,         // send *out (may be empty), then hang up
  };

  explicit NbdNegotiator(NbdExportInfo info) : info_(std::move(info)) {}

  // Takes the client's flags. kInvalidArgument for bits this server did not
  // offer (the protocol says to hang up).
  Status AcceptClientFlags(uint32_t client_flags);
  // Answers one option. `data` is the option's whole data (at most
  // kNbdMaxOptionBytes). Never fails: a malformed option gets an error reply.
  Outcome HandleOption(uint32_t option, std::span<const uint8_t> data, std::vector<uint8_t>* out);

  bool structured_replies() const { return structured_replies_; }
  // The flags sent when transmission began.
  uint16_t transmission_flags() const { return NbdTransmissionFlags(info_, structured_replies_); }
  const NbdExportInfo& info() const { return info_; }

 private:
  bool NameMatches(std::string_view name) const { return name.empty() || name == info_.name; }
  Outcome HandleInfoOrGo(uint32_t option, std::span<const uint8_t> data, std::vector<uint8_t>* out);

  NbdExportInfo info_;
  bool fixed_newstyle_ = false;
  bool no_zeroes_ = false;
  bool structured_replies_ = false;
};

// --- transmission phase ---

struct NbdRequest {
  uint16_t flags = 0;
  uint16_t type = 0;
  uint64_t handle = 0;
  uint64_t offset = 0;
  uint32_t length = 0;
};

// Decodes a request header. kInvalidArgument if the magic is wrong (the
// stream is out of step: hang up).
Result<NbdRequest> DecodeNbdRequest(std::span<const uint8_t, kNbdRequestBytes> bytes);
// The bytes that follow the header on the wire (WRITE's data).
inline uint32_t NbdPayloadBytes(const NbdRequest& r) { return r.type == kNbdCmdWrite ? r.length : 0; }

// What a request is checked against.
struct NbdTransmissionState {
  uint64_t size_bytes = 0;  // the device's size now
  uint16_t transmission_flags = 0;
  bool structured_replies = false;
};

struct NbdCheck {
  uint32_t error = 0;  // 0: serve it; else the NBD error to answer with
  std::string why;     // for the error message and the log
};
// Checks a request once, flat, before anything is allocated for it: known
// command, flags allowed for it and advertised, the export writable,
// READ/WRITE at most kNbdMaxPayloadBytes (EOVERFLOW), the range inside the
// export (ENOSPC for WRITE, EINVAL otherwise) without overflow.
NbdCheck CheckNbdRequest(const NbdRequest& request, const NbdTransmissionState& state);

// The NBD error for a failed BlockDevice operation.
uint32_t NbdErrorFromStatus(const Status& status);

// A simple reply header (data, if any, follows it).
std::array<uint8_t, kNbdSimpleReplyBytes> EncodeNbdSimpleReply(uint64_t handle, uint32_t error);
// A structured reply chunk header for a payload of payload_bytes.
std::array<uint8_t, kNbdStructuredHeaderBytes> EncodeNbdStructuredHeader(uint16_t flags, uint16_t type, uint64_t handle,
                                                                         uint32_t payload_bytes);
// The final chunk answering a READ of `length` bytes at `offset` with data:
// header + u64 offset; the data follows it. REQUIRES: length <= kNbdMaxPayloadBytes.
std::vector<uint8_t> EncodeNbdReadChunkHeader(uint64_t handle, uint64_t offset, uint32_t length);
// A final NBD_REPLY_TYPE_ERROR chunk with a message (cut to 4096 bytes).
std::vector<uint8_t> EncodeNbdStructuredError(uint64_t handle, uint32_t error, std::string_view message);
// A final NBD_REPLY_TYPE_NONE chunk (success with no payload).
std::array<uint8_t, kNbdStructuredHeaderBytes> EncodeNbdStructuredDone(uint64_t handle);

std::string_view NbdCommandName(uint16_t type);

}  // namespace cowtap::backend
