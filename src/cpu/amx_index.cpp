// AMX kernels of the index branch (bf16): one key chunk's scores against the packed query rows of an
// index tile. Pooling and selection stay in index_topk.cpp, shared with the other dtypes.
#include "cpu/amx.h"

#include <algorithm>

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

MSA_AMX_TARGET void index_chunk_scores(const uint16_t* q, int d, int64_t first_panel, int64_t panels,
                                       const uint16_t* keys, float* scores, int64_t ldc) {
  const int dk = packed_dim(d);
  const int64_t lda = int64_t(dk) * 2, key_tile_bytes = 16 * lda;  // 16 keys x dk bf16
  for (int64_t pn = first_panel; pn < panels; ++pn)
    for (int pair = 0; pair < 2; ++pair)
      product<2>(q + pn * 32 * dk, lda, 64, keys + pair * 32 * dk, key_tile_bytes, 1024, dk / 32,
                 scores + pn * 32 * ldc + pair * 32, ldc);
}

MSA_AMX_TARGET void index_chunk_block_max(const uint16_t* q, int d, int64_t first_panel, int64_t rows,
                                          const uint16_t* keys, const int64_t* position, int64_t c0,
                                          int nk, float iscale, float* scores, float* block_max,
                                          int64_t ld) {
  const int dk = packed_dim(d);
  const int64_t lda = int64_t(dk) * 2, key_tile_bytes = 16 * lda;
  const __m512 neg_inf = _mm512_set1_ps(-__builtin_inff());
  for (int64_t pn = first_panel; pn * 32 < rows; ++pn) {
    for (int pair = 0; pair < 2; ++pair)
      product<2>(q + pn * 32 * dk, lda, 64, keys + pair * 32 * dk, key_tile_bytes, 1024, dk / 32,
                 scores + pair * 32, kPackKeys);
    for (int64_t r = pn * 32; r < std::min<int64_t>(rows, pn * 32 + 32); ++r) {
      const int64_t vis = std::min<int64_t>(nk, position[r] + 1 - c0);  // keys of the chunk it sees
      if (vis <= 0) continue;
      const float* srow = scores + (r - pn * 32) * kPackKeys;
      __m512 m = neg_inf;
      for (int c = 0; c < vis; c += 16) {
        const __mmask16 live = vis - c >= 16 ? __mmask16(0xffff) : __mmask16((1u << (vis - c)) - 1);
        m = _mm512_mask_max_ps(m, live, m, _mm512_loadu_ps(srow + c));
      }
      // iscale > 0 and rounding is monotone, so scaling the max equals the max of scaled scores.
      float& bm = block_max[r * ld];
      bm = std::max(bm, _mm512_reduce_max_ps(m) * iscale);
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

ThreadTiles::ThreadTiles() {}
ThreadTiles::~ThreadTiles() {}
void index_chunk_scores(const uint16_t*, int, int64_t, int64_t, const uint16_t*, float*, int64_t) {}
void index_chunk_block_max(const uint16_t*, int, int64_t, int64_t, const uint16_t*, const int64_t*,
                           int64_t, int, float, float*, float*, int64_t) {}

}  // namespace amx
}  // namespace cpu
}  // namespace detail
}  // namespace msa

#endif
