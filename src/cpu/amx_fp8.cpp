// FP8 E4M3 codes widened on AVX-512 (VBMI) for the CPU backend's FP8 pages: exactly to bf16 for the
// AMX index path (every E4M3 value is a bf16 value), and on to f32 times the page scale for the
// attention's K / V rows. Called only after amx::usable() (which checks VBMI too).
#include <algorithm>

#include "common/float_convert.h"
#include "cpu/amx.h"

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>

// GCC 12's AVX-512 headers start masked intrinsics from an undefined vector, which it then reports as
// maybe uninitialized in every caller (as amx_tiles.h notes).
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif

#define MSA_FP8_TARGET __attribute__((target("avx512f,avx512bw,avx512vl,avx512vbmi")))

namespace msa {
namespace detail {
namespace cpu {
namespace amx {

namespace {

// The 128 non-negative E4M3 codes as bf16 bits (exact), split into their low and high bytes; a code's
// sign bit is the high byte's.
struct Fp8Bf16Bytes {
  alignas(64) uint8_t lo[128];
  alignas(64) uint8_t hi[128];
};
const Fp8Bf16Bytes& fp8_bf16_bytes() {
  static const Fp8Bf16Bytes t = [] {
    Fp8Bf16Bytes b{};
    for (int c = 0; c < 128; ++c) {
      const uint16_t bits = float_to_bf16(fp8_e4m3_to_float(uint8_t(c)));
      b.lo[c] = uint8_t(bits & 0xff);
      b.hi[c] = uint8_t(bits >> 8);
    }
    return b;
  }();
  return t;
}

// 64 codes at once: both bytes of each bf16 looked up by its code's low 7 bits (one 128-entry byte
// permute each), the sign bit kept in the high byte, then interleaved into 16-bit lanes (the unpacks
// work per 128-bit lane; a qword permute restores the order). Code 0 gives +0.
struct Widener {
  __m512i lo0, lo1, hi0, hi1, sign, first, second;
  MSA_FP8_TARGET Widener() {
    const Fp8Bf16Bytes& t = fp8_bf16_bytes();
    lo0 = _mm512_load_si512(t.lo);
    lo1 = _mm512_load_si512(t.lo + 64);
    hi0 = _mm512_load_si512(t.hi);
    hi1 = _mm512_load_si512(t.hi + 64);
    sign = _mm512_set1_epi8(char(0x80));
    first = _mm512_set_epi64(11, 10, 3, 2, 9, 8, 1, 0);
    second = _mm512_set_epi64(15, 14, 7, 6, 13, 12, 5, 4);
  }
  // bf16 bits of codes 0..31 into *a, 32..63 into *b.
  MSA_FP8_TARGET void widen(__m512i c, __m512i* a, __m512i* b) const {
    const __m512i lo = _mm512_permutex2var_epi8(lo0, c, lo1);  // index bits 0-6: the sign bit is ignored
    const __m512i hi = _mm512_or_si512(_mm512_permutex2var_epi8(hi0, c, hi1), _mm512_and_si512(c, sign));
    const __m512i x = _mm512_unpacklo_epi8(lo, hi), y = _mm512_unpackhi_epi8(lo, hi);
    *a = _mm512_permutex2var_epi64(x, first, y);
    *b = _mm512_permutex2var_epi64(x, second, y);
  }
};

MSA_FP8_TARGET inline __mmask64 first_n(int n) {
  return n >= 64 ? ~__mmask64(0) : n > 0 ? (__mmask64(1) << n) - 1 : 0;
}

// 16 bf16 lanes (of 32 in `v`, half `h`) as f32 times `scale`.
MSA_FP8_TARGET inline __m512 bf16_half_to_f32(__m512i v, int h, __m512 scale) {
  const __m256i half = h ? _mm512_extracti64x4_epi64(v, 1) : _mm512_castsi512_si256(v);
  return _mm512_mul_ps(_mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(half), 16)), scale);
}

}  // namespace

// Measured on this project's CPU: 0.54 us per 64 x 128 chunk, 3.3x a version with two 16-bit word
// permutes per 32 codes.
MSA_FP8_TARGET void widen_fp8_chunk(const uint8_t* codes, int64_t stride, int nk, int d, uint16_t* staged) {
  const int dk = packed_dim(d);
  const Widener w;
  for (int r = 0; r < kPackKeys; ++r) {
    uint16_t* dst = staged + int64_t(r) * dk;
    for (int i = 0; i < dk; i += 64) {  // codes past d and rows past nk load as 0
      __m512i a, b;
      w.widen(_mm512_maskz_loadu_epi8(first_n(r < nk ? d - i : 0), codes + int64_t(r) * stride + i), &a, &b);
      _mm512_storeu_si512(dst + i, a);
      if (i + 32 < dk) _mm512_storeu_si512(dst + i + 32, b);
    }
  }
}

MSA_FP8_TARGET void dequantise_fp8_rows(const uint8_t* src, int64_t stride, int rows, int n, float scale, float* dst,
                                        int dp) {
  const Widener w;
  const __m512 s = _mm512_set1_ps(scale);
  for (int r = 0; r < rows; ++r) {
    const uint8_t* row = src + int64_t(r) * stride;
    float* out = dst + int64_t(r) * dp;
    for (int i = 0; i < dp; i += 64) {  // codes past n load as 0
      __m512i a, b;
      w.widen(_mm512_maskz_loadu_epi8(first_n(n - i), row + i), &a, &b);
      const __m512i halves[2] = {a, b};
      for (int q = 0; q < 4; ++q) {  // 16 floats a step, the last masked at dp
        const int at = i + 16 * q;
        if (at >= dp) break;
        const __mmask16 keep = dp - at >= 16 ? __mmask16(0xffff) : __mmask16((1u << (dp - at)) - 1);
        _mm512_mask_storeu_ps(out + at, keep, bf16_half_to_f32(halves[q >> 1], q & 1, s));
      }
    }
  }
}

}  // namespace amx
}  // namespace cpu
}  // namespace detail
}  // namespace msa

#else  // no AMX build: usable() is false, so these are never called.

namespace msa {
namespace detail {
namespace cpu {
namespace amx {

void widen_fp8_chunk(const uint8_t*, int64_t, int, int, uint16_t*) {}
void dequantise_fp8_rows(const uint8_t*, int64_t, int, int, float, float*, int) {}

}  // namespace amx
}  // namespace cpu
}  // namespace detail
}  // namespace msa

#endif
