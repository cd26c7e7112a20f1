// Tile-unit building blocks of the AMX kernels (amx_*.cpp only). Every function that uses an AMX or
// AVX-512 intrinsic carries MSA_AMX_TARGET, so the translation unit itself is compiled for the
// build's baseline and nothing here runs before amx::usable() said yes.
//
// One tile configuration serves every kernel: eight tiles of 16 rows x 64 bytes. tmm0-3 accumulate
// a 2 x 2 grid of 16 x 16 f32 results, tmm4-5 hold two 16 x 32 bf16 row tiles of A, tmm6-7 two B
// tiles in the VNNI layout of amx.h's packers.
#pragma once

#include <immintrin.h>

#include <cstdint>
#include <cstring>

#include "cpu/exp2_poly.h"

// GCC 12's AVX-512 headers start masked intrinsics from _mm512_undefined_ps(), which it then
// reports as maybe uninitialized in every caller.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif

#define MSA_AMX_TARGET \
  __attribute__((target("amx-tile,amx-bf16,avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,fma")))

namespace msa {
namespace detail {
namespace cpu {
namespace amx {

struct alignas(64) TileConfig {
  uint8_t palette = 1;
  uint8_t start_row = 0;
  uint8_t reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

// Loads the one configuration on the calling thread (tile state is per thread). Both instructions
// are written as asm, so these need no target attribute: not _tile_loadconfig, whose asm names only
// the first 8 bytes as read (the compiler may then drop the stores that fill the rest).
inline void configure_tiles() {
  TileConfig cfg;
  for (int i = 0; i < 8; ++i) {
    cfg.rows[i] = 16;
    cfg.colsb[i] = 64;
  }
  __asm__ volatile("ldtilecfg %0" ::"m"(cfg) : "memory");
}
inline void release_tiles() { __asm__ volatile("tilerelease" ::: "memory"); }

// C = A B (Accumulate: C += A B, C read from memory first) for MT row tiles (1 or 2) of 16 rows and two 16-column B tiles, over `ksteps` steps of 32
// (bf16 pairs): A row tile r of step s at a + r * 16 * lda + s * a_step (bytes; rows lda apart), B
// tile j of step s at b + j * b_pair + s * b_step. C row tile r, column tile j goes to
// c + (r * 16) * ldc + j * 16 (floats; rows ldc floats apart).
template <int MT, bool Accumulate = false>
MSA_AMX_TARGET inline void product(const void* a, int64_t lda, int64_t a_step, const void* b,
                                   int64_t b_pair, int64_t b_step, int ksteps, float* c,
                                   int64_t ldc) {
  static_assert(MT == 1 || MT == 2, "one or two row tiles");
  // The tile loads are asm statements without a memory operand: order them after the plain stores
  // that filled A and B.
  __asm__ volatile("" ::: "memory");
  const char* pa = static_cast<const char*>(a);
  const char* pb = static_cast<const char*>(b);
  const int64_t ldc_bytes = ldc * int64_t(sizeof(float));
  if constexpr (Accumulate) {
    _tile_loadd(0, c, ldc_bytes);
    _tile_loadd(1, c + 16, ldc_bytes);
    if constexpr (MT == 2) {
      _tile_loadd(2, c + 16 * ldc, ldc_bytes);
      _tile_loadd(3, c + 16 * ldc + 16, ldc_bytes);
    }
  } else {
    _tile_zero(0);
    _tile_zero(1);
    if constexpr (MT == 2) {
      _tile_zero(2);
      _tile_zero(3);
    }
  }
  for (int s = 0; s < ksteps; ++s) {
    _tile_loadd(4, pa + s * a_step, lda);
    _tile_loadd(6, pb + s * b_step, 64);
    _tile_loadd(7, pb + b_pair + s * b_step, 64);
    _tile_dpbf16ps(0, 4, 6);
    _tile_dpbf16ps(1, 4, 7);
    if constexpr (MT == 2) {
      _tile_loadd(5, pa + 16 * lda + s * a_step, lda);
      _tile_dpbf16ps(2, 5, 6);
      _tile_dpbf16ps(3, 5, 7);
    }
  }
  _tile_stored(0, c, ldc_bytes);
  _tile_stored(1, c + 16, ldc_bytes);
  if constexpr (MT == 2) {
    _tile_stored(2, c + 16 * ldc, ldc_bytes);
    _tile_stored(3, c + 16 * ldc + 16, ldc_bytes);
  }
}

// 16 floats -> 16 bf16, round to nearest even (NaN stays NaN).
MSA_AMX_TARGET inline __m256i to_bf16(__m512 x) { return (__m256i)_mm512_cvtneps_pbh(x); }

// 2^x on 16 floats for x <= 0 (NaN kept; below -126 gives 0): kExp2Poly, as the AVX2 rows' exp2_ps.
MSA_AMX_TARGET inline __m512 exp2_16(__m512 x) {
  const __m512 lo = _mm512_set1_ps(-126.f);
  const __m512 xc = _mm512_max_ps(lo, x);
  const __m512 n = _mm512_roundscale_ps(xc, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 f = _mm512_sub_ps(xc, n);
  __m512 p = _mm512_set1_ps(kExp2Poly[0]);
  for (int i = 1; i <= kExp2Degree; ++i) p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(kExp2Poly[i]));
  const __m512 r = _mm512_scalef_ps(p, n);
  return _mm512_maskz_mov_ps(~_mm512_cmp_ps_mask(x, lo, _CMP_LT_OQ), r);
}

}  // namespace amx
}  // namespace cpu
}  // namespace detail
}  // namespace msa
