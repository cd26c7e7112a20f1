// Host-side conversions between f32 and the 16-bit and 8-bit float formats, used by the CPU backend, the tools
// and the tests. Round-to-nearest-even, NaN preserved.
#pragma once

#include <cstdint>
#include <cstring>

// The FP8 encoder is also the CUDA paged append's (one quantisation rule on host and device).
#if defined(__CUDACC__)
#define MSA_CONVERT_FN __host__ __device__ inline
#else
#define MSA_CONVERT_FN inline
#endif

namespace msa {

inline float bf16_to_float(uint16_t h) {
  uint32_t bits = uint32_t(h) << 16;
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

inline uint16_t float_to_bf16(float f) {
  uint32_t bits;
  std::memcpy(&bits, &f, 4);
  if ((bits & 0x7fffffffu) > 0x7f800000u) return uint16_t((bits >> 16) | 0x40);  // quiet NaN
  bits += 0x7fffu + ((bits >> 16) & 1u);
  return uint16_t(bits >> 16);
}

inline float f16_to_float(uint16_t h) {
  const uint32_t sign = uint32_t(h & 0x8000u) << 16;
  uint32_t exp = (h >> 10) & 0x1fu;
  uint32_t mant = h & 0x3ffu;
  uint32_t bits;
  if (exp == 0x1f) {
    bits = sign | 0x7f800000u | (mant << 13);
  } else if (exp == 0) {
    if (mant == 0) {
      bits = sign;
    } else {  // subnormal: renormalise
      int e = -1;
      do {
        ++e;
        mant <<= 1;
      } while ((mant & 0x400u) == 0);
      bits = sign | (uint32_t(127 - 15 - e) << 23) | ((mant & 0x3ffu) << 13);
    }
  } else {
    bits = sign | ((exp + 127 - 15) << 23) | (mant << 13);
  }
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

inline uint16_t float_to_f16(float f) {
  uint32_t bits;
  std::memcpy(&bits, &f, 4);
  const uint32_t sign = (bits >> 16) & 0x8000u;
  const uint32_t abs = bits & 0x7fffffffu;
  if (abs > 0x7f800000u) return uint16_t(sign | 0x7e00u);
  if (abs >= 0x477ff000u) return uint16_t(sign | 0x7c00u);  // overflow to inf (after rounding)
  if (abs < 0x38800000u) {                                  // subnormal or zero in f16
    if (abs < 0x33000000u) return uint16_t(sign);
    const uint32_t exp = abs >> 23;
    const uint32_t mant = (abs & 0x7fffffu) | 0x800000u;
    const uint32_t shift = 126 - exp;  // 14..24
    uint32_t half = mant >> shift;
    const uint32_t rem = mant & ((1u << shift) - 1);
    const uint32_t mid = 1u << (shift - 1);
    if (rem > mid || (rem == mid && (half & 1u))) ++half;
    return uint16_t(sign | half);
  }
  uint32_t h = ((abs - 0x38000000u) >> 13);
  const uint32_t rem = abs & 0x1fffu;
  if (rem > 0x1000u || (rem == 0x1000u && (h & 1u))) ++h;
  return uint16_t(sign | h);
}

// FP8 E4M3, OCP "fn" variant (torch.float8_e4m3fn): exponent bias 7, no infinities, largest finite
// 448 (0x7e), NaN 0x7f / 0xff. Encoding rounds to nearest even and saturates to +-448 (infinities
// included), as the paged caches want: a value above the page's scale range clips, it does not become
// NaN. NaN stays NaN.
inline float fp8_e4m3_to_float(uint8_t b) {
  const uint32_t sign = uint32_t(b & 0x80u) << 24;
  const uint32_t exp = (b >> 3) & 0xfu, mant = b & 0x7u;
  float f;
  if (exp == 0xf && mant == 0x7) {
    const uint32_t nan = sign | 0x7fc00000u;
    std::memcpy(&f, &nan, 4);
    return f;
  }
  if (exp == 0) {  // subnormal: mant x 2^-9
    f = float(mant) * 0.001953125f;
    return sign ? -f : f;
  }
  const uint32_t bits = sign | ((exp + 127 - 7) << 23) | (mant << 20);
  std::memcpy(&f, &bits, 4);
  return f;
}

MSA_CONVERT_FN uint8_t float_to_fp8_e4m3(float f) {
  uint32_t bits;
  std::memcpy(&bits, &f, 4);
  const uint8_t sign = uint8_t((bits >> 24) & 0x80u);
  const uint32_t abs = bits & 0x7fffffffu;
  if (abs > 0x7f800000u) return uint8_t(sign | 0x7f);  // NaN
  if (abs >= 0x43e00000u) return uint8_t(sign | 0x7e);  // >= 448 (and inf): saturate
  if (abs < 0x3c800000u) {  // below 2^-6: subnormal in E4M3, steps of 2^-9
    const uint32_t exp = abs >> 23;
    if (exp < 127 - 11) return sign;  // below 2^-11 = a quarter step: rounds to zero
    const uint32_t m = (abs & 0x7fffffu) | 0x800000u;
    const uint32_t shift = 23 - (exp - 127 + 9);  // value x 2^9 = m >> shift
    uint32_t q = m >> shift;
    const uint32_t rem = m & ((1u << shift) - 1), mid = 1u << (shift - 1);
    if (rem > mid || (rem == mid && (q & 1u))) ++q;  // q == 8 is the smallest normal, 0x08
    return uint8_t(sign | q);
  }
  uint32_t h = ((abs >> 23) - 127 + 7) << 3 | ((abs >> 20) & 0x7u);
  const uint32_t rem = abs & 0xfffffu;
  if (rem > 0x80000u || (rem == 0x80000u && (h & 1u))) ++h;  // a carry moves into the exponent
  return uint8_t(sign | (h > 0x7eu ? 0x7eu : h));
}

}  // namespace msa
