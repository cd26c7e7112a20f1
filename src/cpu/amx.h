// AMX (Intel Advanced Matrix Extensions) path of the CPU backend for bf16 inputs: the index scores
// and the attention forward run their products on the tile unit (TDPBF16PS: bf16 products, f32
// sums), up to ~16x the f32 FMA rate of the same core.
//
// This header holds no intrinsics: it is included by code compiled for the build's baseline
// instruction set. The kernels live in amx_*.cpp, whose functions carry their own target attribute
// (MSA_AMX_TARGET in amx_tiles.h), so a portable build still contains them and only calls them
// after `usable()` has checked the running CPU and kernel.
#pragma once

#include <cstddef>
#include <cstdint>
#include <vector>

#include "core/problem.h"
#include "msa/tensor.h"

namespace msa {
namespace detail {
namespace cpu {
namespace amx {

// True when this process may run AMX bf16 tile instructions: an x86-64 build by GCC or Clang, a CPU
// with AMX-TILE, AMX-BF16 and AVX-512 (F, BW, VL, BF16, VBMI; every AMX CPU so far has them), the kernel's permission for tile data
// (arch_prctl, asked once per process), and the environment variable MSA_CPU_AMX not set to 0
// (read on every call, so tests and benchmarks can compare both paths in one process).
bool usable();

// MSA_CPU_AMX=all: take the tile unit wherever it applies, also where the backend would judge the
// row kernels faster (decode-like attention calls); for tests. Unset or 1: the backend decides.
bool forced();

// Sequences are packed in runs of this many keys (zero-filled past their length), so a key chunk of
// the index (64 keys) or a block of the attention (a multiple of 32) never reads past its run.
constexpr int kPackKeys = 64;

// Head dimension of a packed row: D rounded up to the 32 elements of one tile's reduction step.
inline int packed_dim(int d) { return (d + 31) / 32 * 32; }

// Keys a sequence of `len` keys occupies when packed.
inline int64_t packed_keys(int64_t len) { return (len + kPackKeys - 1) / kPackKeys * kPackKeys; }

// Every sequence of a problem packed in runs of kPackKeys keys, one after the other: where each
// sequence starts (in keys), and which keys of which sequence a run holds.
struct PackedRuns {
  std::vector<int64_t> seq_begin;  // batch + 1 entries
  explicit PackedRuns(const Problem& p);
  int64_t count() const { return seq_begin.back() / kPackKeys; }
  struct Run {
    int seq;
    int64_t first, len;  // keys first .. first + len - 1 of the sequence (len <= kPackKeys)
  };
  Run run(const Problem& p, int64_t r) const;
};

// Keys all sequences of a problem occupy when packed (a bound computable without reading lengths).
inline int64_t packed_keys_bound(const Problem& p) {
  return p.total_k + int64_t(p.batch) * kPackKeys;
}

// bf16 elements of one packed head: keys as the B operand of Q K^T ("score tiles") or values as the
// B operand of P V ("value tiles") both take packed_keys * packed_dim elements.
inline int64_t packed_head_elems(int64_t keys, int d) { return keys * packed_dim(d); }

// Packs rows 0..len-1 of one head (row r at src + r * row_stride, d contiguous bf16 elements) as
// score tiles: for each 16 keys and each 32 dims, a 16 x 16 tile of (dim pair, key) bf16 pairs (the
// VNNI layout TDPBF16PS reads for B). Keys from len up to packed_keys(len) and dims from d up to
// packed_dim(d) are zero.
void pack_score_tiles(const uint16_t* src, int64_t row_stride, int64_t len, int d, uint16_t* dst);

// Packs values the same way for the P V product: for each 32 keys and each 16 dims, a 16 x 16 tile
// of (dim, key pair) bf16 pairs.
void pack_value_tiles(const uint16_t* src, int64_t row_stride, int64_t len, int d, uint16_t* dst);

// Holds the tile configuration of amx_tiles.h on the calling thread for its lifetime (tile state is
// per thread: construct one inside each parallel region, after usable() returned true).
class ThreadTiles {
 public:
  ThreadTiles();
  ~ThreadTiles();
  ThreadTiles(const ThreadTiles&) = delete;
  ThreadTiles& operator=(const ThreadTiles&) = delete;
};

// Index scores of one key chunk (kPackKeys keys) for row panels [first_panel, panels) of 32 rows:
// scores[r * ldc + j] = <q row r, key j of the chunk> (unscaled), where q rows are bf16 rows of
// packed_dim(d) elements (zero-padded) and `keys` points at the chunk in score-tile layout.
void index_chunk_scores(const uint16_t* q, int d, int64_t first_panel, int64_t panels,
                        const uint16_t* keys, float* scores, int64_t ldc);

// The `keys` argument of index_chunk_max_key_major for nk keys at `keys` (rows *stride elements
// apart): the rows in place where kPackKeys rows of packed_dim(d) elements may be read there
// (`in_place`), else a zero-padded copy in `staged` (kPackKeys x packed_dim(d)), *stride then
// becoming its row length.
const uint16_t* key_chunk(const uint16_t* keys, int64_t* stride, int nk, int d, bool in_place,
                          uint16_t* staged);

// The `keys` argument of index_chunk_max_key_major for nk keys of FP8 E4M3 codes (d codes a row, rows
// `stride` bytes apart): widened exactly to bf16 (every E4M3 value is a bf16 value; unscaled) into
// `staged` (kPackKeys x packed_dim(d), zero past nk keys and d), whose row length is packed_dim(d).
void widen_fp8_chunk(const uint8_t* codes, int64_t stride, int nk, int d, uint16_t* staged);

// `rows` rows of n FP8 E4M3 codes (`stride` bytes apart) -> f32 x scale into dst (rows dp floats
// apart, zero padding past n): the attention's K / V rows of an FP8 page (the same exact widening,
// then bf16 -> f32, then the page scale).
void dequantise_fp8_rows(const uint8_t* src, int64_t stride, int rows, int n, float scale, float* dst, int dp);

// The query rows of the key-major kernel: `rows` bf16 rows of packed_dim(d) elements (zero-padded
// up to packed_keys(rows)) packed as score tiles into `packed`, and their positions (nondecreasing)
// padded so that the padding rows see every key; their results are never read.
void pack_key_major_rows(const uint16_t* qrows, int64_t rows, int d, int64_t* position,
                         uint16_t* packed);

// Key-major scores of one chunk for the max-pooling fast path (no selected LSE asked, blocks a
// multiple of kPackKeys keys): the chunk's nk keys are the A operand straight from their rows
// (`keys`, rows key_stride elements apart, packed_dim(d) readable elements each and kPackKeys rows:
// the caller stages a chunk that would read past the sequence or past d, see key_chunk), the query
// rows the B operand (`rows_packed`, from pack_key_major_rows), so a product's rows are keys and
// its lanes query rows, and pooling along keys needs no horizontal reduction. For every 32-row
// group with a row that sees c0: run_max[r] = max(run_max[r], max of the unscaled scores of the keys
// c0 + t, t < nk, with c0 + t <= position[r]). `scores`: 32 x 32 floats.
void index_chunk_max_key_major(const uint16_t* keys, int64_t key_stride, int d, int nk, int64_t c0,
                               const uint16_t* rows_packed, int64_t rows, const int64_t* position,
                               float* scores, float* run_max);

}  // namespace amx
}  // namespace cpu
}  // namespace detail
}  // namespace msa
