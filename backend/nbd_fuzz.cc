// libFuzzer target: the NBD handshake (option parser) and the request
// decoder/checker, driven over one byte stream the way the server reads it.
//
// Input: byte 0 picks the export's properties (bit 0 read-only, bit 1 trim,
// bit 2 write-zeroes, bit 3 flush, bit 4 multi-conn), bytes 1..8 its size
// (big-endian), bytes 9..12 the client flags; then options (16-byte header +
// data) until one starts transmission or closes; then 28-byte requests, each
// WRITE followed by its data. Checks what the server relies on: every option
// is answered by well-formed replies naming that option (or by EXPORT_NAME's
// fixed reply), and an accepted request lies inside the export and within
// the payload limit. Violations abort (libFuzzer reports them).
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <span>
#include <vector>

#include "backend/nbd_protocol.h"
#include "base/checked_math.h"
#include "base/endian.h"

namespace cowtap::backend {
namespace {

void Require(bool condition) {
  if (!condition) std::abort();
}

// Every byte of out must be option replies for `option`.
void CheckOptionReplies(uint32_t option, const std::vector<uint8_t>& out) {
  size_t at = 0;
  while (at < out.size()) {
    Require(out.size() - at >= 20);
    Require(LoadBe64(&out[at]) == kNbdOptionReplyMagic);
    Require(LoadBe32(&out[at + 8]) == option);
    const uint32_t len = LoadBe32(&out[at + 16]);
    Require(len <= out.size() - at - 20);
    Require(len <= 8 + 2 * kNbdMaxStringBytes);
    at += 20 + len;
  }
}

class Stream {
 public:
  Stream(const uint8_t* data, size_t size) : data_(data), size_(size) {}
  bool Take(size_t n, std::span<const uint8_t>* out) {
    if (size_ - at_ < n) return false;
    *out = std::span<const uint8_t>(data_ + at_, n);
    at_ += n;
    return true;
  }
  void Skip(uint64_t n) { at_ += static_cast<size_t>(std::min<uint64_t>(n, size_ - at_)); }

 private:
  const uint8_t* data_;
  size_t size_;
  size_t at_ = 0;
};

}  // namespace
}  // namespace cowtap::backend

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  using namespace cowtap;
  using namespace cowtap::backend;
  Stream in(data, size);
  std::span<const uint8_t> b;
  if (!in.Take(13, &b)) return 0;
  NbdExportInfo info;
  info.name = "disk";
  info.read_only = b[0] & 1;
  info.trim = b[0] & 2;
  info.write_zeroes = b[0] & 4;
  info.flush = b[0] & 8;
  info.multi_conn = b[0] & 16;
  info.size_bytes = LoadBe64(b.data() + 1);
  NbdNegotiator negotiator(info);
  if (!negotiator.AcceptClientFlags(LoadBe32(b.data() + 9)).ok()) return 0;

  std::vector<uint8_t> out;
  while (true) {
    if (!in.Take(kNbdOptionHeaderBytes, &b)) return 0;
    Result<NbdOptionHeader> h = DecodeNbdOptionHeader(b.first<kNbdOptionHeaderBytes>());
    if (!h.ok()) return 0;
    Require(h->length <= kNbdMaxOptionBytes);
    if (!in.Take(h->length, &b)) return 0;
    out.clear();
    const NbdNegotiator::Outcome outcome = negotiator.HandleOption(h->option, b, &out);
    if (h->option == kNbdOptExportName) {
      Require(outcome != NbdNegotiator::Outcome::kContinue);
      Require(outcome == NbdNegotiator::Outcome::kClose ? out.empty() : (out.size() == 10 || out.size() == 134));
    } else {
      CheckOptionReplies(h->option, out);
    }
    if (outcome == NbdNegotiator::Outcome::kClose) return 0;
    if (outcome == NbdNegotiator::Outcome::kTransmission) break;
  }

  NbdTransmissionState state;
  state.size_bytes = info.size_bytes;
  state.transmission_flags = negotiator.transmission_flags();
  state.structured_replies = negotiator.structured_replies();
  Require(state.transmission_flags & kNbdFlagHasFlags);
  while (in.Take(kNbdRequestBytes, &b)) {
    Result<NbdRequest> r = DecodeNbdRequest(b.first<kNbdRequestBytes>());
    if (!r.ok()) return 0;
    if (r->type == kNbdCmdDisc) return 0;
    const NbdCheck check = CheckNbdRequest(*r, state);
    if (check.error == 0) {
      const bool writes = r->type == kNbdCmdWrite || r->type == kNbdCmdTrim || r->type == kNbdCmdWriteZeroes;
      Require(!writes || !(state.transmission_flags & kNbdFlagReadOnly));
      if (r->type != kNbdCmdFlush) Require(RangeWithin(r->offset, r->length, state.size_bytes));
      if (r->type == kNbdCmdRead || r->type == kNbdCmdWrite) Require(r->length <= kNbdMaxPayloadBytes);
      Require(r->type <= kNbdCmdWriteZeroes && r->type != kNbdCmdCache);
    } else {
      Require(!check.why.empty());
      if (state.structured_replies) {
        const std::vector<uint8_t> e = EncodeNbdStructuredError(r->handle, check.error, check.why);
        Require(LoadBe32(e.data() + 16) == e.size() - kNbdStructuredHeaderBytes);
      }
    }
    in.Skip(NbdPayloadBytes(*r));
  }
  return 0;
}
