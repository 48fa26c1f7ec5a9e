#include "base/iovec.h"

#include <cstring>

namespace cowtap {
namespace {

// Calls fn(base, len) for each piece of iov covering [offset, offset + length).
template <typename Fn>
void ForEachPiece(IoVecs iov, size_t offset, size_t length, Fn fn) {
  for (const iovec& v : iov) {
    if (length == 0) return;
    if (offset >= v.iov_len) {
      offset -= v.iov_len;
      continue;
    }
    size_t n = v.iov_len - offset;
    if (n > length) n = length;
    fn(static_cast<uint8_t*>(v.iov_base) + offset, n);
    length -= n;
    offset = 0;
  }
}

}  // namespace

size_t TotalLength(IoVecs iov) {
  size_t n = 0;
  for (const iovec& v : iov) n += v.iov_len;
  return n;
}

void SliceIoVecs(IoVecs iov, size_t offset, size_t length, std::vector<iovec>* out) {
  ForEachPiece(iov, offset, length, [out](uint8_t* p, size_t n) { out->push_back(iovec{p, n}); });
}

void CopyFromIoVecs(IoVecs iov, size_t offset, void* dst, size_t length) {
  auto* d = static_cast<uint8_t*>(dst);
  ForEachPiece(iov, offset, length, [&d](uint8_t* p, size_t n) {
    std::memcpy(d, p, n);
    d += n;
  });
}

void CopyToIoVecs(IoVecs iov, size_t offset, const void* src, size_t length) {
  const auto* s = static_cast<const uint8_t*>(src);
  ForEachPiece(iov, offset, length, [&s](uint8_t* p, size_t n) {
    std::memcpy(p, s, n);
    s += n;
  });
}

void ZeroIoVecs(IoVecs iov, size_t offset, size_t length) {
  ForEachPiece(iov, offset, length, [](uint8_t* p, size_t n) { std::memset(p, 0, n); });
}

}  // namespace cowtap
