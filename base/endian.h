// Big- and little-endian loads and stores on unaligned byte pointers, for
// decoding on-disk (qcow2: big-endian) and wire (blkif: little-endian) formats.
// Pure functions; thread-safe.
#pragma once

#include <cstdint>
#include <cstring>

namespace cowtap {

inline uint16_t LoadBe16(const uint8_t* p) { uint16_t v; std::memcpy(&v, p, 2); return __builtin_bswap16(v); }
inline uint32_t LoadBe32(const uint8_t* p) { uint32_t v; std::memcpy(&v, p, 4); return __builtin_bswap32(v); }
inline uint64_t LoadBe64(const uint8_t* p) { uint64_t v; std::memcpy(&v, p, 8); return __builtin_bswap64(v); }
inline void StoreBe16(uint8_t* p, uint16_t v) { v = __builtin_bswap16(v); std::memcpy(p, &v, 2); }
inline void StoreBe32(uint8_t* p, uint32_t v) { v = __builtin_bswap32(v); std::memcpy(p, &v, 4); }
inline void StoreBe64(uint8_t* p, uint64_t v) { v = __builtin_bswap64(v); std::memcpy(p, &v, 8); }

inline uint16_t LoadLe16(const uint8_t* p) { uint16_t v; std::memcpy(&v, p, 2); return v; }
inline uint32_t LoadLe32(const uint8_t* p) { uint32_t v; std::memcpy(&v, p, 4); return v; }
inline uint64_t LoadLe64(const uint8_t* p) { uint64_t v; std::memcpy(&v, p, 8); return v; }
inline void StoreLe16(uint8_t* p, uint16_t v) { std::memcpy(p, &v, 2); }
inline void StoreLe32(uint8_t* p, uint32_t v) { std::memcpy(p, &v, 4); }
inline void StoreLe64(uint8_t* p, uint64_t v) { std::memcpy(p, &v, 8); }

static_assert(__BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__, "cowtap targets little-endian hosts (x86, arm64)");

}  // namespace cowtap
