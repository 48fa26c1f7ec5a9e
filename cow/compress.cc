// Raw deflate via zlib (negative window bits: no header, no checksum) and
// zstd via its streaming decoder, each bounded by the output cluster.
#include "cow/compress.h"

#include <zlib.h>
#include <zstd.h>

namespace cowtap::cow {
namespace {

Status InflateRaw(std::span<const uint8_t> in, std::span<uint8_t> out, const std::string& what) {
  z_stream z{};
  // -15: raw deflate with the largest window, which accepts any smaller one.
  if (inflateInit2(&z, -15) != Z_OK) return Status::Internal("inflateInit2 failed");
  z.next_in = const_cast<Bytef*>(in.data());
  z.avail_in = static_cast<uInt>(in.size());
  z.next_out = out.data();
  z.avail_out = static_cast<uInt>(out.size());
  int rc = inflate(&z, Z_FINISH);
  uint64_t produced = out.size() - z.avail_out;
  inflateEnd(&z);
  // Z_BUF_ERROR with a full output means the stream would produce more than a
  // cluster or lacks an end marker after exactly a cluster; QEMU accepts a
  // full cluster either way.
  if ((rc == Z_STREAM_END || rc == Z_BUF_ERROR || rc == Z_OK) && produced == out.size()) return Status::Ok();
  return Status::Corrupt(what + ": deflate stream is invalid or short (" + std::to_string(produced) + " of " +
                         std::to_string(out.size()) + " bytes, zlib code " + std::to_string(rc) + ")");
}

Status DecompressZstd(std::span<const uint8_t> in, std::span<uint8_t> out, const std::string& what) {
  ZSTD_DCtx* ctx = ZSTD_createDCtx();
  if (!ctx) return Status::Internal("ZSTD_createDCtx failed");
  // A cluster is at most 2 MiB and written as one frame, so a frame asking
  // for a larger window (the image chooses) is refused instead of served
  // with a window buffer of up to 128 MiB.
  ZSTD_DCtx_setParameter(ctx, ZSTD_d_windowLogMax, 21);
  ZSTD_inBuffer ib{in.data(), in.size(), 0};
  ZSTD_outBuffer ob{out.data(), out.size(), 0};
  size_t rc = 0;
  while (ob.pos < ob.size) {
    size_t before_in = ib.pos, before_out = ob.pos;
    rc = ZSTD_decompressStream(ctx, &ob, &ib);
    if (ZSTD_isError(rc)) break;
    if (rc == 0) break;                                      // frame complete
    if (ib.pos == before_in && ob.pos == before_out) break;  // no progress: input exhausted
  }
  ZSTD_freeDCtx(ctx);
  if (ZSTD_isError(rc))
    return Status::Corrupt(what + ": zstd stream is invalid (" + std::string(ZSTD_getErrorName(rc)) + ")");
  if (ob.pos != ob.size)
    return Status::Corrupt(what + ": zstd stream is short (" + std::to_string(ob.pos) + " of " +
                           std::to_string(out.size()) + " bytes)");
  return Status::Ok();
}

}  // namespace

Status DecompressCluster(CompressionType type, std::span<const uint8_t> input, std::span<uint8_t> out,
                         const std::string& what) {
  switch (type) {
    case CompressionType::kDeflate:
      return InflateRaw(input, out, what);
    case CompressionType::kZstd:
      return DecompressZstd(input, out, what);
  }
  return Status::NotSupported(what + ": unknown compression type");
}

Result<std::vector<uint8_t>> CompressCluster(CompressionType type, std::span<const uint8_t> input) {
  if (input.size() <= 512) return std::vector<uint8_t>{};
  const size_t limit = input.size() - 512;
  std::vector<uint8_t> out(limit);
  if (type == CompressionType::kDeflate) {
    z_stream z{};
    if (deflateInit2(&z, Z_DEFAULT_COMPRESSION, Z_DEFLATED, -12, 9, Z_DEFAULT_STRATEGY) != Z_OK)
      return Status::Internal("deflateInit2 failed");
    z.next_in = const_cast<Bytef*>(input.data());
    z.avail_in = static_cast<uInt>(input.size());
    z.next_out = out.data();
    z.avail_out = static_cast<uInt>(out.size());
    int rc = deflate(&z, Z_FINISH);
    size_t n = out.size() - z.avail_out;
    deflateEnd(&z);
    if (rc != Z_STREAM_END) return std::vector<uint8_t>{};  // did not fit: store uncompressed
    out.resize(n);
    return out;
  }
  size_t n = ZSTD_compress(out.data(), out.size(), input.data(), input.size(), 3);
  if (ZSTD_isError(n)) return std::vector<uint8_t>{};
  out.resize(n);
  return out;
}

}  // namespace cowtap::cow
