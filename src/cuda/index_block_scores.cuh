// Stage 1 of the CUDA index branch: block scores S(j) = max over the visible tokens of block j of
// iscale * <qi, ki>, and optionally the block's logsumexp of s / T, for every (group, query, block).
//
// One CTA takes a tile of queries x all the groups of those queries (128 rows), so each key chunk is
// loaded into shared memory once and shared by every group. Keys stream in chunks of at most 128
// tokens that never straddle a block (one chunk per block when B = 128), double-buffered with
// cp.async. Scores come from tensor cores (mma.sync m16n8k16, fp32 accumulation) and are pooled in
// registers: token scores never reach global memory; each row writes one float per block.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "msa/rules.h"

namespace msa {
namespace detail {
namespace cuda {
namespace index {

constexpr int kScoreWarps = 8;                // each owns 16 (query, group) rows
constexpr int kScoreRows = kScoreWarps * 16;  // rows per CTA
constexpr int kScoreThreads = kScoreWarps * 32;
constexpr int kKeysPerChunk = 128;
constexpr int kSmemPad = 8;  // halfs of padding per shared row: ldmatrix rows land in distinct banks

struct BlockScoreArgs {
  const uint16_t* qi;  // [total_q, Hkv, Di] 16-bit floats, strides in elements
  int64_t qi_s0, qi_s1;
  const uint16_t* ki;  // [total_k, Di]
  int64_t ki_s0;
  const int32_t* cu_q;
  const int32_t* cu_k;
  int num_kv_heads;
  int head_dim;         // Di
  int padded_dim;       // Di rounded up to 16 (the MMA k-step); padding columns are zero
  int block_size;       // B
  int groups_per_cta;   // G: groups of one query held by a CTA (all of them when Hkv <= 128)
  int queries_per_cta;  // kScoreRows / G
  float iscale;
  float lse_factor;  // iscale / T: the block LSE is of s / T
  bool vector_loads;  // 16-byte cp.async is legal (Di % 8 == 0, aligned base and strides)
  float* scores;      // [Hkv, total_q, ld]
  float* lses;        // same layout; written only when kWantLse
  int64_t ld;         // row stride of scores / lses; also the bound on block ids
  int64_t total_q;
  int64_t total_k;
};

// Sets a CTA's rows (all groups of a query, up to `rows` of them, and as many queries as fit) and
// returns the grid: row tiles of the longest sequence x sequences x slices of the groups.
inline dim3 block_score_grid(BlockScoreArgs& s, int rows, int64_t max_q, int batch) {
  s.groups_per_cta = s.num_kv_heads < rows ? s.num_kv_heads : rows;
  s.queries_per_cta = rows / s.groups_per_cta;
  return dim3(unsigned((max_q + s.queries_per_cta - 1) / s.queries_per_cta), unsigned(batch),
              unsigned((s.num_kv_heads + s.groups_per_cta - 1) / s.groups_per_cta));
}

inline std::size_t block_score_smem_bytes(int padded_dim) {
  return std::size_t(kScoreRows + 2 * kKeysPerChunk) * (padded_dim + kSmemPad) * 2;
}

__device__ __forceinline__ uint32_t smem_addr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

__device__ __forceinline__ void cp_async_16(uint16_t* dst, const uint16_t* src, bool valid) {
  // src-size 0 zero-fills the 16 bytes: rows past the chunk and padding read as zeros.
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_addr(dst)), "l"(src),
               "r"(valid ? 16 : 0));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}

__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const uint16_t* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_addr(p)));
}

template <bool kBf16>
__device__ __forceinline__ void mma_16816(float (&c)[4], const uint32_t (&a)[4], uint32_t b0,
                                          uint32_t b1) {
  if constexpr (kBf16) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
        "{%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  } else {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
        "{%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
}

// Copies `rows` rows of Di 16-bit values into shared rows of `stride` halfs (zeros past `valid_rows`
// and past Di). Rows come from base + row_offset(r).
template <class RowOffset>
__device__ __forceinline__ void load_tile(uint16_t* smem, int stride, int rows, int valid_rows,
                                          const uint16_t* base, RowOffset row_offset,
                                          const BlockScoreArgs& a) {
  const int dp = a.padded_dim;
  if (a.vector_loads) {
    const int segs = dp / 8;
    for (int i = threadIdx.x; i < rows * segs; i += kScoreThreads) {
      const int r = i / segs, s = i - r * segs;
      const bool valid = r < valid_rows && s * 8 < a.head_dim;
      const uint16_t* src = valid ? base + row_offset(r) + s * 8 : base;
      cp_async_16(smem + r * stride + s * 8, src, valid);
    }
  } else {
    for (int i = threadIdx.x; i < rows * dp; i += kScoreThreads) {
      const int r = i / dp, d = i - r * dp;
      smem[r * stride + d] = (r < valid_rows && d < a.head_dim) ? base[row_offset(r) + d] : 0;
    }
  }
}

// Pieces of the chunk loop shared by the HMMA kernel below and the wgmma one
// (index_block_scores_wgmma.cuh). A CTA walks its tile's visible blocks in chunks of kChunkKeys keys
// (subchunks chunks per block) and pools each block over its chunks.

// Keys [kb, ke) of chunk c: sub-chunk c % subchunks of block c / subchunks, cut at the block's end and
// after p_max, the tile's last query position (empty, ke == kb, when nothing is left). The block
// comes from a 32-bit division (chunk counts stay far below 2^31: a chunk holds at least 64 keys): a
// 64-bit one is a subroutine call, which in the wgmma kernels ptxas treats as a divergent path.
template <int kChunkKeys>
__device__ __forceinline__ void chunk_key_range(int c, int subchunks, int B, int64_t p_max, int64_t& kb,
                                                int64_t& ke) {
  const int j = c / subchunks;
  kb = rules::block_begin(j, B) + int64_t(c - j * subchunks) * kChunkKeys;
  ke = kb + kChunkKeys;
  const int64_t bend = rules::block_begin(int64_t(j) + 1, B);
  ke = ke < bend ? ke : bend;
  ke = ke < p_max + 1 ? ke : p_max + 1;
  if (ke < kb) ke = kb;
}

// The four threads of a quad (lanes 4k..4k+3) hold the other columns of the same two rows.
__device__ __forceinline__ void quad_max(float (&m)[2]) {
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    m[h] = fmaxf(m[h], __shfl_xor_sync(0xffffffffu, m[h], 1));
    m[h] = fmaxf(m[h], __shfl_xor_sync(0xffffffffu, m[h], 2));
  }
}

// After chunk c: when it is the last chunk of its block j, the quad's leader writes the block's score
// (and LSE) of its two rows, and every thread restarts the running max and sum.
template <bool kWantLse>
__device__ __forceinline__ void finish_block(const BlockScoreArgs& a, int64_t c, int subchunks, int B,
                                             bool quad_leader, const bool (&row_ok)[2],
                                             const int64_t (&pos)[2], const int (&grp)[2],
                                             const int64_t (&qrow)[2], float (&run_max)[2],
                                             float (&run_sum)[2]) {
  const int64_t j = c / subchunks;
  if (c - j * subchunks == subchunks - 1) {  // last chunk of block j: write and reset
    if (quad_leader) {
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        if (row_ok[h] && j <= rules::local_block(pos[h], B) && j < a.ld) {
          const int64_t o = (int64_t(grp[h]) * a.total_q + qrow[h]) * a.ld + j;
          a.scores[o] = run_max[h] * a.iscale;
          if constexpr (kWantLse) a.lses[o] = run_max[h] * a.lse_factor + logf(run_sum[h]);
        }
      }
    }
    run_max[0] = run_max[1] = -INFINITY;
    run_sum[0] = run_sum[1] = 0.f;
  }
}

template <bool kBf16, bool kWantLse>
__global__ void __launch_bounds__(kScoreThreads, 2) block_scores_kernel(const BlockScoreArgs a) {
  extern __shared__ __align__(16) uint16_t smem[];
  const int b = blockIdx.y;
  const int64_t q_begin = a.cu_q[b], lq = a.cu_q[b + 1] - q_begin;
  const int64_t k_begin = a.cu_k[b], lk = a.cu_k[b + 1] - k_begin;
  // Later tiles see more keys: launch them first so the causal tail does not straggle.
  const int64_t q0 = int64_t(gridDim.x - 1 - blockIdx.x) * a.queries_per_cta;
  if (q0 >= lq) return;
  const int G = a.groups_per_cta, g0 = blockIdx.z * G;
  const int64_t tile_q = lq - q0 < a.queries_per_cta ? lq - q0 : a.queries_per_cta;
  const int64_t p_min = rules::query_position(lq, lk, q0);
  const int64_t p_max = rules::query_position(lq, lk, q0 + tile_q - 1);
  const int B = a.block_size;

  const int stride = a.padded_dim + kSmemPad;
  uint16_t* sq = smem;
  auto key_buffer = [&](int64_t c) { return smem + (kScoreRows + (c & 1) * kKeysPerChunk) * stride; };

  // Rows: r = query_in_tile * G + group_in_cta. Rows past the tile or past Hkv load as zeros.
  {
    const int valid_rows = int(tile_q) * G;
    const uint16_t* qbase = a.qi + (q_begin + q0) * a.qi_s0;
    auto row_offset = [&](int r) {
      const int qq = r / G, gg = g0 + r - (r / G) * G;
      return int64_t(qq) * a.qi_s0 + int64_t(gg < a.num_kv_heads ? gg : 0) * a.qi_s1;
    };
    load_tile(sq, stride, kScoreRows, valid_rows, qbase, row_offset, a);
  }

  const int64_t num_blocks = rules::local_block(p_max, B) + 1;
  const int subchunks = (B + kKeysPerChunk - 1) / kKeysPerChunk;
  const int64_t num_chunks = num_blocks * subchunks;
  auto chunk_range = [&](int64_t c, int64_t& kb, int64_t& ke) {
    chunk_key_range<kKeysPerChunk>(int(c), subchunks, B, p_max, kb, ke);
  };
  auto load_chunk = [&](int64_t c) {
    int64_t kb, ke;
    chunk_range(c, kb, ke);
    const uint16_t* kbase = a.ki + (k_begin + kb) * a.ki_s0;
    auto row_offset = [&](int r) { return int64_t(r) * a.ki_s0; };
    load_tile(key_buffer(c), stride, kKeysPerChunk, int(ke - kb), kbase, row_offset, a);
  };

  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  // This thread's two rows (mma accumulator rows lane/4 and lane/4 + 8 of the warp's 16).
  int64_t qrow[2], pos[2];
  int grp[2];
  bool row_ok[2];
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const int r = warp * 16 + (lane >> 2) + h * 8;
    const int qq = r / G;
    grp[h] = g0 + r - qq * G;
    row_ok[h] = qq < tile_q && grp[h] < a.num_kv_heads;
    qrow[h] = q_begin + q0 + qq;
    pos[h] = rules::query_position(lq, lk, q0 + qq);
  }

  float run_max[2] = {-INFINITY, -INFINITY}, run_sum[2] = {0.f, 0.f};
  const float lse_log2 = a.lse_factor * 1.4426950408889634f;

  load_chunk(0);
  cp_async_commit();
  for (int64_t c = 0; c < num_chunks; ++c) {
    if (c + 1 < num_chunks) load_chunk(c + 1);
    cp_async_commit();
    cp_async_wait<1>();
    __syncthreads();

    int64_t kb, ke;
    chunk_range(c, kb, ke);
    const uint16_t* kt = key_buffer(c);
    float acc[16][4];
#pragma unroll
    for (int n = 0; n < 16; ++n) acc[n][0] = acc[n][1] = acc[n][2] = acc[n][3] = 0.f;
    const int live_tiles = int((ke - kb + 7) / 8);  // 8-key column tiles holding any key
    const uint16_t* qa = sq + (warp * 16 + (lane & 15)) * stride + (lane >> 4) * 8;
    const uint16_t* kbp = kt + ((lane & 7) + (lane >> 4) * 8) * stride + ((lane >> 3) & 1) * 8;
    for (int k0 = 0; k0 < a.padded_dim; k0 += 16) {
      uint32_t af[4];
      ldmatrix_x4(af, qa + k0);
#pragma unroll
      for (int np = 0; np < 8; ++np) {
        if (np * 16 < live_tiles * 8) {
          uint32_t bf[4];
          ldmatrix_x4(bf, kbp + np * 16 * stride + k0);
          mma_16816<kBf16>(acc[2 * np], af, bf[0], bf[1]);
          mma_16816<kBf16>(acc[2 * np + 1], af, bf[2], bf[3]);
        }
      }
    }

    // Pool: mask columns past the chunk or past the row's causal limit, then max over the chunk.
    const bool need_mask = ke - kb < kKeysPerChunk || ke - 1 > p_min;
    if (need_mask) {
#pragma unroll
      for (int n = 0; n < 16; ++n)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int64_t t = kb + n * 8 + (lane & 3) * 2 + (e & 1);
          if (t >= ke || !rules::causally_visible(t, pos[e >> 1])) acc[n][e] = -INFINITY;
        }
    }
    float cmax[2] = {-INFINITY, -INFINITY};
#pragma unroll
    for (int n = 0; n < 16; ++n) {
      cmax[0] = fmaxf(cmax[0], fmaxf(acc[n][0], acc[n][1]));
      cmax[1] = fmaxf(cmax[1], fmaxf(acc[n][2], acc[n][3]));
    }
    quad_max(cmax);
    if constexpr (kWantLse) {
      // Online logsumexp (relative to the running max) so a block spanning chunks stays exact.
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        // No early exit for rows that see nothing yet: every lane must reach the shuffles.
        const float m_new = fmaxf(run_max[h], cmax[h]);
        const float m_ref = m_new == -INFINITY ? 0.f : m_new;
        float s = 0.f;
#pragma unroll
        for (int n = 0; n < 16; ++n) {
          s += exp2f((acc[n][2 * h] - m_ref) * lse_log2);
          s += exp2f((acc[n][2 * h + 1] - m_ref) * lse_log2);
        }
        s += __shfl_xor_sync(0xffffffffu, s, 1);
        s += __shfl_xor_sync(0xffffffffu, s, 2);
        run_sum[h] = run_sum[h] * exp2f((run_max[h] - m_ref) * lse_log2) + s;
        run_max[h] = m_new;
      }
    } else {
      run_max[0] = fmaxf(run_max[0], cmax[0]);
      run_max[1] = fmaxf(run_max[1], cmax[1]);
    }

    finish_block<kWantLse>(a, c, subchunks, B, (lane & 3) == 0, row_ok, pos, grp, qrow, run_max, run_sum);
    __syncthreads();  // the next iteration refills this buffer
  }
}

}  // namespace index
}  // namespace cuda
}  // namespace detail
}  // namespace msa
