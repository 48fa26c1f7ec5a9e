// Overflow-checked unsigned arithmetic for sizes and offsets that come from a
// guest or an image file. Each returns false (and leaves *out unspecified) on
// overflow. Pure functions; thread-safe.
#pragma once

#include <cstdint>
#include <optional>
#include <type_traits>

namespace cowtap {

template <typename T>
[[nodiscard]] constexpr bool CheckedAdd(T a, T b, T* out) {
  static_assert(std::is_unsigned_v<T>);
  return !__builtin_add_overflow(a, b, out);
}

template <typename T>
[[nodiscard]] constexpr bool CheckedMul(T a, T b, T* out) {
  static_assert(std::is_unsigned_v<T>);
  return !__builtin_mul_overflow(a, b, out);
}

// a + b, or nullopt on overflow.
[[nodiscard]] constexpr std::optional<uint64_t> AddU64(uint64_t a, uint64_t b) {
  uint64_t r;
  if (__builtin_add_overflow(a, b, &r)) return std::nullopt;
  return r;
}

[[nodiscard]] constexpr std::optional<uint64_t> MulU64(uint64_t a, uint64_t b) {
  uint64_t r;
  if (__builtin_mul_overflow(a, b, &r)) return std::nullopt;
  return r;
}

// True if [offset, offset + length) lies within [0, limit) without overflow.
[[nodiscard]] constexpr bool RangeWithin(uint64_t offset, uint64_t length, uint64_t limit) {
  uint64_t end;
  if (__builtin_add_overflow(offset, length, &end)) return false;
  return end <= limit;
}

constexpr bool IsPowerOfTwo(uint64_t v) { return v != 0 && (v & (v - 1)) == 0; }

// REQUIRES: align is a power of two. Rounding up may overflow; use the checked form.
constexpr uint64_t AlignDown(uint64_t v, uint64_t align) { return v & ~(align - 1); }
[[nodiscard]] constexpr std::optional<uint64_t> AlignUp(uint64_t v, uint64_t align) {
  uint64_t r;
  if (__builtin_add_overflow(v, align - 1, &r)) return std::nullopt;
  return r & ~(align - 1);
}
constexpr uint64_t DivRoundUp(uint64_t v, uint64_t d) { return v / d + (v % d != 0); }

}  // namespace cowtap
