// The pooling of the wgmma index stage 1 kernels (index_block_scores_wgmma_pipe.cuh,
// index_block_scores_ws.cuh): per accumulator row, the running block max (and, when asked, the
// block's sum of exponentials) over a block's chunks, written out when a block's last chunk is done.
//
// A wgmma m64 x kKeys accumulator gives each thread pairs of columns in 8-column steps on two rows
// 8 apart; element i of an accumulator of kTiles such m64 tiles sits on row slot
// 2 * (i / (kKeys / 2)) + (i / 2) % 2 (bench/index_wgmma_layout_check.cu checks the layout). Four
// threads of a quad hold the other columns of the same rows.
//
// Nothing here branches on per-thread values: the kernels keep a wgmma batch in flight across the
// pooling, and a branch ptxas cannot prove warp-uniform there makes it serialize every wgmma
// (warning C7518). Hence 32-bit chunk arithmetic and predicated stores.
#pragma once

#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>

#include "cuda/exp2_ftz.cuh"
#include "cuda/index_block_scores.cuh"
#include "msa/rules.h"

namespace msa {
namespace detail {
namespace cuda {
namespace index {

// A store predicated in the instruction, not branched around.
__device__ __forceinline__ void store_if(float* p, float v, bool pred) {
  asm volatile(
      "{\n .reg .pred p;\n setp.ne.b32 p, %2, 0;\n @p st.global.f32 [%0], %1;\n}\n" ::"l"(p), "f"(v),
      "r"(int(pred))
      : "memory");
}

// The query tile a CTA pools: rows r = query_in_tile * G + group_in_cta (G = a.groups_per_cta),
// groups from g0, queries q0 .. q0 + tile_q - 1 of a sequence at q_begin with lq queries, lk keys.
struct PoolTile {
  int64_t q_begin, lq, lk, q0, tile_q, p_min, p_max;
  int g0;
};

template <int kSlots, int kKeys, bool kWantLse>
struct RowPool {
  static constexpr int kAccPerTile = kKeys / 2;  // accumulator elements per thread of one m64 tile
  static constexpr int kChains = kAccPerTile / 4 < 4 ? kAccPerTile / 4 : 4;

  // Per row slot: its position, its first output element (block 0), and the last block it writes
  // (its causal last block capped by the row stride; -1 when it writes nothing: a row past the tile
  // or past Hkv, or not the quad's leader lane).
  int64_t pos[kSlots], out_row[kSlots];
  int write_last[kSlots];
  float run_max[kSlots], run_sum[kSlots];

  __device__ static constexpr int slot_of(int i) { return 2 * (i / kAccPerTile) + (i / 2) % 2; }

  // `rows` gives the CTA row of accumulator element i (partition_C of an identity tensor, plus the
  // warpgroup's first row).
  template <class RowOf>
  __device__ void init(const BlockScoreArgs& a, const PoolTile& t, RowOf rows) {
    const int G = a.groups_per_cta;
#pragma unroll
    for (int s = 0; s < kSlots; ++s) {
      const int r = rows((s / 2) * kAccPerTile + 2 * (s % 2));
      const int qq = r / G;
      const int grp = t.g0 + r - qq * G;
      const bool row_ok = qq < t.tile_q && grp < a.num_kv_heads && (threadIdx.x & 3) == 0;
      pos[s] = rules::query_position(t.lq, t.lk, t.q0 + qq);
      out_row[s] = (int64_t(grp) * a.total_q + t.q_begin + t.q0 + qq) * a.ld;
      const int64_t local = rules::local_block(pos[s], a.block_size);
      write_last[s] = row_ok ? int(local < a.ld - 1 ? local : a.ld - 1) : -1;
      run_max[s] = -INFINITY;
      run_sum[s] = 0.f;
    }
  }

  // Pools chunk c (keys [kb, ke), its product complete in `acc`) into the running max / sum and
  // writes block outputs when c ends its block. `cols(i)` is the column of element i in the chunk.
  template <class Acc, class ColOf>
  __device__ void pool(const BlockScoreArgs& a, const PoolTile& t, int c, int subchunks, int64_t kb, int64_t ke,
                       Acc& acc, ColOf cols, float lse_log2) {
    constexpr int kAcc = kAccPerTile * (kSlots / 2);
    // Mask columns past the chunk or past the row's causal limit (only chunks on the diagonal or
    // cut). A uniform branch: kb, ke and p_min derive from broadcast values.
    if (ke - kb < kKeys || ke - 1 > t.p_min) {
      int col_end[kSlots];  // rules::causally_visible(t, p) is t <= p
#pragma unroll
      for (int s = 0; s < kSlots; ++s) {
        const int64_t end = ke < pos[s] + 1 ? ke : pos[s] + 1;
        col_end[s] = end > kb ? int(end - kb) : 0;
      }
#pragma unroll
      for (int i = 0; i < kAcc; ++i)
        if (cols(i) >= col_end[slot_of(i)]) acc(i) = -INFINITY;
    }
    // Element i feeds chain (i / 4) % kChains of its slot: independent chains per row, since one
    // serial fmax / add chain per row was latency-bound.
    float pm[kSlots][kChains];
#pragma unroll
    for (int s = 0; s < kSlots; ++s)
#pragma unroll
      for (int j = 0; j < kChains; ++j) pm[s][j] = -INFINITY;
#pragma unroll
    for (int i = 0; i < kAcc; ++i) {
      float& m = pm[slot_of(i)][(i / 4) % kChains];
      m = fmaxf(m, acc(i));
    }
    float cmax[kSlots];
#pragma unroll
    for (int s = 0; s < kSlots; ++s) {
      cmax[s] = pm[s][0];
#pragma unroll
      for (int j = 1; j < kChains; ++j) cmax[s] = fmaxf(cmax[s], pm[s][j]);
      cmax[s] = fmaxf(cmax[s], __shfl_xor_sync(0xffffffffu, cmax[s], 1));
      cmax[s] = fmaxf(cmax[s], __shfl_xor_sync(0xffffffffu, cmax[s], 2));
    }
    if constexpr (kWantLse) {
      // Online logsumexp (relative to the running max) so a block spanning chunks stays exact;
      // exp((s - m) * lse_factor) == 2^(s * lse_log2 - m * lse_log2): one FFMA per score.
      float m_scaled[kSlots];
#pragma unroll
      for (int s = 0; s < kSlots; ++s) {
        const float m_new = fmaxf(run_max[s], cmax[s]);
        m_scaled[s] = (m_new == -INFINITY ? 0.f : m_new) * lse_log2;
      }
      float ps[kSlots][kChains];
#pragma unroll
      for (int s = 0; s < kSlots; ++s)
#pragma unroll
        for (int j = 0; j < kChains; ++j) ps[s][j] = 0.f;
#pragma unroll
      for (int i = 0; i < kAcc; ++i)
        ps[slot_of(i)][(i / 4) % kChains] += exp2_ftz(fmaf(acc(i), lse_log2, -m_scaled[slot_of(i)]));
#pragma unroll
      for (int s = 0; s < kSlots; ++s) {
        float sum = ps[s][0];
#pragma unroll
        for (int j = 1; j < kChains; ++j) sum += ps[s][j];
        // No early exit for rows that see nothing yet: every lane must reach the shuffles.
        sum += __shfl_xor_sync(0xffffffffu, sum, 1);
        sum += __shfl_xor_sync(0xffffffffu, sum, 2);
        run_sum[s] = run_sum[s] * exp2_ftz(run_max[s] * lse_log2 - m_scaled[s]) + sum;
        run_max[s] = fmaxf(run_max[s], cmax[s]);
      }
    } else {
#pragma unroll
      for (int s = 0; s < kSlots; ++s) run_max[s] = fmaxf(run_max[s], cmax[s]);
    }
    // As finish_block (index_block_scores.cuh), with predicated stores instead of branches.
    const int j = c / subchunks;
    const bool block_done = c - j * subchunks == subchunks - 1;  // last chunk of block j: write, reset
#pragma unroll
    for (int s = 0; s < kSlots; ++s) {
      const bool write = block_done && j <= write_last[s];
      const int64_t o = out_row[s] + j;
      store_if(a.scores + o, run_max[s] * a.iscale, write);
      if constexpr (kWantLse) store_if(a.lses + o, run_max[s] * a.lse_factor + logf(run_sum[s]), write);
    }
#pragma unroll
    for (int s = 0; s < kSlots; ++s) {
      run_max[s] = block_done ? -INFINITY : run_max[s];
      run_sum[s] = block_done ? 0.f : run_sum[s];
    }
  }
};

}  // namespace index
}  // namespace cuda
}  // namespace detail
}  // namespace msa
