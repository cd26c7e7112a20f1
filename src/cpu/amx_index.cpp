// AMX kernels of the index branch (bf16): one key chunk's scores against the packed query rows of
// an index tile. Pooling and selection stay in index_topk.cpp, shared with the other dtypes.
#include <algorithm>

#include "cpu/amx.h"

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include "cpu/amx_tiles.h"

namespace msa {
namespace detail {
namespace cpu {
namespace amx {

static_assert(kPackKeys == 64, "a chunk is two 32-key column pairs");

ThreadTiles::ThreadTiles() { configure_tiles(); }
// Released so that the thread does not keep 8 KB of tile state live across context switches.
ThreadTiles::~ThreadTiles() { release_tiles(); }

MSA_AMX_TARGET void index_chunk_scores(const uint16_t* q, int d, int64_t first_panel,
                                       int64_t panels, const uint16_t* keys, float* scores,
                                       int64_t ldc) {
  const int dk = packed_dim(d);
  const int64_t lda = int64_t(dk) * 2, key_tile_bytes = 16 * lda;  // 16 keys x dk bf16
  for (int64_t pn = first_panel; pn < panels; ++pn)
    for (int pair = 0; pair < 2; ++pair)
      product<2>(q + pn * 32 * dk, lda, 64, keys + pair * 32 * dk, key_tile_bytes, 1024, dk / 32,
                 scores + pn * 32 * ldc + pair * 32, ldc);
}

// Lanes of 16 rows (positions in two halves of 8) that see key t.
MSA_AMX_TARGET inline __mmask16 sees(__m512i pos_lo, __m512i pos_hi, int64_t t) {
  const __m512i key = _mm512_set1_epi64(t);
  return __mmask16(_mm512_cmpge_epi64_mask(pos_lo, key) |
                   (_mm512_cmpge_epi64_mask(pos_hi, key) << 8));
}

MSA_AMX_TARGET void index_chunk_max_key_major(const uint16_t* keys, int64_t key_stride, int d,
                                              int nk, int64_t c0, const uint16_t* rows_packed,
                                              int64_t rows, const int64_t* position,
                                              float* scores, float* run_max) {
  const int dk = packed_dim(d);
  const int64_t group_elems = int64_t(dk / 32) * 512;  // score tiles of 16 query rows
  for (int64_t pr = 0; pr * 32 < rows; ++pr) {
    const int64_t r0 = pr * 32;
    if (position[std::min(rows - 1, r0 + 31)] < c0) continue;  // no row of the group sees c0
    __m512 m[2] = {_mm512_loadu_ps(run_max + r0), _mm512_loadu_ps(run_max + r0 + 16)};
    __m512i lo[2], hi[2];
    int64_t first_pos[2];
    for (int h = 0; h < 2; ++h) {
      lo[h] = _mm512_loadu_si512(position + r0 + 16 * h);
      hi[h] = _mm512_loadu_si512(position + r0 + 16 * h + 8);
      first_pos[h] = position[r0 + 16 * h];
    }
    for (int kp = 0; kp * 32 < nk; ++kp) {
      product<2>(keys + kp * 32 * key_stride, key_stride * 2, 64,
                 rows_packed + pr * 2 * group_elems, group_elems * 2, 1024, dk / 32, scores, 32);
      const int n = std::min(32, nk - kp * 32);
      for (int i = 0; i < n; ++i) {
        const int64_t t = c0 + kp * 32 + i;
        for (int h = 0; h < 2; ++h) {
          const __m512 v = _mm512_loadu_ps(scores + i * 32 + 16 * h);
          m[h] = t <= first_pos[h] ? _mm512_max_ps(m[h], v)
                                   : _mm512_mask_max_ps(m[h], sees(lo[h], hi[h], t), m[h], v);
        }
      }
    }
    _mm512_storeu_ps(run_max + r0, m[0]);
    _mm512_storeu_ps(run_max + r0 + 16, m[1]);
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

ThreadTiles::ThreadTiles() {}
ThreadTiles::~ThreadTiles() {}
void index_chunk_scores(const uint16_t*, int, int64_t, int64_t, const uint16_t*, float*, int64_t) {}
void index_chunk_max_key_major(const uint16_t*, int64_t, int, int, int64_t, const uint16_t*,
                               int64_t, const int64_t*, float*, float*) {}

}  // namespace amx
}  // namespace cpu
}  // namespace detail
}  // namespace msa

#endif
