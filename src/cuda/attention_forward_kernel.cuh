// Block-sparse (and dense causal) attention forward: one CTA of 4 warps computes a tile of 64 rows,
// where the rows are (query, head) pairs of ONE GQA group flattened query-major, so the G heads of a
// query that share their selected blocks sit in consecutive rows of the matrix unit (G = 16: 4
// queries x 16 heads). The CTA walks the sorted union of the blocks its queries selected, 64 keys at
// a time, masking per row the blocks its query did not select and the causal tail; FlashAttention-2
// online softmax in registers, fp32 accumulation, mma.sync m16n8k16 tensor-core products.
#pragma once

#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>

#include "cuda/attention_mma.cuh"
#include "cuda/attention_block_union.cuh"
#include "msa/rules.h"

namespace msa {
namespace detail {
namespace cuda {

struct AttentionParams {
  const void* q;
  const void* k;
  const void* v;
  void* out;
  float* lse;
  const int32_t* topk;  // nullptr: dense causal (every block 0..local)
  const int32_t* cu_q;
  const int32_t* cu_k;
  int64_t q_s0, q_s1, k_s0, k_s1, v_s0, v_s1, o_s0, o_s1, lse_s0, lse_s1, topk_s0, topk_s1;
  int topk_k;        // slots per topk row
  int group_size;    // G
  int block_size;    // B, a multiple of kAttnKeys
  int bitmap_words;  // capacity of the per-CTA block bitmap (32 blocks a word)
  int union_cap;     // capacity of the per-CTA union of selected blocks
  float scale_log2;  // softmax scale * log2(e)
  float scale;
};

constexpr int kAttnRows = 64;     // rows of a CTA tile
constexpr int kAttnKeys = 64;     // keys per pipeline stage
constexpr int kAttnThreads = 128;

template <int D>
struct AttentionSmem {
  static constexpr int kTileElems = kAttnRows * D;  // kAttnKeys == kAttnRows
  static constexpr std::size_t kTileBytes = std::size_t(kTileElems) * 2;
  // Q, K[2], V[2], then the union bookkeeping.
  static constexpr std::size_t kFixedBytes = 5 * kTileBytes;
  static std::size_t bytes(int bitmap_words, int union_cap) {
    return kFixedBytes + BlockUnionSmem<1>::bytes(bitmap_words, union_cap);
  }
};

// Swizzled element offset of (row, col) in a [64][D] 16-bit tile: 16-byte chunks XOR the row's low
// three bits, so ldmatrix's 8 row addresses of one chunk column fall in distinct banks.
template <int D>
__device__ __forceinline__ int swz(int row, int col) {
  return row * D + ((((col >> 3) ^ (row & 7))) << 3) + (col & 7);
}

// Copies 64 rows of D elements into a swizzled tile; row r comes from row_ptr(r), or zeros when null.
// `any_row` is a valid address passed with the zero-fill copies (they read nothing). Threads: the
// CTA's size (each copy is issued by one thread).
template <int D, int Threads = kAttnThreads, class RowPtr>
__device__ __forceinline__ void load_tile(uint16_t* tile, const uint16_t* any_row, RowPtr row_ptr) {
  constexpr int kChunks = D / 8;
  for (int i = threadIdx.x; i < kAttnRows * kChunks; i += Threads) {
    const int r = i / kChunks, c = i % kChunks;
    const uint16_t* src = row_ptr(r);
    mma::cp_async_16(mma::smem_addr(tile + swz<D>(r, c * 8)), src ? src + c * 8 : any_row, src ? 16 : 0);
  }
}

// Keys [ks, ks + 64) of a sequence whose keys start at packed row k_begin (row stride s0, column
// offset col0: a group's slice) into a swizzled tile; rows at or past lk are zeros.
template <int D, int Threads = kAttnThreads>
__device__ __forceinline__ void load_key_rows(uint16_t* tile, const uint16_t* base, int64_t k_begin, int64_t ks,
                                              int64_t lk, int64_t s0, int64_t col0) {
  load_tile<D, Threads>(tile, base, [&](int r) -> const uint16_t* {
    const int64_t t = ks + r;
    return t < lk ? base + (k_begin + t) * s0 + col0 : nullptr;
  });
}

// s = A K^T for this warp's 16 rows of A (rows 16 warp .. of a swizzled [64][D] tile) against the 64
// rows of the swizzled [64][D] tile K: the score product of every 64-row tile kernel that keeps its
// A rows in shared memory. fp32 accumulators in the mma.sync C layout, zeroed first.
template <class T, int D>
__device__ __forceinline__ void warp_scores(const uint16_t* sA, const uint16_t* sK, float (&s)[kAttnKeys / 8][4]) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
#pragma unroll
  for (int n = 0; n < kAttnKeys / 8; ++n) s[n][0] = s[n][1] = s[n][2] = s[n][3] = 0.f;
#pragma unroll
  for (int kk = 0; kk < D / 16; ++kk) {
    uint32_t a[4];
    {
      const int r = warp * 16 + (lane & 15), c = kk * 16 + (lane >> 4) * 8;
      mma::ldmatrix_x4(mma::smem_addr(sA + swz<D>(r, c)), a[0], a[1], a[2], a[3]);
    }
#pragma unroll
    for (int np = 0; np < kAttnKeys / 16; ++np) {
      uint32_t b0, b1, b2, b3;
      const int r = np * 16 + (lane & 7) + (lane >> 4) * 8, c = kk * 16 + ((lane >> 3) & 1) * 8;
      mma::ldmatrix_x4(mma::smem_addr(sK + swz<D>(r, c)), b0, b1, b2, b3);
      mma::mma_16816<T>(s[2 * np], a, b0, b1);
      mma::mma_16816<T>(s[2 * np + 1], a, b2, b3);
    }
  }
}

// o += s V for this warp's 16 rows: s, a [16 rows][64 keys] accumulator tile (P, or dS), re-packed to
// 16-bit A fragments in place of a trip through shared memory; V the swizzled [64 keys][D] tile.
template <class T, int D>
__device__ __forceinline__ void warp_acc_times_tile(const float (&s)[kAttnKeys / 8][4], const uint16_t* sV,
                                                    float (&o)[D / 8][4]) {
  const int lane = threadIdx.x & 31;
#pragma unroll
  for (int kk = 0; kk < kAttnKeys / 16; ++kk) {
    uint32_t a[4];
    a[0] = mma::Elem<T>::pack(s[2 * kk][0], s[2 * kk][1]);
    a[1] = mma::Elem<T>::pack(s[2 * kk][2], s[2 * kk][3]);
    a[2] = mma::Elem<T>::pack(s[2 * kk + 1][0], s[2 * kk + 1][1]);
    a[3] = mma::Elem<T>::pack(s[2 * kk + 1][2], s[2 * kk + 1][3]);
#pragma unroll
    for (int dp = 0; dp < D / 16; ++dp) {
      uint32_t b0, b1, b2, b3;
      const int r = kk * 16 + (lane & 7) + ((lane >> 3) & 1) * 8, c = dp * 16 + (lane >> 4) * 8;
      mma::ldmatrix_x4_trans(mma::smem_addr(sV + swz<D>(r, c)), b0, b1, b2, b3);
      mma::mma_16816<T>(o[2 * dp], a, b0, b1);
      mma::mma_16816<T>(o[2 * dp + 1], a, b2, b3);
    }
  }
}

template <class T, int D>
__global__ void __launch_bounds__(kAttnThreads, 2) attention_forward_kernel(const AttentionParams p) {
  extern __shared__ __align__(128) unsigned char smem_raw[];
  uint16_t* sQ = reinterpret_cast<uint16_t*>(smem_raw);
  uint16_t* sK = sQ + AttentionSmem<D>::kTileElems;      // two stages
  uint16_t* sV = sK + 2 * AttentionSmem<D>::kTileElems;  // two stages
  const BlockUnionSmem<1> su =
      BlockUnionSmem<1>::carve(smem_raw + AttentionSmem<D>::kFixedBytes, p.bitmap_words, p.union_cap);

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int b = blockIdx.z, g = blockIdx.y;
  const int G = p.group_size, B = p.block_size;
  const int64_t q_begin = p.cu_q[b], lq = p.cu_q[b + 1] - q_begin;
  const int64_t k_begin = p.cu_k[b], lk = p.cu_k[b + 1] - k_begin;
  const int64_t rows_total = lq * G;
  // Longest tiles (latest queries) launch first: better tail balance under causal masking.
  const int64_t f0 = int64_t(gridDim.x - 1 - blockIdx.x) * kAttnRows;
  if (f0 >= rows_total) return;
  const int64_t i_first = f0 / G;
  const int64_t i_last = (f0 + kAttnRows - 1 < rows_total ? f0 + kAttnRows - 1 : rows_total - 1) / G;
  const int64_t p_first = rules::query_position(lq, lk, i_first);
  const int64_t p_last = rules::query_position(lq, lk, i_last);
  const int64_t local_last = rules::local_block(p_last, B);
  const bool dense = p.topk == nullptr;
  const bool partial_tile = f0 + kAttnRows > rows_total;

  const uint16_t* q = static_cast<const uint16_t*>(p.q);
  const uint16_t* k = static_cast<const uint16_t*>(p.k);
  const uint16_t* v = static_cast<const uint16_t*>(p.v);

  // Q tile (first cp.async group).
  load_tile<D>(sQ, q, [&](int r) -> const uint16_t* {
    const int64_t f = f0 + r;
    if (f >= rows_total) return nullptr;
    return q + (q_begin + f / G) * p.q_s0 + (int64_t(g) * G + f % G) * p.q_s1;
  });
  mma::cp_async_commit();

  // Union of the selected blocks (attention_block_union.cuh).
  int num_union = int(local_last + 1);
  if (!dense) {
    num_union = build_block_union<kAttnThreads, 1>(su, p.topk, p.topk_s0, p.topk_s1, p.topk_k, p.union_cap, g,
                                                   q_begin, lq, lk, B, i_first, i_last, local_last);
  }
  auto block_at = [&](int u) -> int64_t { return dense ? int64_t(u) : int64_t(su.blocks[u]); };

  // Key tiles: every sub-tile of each union block, except sub-tiles past the tile's last position.
  const int sub_per_block = B / kAttnKeys;
  int num_iters = 0;
  if (num_union > 0) {
    const int64_t last_block = block_at(num_union - 1);
    const int64_t last_subs = (p_last - rules::block_begin(last_block, B)) / kAttnKeys + 1;
    num_iters = (num_union - 1) * sub_per_block + int(last_subs < sub_per_block ? last_subs : sub_per_block);
  }
  auto key_start = [&](int it) -> int64_t {
    return rules::block_begin(block_at(it / sub_per_block), B) + int64_t(it % sub_per_block) * kAttnKeys;
  };
  auto load_kv = [&](int it, int stage) {
    const int64_t ks = key_start(it);
    load_tile<D>(sK + stage * AttentionSmem<D>::kTileElems, k, [&](int r) -> const uint16_t* {
      const int64_t t = ks + r;
      return t < lk ? k + (k_begin + t) * p.k_s0 + int64_t(g) * p.k_s1 : nullptr;
    });
    load_tile<D>(sV + stage * AttentionSmem<D>::kTileElems, v, [&](int r) -> const uint16_t* {
      const int64_t t = ks + r;
      return t < lk ? v + (k_begin + t) * p.v_s0 + int64_t(g) * p.v_s1 : nullptr;
    });
  };
  if (num_iters > 0) load_kv(0, 0);
  mma::cp_async_commit();

  // This thread's two rows (r and r + 8 of its warp's 16): position (-1 = padding row) and query bit.
  const int row_a = warp * 16 + (lane >> 2);
  int64_t pos[2];
  int qbit[2];
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const int64_t f = f0 + row_a + 8 * h;
    const bool valid = f < rows_total;
    pos[h] = valid ? rules::query_position(lq, lk, f / G) : -1;
    qbit[h] = valid ? int(f / G - i_first) : 0;
  }
  const unsigned long long all_queries =
      (i_last - i_first + 1) >= 64 ? ~0ull : ((1ull << (i_last - i_first + 1)) - 1ull);

  mma::cp_async_wait<1>();
  __syncthreads();
  uint32_t qf[D / 16][4];
#pragma unroll
  for (int kk = 0; kk < D / 16; ++kk) {
    const int r = warp * 16 + (lane & 15), c = kk * 16 + (lane >> 4) * 8;
    mma::ldmatrix_x4(mma::smem_addr(sQ + swz<D>(r, c)), qf[kk][0], qf[kk][1], qf[kk][2], qf[kk][3]);
  }

  float o[D / 8][4];
#pragma unroll
  for (int n = 0; n < D / 8; ++n) o[n][0] = o[n][1] = o[n][2] = o[n][3] = 0.f;
  float m_run[2] = {-INFINITY, -INFINITY}, l_run[2] = {0.f, 0.f};

  for (int it = 0; it < num_iters; ++it) {
    const int stage = it & 1;
    if (it + 1 < num_iters) {
      load_kv(it + 1, stage ^ 1);
      mma::cp_async_commit();
      mma::cp_async_wait<1>();
    } else {
      mma::cp_async_wait<0>();
    }
    __syncthreads();
    const uint16_t* tK = sK + stage * AttentionSmem<D>::kTileElems;
    const uint16_t* tV = sV + stage * AttentionSmem<D>::kTileElems;
    const int64_t ks = key_start(it);

    float s[kAttnKeys / 8][4];
#pragma unroll
    for (int n = 0; n < kAttnKeys / 8; ++n) s[n][0] = s[n][1] = s[n][2] = s[n][3] = 0.f;
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk) {
#pragma unroll
      for (int np = 0; np < kAttnKeys / 16; ++np) {
        uint32_t b0, b1, b2, b3;
        const int r = np * 16 + (lane & 7) + (lane >> 4) * 8, c = kk * 16 + ((lane >> 3) & 1) * 8;
        mma::ldmatrix_x4(mma::smem_addr(tK + swz<D>(r, c)), b0, b1, b2, b3);
        mma::mma_16816<T>(s[2 * np], qf[kk], b0, b1);
        mma::mma_16816<T>(s[2 * np + 1], qf[kk], b2, b3);
      }
    }

    // Mask unselected rows and the causal tail; skipped when the whole sub-tile is visible to all rows.
    const unsigned long long sel = dense ? all_queries : su.mask[it / sub_per_block];
    if (partial_tile || sel != all_queries || ks + kAttnKeys - 1 > p_first) {
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const bool row_sel = (sel >> qbit[h]) & 1ull;
        const int64_t lim = row_sel ? pos[h] - ks : -1;  // last visible key offset in this sub-tile
#pragma unroll
        for (int n = 0; n < kAttnKeys / 8; ++n) {
#pragma unroll
          for (int j = 0; j < 2; ++j) {
            const int key = n * 8 + (lane & 3) * 2 + j;
            if (key > lim) s[n][2 * h + j] = -INFINITY;
          }
        }
      }
    }

    // Online softmax (scores stay raw; exp2 with the scale folded in).
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      float mx = m_run[h];
#pragma unroll
      for (int n = 0; n < kAttnKeys / 8; ++n) mx = fmaxf(mx, fmaxf(s[n][2 * h], s[n][2 * h + 1]));
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
      const float m_scaled = mx == -INFINITY ? 0.f : mx * p.scale_log2;
      const float alpha = exp2f(m_run[h] * p.scale_log2 - m_scaled);
      m_run[h] = mx;
      float sum = 0.f;
#pragma unroll
      for (int n = 0; n < kAttnKeys / 8; ++n) {
#pragma unroll
        for (int j = 0; j < 2; ++j) {
          const float e = exp2f(fmaf(s[n][2 * h + j], p.scale_log2, -m_scaled));
          s[n][2 * h + j] = e;
          sum += e;
        }
      }
      l_run[h] = l_run[h] * alpha + sum;
#pragma unroll
      for (int n = 0; n < D / 8; ++n) {
        o[n][2 * h] *= alpha;
        o[n][2 * h + 1] *= alpha;
      }
    }

    // O += P V.
    warp_acc_times_tile<T, D>(s, tV, o);
    __syncthreads();
  }

  // Epilogue: normalize and store. A row that saw no key (only with malformed topk rows) gets
  // out = 0 and lse = -inf.
  T* out = static_cast<T*>(p.out);
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    float l = l_run[h];
    l += __shfl_xor_sync(0xffffffffu, l, 1);
    l += __shfl_xor_sync(0xffffffffu, l, 2);
    if (pos[h] < 0) continue;
    const int64_t f = f0 + row_a + 8 * h;
    const int64_t row = q_begin + f / G;
    const int64_t head = int64_t(g) * G + f % G;
    const float inv = l > 0.f ? 1.f / l : 0.f;
    T* dst = out + row * p.o_s0 + head * p.o_s1 + (lane & 3) * 2;
#pragma unroll
    for (int n = 0; n < D / 8; ++n) {
      const uint32_t packed = mma::Elem<T>::pack(o[n][2 * h] * inv, o[n][2 * h + 1] * inv);
      *reinterpret_cast<uint32_t*>(dst + n * 8) = packed;
    }
    if ((lane & 3) == 0)
      p.lse[row * p.lse_s0 + head * p.lse_s1] = l > 0.f ? m_run[h] * p.scale + logf(l) : -INFINITY;
  }
}

}  // namespace cuda
}  // namespace detail
}  // namespace msa
