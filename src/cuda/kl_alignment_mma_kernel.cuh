// Tensor-core (mma.sync m16n8k16, fp32 accumulation) KL alignment of the index branch (SPEC.md "Index
// branch training: KL alignment"). Tiles are the attention forward's: 64 rows = (query, head) pairs of
// one GQA group, query-major, so a tile holds 64 / G whole queries (G must divide 64). The per-chunk
// work against 64 keys is shared by two kernels:
//   - query-major (kl_mma_query_kernel): the tile walks the sorted union of its queries' selected
//     blocks (attention_block_union.cuh, every visible block in dense mode) twice: walk 1 takes each
//     query's student logsumexp, walk 2 the teacher, the loss and dqi (kept in registers, written once);
//   - key-major (kl_mma_key_kernel): a CTA owns 64 keys and visits, group by group and in ascending
//     order, the queries that selected their block (key_query_lists.cuh), gathered 64 / G at a time
//     into tiles, recomputing teacher and student to accumulate dki in registers, written once. A block
//     that every query chooses (the first block of a trained model, every block's early keys in
//     dense mode) has a list as long as the sequence, so each list is cut into key_splits equal
//     shares, one CTA each (blockIdx.z), whose f32 partials kl_mma_dki_reduce_kernel sums in split
//     order. Where the per-query partials fit (sparse), this kernel also writes each query's dqi
//     share of its 64 keys and the loss, and the query-major kernel is not run: its tiles of
//     consecutive queries share few blocks when G is small. Sparse, the student LSE always comes
//     from kl_student_lse.cuh (one float per query partial: it always fits), so walk 1 runs only
//     in dense mode.
// No atomics on gradients, fixed orders everywhere: results are bitwise reproducible.
// Per chunk: P = exp2(S scale log2e - lse log2e) per row (S = q k^T by mma) -> shared memory; student
// logits Z = qi ki^T (mma, one row per query) -> shared memory; then per (query, key) the teacher
// T = mean over the G head rows, the student Q = exp(iscale Z - student_lse), the loss term and the
// logit gradient (Q - T) stored as 16-bit for the gradient products (norm * iscale applied in fp32 at
// the end, so a float16 dZ never underflows however small norm is).
#pragma once

#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>

#include "cuda/attention_block_union.cuh"
#include "cuda/attention_forward_kernel.cuh"  // kAttnRows, kAttnKeys, kAttnThreads, swz, load_tile
#include "cuda/attention_mma.cuh"
#include "cuda/key_query_lists.cuh"
#include "cuda/key_splits.h"
#include "cuda/query_partials.cuh"
#include "cuda/sequence_of_row.cuh"
#include "msa/rules.h"

namespace msa {
namespace detail {
namespace cuda {

struct KlMmaParams {
  const void* q;
  const void* k;
  const float* lse;
  const void* qi;
  const void* ki;
  const int32_t* topk;  // nullptr: dense (every visible key)
  const int32_t* cu_q;
  const int32_t* cu_k;
  void* dqi;
  void* dki;
  float* dki_part;     // [key_splits, total_k, Di] f32 workspace when key_splits > 1
  float* student_lse;  // [total_q, Hkv] workspace: written by the query-major kernel
  double* loss_part;   // [total_q, Hkv] workspace, zeroed: a tile's loss at (its first query, g)
  KeyQueryLists lists;  // sparse only: the queries that selected each (group, key block)
  // Sparse, when they fit (query_partials.cuh): the key-major kernel also writes dqi per (query,
  // group, slot part) and the loss per key tile, kl_mma_dqi_reduce_kernel sums the partials, and the
  // query-major kernel is not run.
  float* dqi_part;
  float* student_part;  // sparse: the student LSE's partials (kl_student_lse.cuh), merged first
  int partials_per_row;
  double* key_loss_part;  // [(total_k / 64 + batch + 1) * key_splits], zeroed
  int64_t q_s0, q_s1, k_s0, k_s1, lse_s0, lse_s1, qi_s0, qi_s1, ki_s0, topk_s0, topk_s1;
  int64_t dqi_s0, dqi_s1, dki_s0;
  int64_t total_k;
  int hkv, G, B, topk_k;
  int key_splits;  // CTAs sharing one key tile's query lists (blockIdx.z), see kl_key_splits
  int bitmap_words, union_cap;
  float scale_log2, iscale, grad_scale;  // grad_scale = norm * iscale
};

constexpr int kKlPStride = kAttnKeys + 8;  // fp32 row stride of the P and Z buffers (bank spread)

// Shared memory: Q rows, K, index keys, P, index queries, Z, dZ, small arrays (then the query
// kernel's union bookkeeping). The per-query buffers hold 16 * qt rows (qt = kl_query_tiles), so
// that G = 16 keeps two CTAs per SM. The query-major kernel double-buffers the key side (K, ki),
// the key-major kernel the query side (Q, qi and the per-row values).
__host__ __device__ __forceinline__ int kl_query_tiles(int G) { return (kAttnRows / G + 15) / 16; }

constexpr int kKlSmallArrays = 2 * 3 + 2;  // qlim, lse, slse per stage; walk-1 max and sum

template <int D, int Di>
struct KlMmaSmem {
  static constexpr std::size_t kQ = std::size_t(kAttnRows) * D * 2;
  static constexpr std::size_t kK = std::size_t(kAttnKeys) * D * 2;
  static constexpr std::size_t kKi = std::size_t(kAttnKeys) * Di * 2;
  static constexpr std::size_t kP = std::size_t(kAttnRows) * kKlPStride * 4;
  static constexpr std::size_t kSmall = kKlSmallArrays * kAttnRows * 4 + kAttnThreads * 8;
  __host__ __device__ static constexpr std::size_t qi_bytes(int qt) { return std::size_t(qt) * 16 * Di * 2; }
  __host__ __device__ static constexpr std::size_t z_bytes(int qt) { return std::size_t(qt) * 16 * kKlPStride * 4; }
  __host__ __device__ static constexpr std::size_t dz_bytes(int qt) { return std::size_t(qt) * 16 * kAttnKeys * 2; }
  // q_stages: buffers of (Q, qi); k_stages: buffers of (K, ki).
  __host__ __device__ static constexpr std::size_t fixed_bytes(int qt, int q_stages, int k_stages) {
    return q_stages * (kQ + qi_bytes(qt)) + k_stages * (kK + kKi) + kP + z_bytes(qt) + dz_bytes(qt) + kSmall;
  }
  static std::size_t query_bytes(int qt, int bitmap_words, int union_cap) {
    return fixed_bytes(qt, 1, 2) + BlockUnionSmem<1>::bytes(bitmap_words, union_cap);
  }
  static std::size_t key_bytes(int qt) { return fixed_bytes(qt, 2, 1) + 2 * kAttnRows * 8 + GatheredQueryStage::kBytes; }
};

// The shared-memory pieces, carved in KlMmaSmem's order (each a multiple of 128 bytes but the small
// arrays, which come last before the tail). Stage s of a buffer starts at buffer + s * its size.
template <int D, int Di>
struct KlTiles {
  uint16_t *q, *k, *qi, *ki, *dz;
  int q_stride, qi_stride, k_stride, ki_stride;  // elements between stages
  float *p, *z;
  double* red;    // [kAttnThreads] loss reduction
  int* qlim;      // [2][64] per query of the tile: last visible key offset in the chunk (-1: none)
  float* lse;     // [2][64] per row: the main branch's lse
  float* slse;    // [2][64] per query: student logsumexp
  float *sm, *sl; // [64] per query: walk-1 running max and sum
  unsigned char* tail;
  __device__ KlTiles(unsigned char* base, int qt, int q_stages, int k_stages) {
    using S = KlMmaSmem<D, Di>;
    unsigned char* at = base;
    q = reinterpret_cast<uint16_t*>(at), at += q_stages * S::kQ;
    qi = reinterpret_cast<uint16_t*>(at), at += q_stages * S::qi_bytes(qt);
    k = reinterpret_cast<uint16_t*>(at), at += k_stages * S::kK;
    ki = reinterpret_cast<uint16_t*>(at), at += k_stages * S::kKi;
    q_stride = int(S::kQ / 2), qi_stride = int(S::qi_bytes(qt) / 2);
    k_stride = int(S::kK / 2), ki_stride = int(S::kKi / 2);
    p = reinterpret_cast<float*>(at), at += S::kP;
    z = reinterpret_cast<float*>(at), at += S::z_bytes(qt);
    dz = reinterpret_cast<uint16_t*>(at), at += S::dz_bytes(qt);
    red = reinterpret_cast<double*>(at), at += kAttnThreads * 8;
    qlim = reinterpret_cast<int*>(at);
    lse = reinterpret_cast<float*>(qlim + 2 * kAttnRows);
    slse = lse + 2 * kAttnRows;
    sm = slse + 2 * kAttnRows;
    sl = sm + kAttnRows;
    tail = base + S::fixed_bytes(qt, q_stages, k_stages);
  }
};

// The key-major kernels' epilogues. store_key_loss: this CTA's loss (per-thread parts summed in
// thread order) at its key tile's global index (as global_block with B = 64) and split.
template <int kThreads>
__device__ __forceinline__ void store_key_loss(const KlMmaParams& p, double loss, double* red, int64_t k_begin,
                                               int b) {
  red[threadIdx.x] = loss;
  __syncthreads();
  if (threadIdx.x == 0) {
    double sum = 0.0;
    for (int t = 0; t < kThreads; ++t) sum += red[t];
    p.key_loss_part[(k_begin / kAttnKeys + b + blockIdx.x) * p.key_splits + blockIdx.z] = sum;
  }
}

// Packed key row `row` of dki: columns col + 8 n and col + 8 n + 1 from row half h of acc, times
// norm * iscale; with splits, this CTA's f32 share (every split writes every key row, zeros included).
template <class T, int Di, int kTiles>
__device__ __forceinline__ void store_dki_row(const KlMmaParams& p, int64_t row, int col, const float (&acc)[kTiles][4],
                                              int h) {
  if (p.key_splits > 1) {
    float* dst = p.dki_part + (int64_t(blockIdx.z) * p.total_k + row) * Di + col;
#pragma unroll
    for (int n = 0; n < kTiles; ++n)
      *reinterpret_cast<float2*>(dst + n * 8) =
          make_float2(acc[n][2 * h] * p.grad_scale, acc[n][2 * h + 1] * p.grad_scale);
    return;
  }
  T* dst = static_cast<T*>(p.dki) + row * p.dki_s0 + col;
#pragma unroll
  for (int n = 0; n < kTiles; ++n) {
    dst[n * 8] = mma::Elem<T>::from_float(acc[n][2 * h] * p.grad_scale);
    dst[n * 8 + 1] = mma::Elem<T>::from_float(acc[n][2 * h + 1] * p.grad_scale);
  }
}

// load_tile (attention_forward_kernel.cuh) for the first `rows` rows of a [rows][D] swizzled tile.
template <int D, class RowPtr>
__device__ __forceinline__ void load_query_rows(uint16_t* tile, int rows, const uint16_t* any_row, RowPtr row_ptr) {
  constexpr int kChunks = D / 8;
  for (int i = threadIdx.x; i < rows * kChunks; i += kAttnThreads) {
    const int r = i / kChunks, c = i % kChunks;
    const uint16_t* src = row_ptr(r);
    mma::cp_async_16(mma::smem_addr(tile + swz<D>(r, c * 8)), src ? src + c * 8 : any_row, src ? 16 : 0);
  }
}

// P rows: each warp its 16 rows; P = 0 where the row's query does not see the key. `lse`: the
// main branch's, per row.
template <class T, int D>
__device__ __forceinline__ void kl_teacher_rows(const uint16_t* sQ, const uint16_t* sK, const int* qlim,
                                                const float* lse, int G, float scale_log2, float* sP) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  float s[kAttnKeys / 8][4];
  warp_scores<T, D>(sQ, sK, s);
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const int row = warp * 16 + (lane >> 2) + 8 * h;
    const int lim = qlim[row / G];
    const float l2 = lse[row] * 1.4426950408889634f;
#pragma unroll
    for (int n = 0; n < kAttnKeys / 8; ++n) {
      const int key = n * 8 + (lane & 3) * 2;
      float2 v;
      v.x = key <= lim ? exp2f(fmaf(s[n][2 * h], scale_log2, -l2)) : 0.f;
      v.y = key + 1 <= lim ? exp2f(fmaf(s[n][2 * h + 1], scale_log2, -l2)) : 0.f;
      *reinterpret_cast<float2*>(sP + row * kKlPStride + key) = v;
    }
  }
}

// Student logits Z = qi ki^T (unscaled) for the first 16 * qt query rows; warp w computes keys
// 16w .. 16w + 15.
template <class T, int Di>
__device__ __forceinline__ void kl_student_logits(const uint16_t* sQi, const uint16_t* sKi, int qt, float* sZ) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
#pragma unroll
  for (int mt = 0; mt < kAttnRows / 16; ++mt) {
    if (mt >= qt) break;
    float z[2][4];
#pragma unroll
    for (int n = 0; n < 2; ++n) z[n][0] = z[n][1] = z[n][2] = z[n][3] = 0.f;
#pragma unroll
    for (int kk = 0; kk < Di / 16; ++kk) {
      uint32_t a[4], b0, b1, b2, b3;
      {
        const int r = mt * 16 + (lane & 15), c = kk * 16 + (lane >> 4) * 8;
        mma::ldmatrix_x4(mma::smem_addr(sQi + swz<Di>(r, c)), a[0], a[1], a[2], a[3]);
      }
      const int r = warp * 16 + (lane & 7) + (lane >> 4) * 8, c = kk * 16 + ((lane >> 3) & 1) * 8;
      mma::ldmatrix_x4(mma::smem_addr(sKi + swz<Di>(r, c)), b0, b1, b2, b3);
      mma::mma_16816<T>(z[0], a, b0, b1);
      mma::mma_16816<T>(z[1], a, b2, b3);
    }
#pragma unroll
    for (int n = 0; n < 2; ++n) {
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int row = mt * 16 + (lane >> 2) + 8 * h;
        const int key = warp * 16 + n * 8 + (lane & 3) * 2;
        *reinterpret_cast<float2*>(sZ + row * kKlPStride + key) = make_float2(z[n][2 * h], z[n][2 * h + 1]);
      }
    }
  }
}

// Walk 1 update of each query's running (max, sum of exp) of iscale * Z over its visible keys; warp w
// takes queries w, w + 4, ...; lane 0's values are kept, so every lane restarts from the same ones.
__device__ __forceinline__ void kl_student_lse_update(const float* sZ, const int* qlim, int nq, float iscale,
                                                      float* sm, float* sl) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  for (int qq = warp; qq < nq; qq += kAttnThreads / 32) {
    const int lim = qlim[qq];
    if (lim < 0) continue;
    float z0 = lane <= lim ? sZ[qq * kKlPStride + lane] * iscale : -INFINITY;
    float z1 = lane + 32 <= lim ? sZ[qq * kKlPStride + lane + 32] * iscale : -INFINITY;
    float mc = fmaxf(z0, z1);
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) mc = fmaxf(mc, __shfl_xor_sync(0xffffffffu, mc, o));
    const float m_old = sm[qq];
    const float m_new = fmaxf(m_old, mc);  // finite: key 0 of the chunk is visible (lim >= 0)
    float e = (lane <= lim ? expf(z0 - m_new) : 0.f) + (lane + 32 <= lim ? expf(z1 - m_new) : 0.f);
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) e += __shfl_xor_sync(0xffffffffu, e, o);
    const float l_new = (m_old == -INFINITY ? 0.f : sl[qq] * expf(m_old - m_new)) + e;
    __syncwarp();
    if (lane == 0) {
      sm[qq] = m_new;
      sl[qq] = l_new;
    }
  }
}

// Per (query, key): teacher T (mean of the G rows of P), student Q, the loss term (returned, this
// thread's share) and dZ = Q - T as 16-bit into the swizzled [64][64] tile (zero outside the
// visible keys and for the padding query rows up to 16 * qt).
template <class T>
__device__ __forceinline__ double kl_terms(const float* sP, const float* sZ, const int* qlim, const float* slse,
                                           int G, int nq, int qt, float iscale, uint16_t* sDz) {
  const float inv_g = 1.f / float(G);
  double loss = 0.0;
  for (int e = threadIdx.x; e < qt * 16 * kAttnKeys; e += kAttnThreads) {
    const int qq = e / kAttnKeys, key = e % kAttnKeys;
    float dz = 0.f;
    if (qq < nq && key <= qlim[qq]) {
      float t = 0.f;
      for (int h = 0; h < G; ++h) t += sP[(qq * G + h) * kKlPStride + key];
      t *= inv_g;
      const float log_q = sZ[qq * kKlPStride + key] * iscale - slse[qq];
      if (t > 0.f) loss += double(t * (logf(t) - log_q));
      dz = expf(log_q) - t;
    }
    const uint32_t packed = mma::Elem<T>::pack(dz, 0.f);
    sDz[swz<kAttnKeys>(qq, key)] = uint16_t(packed & 0xffffu);
  }
  return loss;
}

// dqi[16 queries of m-tile mt][Di] += dZ @ ki: warp w owns columns w * Di / 4 .. (w + 1) * Di / 4.
template <class T, int Di>
__device__ __forceinline__ void kl_dqi_mma_tile(const uint16_t* sDz, const uint16_t* sKi, int mt,
                                                float (&acc)[Di / 32][4]) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
#pragma unroll
  for (int kk = 0; kk < kAttnKeys / 16; ++kk) {
    uint32_t a[4];
    {
      const int r = mt * 16 + (lane & 15), c = kk * 16 + (lane >> 4) * 8;
      mma::ldmatrix_x4(mma::smem_addr(sDz + swz<kAttnKeys>(r, c)), a[0], a[1], a[2], a[3]);
    }
#pragma unroll
    for (int dp = 0; dp < Di / 64; ++dp) {
      uint32_t b0, b1, b2, b3;
      const int r = kk * 16 + (lane & 7) + ((lane >> 3) & 1) * 8;
      const int c = warp * (Di / 4) + dp * 16 + (lane >> 4) * 8;
      mma::ldmatrix_x4_trans(mma::smem_addr(sKi + swz<Di>(r, c)), b0, b1, b2, b3);
      mma::mma_16816<T>(acc[2 * dp], a, b0, b1);
      mma::mma_16816<T>(acc[2 * dp + 1], a, b2, b3);
    }
  }
}

// dqi[16 qt queries][Di] += dZ @ ki, m-tile by m-tile.
template <class T, int Di>
__device__ __forceinline__ void kl_dqi_mma(const uint16_t* sDz, const uint16_t* sKi, int qt,
                                           float (&acc)[kAttnRows / 16][Di / 32][4]) {
#pragma unroll
  for (int mt = 0; mt < kAttnRows / 16; ++mt) {
    if (mt >= qt) break;
    kl_dqi_mma_tile<T, Di>(sDz, sKi, mt, acc[mt]);
  }
}

// dki[64 keys][Di] += dZ^T @ qi: warp w owns keys 16w .. 16w + 15, all Di columns.
template <class T, int Di>
__device__ __forceinline__ void kl_dki_mma(const uint16_t* sDz, const uint16_t* sQi, int qt, float (&acc)[Di / 8][4]) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
#pragma unroll
  for (int kq = 0; kq < kAttnRows / 16; ++kq) {
    if (kq >= qt) break;
    uint32_t a[4];
    {
      // A = dZ^T (rows: keys, k: queries) from the [query][key] tile, transposed by ldmatrix.
      const int r = kq * 16 + (lane & 7) + (lane >> 4) * 8, c = warp * 16 + ((lane >> 3) & 1) * 8;
      mma::ldmatrix_x4_trans(mma::smem_addr(sDz + swz<kAttnKeys>(r, c)), a[0], a[1], a[2], a[3]);
    }
#pragma unroll
    for (int dp = 0; dp < Di / 16; ++dp) {
      uint32_t b0, b1, b2, b3;
      const int r = kq * 16 + (lane & 7) + ((lane >> 3) & 1) * 8, c = dp * 16 + (lane >> 4) * 8;
      mma::ldmatrix_x4_trans(mma::smem_addr(sQi + swz<Di>(r, c)), b0, b1, b2, b3);
      mma::mma_16816<T>(acc[2 * dp], a, b0, b1);
      mma::mma_16816<T>(acc[2 * dp + 1], a, b2, b3);
    }
  }
}

// Query-major kernel: grid (query tiles of the longest sequence, Hkv, batch).
template <class T, int D, int Di>
__global__ void __launch_bounds__(kAttnThreads) kl_mma_query_kernel(const KlMmaParams p) {
  extern __shared__ __align__(128) unsigned char smem_raw[];
  KlTiles<D, Di> s(smem_raw, kl_query_tiles(p.G), 1, 2);
  const BlockUnionSmem<1> su = BlockUnionSmem<1>::carve(s.tail, p.bitmap_words, p.union_cap);

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int b = blockIdx.z, g = blockIdx.y;
  const int G = p.G, B = p.B;
  const int64_t q_begin = p.cu_q[b], lq = p.cu_q[b + 1] - q_begin;
  const int64_t k_begin = p.cu_k[b], lk = p.cu_k[b + 1] - k_begin;
  const int64_t rows_total = lq * G;
  const int64_t f0 = int64_t(gridDim.x - 1 - blockIdx.x) * kAttnRows;  // longest tiles first
  if (f0 >= rows_total) return;
  const int64_t i_first = f0 / G;  // G divides 64: the tile holds whole queries
  const int64_t i_last = (f0 + kAttnRows < rows_total ? f0 + kAttnRows : rows_total) / G - 1;
  const int nq = int(i_last - i_first + 1);
  const int qt = kl_query_tiles(G);
  const int64_t p_last = rules::query_position(lq, lk, i_last);
  const int64_t local_last = rules::local_block(p_last, B);
  const bool dense = p.topk == nullptr;

  const uint16_t* q = static_cast<const uint16_t*>(p.q);
  const uint16_t* k = static_cast<const uint16_t*>(p.k);
  const uint16_t* qi = static_cast<const uint16_t*>(p.qi);
  const uint16_t* ki = static_cast<const uint16_t*>(p.ki);

  load_tile<D>(s.q, q, [&](int r) -> const uint16_t* {
    const int64_t f = f0 + r;
    if (f >= rows_total) return nullptr;
    return q + (q_begin + f / G) * p.q_s0 + (int64_t(g) * G + f % G) * p.q_s1;
  });
  load_query_rows<Di>(s.qi, qt * 16, qi, [&](int r) -> const uint16_t* {
    return r < nq ? qi + (q_begin + i_first + r) * p.qi_s0 + int64_t(g) * p.qi_s1 : nullptr;
  });
  mma::cp_async_commit();
  if (tid < kAttnRows) {
    const int64_t f = f0 + tid;
    s.lse[tid] = f < rows_total ? p.lse[(q_begin + f / G) * p.lse_s0 + (int64_t(g) * G + f % G) * p.lse_s1] : 0.f;
    s.sm[tid] = -INFINITY;
    s.sl[tid] = 0.f;
  }

  int num_union = int(local_last + 1);
  if (!dense) {
    num_union = build_block_union<kAttnThreads, 1>(su, p.topk, p.topk_s0, p.topk_s1, p.topk_k, p.union_cap, g,
                                                   q_begin, lq, lk, B, i_first, i_last, local_last);
  }
  auto block_at = [&](int u) -> int64_t { return dense ? int64_t(u) : int64_t(su.blocks[u]); };
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
  // Copies chunk `it`'s ki (and k when `with_k`) into `stage` (cp.async, not committed).
  auto issue_chunk = [&](int it, int stage, bool with_k) {
    const int64_t ks = key_start(it);
    if (with_k) {
      load_tile<D>(s.k + stage * s.k_stride, k, [&](int r) -> const uint16_t* {
        const int64_t t = ks + r;
        return t < lk ? k + (k_begin + t) * p.k_s0 + int64_t(g) * p.k_s1 : nullptr;
      });
    }
    load_tile<Di>(s.ki + stage * s.ki_stride, ki, [&](int r) -> const uint16_t* {
      const int64_t t = ks + r;
      return t < lk ? ki + (k_begin + t) * p.ki_s0 : nullptr;
    });
  };
  // Each query's last visible key offset in chunk `it` (-1: none).
  auto set_limits = [&](int it) {
    if (tid < kAttnRows) {
      const int64_t ks = key_start(it);
      int lim = -1;
      if (tid < nq) {
        const unsigned long long sel = dense ? ~0ull : su.mask[it / sub_per_block];
        const int64_t pos = rules::query_position(lq, lk, i_first + tid);
        if (((sel >> tid) & 1ull) && pos >= ks) lim = pos - ks < kAttnKeys ? int(pos - ks) : kAttnKeys - 1;
      }
      s.qlim[tid] = lim;
    }
  };
  // Two-stage pipeline over the chunks: body(stage) runs between barriers with chunk `it` resident.
  auto walk = [&](bool with_k, auto&& body) {
    if (num_iters > 0) issue_chunk(0, 0, with_k);
    mma::cp_async_commit();
    for (int it = 0; it < num_iters; ++it) {
      const int stage = it & 1;
      if (it + 1 < num_iters) {
        issue_chunk(it + 1, stage ^ 1, with_k);
        mma::cp_async_commit();
        mma::cp_async_wait<1>();
      } else {
        mma::cp_async_wait<0>();
      }
      set_limits(it);
      __syncthreads();
      body(stage);
      __syncthreads();
    }
    mma::cp_async_wait<0>();  // the Q tiles, when there was no chunk to wait for
  };

  if (p.student_part) {  // sparse: the student LSE came from kl_student_lse.cuh
    if (tid < nq) s.slse[tid] = p.student_lse[(q_begin + i_first + tid) * p.hkv + g];
  } else {
    // Walk 1: student logsumexp per query.
    walk(false, [&](int stage) {
      kl_student_logits<T, Di>(s.qi, s.ki + stage * s.ki_stride, qt, s.z);
      __syncthreads();
      kl_student_lse_update(s.z, s.qlim, nq, p.iscale, s.sm, s.sl);
    });
    if (tid < kAttnRows) {
      const float l = s.sl[tid];
      const float lse = l > 0.f ? s.sm[tid] + logf(l) : -INFINITY;
      s.slse[tid] = lse;
      if (tid < nq) p.student_lse[(q_begin + i_first + tid) * p.hkv + g] = lse;
    }
  }
  __syncthreads();

  // Walk 2: teacher, loss, dqi.
  float acc[kAttnRows / 16][Di / 32][4];
#pragma unroll
  for (int mt = 0; mt < kAttnRows / 16; ++mt)
#pragma unroll
    for (int n = 0; n < Di / 32; ++n) acc[mt][n][0] = acc[mt][n][1] = acc[mt][n][2] = acc[mt][n][3] = 0.f;
  double loss = 0.0;
  walk(true, [&](int stage) {
    const uint16_t* tki = s.ki + stage * s.ki_stride;
    kl_teacher_rows<T, D>(s.q, s.k + stage * s.k_stride, s.qlim, s.lse, G, p.scale_log2, s.p);
    kl_student_logits<T, Di>(s.qi, tki, qt, s.z);
    __syncthreads();
    loss += kl_terms<T>(s.p, s.z, s.qlim, s.slse, G, nq, qt, p.iscale, s.dz);
    __syncthreads();
    kl_dqi_mma<T, Di>(s.dz, tki, qt, acc);
  });

  // dqi = norm * iscale * acc; a query without keys gets 0.
  T* dqi = static_cast<T*>(p.dqi);
#pragma unroll
  for (int mt = 0; mt < kAttnRows / 16; ++mt) {
    if (mt >= qt) break;
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int qq = mt * 16 + (lane >> 2) + 8 * h;
      if (qq >= nq) continue;
      T* dst = dqi + (q_begin + i_first + qq) * p.dqi_s0 + int64_t(g) * p.dqi_s1 + warp * (Di / 4) + (lane & 3) * 2;
#pragma unroll
      for (int n = 0; n < Di / 32; ++n) {
        dst[n * 8] = mma::Elem<T>::from_float(acc[mt][n][2 * h] * p.grad_scale);
        dst[n * 8 + 1] = mma::Elem<T>::from_float(acc[mt][n][2 * h + 1] * p.grad_scale);
      }
    }
  }
  s.red[tid] = loss;
  __syncthreads();
  if (tid == 0) {
    double sum = 0.0;
    for (int t = 0; t < kAttnThreads; ++t) sum += s.red[t];
    p.loss_part[(q_begin + i_first) * p.hkv + g] = sum;
  }
}

// Key-major kernel: grid (key tiles of the longest sequence, batch); the CTA loops over the groups.
template <class T, int D, int Di>
__global__ void __launch_bounds__(kAttnThreads) kl_mma_key_kernel(const KlMmaParams p) {
  extern __shared__ __align__(128) unsigned char smem_raw[];
  KlTiles<D, Di> s(smem_raw, kl_query_tiles(p.G), 2, 1);
  int64_t* s_qpart = reinterpret_cast<int64_t*>(s.tail);  // [2][64] per query: its dqi partial (-1: none)
  GatheredQueryStage staged(reinterpret_cast<int*>(s_qpart + 2 * kAttnRows));

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int b = blockIdx.y;
  const int G = p.G, B = p.B;
  const int64_t q_begin = p.cu_q[b], lq = p.cu_q[b + 1] - q_begin;
  const int64_t k_begin = p.cu_k[b], lk = p.cu_k[b + 1] - k_begin;
  const int64_t ks = int64_t(blockIdx.x) * kAttnKeys;
  if (ks >= lk) return;
  const bool dense = p.topk == nullptr;
  const int qt = kl_query_tiles(G);

  const uint16_t* q = static_cast<const uint16_t*>(p.q);
  const uint16_t* k = static_cast<const uint16_t*>(p.k);
  const uint16_t* qi = static_cast<const uint16_t*>(p.qi);
  const uint16_t* ki = static_cast<const uint16_t*>(p.ki);

  load_key_rows<Di>(s.ki, ki, k_begin, ks, lk, p.ki_s0, 0);
  mma::cp_async_commit();

  float acc[Di / 8][4];
#pragma unroll
  for (int n = 0; n < Di / 8; ++n) acc[n][0] = acc[n][1] = acc[n][2] = acc[n][3] = 0.f;
  double loss = 0.0;

  for (int g = 0; g < p.hkv; ++g) {
    // G divides 64 here: each tile holds 64 / G whole queries.
    const GatheredWalk walk(p.lists, dense, G, g, b, k_begin, ks, lq, lk, B, p.key_splits, int(blockIdx.z));
    const int64_t num_tiles = walk.num_tiles();
    if (num_tiles == 0) continue;
    __syncthreads();  // the previous group's last tile is done with s.k, every stage and the staging
    staged.fetch(walk, 0);
    staged.store(0);
    staged.fetch(walk, 1);
    staged.store(1);
    load_key_rows<D>(s.k, k, k_begin, ks, lk, p.k_s0, int64_t(g) * p.k_s1);
    mma::cp_async_commit();
    __syncthreads();  // the staged queries
    // Tile u, its queries staged in buffer `stage` (= u & 1), into `stage`: Q rows, qi, per row the
    // main lse and per query the student LSE by cp.async (not committed); per query its limit in
    // this key tile (-1: padding, or before the tile) and its dqi partial. Waits on no global read.
    auto issue_tile = [&](int64_t u, int stage) {
      const int nq = walk.queries_in(u);
      const int* staged_query = staged.query + stage * kAttnRows;
      load_tile<D>(s.q + stage * s.q_stride, q, [&](int r) -> const uint16_t* {
        const int i = staged_query[r / G];
        return i < 0 ? nullptr : q + (q_begin + i) * p.q_s0 + (int64_t(g) * G + r % G) * p.q_s1;
      });
      load_query_rows<Di>(s.qi + stage * s.qi_stride, qt * 16, qi, [&](int r) -> const uint16_t* {
        const int i = r < nq ? staged_query[r] : -1;
        return i < 0 ? nullptr : qi + (q_begin + i) * p.qi_s0 + int64_t(g) * p.qi_s1;
      });
      if (tid < kAttnRows) {
        const int ir = staged_query[tid / G];
        mma::cp_async_4_or_zero(
            mma::smem_addr(s.lse + stage * kAttnRows + tid),
            ir >= 0 ? p.lse + (q_begin + ir) * p.lse_s0 + (int64_t(g) * G + tid % G) * p.lse_s1 : p.lse, ir < 0);
        const int i = tid < nq ? staged_query[tid] : -1;
        const int lim = gathered_limit(lq, lk, i, ks, kAttnKeys);
        const bool visible = lim >= 0;
        int64_t part = -1;
        if (visible && p.dqi_part)
          part = ((q_begin + i) * p.hkv + g) * p.partials_per_row +
                 partial_index(staged.slot[stage * kAttnRows + tid], rules::block_of(ks, B), ks, B);
        mma::cp_async_4_or_zero(mma::smem_addr(s.slse + stage * kAttnRows + tid),
                                visible ? p.student_lse + (q_begin + i) * p.hkv + g : p.student_lse, !visible);
        s_qpart[stage * kAttnRows + tid] = part;
        s.qlim[stage * kAttnRows + tid] = lim;
      }
      return nq;
    };
    int nq_next = issue_tile(0, 0);
    mma::cp_async_commit();
    staged.fetch(walk, 2);
    for (int64_t u = 0; u < num_tiles; ++u) {
      const int stage = int(u & 1);
      const int nq = nq_next;
      if (u + 1 < num_tiles) {
        nq_next = issue_tile(u + 1, stage ^ 1);
        mma::cp_async_commit();
        mma::cp_async_wait<1>();
      } else {
        mma::cp_async_wait<0>();
      }
      __syncthreads();
      const uint16_t* tq = s.q + stage * s.q_stride;
      const uint16_t* tqi = s.qi + stage * s.qi_stride;
      const int* qlim = s.qlim + stage * kAttnRows;
      kl_teacher_rows<T, D>(tq, s.k, qlim, s.lse + stage * kAttnRows, G, p.scale_log2, s.p);
      kl_student_logits<T, Di>(tqi, s.ki, qt, s.z);
      __syncthreads();
      loss += kl_terms<T>(s.p, s.z, qlim, s.slse + stage * kAttnRows, G, nq, qt, p.iscale, s.dz);
      __syncthreads();
      kl_dki_mma<T, Di>(s.dz, tqi, qt, acc);
      if (p.dqi_part) {  // each query's dqi share of these keys, one m-tile of queries at a time
#pragma unroll 1
        for (int mt = 0; mt < qt; ++mt) {
          float dq[Di / 32][4];
#pragma unroll
          for (int n = 0; n < Di / 32; ++n) dq[n][0] = dq[n][1] = dq[n][2] = dq[n][3] = 0.f;
          kl_dqi_mma_tile<T, Di>(s.dz, s.ki, mt, dq);
#pragma unroll
          for (int h = 0; h < 2; ++h) {
            const int64_t part = s_qpart[stage * kAttnRows + mt * 16 + (lane >> 2) + 8 * h];
            if (part < 0) continue;
            float* dst = p.dqi_part + part * Di + warp * (Di / 4) + (lane & 3) * 2;
#pragma unroll
            for (int n = 0; n < Di / 32; ++n)
              *reinterpret_cast<float2*>(dst + n * 8) = make_float2(dq[n][2 * h], dq[n][2 * h + 1]);
          }
        }
      }
      staged.store(stage);  // tile u + 2, into the buffer whose copies issue_tile(u) issued
      staged.fetch(walk, u + 3);
      __syncthreads();
    }
  }
  mma::cp_async_wait<0>();  // the ki tile, when no query tile was visited
  if (p.dqi_part) store_key_loss<kAttnThreads>(p, loss, s.red, k_begin, b);
  // dki = norm * iscale * acc for the keys of this tile (0 for keys nobody selected).
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const int64_t t = ks + warp * 16 + (lane >> 2) + 8 * h;
    if (t < lk) store_dki_row<T, Di>(p, k_begin + t, (lane & 3) * 2, acc, h);
  }
}

// dki from the key-major kernel's split partials, summed in split order (bitwise reproducible).
template <class T, int Di>
__global__ void kl_mma_dki_reduce_kernel(const KlMmaParams p) {
  const int64_t n = p.total_k * Di;
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x) {
    float sum = 0.f;
    for (int z = 0; z < p.key_splits; ++z) sum += p.dki_part[int64_t(z) * n + i];
    static_cast<T*>(p.dki)[(i / Di) * p.dki_s0 + i % Di] = mma::Elem<T>::from_float(sum);
  }
}

// dqi from the key-major kernel's partials: one warp per (query, group) row sums the partials that
// exist (partial_used) in slot order, times norm * iscale; a query without keys gets 0.
template <class T, int Di>
__global__ void __launch_bounds__(128) kl_mma_dqi_reduce_kernel(const KlMmaParams p, int batch, int64_t total_rows) {
  const int64_t r = int64_t(blockIdx.x) * 4 + (threadIdx.x >> 5);
  if (r >= total_rows) return;
  const int lane = threadIdx.x & 31;
  const PartialRow pr(r, p.hkv, 1, p.cu_q, p.cu_k, batch, p.topk, p.topk_s0, p.topk_s1);
  float acc[Di / 32];
#pragma unroll
  for (int j = 0; j < Di / 32; ++j) acc[j] = 0.f;
  sum_used_partials<Di>(p.dqi_part + r * p.partials_per_row * Di, pr.ids, p.topk_k, p.B / kAttnKeys, pr.pos, p.B,
                        [](int) { return 1.f; }, acc);
  T* dst = static_cast<T*>(p.dqi) + pr.row * p.dqi_s0 + int64_t(pr.g) * p.dqi_s1;
#pragma unroll
  for (int j = 0; j < Di / 32; ++j) dst[lane + 32 * j] = mma::Elem<T>::from_float(acc[j] * p.grad_scale);
}

}  // namespace cuda
}  // namespace detail
}  // namespace msa
