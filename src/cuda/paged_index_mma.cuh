// CUDA paged index branch, stage 1, tensor-core variant for decode: the default for 16-bit index
// queries (MSA_PAGED_INDEX_KERNEL=stream / smem keep paged_index_stream.cuh / paged_index.cuh). Same
// grid, arguments and score layout as index_scores_kernel, so the same top-k select follows.
//
// Why: the streaming kernel spends ~70 instructions per 16 bytes of ki (FP32 FMAs per row plus a
// shuffle tree per key and row), which holds it at 83% of copy bandwidth in bf16 and 62% in FP8
// (twice the elements per byte). Here each warp feeds ki straight from global memory into
// mma.sync m16n8k16 as the A operand (16 keys x 16 dims; the index queries are the B operand, 8 rows
// per n-tile): per 16 bytes a thread issues a quarter of an mma and no shuffle, and the block max is
// kept in the accumulator layout, reduced across lanes once per block.
//
// The dot product does not care about the order of the Di dimension, so it is permuted to suit the
// loads: lane (g = lane / 4, t = lane % 4) loads 16-byte chunks t, t + 4, ... of keys g and g + 8 of
// a 16-key tile (each load instruction covers 8 keys x 64 contiguous bytes), and chunk i's elements
// 4h..4h+3 fill mma k-step (i, h)'s k slots (2t, 2t+1) and (2t+8, 2t+9). The query fragments use the
// same map, so every lane loads the query dims of its own chunks. FP8 codes are widened to the query
// dtype (exact: every E4M3 value is a bf16 and a half); the page scale and iscale are positive, so
// they multiply the block max once. Candidate blocks lie before the row's local block, so every key
// of a scored block is visible: no masking inside the loop.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_fp8.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <cstdlib>
#include <cstring>

#include "cuda/attention_mma.cuh"
#include "cuda/paged_index.cuh"
#include "cuda/paged_index_stream.cuh"  // kStreamMaxQueries
#include "cuda/paged_layout.h"
#include "cuda/paged_load.cuh"  // fp8x2_to_pair
#include "cuda/paged_tile.cuh"
#include "msa/rules.h"

namespace msa {
namespace detail {
namespace cuda {
namespace paged {

// The shape of one instance: E elements per 16-byte chunk, kCpr chunks per lane and key row
// (Di = 4 * E * kCpr), kNT n-tiles of 8 rows per pass over the block, kTiles 16-key tiles loaded
// per round (loads in flight per lane: 2 * kCpr * kTiles).
template <bool kFp8, int kCpr>
struct MmaIndexShape {
  static constexpr int kElems = kFp8 ? 16 : 8;
  static constexpr int kStepsPerChunk = kElems / 4;  // mma k-steps (16 dims) a chunk feeds
  static constexpr int kSteps = kCpr * kStepsPerChunk;
  // Up to 8 16-byte loads in flight per lane (more spilled at the 4-CTA register bound).
  static constexpr int kTiles = 8 / (2 * kCpr) > 0 ? 8 / (2 * kCpr) : 1;
};

template <class T, bool kFp8, int kCpr, int kNT>
__global__ void __launch_bounds__(kThreads, kNT >= 4 ? 2 : 4) index_scores_mma_kernel(const IndexArgs a) {
  wait_for_prior_grid_then_release_next();
  using Shape = MmaIndexShape<kFp8, kCpr>;
  constexpr int E = Shape::kElems, KS = Shape::kSteps, TL = Shape::kTiles;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int g8 = lane >> 2, t4 = lane & 3;

  const IndexWork w = index_work(a);
  if (!w.ok) return;
  const int r = w.qt.r, q_len = w.qt.q_len, q0 = w.qt.q0, rows = w.rows;
  const int64_t qbase = w.qt.qbase, kv = w.qt.kv, j0 = w.j0, j1 = w.j1;
  const int B = a.block_size;
  const T* qi = static_cast<const T*>(a.qi);

  for (int r0 = 0; r0 < rows; r0 += 8 * kNT) {
    // B fragments: row r0 + 8 nt + g8, k-step (i, h) holds dims E (t4 + 4 i) + 4 h + {0, 1} and {2, 3}.
    uint32_t qf[kNT][KS][2];
#pragma unroll
    for (int nt = 0; nt < kNT; ++nt) {
      const int row = r0 + nt * 8 + g8;
      const uint32_t* src =
          row < rows ? reinterpret_cast<const uint32_t*>(qi + (qbase + q0 + row / a.hkv) * a.qi_s0 +
                                                         int64_t(row % a.hkv) * a.qi_s1)
                     : nullptr;
#pragma unroll
      for (int i = 0; i < kCpr; ++i)
#pragma unroll
        for (int h = 0; h < Shape::kStepsPerChunk; ++h) {
          const int e = E * (t4 + 4 * i) + 4 * h;  // even: a 32-bit pair
          qf[nt][i * Shape::kStepsPerChunk + h][0] = src ? src[e / 2] : 0u;
          qf[nt][i * Shape::kStepsPerChunk + h][1] = src ? src[e / 2 + 1] : 0u;
        }
    }

    // The next block's page id is read one block ahead: its latency hides behind this block's loads.
    int64_t next_page = j0 + warp < j1 ? a.page_table[r * a.pt_s0 + (j0 + warp) * a.pt_s1] : -1;
    for (int64_t j = j0 + warp; j < j1; j += kThreads / 32) {
      const int64_t page = next_page;
      if (j + kThreads / 32 < j1) next_page = a.page_table[r * a.pt_s0 + (j + kThreads / 32) * a.pt_s1];
      const bool valid = page >= 0 && page < a.num_pages;  // an id outside the cache is not read
      float best[kNT][2];
#pragma unroll
      for (int nt = 0; nt < kNT; ++nt) best[nt][0] = best[nt][1] = -INFINITY;
      if (valid) {  // warp-uniform
        const unsigned char* base = a.ki + page * a.ki_s0 + int64_t(t4) * 16;
        for (int k0 = 0; k0 < B; k0 += 16 * TL) {
          uint4 v[TL][2][kCpr];  // [tile][key g8, g8 + 8][chunk]
#pragma unroll
          for (int tl = 0; tl < TL; ++tl)
#pragma unroll
            for (int hk = 0; hk < 2; ++hk) {
              const int key = k0 + tl * 16 + g8 + 8 * hk;
#pragma unroll
              for (int i = 0; i < kCpr; ++i)
                v[tl][hk][i] = key < B ? __ldg(reinterpret_cast<const uint4*>(base + int64_t(key) * a.ki_s1 +
                                                                              i * 64))
                                       : make_uint4(0u, 0u, 0u, 0u);
            }
#pragma unroll
          for (int tl = 0; tl < TL; ++tl) {
            if (k0 + tl * 16 >= B) break;  // B is a multiple of 16: whole tiles only
            float acc[kNT][4];
#pragma unroll
            for (int nt = 0; nt < kNT; ++nt) acc[nt][0] = acc[nt][1] = acc[nt][2] = acc[nt][3] = 0.f;
#pragma unroll
            for (int i = 0; i < kCpr; ++i) {
              uint32_t w[2][E / 2];  // [key g8, g8 + 8][pair]
#pragma unroll
              for (int hk = 0; hk < 2; ++hk) {
                const uint4 u = v[tl][hk][i];
                if constexpr (kFp8) {
                  const __nv_fp8x2_storage_t* c = reinterpret_cast<const __nv_fp8x2_storage_t*>(&u);
#pragma unroll
                  for (int p = 0; p < E / 2; ++p) w[hk][p] = fp8x2_to_pair<T>(c[p]);
                } else {
                  w[hk][0] = u.x;
                  w[hk][1] = u.y;
                  w[hk][2] = u.z;
                  w[hk][3] = u.w;
                }
              }
#pragma unroll
              for (int h = 0; h < Shape::kStepsPerChunk; ++h) {
                const uint32_t af[4] = {w[0][2 * h], w[1][2 * h], w[0][2 * h + 1], w[1][2 * h + 1]};
#pragma unroll
                for (int nt = 0; nt < kNT; ++nt)
                  mma::mma_16816<T>(acc[nt], af, qf[nt][i * Shape::kStepsPerChunk + h][0],
                                    qf[nt][i * Shape::kStepsPerChunk + h][1]);
              }
            }
#pragma unroll
            for (int nt = 0; nt < kNT; ++nt) {
              best[nt][0] = fmaxf(best[nt][0], fmaxf(acc[nt][0], acc[nt][2]));
              best[nt][1] = fmaxf(best[nt][1], fmaxf(acc[nt][1], acc[nt][3]));
            }
          }
        }
      }
      // Max over the 8 key rows g8 of the tile: lanes t4 (g8 = 0) end with columns 2 t4, 2 t4 + 1.
#pragma unroll
      for (int nt = 0; nt < kNT; ++nt)
#pragma unroll
        for (int c = 0; c < 2; ++c)
#pragma unroll
          for (int off = 4; off < 32; off <<= 1)
            best[nt][c] = fmaxf(best[nt][c], __shfl_xor_sync(0xffffffffu, best[nt][c], off));
      if (lane < 4) {
        const float scale = a.iscale * (valid && kFp8 ? a.ki_scale[page * a.kis_s0] : 1.f);
#pragma unroll
        for (int nt = 0; nt < kNT; ++nt)
#pragma unroll
          for (int c = 0; c < 2; ++c) {
            const int row = r0 + nt * 8 + 2 * t4 + c;
            if (row >= rows) continue;
            const int qrow = row / a.hkv, grp = row - qrow * a.hkv;
            if (j >= rules::local_block(rules::query_position(q_len, kv, q0 + qrow), B)) continue;
            const float s = valid ? best[nt][c] * scale : kBadPageScore;
            // A NaN score has no rank: the lowest, as on the CPU.
            a.scores[(int64_t(grp) * a.bounds.total_q + qbase + q0 + qrow) * a.ld + j] = isnan(s) ? -INFINITY : s;
          }
      }
    }
  }
}

// Host side. The kernel applies to 16-bit index queries (the mma operand type), Di a multiple of
// 4 x 16 bytes' worth of elements (32 for 16-bit ki, 64 for FP8), blocks of whole 16-key tiles,
// 16-byte aligned ki rows, and decode-sized query suffixes (longer ones keep the shared-memory kernel).
inline bool mma_index_requested() {
  const char* v = std::getenv("MSA_PAGED_INDEX_KERNEL");
  return v == nullptr || std::strcmp(v, "mma") == 0;
}

inline bool mma_index_supported(int max_q_len, int q_bytes, int di, bool ki_fp8, int block_size, const void* ki,
                                int64_t ki_s0_bytes, int64_t ki_s1_bytes) {
  if (q_bytes != 2 || max_q_len > kStreamMaxQueries || block_size % 16 != 0) return false;
  const int per_lane = ki_fp8 ? 64 : 32;
  if (di % per_lane != 0 || di / per_lane > 4) return false;
  return reinterpret_cast<std::uintptr_t>(ki) % 16 == 0 && ki_s0_bytes % 16 == 0 && ki_s1_bytes % 16 == 0;
}

template <class T, bool kFp8, int kCpr>
void launch_mma_index_cpr(const IndexArgs& a, int rows, unsigned ctas, cudaStream_t stream) {
  if (rows <= 8)
    launch_chained(index_scores_mma_kernel<T, kFp8, kCpr, 1>, ctas, kThreads, 0, stream, a);
  else if (rows <= 16)
    launch_chained(index_scores_mma_kernel<T, kFp8, kCpr, 2>, ctas, kThreads, 0, stream, a);
  else
    launch_chained(index_scores_mma_kernel<T, kFp8, kCpr, 4>, ctas, kThreads, 0, stream, a);
}

// rows: the plan's largest tile (row_cap); mma_index_supported has checked Di.
template <class T, bool kFp8>
void launch_mma_index(const IndexArgs& a, int rows, unsigned ctas, cudaStream_t stream) {
  switch (a.di / (kFp8 ? 64 : 32)) {
    case 1: return launch_mma_index_cpr<T, kFp8, 1>(a, rows, ctas, stream);
    case 2: return launch_mma_index_cpr<T, kFp8, 2>(a, rows, ctas, stream);
    case 3: return launch_mma_index_cpr<T, kFp8, 3>(a, rows, ctas, stream);
    default: return launch_mma_index_cpr<T, kFp8, 4>(a, rows, ctas, stream);
  }
}

}  // namespace paged
}  // namespace cuda
}  // namespace detail
}  // namespace msa
