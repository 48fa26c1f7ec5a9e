// Helpers over scatter-gather lists (struct iovec). The data path passes a
// request's segments as std::span<const iovec> from the ring down to the file,
// so that guest pages are read and written in place without a bounce copy.
// Pure functions over caller-owned memory; thread-safe.
#pragma once

#include <sys/uio.h>

#include <cstddef>
#include <cstdint>
#include <span>
#include <vector>

namespace cowtap {

using IoVecs = std::span<const iovec>;

size_t TotalLength(IoVecs iov);

// Appends to *out the iovecs that cover bytes [offset, offset + length) of iov.
// REQUIRES: offset + length <= TotalLength(iov).
void SliceIoVecs(IoVecs iov, size_t offset, size_t length, std::vector<iovec>* out);

// Copies between a flat buffer and bytes [offset, offset + length) of iov.
// REQUIRES: the range lies within iov.
void CopyFromIoVecs(IoVecs iov, size_t offset, void* dst, size_t length);
void CopyToIoVecs(IoVecs iov, size_t offset, const void* src, size_t length);
void ZeroIoVecs(IoVecs iov, size_t offset, size_t length);

// A single iovec over a buffer.
inline iovec MakeIoVec(void* p, size_t len) { return iovec{p, len}; }
inline iovec MakeIoVec(const void* p, size_t len) { return iovec{const_cast<void*>(p), len}; }

}  // namespace cowtap
