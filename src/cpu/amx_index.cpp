// AMX kernels of the index branch (bf16): one key chunk's scores against the packed query rows of an
// index tile. Pooling and selection stay in index_topk.cpp, shared with the other dtypes.
#include "cpu/amx.h"

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include "cpu/amx_tiles.h"

namespace msa {
namespace detail {
namespace cpu {
namespace amx {

static_assert(kPackKeys == 64, "a chunk is two 32-key column pairs");

MSA_AMX_TARGET ThreadTiles::ThreadTiles() { configure_tiles(); }
// Released so that the thread does not keep 8 KB of tile state live across context switches.
MSA_AMX_TARGET ThreadTiles::~ThreadTiles() { _tile_release(); }

MSA_AMX_TARGET void index_chunk_scores(const uint16_t* q, int d, int64_t first_panel, int64_t panels,
                                       const uint16_t* keys, float* scores, int64_t ldc) {
  const int dk = packed_dim(d);
  const int64_t lda = int64_t(dk) * 2, key_tile_bytes = 16 * lda;  // 16 keys x dk bf16
  for (int64_t pn = first_panel; pn < panels; ++pn)
    for (int pair = 0; pair < 2; ++pair)
      product<2>(q + pn * 32 * dk, lda, 64, keys + pair * 32 * dk, key_tile_bytes, 1024, dk / 32,
                 scores + pn * 32 * ldc + pair * 32, ldc);
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

}  // namespace amx
}  // namespace cpu
}  // namespace detail
}  // namespace msa

#endif
