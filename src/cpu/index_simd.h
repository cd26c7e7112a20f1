// Small vector building blocks of the CPU index branch and KL alignment: a register-blocked score
// micro-kernel, row conversion to the accumulator type, dot products, segment max / sum-exp and a
// vectorised exp. Written with GCC/Clang vector extensions so that -march=native picks AVX2+FMA (or
// AVX-512) without intrinsics; the f64 path (gradient checks only) uses the same code on 4 doubles.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>

#if defined(__F16C__)
#include <immintrin.h>
#endif

#include "cpu/element.h"

namespace msa {
namespace detail {
namespace cpu {
namespace simd {

template <class A>
struct Vec;
template <>
struct Vec<float> {
  typedef float type __attribute__((vector_size(32)));
  typedef int32_t itype __attribute__((vector_size(32)));
  static constexpr int kLanes = 8;
};
template <>
struct Vec<double> {
  typedef double type __attribute__((vector_size(32)));
  static constexpr int kLanes = 4;
};

template <class A>
using vec_t = typename Vec<A>::type;
template <class A>
constexpr int lanes = Vec<A>::kLanes;

template <class A>
inline vec_t<A> load(const A* p) {
  vec_t<A> v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}
template <class A>
inline void store(A* p, vec_t<A> v) {
  std::memcpy(p, &v, sizeof(v));
}
// Written out lane by lane: `vec{} + x` would cost an add (0 + x is not x for x = -0).
inline vec_t<float> broadcast(float x) { return vec_t<float>{x, x, x, x, x, x, x, x}; }
inline vec_t<double> broadcast(double x) { return vec_t<double>{x, x, x, x}; }
template <class A>
inline vec_t<A> vmax(vec_t<A> a, vec_t<A> b) {
  return a > b ? a : b;
}
template <class A>
inline A hmax(vec_t<A> v) {
  A m = v[0];
  for (int i = 1; i < lanes<A>; ++i) m = v[i] > m ? v[i] : m;
  return m;
}
template <class A>
inline A hsum(vec_t<A> v) {
  A s = 0;
  for (int i = 0; i < lanes<A>; ++i) s += v[i];
  return s;
}

// exp on 8 floats: Cody-Waite reduction by ln 2, degree-6 Taylor polynomial on |r| <= ln2/2
// (relative error ~2 ulp), 2^n built in the exponent bits. Inputs below -87 flush towards 0.
inline vec_t<float> vexp(vec_t<float> x) {
  using V = vec_t<float>;
  using VI = Vec<float>::itype;
  x = x < broadcast(-87.3f) ? broadcast(-87.3f) : x;
  x = x > broadcast(88.7f) ? broadcast(88.7f) : x;
  const V magic = broadcast(12582912.f);  // 1.5 * 2^23: adding it rounds to the nearest integer
  const V n = (x * 1.44269504088896341f + magic) - magic;
  const V r = (x - n * 0.693359375f) + n * 2.12194440e-4f;
  V p = broadcast(1.f / 720);
  p = p * r + 1.f / 120;
  p = p * r + 1.f / 24;
  p = p * r + 1.f / 6;
  p = p * r + 0.5f;
  p = p * r + 1.f;
  p = p * r + 1.f;
  const VI bits = (__builtin_convertvector(n, VI) + 127) << 23;
  V scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return p * scale;
}
inline vec_t<double> vexp(vec_t<double> x) {
  for (int i = 0; i < 4; ++i) x[i] = std::exp(x[i]);
  return x;
}

// dst[0..n) = src converted to the accumulator type, times `mul`.
template <class T, class A>
inline void convert_row(const T* src, A* dst, int n, A mul = A(1)) {
  if constexpr (std::is_same_v<T, A>) {
    for (int i = 0; i < n; ++i) dst[i] = src[i] * mul;
  } else if constexpr (std::is_same_v<T, bf16>) {
    for (int i = 0; i < n; ++i) {
      const uint32_t bits = uint32_t(src[i].bits) << 16;
      float f;
      std::memcpy(&f, &bits, 4);
      dst[i] = f * mul;
    }
  } else {
    int i = 0;
#if defined(__F16C__)
    if constexpr (std::is_same_v<T, f16> && std::is_same_v<A, float>) {
      const __m256 m = _mm256_set1_ps(mul);
      for (; i + 8 <= n; i += 8) {
        const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i));
        _mm256_storeu_ps(dst + i, _mm256_mul_ps(_mm256_cvtph_ps(h), m));
      }
    }
#endif
    for (; i < n; ++i) dst[i] = A(to_float(src[i])) * mul;
  }
}

template <class A>
inline A dot(const A* a, const A* b, int n) {
  constexpr int L = lanes<A>;
  vec_t<A> s0{}, s1{};
  int i = 0;
  for (; i + 2 * L <= n; i += 2 * L) {
    s0 += load(a + i) * load(b + i);
    s1 += load(a + i + L) * load(b + i + L);
  }
  for (; i + L <= n; i += L) s0 += load(a + i) * load(b + i);
  A s = hsum<A>(s0 + s1);
  for (; i < n; ++i) s += a[i] * b[i];
  return s;
}

template <class A>
inline A segment_max(const A* x, int n) {
  constexpr int L = lanes<A>;
  A m = -INFINITY;
  int i = 0;
  if (n >= L) {
    vec_t<A> v = load(x);
    for (i = L; i + L <= n; i += L) v = vmax<A>(v, load(x + i));
    m = hmax<A>(v);
  }
  for (; i < n; ++i) m = x[i] > m ? x[i] : m;
  return m;
}

// sum over i of exp((x[i] - m) * mul)
template <class A>
inline A segment_sum_exp(const A* x, int n, A m, A mul) {
  constexpr int L = lanes<A>;
  vec_t<A> s{};
  int i = 0;
  for (; i + L <= n; i += L) s += vexp((load(x + i) - m) * mul);
  A sum = hsum<A>(s);
  for (; i < n; ++i) sum += std::exp((x[i] - m) * mul);
  return sum;
}

// Register-blocked score tile: c[i][j] = sum_d qp[d][i] * kt[d][j] for kMR rows and kNR<A> columns.
// qp is a packed panel [di][kMR]; kt is [di][ldk] (keys transposed, so a column step is one lane).
constexpr int kMR = 6;
template <class A>
constexpr int kNR = 2 * lanes<A>;

template <class A>
inline void score_micro_kernel(const A* qp, const A* kt, int64_t ldk, int di, A* c, int64_t ldc) {
  using V = vec_t<A>;
  constexpr int L = lanes<A>;
  V acc[kMR][2] = {};
  for (int d = 0; d < di; ++d) {
    const V k0 = load(kt + d * ldk), k1 = load(kt + d * ldk + L);
    const A* q = qp + d * kMR;
    for (int i = 0; i < kMR; ++i) {
      const V a = broadcast(q[i]);
      acc[i][0] += a * k0;
      acc[i][1] += a * k1;
    }
  }
  for (int i = 0; i < kMR; ++i) {
    store(c + i * ldc, acc[i][0]);
    store(c + i * ldc + L, acc[i][1]);
  }
}

}  // namespace simd
}  // namespace cpu
}  // namespace detail
}  // namespace msa
