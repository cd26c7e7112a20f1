// Key-major KL alignment over wide gathered tiles, for GQA groups of 16 or 32 heads (Hq 64 / Hkv 4,
// Hq 16 / Hkv 1, Hq 64 / Hkv 2, ...). Same work, inputs and outputs as kl_mma_key_kernel
// (kl_alignment_mma_kernel.cuh): dki in registers, and each query's dqi share and the loss where the
// per-query partials fit; the launch picks one of the two. Organised so the teacher never leaves
// registers:
//   - a CTA of 8 warps owns 64 keys and walks, group by group, the queries that selected their block
//     (key_query_lists.cuh) in tiles of 256 rows = 256 / G whole queries (16 at G = 16); each warp
//     owns two m-tiles (32 rows: two queries, or one at G = 32);
//   - S = Q K^T by mma.sync, both m-tiles per K fragment (half the K reads from shared memory of one
//     m-tile at a time); P = exp2(S scale - lse) in registers; the teacher of a query (the mean of
//     its G head rows) by a reduce-scatter over the lanes, after which each lane holds the teacher of
//     two keys and computes their student probability, loss term and logit gradient dZ = Q - T;
//   - the student logits Z = qi ki^T, dki += dZ^T qi and the dqi partials dZ ki are one 16-query
//     product each per tile, shared by the CTA (G = 16 fills all 16 rows).
// Why: the 64-row kernel stores P in shared memory and sums the teacher with a scalar loop between
// four barriers per 4 queries; at 128K tokens (Hq 64 / Hkv 4) it ran at ~40 TFLOP/s of teacher
// products on an H200, a tenth of the forward's rate.
// No atomics, fixed orders: bitwise reproducible, as the other KL kernels.
#pragma once

#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>

#include "cuda/attention_forward_kernel.cuh"  // kAttnKeys, swz, load_key_rows
#include "cuda/attention_mma.cuh"
#include "cuda/exp2_ftz.cuh"
#include "cuda/key_query_lists.cuh"
#include "cuda/kl_alignment_mma_kernel.cuh"  // KlMmaParams, kKlPStride
#include "cuda/query_partials.cuh"
#include "msa/rules.h"

namespace msa {
namespace detail {
namespace cuda {

constexpr int kKlWideRows = 256;     // (query, head) rows of a gathered tile
constexpr int kKlWideThreads = 256;  // 8 warps of 32 rows
constexpr int kKlWideQueries = 16;   // rows of the student products: the most queries a tile holds

static_assert(kKlWideThreads == kKlWideRows, "issue_tile copies one row's lse per thread");
static_assert(kKlWideThreads / 32 * 8 == kAttnKeys, "the student logits take 8 keys a warp");

// Groups the wide kernel takes: whole m-tiles per query, at most two per warp.
__host__ __device__ inline bool kl_wide_group(int G) { return G == 16 || G == 32; }

// Shared memory, in carving order: Q and qi tiles (two stages), K and ki tiles, Z (fp32), dZ, then the
// per-row lse and per-query partial index, limit and student LSE (two stages), the loss reduction and
// the staged query lists.
template <int D, int Di>
struct KlWideSmem {
  static constexpr std::size_t kQ = std::size_t(kKlWideRows) * D * 2;
  static constexpr std::size_t kQi = std::size_t(kKlWideQueries) * Di * 2;
  static constexpr std::size_t kK = std::size_t(kAttnKeys) * D * 2;
  static constexpr std::size_t kKi = std::size_t(kAttnKeys) * Di * 2;
  static constexpr std::size_t kZ = std::size_t(kKlWideQueries) * kKlPStride * 4;
  static constexpr std::size_t kDz = std::size_t(kKlWideQueries) * kAttnKeys * 2;
  static constexpr std::size_t kLse = std::size_t(kKlWideRows) * 4;
  static constexpr std::size_t kPart = std::size_t(kKlWideQueries) * 8;
  static constexpr std::size_t kLim = std::size_t(kKlWideQueries) * 4;
  static constexpr std::size_t kRed = std::size_t(kKlWideThreads) * 8;
  static constexpr std::size_t kBytes =
      2 * (kQ + kQi) + kK + kKi + kZ + kDz + 2 * (kLse + kPart + 2 * kLim) + kRed + GatheredQueryStage::kBytes;
};

template <int D, int Di>
struct KlWideTiles {
  using S = KlWideSmem<D, Di>;
  uint16_t *q, *qi, *k, *ki, *dz;  // q, qi: stage s at + s * (kQ / 2), + s * (kQi / 2)
  float *z, *lse, *slse;           // lse: [2][256]; slse: [2][16]
  int64_t* part;                   // [2][16]: the query's dqi partial (-1: none)
  int* lim;                        // [2][16]: the query's last visible key offset here (-1: none)
  double* red;
  int* staged;
  __device__ explicit KlWideTiles(unsigned char* at) {
    q = reinterpret_cast<uint16_t*>(at), at += 2 * S::kQ;
    qi = reinterpret_cast<uint16_t*>(at), at += 2 * S::kQi;
    k = reinterpret_cast<uint16_t*>(at), at += S::kK;
    ki = reinterpret_cast<uint16_t*>(at), at += S::kKi;
    z = reinterpret_cast<float*>(at), at += S::kZ;
    dz = reinterpret_cast<uint16_t*>(at), at += S::kDz;
    lse = reinterpret_cast<float*>(at), at += 2 * S::kLse;
    part = reinterpret_cast<int64_t*>(at), at += 2 * S::kPart;
    lim = reinterpret_cast<int*>(at), at += 2 * S::kLim;
    slse = reinterpret_cast<float*>(at), at += 2 * S::kLim;
    red = reinterpret_cast<double*>(at), at += S::kRed;
    staged = reinterpret_cast<int*>(at);
  }
};

// Student logits Z = qi ki^T (unscaled) of the tile's 16 query rows: warp w computes keys 8w .. 8w + 7.
template <class T, int Di>
__device__ __forceinline__ void kl_wide_student_logits(const uint16_t* sQi, const uint16_t* sKi, float* sZ) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  float z[4] = {0.f, 0.f, 0.f, 0.f};
#pragma unroll
  for (int kk2 = 0; kk2 < Di / 32; ++kk2) {
    uint32_t b[4];  // k-steps 2 kk2 and 2 kk2 + 1 of the warp's 8 keys
    mma::ldmatrix_x4(mma::smem_addr(sKi + swz<Di>(warp * 8 + (lane & 7), kk2 * 32 + (lane >> 3) * 8)), b[0], b[1],
                     b[2], b[3]);
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      uint32_t a[4];
      mma::ldmatrix_x4(mma::smem_addr(sQi + swz<Di>(lane & 15, (2 * kk2 + h) * 16 + (lane >> 4) * 8)), a[0], a[1],
                       a[2], a[3]);
      mma::mma_16816<T>(z, a, b[2 * h], b[2 * h + 1]);
    }
  }
  const int row = lane >> 2, key = warp * 8 + (lane & 3) * 2;
  *reinterpret_cast<float2*>(sZ + row * kKlPStride + key) = make_float2(z[0], z[1]);
  *reinterpret_cast<float2*>(sZ + (row + 8) * kKlPStride + key) = make_float2(z[2], z[3]);
}

// v[n][c]: this lane's partial sums of keys 8 n + 2 (lane & 3) + c. Sums them over the 8 lanes that
// share lane & 3 by halving exchanges (lane bits 4, 3, 2), so lane L ends with the full sums of keys
// 2 L and 2 L + 1: 14 shuffles where a butterfly would take 48.
__device__ __forceinline__ float2 kl_wide_column_sums(const float (&v)[kAttnKeys / 8][2]) {
  const int lane = threadIdx.x & 31;
  float w4[4][2], w2[2][2], w1[2];
  const bool b4 = lane & 16, b3 = lane & 8, b2 = lane & 4;
#pragma unroll
  for (int i = 0; i < 4; ++i)
#pragma unroll
    for (int c = 0; c < 2; ++c)
      w4[i][c] = (b4 ? v[4 + i][c] : v[i][c]) + __shfl_xor_sync(0xffffffffu, b4 ? v[i][c] : v[4 + i][c], 16);
#pragma unroll
  for (int i = 0; i < 2; ++i)
#pragma unroll
    for (int c = 0; c < 2; ++c)
      w2[i][c] = (b3 ? w4[2 + i][c] : w4[i][c]) + __shfl_xor_sync(0xffffffffu, b3 ? w4[i][c] : w4[2 + i][c], 8);
#pragma unroll
  for (int c = 0; c < 2; ++c)
    w1[c] = (b2 ? w2[1][c] : w2[0][c]) + __shfl_xor_sync(0xffffffffu, b2 ? w2[0][c] : w2[1][c], 4);
  return make_float2(w1[0], w1[1]);
}

// Query j's teacher sums t (keys 2 lane, 2 lane + 1) -> its loss terms (returned) and dZ = Q - T into
// row j of the swizzled [16][64] dZ tile (0 past the query's visible keys).
template <class T>
__device__ __forceinline__ double kl_wide_terms(float2 t, int j, int lim, float slse, const float* sZ, float inv_g,
                                                float iscale, uint16_t* sDz) {
  const int lane = threadIdx.x & 31;
  const float2 z = *reinterpret_cast<const float2*>(sZ + j * kKlPStride + 2 * lane);
  double loss = 0.0;
  float dz[2];
#pragma unroll
  for (int c = 0; c < 2; ++c) {
    const float tt = (c ? t.y : t.x) * inv_g;
    dz[c] = 0.f;
    if (2 * lane + c <= lim) {
      const float log_q = (c ? z.y : z.x) * iscale - slse;
      if (tt > 0.f) loss += double(tt * (logf(tt) - log_q));
      dz[c] = expf(log_q) - tt;
    }
  }
  *reinterpret_cast<uint32_t*>(sDz + swz<kAttnKeys>(j, 2 * lane)) = mma::Elem<T>::pack(dz[0], dz[1]);
  return loss;
}

// The teacher of this warp's 32 rows (one or two queries) against the 64 keys, and their loss terms
// and dZ rows. lse: per row; lim, slse: per query of the tile.
template <class T, int D>
__device__ __forceinline__ double kl_wide_teacher(const uint16_t* sQ, const uint16_t* sK, const float* lse,
                                                  const int* lim, const float* slse, const float* sZ, int G,
                                                  float scale_log2, float iscale, uint16_t* sDz) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  float s[2][kAttnKeys / 8][4];
#pragma unroll
  for (int m = 0; m < 2; ++m)
#pragma unroll
    for (int n = 0; n < kAttnKeys / 8; ++n) s[m][n][0] = s[m][n][1] = s[m][n][2] = s[m][n][3] = 0.f;
#pragma unroll
  for (int kk = 0; kk < D / 16; ++kk) {
    uint32_t a[2][4];
#pragma unroll
    for (int m = 0; m < 2; ++m)
      mma::ldmatrix_x4(mma::smem_addr(sQ + swz<D>(warp * 32 + m * 16 + (lane & 15), kk * 16 + (lane >> 4) * 8)),
                       a[m][0], a[m][1], a[m][2], a[m][3]);
#pragma unroll
    for (int np = 0; np < kAttnKeys / 16; ++np) {
      uint32_t b0, b1, b2, b3;
      const int r = np * 16 + (lane & 7) + (lane >> 4) * 8, c = kk * 16 + ((lane >> 3) & 1) * 8;
      mma::ldmatrix_x4(mma::smem_addr(sK + swz<D>(r, c)), b0, b1, b2, b3);
#pragma unroll
      for (int m = 0; m < 2; ++m) {
        mma::mma_16816<T>(s[m][2 * np], a[m], b0, b1);
        mma::mma_16816<T>(s[m][2 * np + 1], a[m], b2, b3);
      }
    }
  }
  const float inv_g = 1.f / float(G);
  double loss = 0.0;
  float t[kAttnKeys / 8][2];
#pragma unroll
  for (int m = 0; m < 2; ++m) {
    const int first_row = warp * 32 + m * 16;
    const int j = first_row / G;
    const int lim_j = lim[j];
    const int row = first_row + (lane >> 2);
    const float l0 = lse[row] * 1.4426950408889634f, l1 = lse[row + 8] * 1.4426950408889634f;
    if (first_row % G == 0) {
#pragma unroll
      for (int n = 0; n < kAttnKeys / 8; ++n) t[n][0] = t[n][1] = 0.f;
    }
#pragma unroll
    for (int n = 0; n < kAttnKeys / 8; ++n)
#pragma unroll
      for (int c = 0; c < 2; ++c) {
        const bool seen = n * 8 + (lane & 3) * 2 + c <= lim_j;
        t[n][c] += seen ? exp2_ftz(fmaf(s[m][n][c], scale_log2, -l0)) + exp2_ftz(fmaf(s[m][n][c + 2], scale_log2, -l1))
                        : 0.f;
      }
    if ((first_row + 16) % G == 0)
      loss += kl_wide_terms<T>(kl_wide_column_sums(t), j, lim_j, slse[j], sZ, inv_g, iscale, sDz);
  }
  return loss;
}

// dki (64 keys x Di) += dZ^T qi over the tile's 16 query rows: warp w owns keys 16 (w % 4) .. + 15 and
// index dims (w / 4) Di / 2 .. + Di / 2.
template <class T, int Di>
__device__ __forceinline__ void kl_wide_dki(const uint16_t* sDz, const uint16_t* sQi, float (&acc)[Di / 16][4]) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int km = warp & 3, dh = warp >> 2;
  uint32_t a[4];  // dZ^T (rows: keys, k: queries), transposed by ldmatrix
  mma::ldmatrix_x4_trans(mma::smem_addr(sDz + swz<kAttnKeys>((lane & 7) + (lane >> 4) * 8, km * 16 + ((lane >> 3) & 1) * 8)),
                         a[0], a[1], a[2], a[3]);
#pragma unroll
  for (int dp = 0; dp < Di / 32; ++dp) {
    uint32_t b0, b1, b2, b3;
    const int r = (lane & 7) + ((lane >> 3) & 1) * 8, c = dh * (Di / 2) + dp * 16 + (lane >> 4) * 8;
    mma::ldmatrix_x4_trans(mma::smem_addr(sQi + swz<Di>(r, c)), b0, b1, b2, b3);
    mma::mma_16816<T>(acc[2 * dp], a, b0, b1);
    mma::mma_16816<T>(acc[2 * dp + 1], a, b2, b3);
  }
}

// Each query's dqi share of these 64 keys, dZ ki, into its partial (part: per query, -1: none):
// warp w owns index dims 16 w .. 16 w + 15.
template <class T, int Di>
__device__ __forceinline__ void kl_wide_dqi_partials(const uint16_t* sDz, const uint16_t* sKi, const int64_t* part,
                                                     float* dqi_part) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  if (warp * 16 >= Di) return;
  float dq[2][4] = {{0.f, 0.f, 0.f, 0.f}, {0.f, 0.f, 0.f, 0.f}};
#pragma unroll
  for (int kk = 0; kk < kAttnKeys / 16; ++kk) {
    uint32_t a[4], b0, b1, b2, b3;
    mma::ldmatrix_x4(mma::smem_addr(sDz + swz<kAttnKeys>(lane & 15, kk * 16 + (lane >> 4) * 8)), a[0], a[1], a[2],
                     a[3]);
    const int r = kk * 16 + (lane & 7) + ((lane >> 3) & 1) * 8, c = warp * 16 + (lane >> 4) * 8;
    mma::ldmatrix_x4_trans(mma::smem_addr(sKi + swz<Di>(r, c)), b0, b1, b2, b3);
    mma::mma_16816<T>(dq[0], a, b0, b1);
    mma::mma_16816<T>(dq[1], a, b2, b3);
  }
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const int64_t pp = part[(lane >> 2) + 8 * h];
    if (pp < 0) continue;
    float* dst = dqi_part + pp * Di + warp * 16 + (lane & 3) * 2;
#pragma unroll
    for (int n = 0; n < 2; ++n) *reinterpret_cast<float2*>(dst + n * 8) = make_float2(dq[n][2 * h], dq[n][2 * h + 1]);
  }
}

// Grid (key tiles of the longest sequence, batch, key splits); the CTA loops over the groups.
template <class T, int D, int Di>
__global__ void __launch_bounds__(kKlWideThreads, 1) kl_mma_key_wide_kernel(const KlMmaParams p) {
  using S = KlWideSmem<D, Di>;
  extern __shared__ __align__(128) unsigned char smem_raw[];
  const KlWideTiles<D, Di> s(smem_raw);
  GatheredQueryStage staged(s.staged);

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int b = blockIdx.y;
  const int G = p.G, B = p.B;
  const int64_t q_begin = p.cu_q[b], lq = p.cu_q[b + 1] - q_begin;
  const int64_t k_begin = p.cu_k[b], lk = p.cu_k[b + 1] - k_begin;
  const int64_t ks = int64_t(blockIdx.x) * kAttnKeys;
  if (ks >= lk) return;
  const bool dense = p.topk == nullptr;

  const uint16_t* q = static_cast<const uint16_t*>(p.q);
  const uint16_t* k = static_cast<const uint16_t*>(p.k);
  const uint16_t* qi = static_cast<const uint16_t*>(p.qi);
  const uint16_t* ki = static_cast<const uint16_t*>(p.ki);

  load_key_rows<Di, kKlWideThreads>(s.ki, ki, k_begin, ks, lk, p.ki_s0, 0);
  mma::cp_async_commit();
  // dZ rows past a tile's queries (G = 32: rows 8..15) are never written: zeros, so that the dki
  // product (their qi rows are zeros) adds exact zeros.
  for (int i = tid; i < int(S::kDz / 4); i += kKlWideThreads) reinterpret_cast<uint32_t*>(s.dz)[i] = 0u;

  float acc[Di / 16][4];
#pragma unroll
  for (int n = 0; n < Di / 16; ++n) acc[n][0] = acc[n][1] = acc[n][2] = acc[n][3] = 0.f;
  double loss = 0.0;

  for (int g = 0; g < p.hkv; ++g) {
    const GatheredWalk walk(p.lists, dense, G, g, b, k_begin, ks, lq, lk, B, p.key_splits, int(blockIdx.z),
                            kKlWideRows);
    const int64_t num_tiles = walk.num_tiles();
    if (num_tiles == 0) continue;
    __syncthreads();  // the previous group's last tile is done with s.k, every stage and the staging
    staged.fetch(walk, 0);
    staged.store(0);
    staged.fetch(walk, 1);
    staged.store(1);
    load_key_rows<D, kKlWideThreads>(s.k, k, k_begin, ks, lk, p.k_s0, int64_t(g) * p.k_s1);
    mma::cp_async_commit();
    __syncthreads();  // the staged queries
    // Tile u, its queries staged in buffer `stage` (= u & 1), into `stage` by cp.async (not
    // committed): Q rows, qi rows, per row the main lse, per query the student LSE; and per query its
    // limit in these keys (-1: padding, or before them) and its dqi partial. Waits on no global read.
    auto issue_tile = [&](int stage) {
      const int* staged_query = staged.query + stage * kAttnRows;
      // Thread tid copies chunk tid % kChunks of rows tid / kChunks + kPass m; G (16 or 32) is a power
      // of two and a query takes one tile, so a row's query and head are a shift and a mask.
      constexpr int kChunks = D / 8, kPass = kKlWideThreads / kChunks;
      const int c = tid % kChunks, g_shift = walk.tiles.row_shift;
      const uint16_t* q_group = q + int64_t(g) * G * p.q_s1 + c * 8;
      uint16_t* tq = s.q + stage * (S::kQ / 2);
#pragma unroll 4
      for (int r = tid / kChunks; r < kKlWideRows; r += kPass) {
        const int iq = staged_query[r >> g_shift];
        const uint16_t* src = iq < 0 ? q : q_group + (q_begin + iq) * p.q_s0 + (r & (G - 1)) * p.q_s1;
        mma::cp_async_16_or_zero(mma::smem_addr(tq + swz<D>(r, c * 8)), src, iq < 0);
      }
      uint16_t* tqi = s.qi + stage * (S::kQi / 2);
      for (int i = tid; i < kKlWideQueries * (Di / 8); i += kKlWideThreads) {
        const int r = i / (Di / 8), c = i % (Di / 8);
        const int iq = staged_query[r];
        const uint16_t* src = iq < 0 ? qi : qi + (q_begin + iq) * p.qi_s0 + int64_t(g) * p.qi_s1 + c * 8;
        mma::cp_async_16_or_zero(mma::smem_addr(tqi + swz<Di>(r, c * 8)), src, iq < 0);
      }
      {
        const int iq = staged_query[tid >> g_shift];
        mma::cp_async_4_or_zero(
            mma::smem_addr(s.lse + stage * kKlWideRows + tid),
            iq >= 0 ? p.lse + (q_begin + iq) * p.lse_s0 + (int64_t(g) * G + (tid & (G - 1))) * p.lse_s1 : p.lse, iq < 0);
      }
      if (tid < kKlWideQueries) {
        const int iq = staged_query[tid];
        const int lim = gathered_limit(lq, lk, iq, ks, kAttnKeys);
        const bool visible = lim >= 0;
        int64_t part = -1;
        if (visible && p.dqi_part)
          part = ((q_begin + iq) * p.hkv + g) * p.partials_per_row +
                 partial_index(staged.slot[stage * kAttnRows + tid], rules::block_of(ks, B), ks, B);
        mma::cp_async_4_or_zero(mma::smem_addr(s.slse + stage * kKlWideQueries + tid),
                                visible ? p.student_lse + (q_begin + iq) * p.hkv + g : p.student_lse, !visible);
        s.part[stage * kKlWideQueries + tid] = part;
        s.lim[stage * kKlWideQueries + tid] = lim;
      }
    };
    issue_tile(0);
    mma::cp_async_commit();
    staged.fetch(walk, 2);
    for (int64_t u = 0; u < num_tiles; ++u) {
      const int stage = int(u & 1);
      if (u + 1 < num_tiles) {
        issue_tile(stage ^ 1);
        mma::cp_async_commit();
        mma::cp_async_wait<1>();
      } else {
        mma::cp_async_wait<0>();
      }
      __syncthreads();
      const uint16_t* tqi = s.qi + stage * (S::kQi / 2);
      kl_wide_student_logits<T, Di>(tqi, s.ki, s.z);
      __syncthreads();
      loss += kl_wide_teacher<T, D>(s.q + stage * (S::kQ / 2), s.k, s.lse + stage * kKlWideRows,
                                    s.lim + stage * kKlWideQueries, s.slse + stage * kKlWideQueries, s.z, G,
                                    p.scale_log2, p.iscale, s.dz);
      __syncthreads();
      kl_wide_dki<T, Di>(s.dz, tqi, acc);
      if (p.dqi_part) kl_wide_dqi_partials<T, Di>(s.dz, s.ki, s.part + stage * kKlWideQueries, p.dqi_part);
      staged.store(stage);  // tile u + 2, into the buffer whose copies issue_tile issued for tile u
      staged.fetch(walk, u + 3);
      __syncthreads();
    }
  }
  mma::cp_async_wait<0>();  // the ki tile, when no query tile was visited
  if (p.dqi_part) store_key_loss<kKlWideThreads>(p, loss, s.red, k_begin, b);
  // dki = norm * iscale * acc for this warp's keys and index dims (0 for keys nobody selected).
  const int km = warp & 3, dh = warp >> 2;
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const int64_t t = ks + km * 16 + (lane >> 2) + 8 * h;
    if (t < lk) store_dki_row<T, Di>(p, k_begin + t, dh * (Di / 2) + (lane & 3) * 2, acc, h);
  }
}

}  // namespace cuda
}  // namespace detail
}  // namespace msa
