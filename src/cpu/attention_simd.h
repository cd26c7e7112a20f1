// Micro-kernels of the CPU main branch (attention forward and backward), on rows of the accumulator
// type A (f32, or f64 for gradient checks). Rows are passed as pointer arrays so that the same kernels
// serve contiguous tiles, gathered query rows of a sparse block and key/value rows read in place.
// Each kernel has a plain version (f64, or builds without AVX2) and an AVX2+FMA version for f32.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>

#include "cpu/element.h"
#include "cpu/exp2_poly.h"

#if defined(__AVX2__) && defined(__FMA__) && defined(__GNUC__)
#include <immintrin.h>
#define MSA_CPU_ATTENTION_AVX2 1
#endif

namespace msa {
namespace detail {
namespace cpu {
namespace attn {

constexpr int kRows = 4;  // rows per micro-tile (the G heads of one query when G = 4)

// Row lengths of A buffers are padded to a multiple of this, with zeros, so vector loops need no tail.
template <class A>
constexpr int column_step() {
#if defined(MSA_CPU_ATTENTION_AVX2)
  return std::is_same_v<A, float> ? 16 : 1;
#else
  return 1;
#endif
}
// Score rows are padded to a multiple of 8 with -inf so softmax loops need no tail.
constexpr int kScorePad = 8;

inline int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

// ---- conversions between storage and accumulator rows ------------------------------------------

// dst[0..d) = src * mul, dst[d..dp) = 0.
template <class T, class A>
inline void load_row(const T* src, int d, A mul, A* dst, int dp) {
  if constexpr (std::is_same_v<T, bf16>) {
    for (int i = 0; i < d; ++i) {
      uint32_t bits = uint32_t(src[i].bits) << 16;
      float f;
      std::memcpy(&f, &bits, 4);
      dst[i] = f * mul;
    }
  } else if constexpr (std::is_same_v<T, f16>) {
    int i = 0;
#if defined(__F16C__) && defined(MSA_CPU_ATTENTION_AVX2)
    const __m256 m = _mm256_set1_ps(mul);
    for (; i + 8 <= d; i += 8) {
      const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i));
      _mm256_storeu_ps(dst + i, _mm256_mul_ps(_mm256_cvtph_ps(h), m));
    }
#endif
    for (; i < d; ++i) dst[i] = f16_to_float(src[i].bits) * mul;
  } else {
    for (int i = 0; i < d; ++i) dst[i] = A(src[i]) * mul;
  }
  for (int i = d; i < dp; ++i) dst[i] = A(0);
}

// dst[0..d) = src * mul, rounded to T.
template <class T, class A>
inline void store_row(const A* src, A mul, T* dst, int d) {
  for (int i = 0; i < d; ++i) dst[i] = store_as<T>(src[i] * mul);
}

// ---- plain kernels -------------------------------------------------------------------------------

// out[r * ldo + j] = <a[r], b[j]> over d elements, r < nr (<= kRows), j < nb.
template <class A>
inline void dot_tile(const A* const* a, int nr, const A* const* b, int nb, int d, A* out,
                     int64_t ldo) {
  for (int r = 0; r < nr; ++r)
    for (int j = 0; j < nb; ++j) {
      A s = 0;
      for (int i = 0; i < d; ++i) s += a[r][i] * b[j][i];
      out[r * ldo + j] = s;
    }
}

// out[r][c] += sum_{i < n} coef[r * cr + i * ci] * x[i][c], r < nr (<= kRows), c < d.
template <class A>
inline void axpy_tile(A* const* out, int nr, const A* coef, int64_t cr, int64_t ci,
                      const A* const* x, int n, int d) {
  for (int r = 0; r < nr; ++r)
    for (int i = 0; i < n; ++i) {
      const A w = coef[r * cr + i * ci];
      const A* xi = x[i];
      A* o = out[r];
      for (int c = 0; c < d; ++c) o[c] += w * xi[c];
    }
}

template <class A>
inline A row_max(const A* s, int n) {
  A m = -std::numeric_limits<A>::infinity();
  for (int i = 0; i < n; ++i) m = s[i] > m ? s[i] : m;
  return m;
}

// s[i] = 2^(s[i] - shift); returns the sum. n is a multiple of kScorePad.
template <class A>
inline A exp2_shift_sum(A* s, int n, A shift) {
  A sum = 0;
  for (int i = 0; i < n; ++i) {
    s[i] = std::exp2(s[i] - shift);
    sum += s[i];
  }
  return sum;
}

// ---- AVX2 + FMA kernels for f32 ------------------------------------------------------------------
#if defined(MSA_CPU_ATTENTION_AVX2)

// {sum a, sum b, sum c, sum d}
inline __m128 hsum4(__m256 a, __m256 b, __m256 c, __m256 d) {
  const __m256 ab = _mm256_hadd_ps(a, b);
  const __m256 cd = _mm256_hadd_ps(c, d);
  const __m256 abcd = _mm256_hadd_ps(ab, cd);
  return _mm_add_ps(_mm256_castps256_ps128(abcd), _mm256_extractf128_ps(abcd, 1));
}

// 2^x for x <= 0 (also fine slightly above): kExp2Poly on the fraction, scaled by 2^round(x).
// x < -126 gives 0; NaN stays NaN.
inline __m256 exp2_ps(__m256 x) {
  const __m256 xc = _mm256_max_ps(_mm256_set1_ps(-126.f), x);  // NaN in x is kept (2nd operand)
  const __m256 n = _mm256_round_ps(xc, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m256 f = _mm256_sub_ps(xc, n);
  __m256 p = _mm256_set1_ps(kExp2Poly[0]);
  for (int i = 1; i <= kExp2Degree; ++i) p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(kExp2Poly[i]));
  const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  const __m256 r = _mm256_mul_ps(p, _mm256_castsi256_ps(e));
  return _mm256_andnot_ps(_mm256_cmp_ps(x, _mm256_set1_ps(-126.f), _CMP_LT_OQ), r);
}

// Kept out of line: inlined into the tile loop, GCC spills its accumulators.
template <>
__attribute__((noinline)) inline void dot_tile<float>(const float* const* a, int nr, const float* const* b, int nb, int d,
                            float* out, int64_t ldo) {
  // Missing rows repeat row 0; their results are not stored.
  const float* a0 = a[0];
  const float* a1 = nr > 1 ? a[1] : a0;
  const float* a2 = nr > 2 ? a[2] : a0;
  const float* a3 = nr > 3 ? a[3] : a0;
  for (int j = 0; j < nb; j += 2) {
    const float* b0 = b[j];
    const float* b1 = j + 1 < nb ? b[j + 1] : b0;
    __m256 c00 = _mm256_setzero_ps(), c01 = c00, c10 = c00, c11 = c00, c20 = c00, c21 = c00,
           c30 = c00, c31 = c00;
    // Every operand is loaded once into a register (6 loads per 8 FMAs); without the empty asm
    // GCC folds the b loads into the FMAs and issues 12 loads instead.
    for (int i = 0; i < d; i += 8) {
      __m256 x0 = _mm256_loadu_ps(b0 + i), x1 = _mm256_loadu_ps(b1 + i);
      __m256 y0 = _mm256_loadu_ps(a0 + i), y1 = _mm256_loadu_ps(a1 + i);
      __m256 y2 = _mm256_loadu_ps(a2 + i), y3 = _mm256_loadu_ps(a3 + i);
      asm("" : "+x"(x0), "+x"(x1), "+x"(y0), "+x"(y1), "+x"(y2), "+x"(y3));
      c00 = _mm256_fmadd_ps(y0, x0, c00);
      c01 = _mm256_fmadd_ps(y0, x1, c01);
      c10 = _mm256_fmadd_ps(y1, x0, c10);
      c11 = _mm256_fmadd_ps(y1, x1, c11);
      c20 = _mm256_fmadd_ps(y2, x0, c20);
      c21 = _mm256_fmadd_ps(y2, x1, c21);
      c30 = _mm256_fmadd_ps(y3, x0, c30);
      c31 = _mm256_fmadd_ps(y3, x1, c31);
    }
    alignas(32) float s[8];
    _mm_store_ps(s, hsum4(c00, c01, c10, c11));
    _mm_store_ps(s + 4, hsum4(c20, c21, c30, c31));
    const bool pair = j + 1 < nb;
    for (int r = 0; r < nr; ++r) {
      out[r * ldo + j] = s[2 * r];
      if (pair) out[r * ldo + j + 1] = s[2 * r + 1];
    }
  }
}

template <int NR>
inline void axpy_tile_avx2(float* const* out, const float* coef, int64_t cr, int64_t ci,
                           const float* const* x, int n, int d) {
  for (int c = 0; c < d; c += 16) {
    __m256 acc[NR][2];
    for (int r = 0; r < NR; ++r) {
      acc[r][0] = _mm256_loadu_ps(out[r] + c);
      acc[r][1] = _mm256_loadu_ps(out[r] + c + 8);
    }
    for (int i = 0; i < n; ++i) {
      const float* xi = x[i] + c;
      const __m256 x0 = _mm256_loadu_ps(xi), x1 = _mm256_loadu_ps(xi + 8);
      for (int r = 0; r < NR; ++r) {
        const __m256 w = _mm256_broadcast_ss(coef + r * cr + i * ci);
        acc[r][0] = _mm256_fmadd_ps(w, x0, acc[r][0]);
        acc[r][1] = _mm256_fmadd_ps(w, x1, acc[r][1]);
      }
    }
    for (int r = 0; r < NR; ++r) {
      _mm256_storeu_ps(out[r] + c, acc[r][0]);
      _mm256_storeu_ps(out[r] + c + 8, acc[r][1]);
    }
  }
}

template <>
inline void axpy_tile<float>(float* const* out, int nr, const float* coef, int64_t cr, int64_t ci,
                             const float* const* x, int n, int d) {
  switch (nr) {
    case 4: return axpy_tile_avx2<4>(out, coef, cr, ci, x, n, d);
    case 3: return axpy_tile_avx2<3>(out, coef, cr, ci, x, n, d);
    case 2: return axpy_tile_avx2<2>(out, coef, cr, ci, x, n, d);
    case 1: return axpy_tile_avx2<1>(out, coef, cr, ci, x, n, d);
    default: return;
  }
}

template <>
inline float row_max<float>(const float* s, int n) {
  __m256 m = _mm256_set1_ps(-std::numeric_limits<float>::infinity());
  for (int i = 0; i < n; i += 8) m = _mm256_max_ps(m, _mm256_loadu_ps(s + i));
  const __m128 h = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps(m, 1));
  const __m128 h2 = _mm_max_ps(h, _mm_movehl_ps(h, h));
  return _mm_cvtss_f32(_mm_max_ss(h2, _mm_shuffle_ps(h2, h2, 1)));
}

template <>
inline float exp2_shift_sum<float>(float* s, int n, float shift) {
  const __m256 sh = _mm256_set1_ps(shift);
  __m256 sum = _mm256_setzero_ps();
  for (int i = 0; i < n; i += 8) {
    const __m256 e = exp2_ps(_mm256_sub_ps(_mm256_loadu_ps(s + i), sh));
    _mm256_storeu_ps(s + i, e);
    sum = _mm256_add_ps(sum, e);
  }
  const __m128 h = _mm_add_ps(_mm256_castps256_ps128(sum), _mm256_extractf128_ps(sum, 1));
  const __m128 h2 = _mm_add_ps(h, _mm_movehl_ps(h, h));
  return _mm_cvtss_f32(_mm_add_ss(h2, _mm_shuffle_ps(h2, h2, 1)));
}

#endif  // MSA_CPU_ATTENTION_AVX2

}  // namespace attn
}  // namespace cpu
}  // namespace detail
}  // namespace msa
