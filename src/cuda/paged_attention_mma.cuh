// Tensor-core variant of the CUDA paged main branch (paged_attention.cuh), the default for 16-bit
// queries (MSA_PAGED_ATTENTION_KERNEL=ffma keeps the FFMA kernel) (f32 keeps the FFMA kernel: the products need
// 16-bit operands). Why: with the G heads of a group packed as rows, every K/V byte costs 32 FLOP of
// FP32 FMAs, above what the FFMA pipes sustain at full memory bandwidth; the same products on
// mma.sync m16n8k16 (bf16/f16 operands, fp32 accumulators) leave the kernel bound by its loads.
//
// Same CTA (request x query tile x group x key split), rows (query * G + head), block union
// (tile_blocks), key splits and outputs (out/lse with one split, else the partials merge_kernel
// combines) as the FFMA kernel. The split's keys are its blocks' visible keys laid end to end
// (B keys a block, fewer for the last), staged kMmaKeys at a time, double-buffered with cp.async
// into swizzled 16-bit tiles that ldmatrix reads (FP8 pages: raw bytes staged, then each thread
// widens the vectors it copied to T; the (page, group) scales multiply S for K and P for V). Per key the stage keeps its
// row offsets, position and the bits of the tile's queries that selected its block (0 for padding
// and for pages outside the cache), so visibility is decided per (row, key) by the union's mask and
// rules::causally_visible; a chunk every row selected and sees whole (decode's usual case) skips
// the mask. Warps: rows are split into m-tiles of 16 (padded rows are zero and
// fully masked); with one m-tile the four warps take a quarter of each chunk's keys each, with two
// a half, with three or four one m-tile each; every warp keeps its own online softmax (fp32, log2
// domain) and the key slices are combined through shared memory at the end.
//
// FP8 caches take one of two modes (MmaMode). fp8_widened: each thread widens the codes it copied
// into a 16-bit tile stage, which ldmatrix then reads. fp8_registers (K and V both FP8; the default
// where a query tile is one m-tile, paged_run.cu): the fragments come straight from the raw
// tiles as 32-bit words (paged_fp8_fragments.h: Q and K share a permutation of D, V's columns are
// permuted and O's written back through the same map), so there is no 16-bit tile and the freed
// shared memory holds four raw stages (three chunks in flight while one is computed).
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "cuda/attention_forward_kernel.cuh"  // swz: the swizzled 16-bit tile ldmatrix reads
#include "cuda/attention_mma.cuh"
#include "cuda/paged_attention.cuh"
#include "cuda/paged_fp8_fragments.h"
#include "cuda/paged_layout.h"
#include "cuda/paged_load.cuh"
#include "cuda/paged_tile.cuh"
#include "msa/rules.h"

namespace msa {
namespace detail {
namespace cuda {
namespace paged {

constexpr int kMmaKeys = 64;  // keys per staged chunk
constexpr int kMmaTileRows = 16;  // rows of one m-tile (mma.sync m16n8k16)
// Whether every query tile of a plan whose tiles have at most `row_cap` rows is one m-tile.
__host__ __device__ constexpr bool one_m_tile(int row_cap) { return row_cap <= kMmaTileRows; }
constexpr int kMmaWarps = kThreads / 32;

// Per-key facts of a staged chunk, written by the thread that owns the key (t < kMmaKeys).
struct MmaKeyMeta {
  // Byte offsets of the key's K and V rows of this group from the cache bases; -1: padding or a
  // page id outside the cache (zeros are staged). Kept per key so the copy loop is one shared load
  // and an add per 16 bytes.
  int64_t koff[kMmaKeys], voff[kMmaKeys];
  int32_t pos[kMmaKeys];   // key position
  uint32_t sel[kMmaKeys];  // bits of the tile's queries that may see it (0: nobody)
  float kscale[kMmaKeys], vscale[kMmaKeys];
};

// How the K / V tiles reach the tensor cores (see the top of this file).
enum class MmaMode : int { sixteen_bit = 0, fp8_widened = 1, fp8_registers = 2 };

// Chunks staged at once: one computed while the others are in flight. A third 16-bit stage (two chunks
// in flight) measured no faster on the H100 at 32 and 128 x 128K (7a2a04e), so 16-bit modes keep two.
__host__ __device__ constexpr int mma_stages(MmaMode m) { return m == MmaMode::fp8_registers ? 4 : 2; }

// The kernel's static shared memory (a MmaKeyMeta per stage, list_len), on top of the dynamic bytes.
__host__ __device__ constexpr std::size_t mma_static_smem(MmaMode m) {
  return std::size_t(mma_stages(m)) * sizeof(MmaKeyMeta) + 16;
}

// Byte offsets of the mma kernel's shared memory (host sizes it, device carves it).
struct MmaSmem {
  std::size_t q, tiles, raw, ml, mask, list, pages, scales, bytes;
};
__host__ __device__ inline std::size_t mma_align(std::size_t n) { return (n + 127) / 128 * 128; }
// 16-bit tile stages: one a stage for 16-bit caches; one in all when both caches are FP8 and widened
// (the copies land in the raw FP8 stages, and one 16-bit stage refilled each chunk keeps two CTAs an
// SM); none in the register mode.
__host__ __device__ inline int mma_tile_stages(bool k_fp8, bool v_fp8, MmaMode m) {
  return m == MmaMode::fp8_registers ? 0 : k_fp8 && v_fp8 ? 1 : mma_stages(m);
}
__host__ __device__ inline MmaSmem mma_smem(int D, int row_cap, int64_t list_cap, int64_t union_cap, bool k_fp8, bool v_fp8,
                                             bool stage_pages, MmaMode mode) {
  MmaSmem s;
  const std::size_t rows_pad = std::size_t((row_cap + 15) / 16 * 16);
  s.q = 0;
  s.tiles = mma_align(rows_pad * D * 2);
  // [stage][K, V][kMmaKeys][D] 16-bit; after the key loop, the slices' O ([warp][16][D + 8] fp32).
  const std::size_t tile_bytes = std::size_t(mma_tile_stages(k_fp8, v_fp8, mode)) * 2 * kMmaKeys * D * 2;
  const std::size_t combine_bytes = std::size_t(kMmaWarps) * 16 * (D + 8) * sizeof(float);
  // FP8 raw stages [stage][K, V][kMmaKeys * D codes] (fp8_tile_offset). The stages' MmaKeyMeta are
  // static shared memory.
  const std::size_t raw_bytes = k_fp8 || v_fp8 ? std::size_t(mma_stages(mode)) * 2 * kMmaKeys * D : 0;
  if (mode == MmaMode::fp8_registers) {  // the raw stages, then the slices' O, share one region
    s.raw = s.tiles;
    s.ml = s.tiles + mma_align(raw_bytes > combine_bytes ? raw_bytes : combine_bytes);
  } else {
    s.raw = s.tiles + mma_align(tile_bytes > combine_bytes ? tile_bytes : combine_bytes);
    s.ml = s.raw + mma_align(raw_bytes);
  }
  // m, l of each warp's 16 rows, then the combined m, l of each row.
  s.mask = s.ml + mma_align(sizeof(float) * (2 * kMmaWarps * 16 + 2 * kMaxRows));
  s.list = s.mask + sizeof(uint32_t) * std::size_t(list_cap);  // the mask: one word per block id
  // Per block of the CTA's split (sparse, stage_pages): its page id, then (FP8) its K and V scales.
  const std::size_t staged = stage_pages ? std::size_t(union_cap) : 0;
  s.pages = s.list + sizeof(int32_t) * std::size_t(union_cap);  // the list: the union, ascending
  s.scales = s.pages + sizeof(int32_t) * staged;
  s.bytes = s.scales + (k_fp8 || v_fp8 ? 2 * sizeof(float) * staged : 0) + 128;  // + slack to align the base
  return s;
}
template <int D>
inline std::size_t attention_mma_smem_bytes(int row_cap, int64_t list_cap, int64_t union_cap, bool k_fp8, bool v_fp8,
                                            bool stage_pages, MmaMode mode) {
  return mma_smem(D, row_cap, list_cap, union_cap, k_fp8, v_fp8, stage_pages, mode).bytes;
}

// Eight FP8 codes widened exactly to T (no scale: the page scales go on S and P).
template <class T>
__device__ __forceinline__ uint4 fp8x8_widen(const unsigned char* raw) {
  const uint2 c = *reinterpret_cast<const uint2*>(raw);
  const __nv_fp8x2_storage_t* p = reinterpret_cast<const __nv_fp8x2_storage_t*>(&c);
  return make_uint4(fp8x2_to_pair<T>(p[0]), fp8x2_to_pair<T>(p[1]), fp8x2_to_pair<T>(p[2]), fp8x2_to_pair<T>(p[3]));
}

// S = Q K^T of a warp's keys [kbase, kbase + KS) from a 16-bit tile (ldmatrix).
template <class T, int D, int KS>
__device__ __forceinline__ void chunk_scores(const uint16_t* tK, int kbase, const uint32_t (&qf)[D / 16][4],
                                             float (&s)[KS / 8][4], int lane) {
#pragma unroll
  for (int kk = 0; kk < D / 16; ++kk) {
#pragma unroll
    for (int np = 0; np < KS / 16; ++np) {
      uint32_t b0, b1, b2, b3;
      const int r = kbase + np * 16 + (lane & 7) + (lane >> 4) * 8, c = kk * 16 + ((lane >> 3) & 1) * 8;
      mma::ldmatrix_x4(mma::smem_addr(tK + swz<D>(r, c)), b0, b1, b2, b3);
      mma::mma_16816<T>(s[2 * np], qf[kk], b0, b1);
      mma::mma_16816<T>(s[2 * np + 1], qf[kk], b2, b3);
    }
  }
}

// The same from a raw FP8 tile: one 32-bit word of key g per k-step, its codes widened to b0, b1;
// qf holds Q in the matching order of D (fp8_k_column).
template <class T, int D, int KS>
__device__ __forceinline__ void chunk_scores_fp8(const unsigned char* rK, int kbase, const uint32_t (&qf)[D / 16][4],
                                                 float (&s)[KS / 8][4], int lane) {
  const int g = lane >> 2, t = lane & 3;
#pragma unroll
  for (int kk = 0; kk < D / 16; ++kk) {
#pragma unroll
    for (int n = 0; n < KS / 8; ++n) {
      const uint32_t w =
          *reinterpret_cast<const uint32_t*>(rK + fp8_tile_offset<D>(kbase + n * 8 + g, fp8_k_column(kk, t)));
      mma::mma_16816<T>(s[n], qf[kk], fp8x2_to_pair<T>(__nv_fp8x2_storage_t(w)),
                        fp8x2_to_pair<T>(__nv_fp8x2_storage_t(w >> 16)));
    }
  }
}

// Between the two products: FP8 K's page scales on S, the mask, the online softmax (scores raw, exp2
// with qscale folded in; m_run raw, l_run a lane's partial sum), FP8 V's page scales on P, O rescaled.
template <int D, int KS>
__device__ __forceinline__ void chunk_softmax(float (&s)[KS / 8][4], const MmaKeyMeta& meta, int kbase,
                                              float (&o)[D / 8][4], float (&m_run)[2], float (&l_run)[2],
                                              const bool (&row_ok)[2], const int (&qbit)[2],
                                              const int64_t (&qpos)[2], float qscale, bool all_visible,
                                              bool k_scaled, bool v_scaled, int lane) {
  if (k_scaled) {  // FP8 K: the tile holds the codes, S takes each key's page scale
#pragma unroll
    for (int n = 0; n < KS / 8; ++n)
#pragma unroll
      for (int j = 0; j < 2; ++j) {
        const float sc = meta.kscale[kbase + n * 8 + (lane & 3) * 2 + j];
        s[n][j] *= sc;
        s[n][2 + j] *= sc;
      }
  }
  // A chunk whose keys every row selected and sees (decode's whole blocks) needs no mask.
#pragma unroll
  for (int n = 0; n < KS / 8 && !all_visible; ++n) {
#pragma unroll
    for (int j = 0; j < 2; ++j) {
      const int key = kbase + n * 8 + (lane & 3) * 2 + j;
      const uint32_t sel = meta.sel[key];
      const int64_t kp = meta.pos[key];
#pragma unroll
      for (int h = 0; h < 2; ++h)
        if (!(row_ok[h] && ((sel >> qbit[h]) & 1u) && rules::causally_visible(kp, qpos[h])))
          s[n][2 * h + j] = -INFINITY;
    }
  }
  float alpha[2];
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    float mx = m_run[h];
#pragma unroll
    for (int n = 0; n < KS / 8; ++n) mx = fmaxf(mx, fmaxf(s[n][2 * h], s[n][2 * h + 1]));
    mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
    mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
    const float m_scaled = mx == -INFINITY ? 0.f : mx * qscale;
    alpha[h] = exp2f(m_run[h] * qscale - m_scaled);
    m_run[h] = mx;
    float sum = 0.f;
#pragma unroll
    for (int n = 0; n < KS / 8; ++n) {
#pragma unroll
      for (int j = 0; j < 2; ++j) {
        const float e = exp2f(fmaf(s[n][2 * h + j], qscale, -m_scaled));
        // FP8 V: the tile holds the codes, P takes each key's page scale (l does not).
        s[n][2 * h + j] = v_scaled ? e * meta.vscale[kbase + n * 8 + (lane & 3) * 2 + j] : e;
        sum += e;
      }
    }
    l_run[h] = l_run[h] * alpha[h] + sum;
  }
  // An unchanged max gives alpha exactly 1 (exp2(0)): once the max settles, most chunks skip the
  // rescale of O (bitwise the same result).
  if (__any_sync(0xffffffffu, alpha[0] != 1.f || alpha[1] != 1.f)) {
#pragma unroll
    for (int n = 0; n < D / 8; ++n) {
      o[n][0] *= alpha[0];
      o[n][1] *= alpha[0];
      o[n][2] *= alpha[1];
      o[n][3] *= alpha[1];
    }
  }
}

// P of a 16-key k-step as an A fragment (the S accumulators of n-tiles 2 kk and 2 kk + 1).
template <class T, int KS>
__device__ __forceinline__ void p_fragment(const float (&s)[KS / 8][4], int kk, uint32_t (&pa)[4]) {
  pa[0] = mma::Elem<T>::pack(s[2 * kk][0], s[2 * kk][1]);
  pa[1] = mma::Elem<T>::pack(s[2 * kk][2], s[2 * kk][3]);
  pa[2] = mma::Elem<T>::pack(s[2 * kk + 1][0], s[2 * kk + 1][1]);
  pa[3] = mma::Elem<T>::pack(s[2 * kk + 1][2], s[2 * kk + 1][3]);
}

// O += P V from a 16-bit tile (ldmatrix.trans).
template <class T, int D, int KS>
__device__ __forceinline__ void chunk_pv(const uint16_t* tV, int kbase, const float (&s)[KS / 8][4],
                                         float (&o)[D / 8][4], int lane) {
#pragma unroll
  for (int kk = 0; kk < KS / 16; ++kk) {
    uint32_t pa[4];
    p_fragment<T, KS>(s, kk, pa);
#pragma unroll
    for (int dp = 0; dp < D / 16; ++dp) {
      uint32_t b0, b1, b2, b3;
      const int r = kbase + kk * 16 + (lane & 7) + ((lane >> 3) & 1) * 8, c = dp * 16 + (lane >> 4) * 8;
      mma::ldmatrix_x4_trans(mma::smem_addr(tV + swz<D>(r, c)), b0, b1, b2, b3);
      mma::mma_16816<T>(o[2 * dp], pa, b0, b1);
      mma::mma_16816<T>(o[2 * dp + 1], pa, b2, b3);
    }
  }
}

// The same from a raw FP8 tile: n-tile j of O holds columns fp8_v_column(j, .); the words of keys
// 2t, 2t + 1, 2t + 8, 2t + 9 at column 32 m + 4 g give n-tiles 4m .. 4m + 3 their codes.
template <class T, int D, int KS>
__device__ __forceinline__ void chunk_pv_fp8(const unsigned char* rV, int kbase, const float (&s)[KS / 8][4],
                                             float (&o)[D / 8][4], int lane) {
  const int g = lane >> 2, t = lane & 3;
#pragma unroll
  for (int kk = 0; kk < KS / 16; ++kk) {
    uint32_t pa[4];
    p_fragment<T, KS>(s, kk, pa);
    const int k0 = kbase + kk * 16 + 2 * t;
#pragma unroll
    for (int m = 0; m < D / 32; ++m) {
      uint32_t w[4];
#pragma unroll
      for (int q = 0; q < 4; ++q)
        w[q] = *reinterpret_cast<const uint32_t*>(
            rV + fp8_tile_offset<D>(k0 + (q & 1) + (q >> 1) * 8, fp8_v_column(4 * m, g)));
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const uint32_t pick = uint32_t(i) | (uint32_t(i + 4) << 4);  // code i of the first word, then of the second
        mma::mma_16816<T>(o[4 * m + i], pa, fp8x2_to_pair<T>(__nv_fp8x2_storage_t(__byte_perm(w[0], w[1], pick))),
                          fp8x2_to_pair<T>(__nv_fp8x2_storage_t(__byte_perm(w[2], w[3], pick))));
      }
    }
  }
}

// One warp's share of a staged chunk: keys [kbase, kbase + KS) against its m-tile's 16 rows. K and V
// come from 16-bit tiles (tK, tV) or, in the register mode, from the raw FP8 tiles (rK, rV).
template <class T, int D, int KS, MmaMode kMode>
__device__ __forceinline__ void mma_chunk(const void* K, const void* V, const MmaKeyMeta& meta, int kbase,
                                          const uint32_t (&qf)[D / 16][4], float (&o)[D / 8][4],
                                          float (&m_run)[2], float (&l_run)[2], const bool (&row_ok)[2],
                                          const int (&qbit)[2], const int64_t (&qpos)[2], float qscale,
                                          bool all_visible, bool k_scaled, bool v_scaled, int lane) {
  float s[KS / 8][4];
#pragma unroll
  for (int n = 0; n < KS / 8; ++n) s[n][0] = s[n][1] = s[n][2] = s[n][3] = 0.f;
  if constexpr (kMode == MmaMode::fp8_registers)
    chunk_scores_fp8<T, D, KS>(static_cast<const unsigned char*>(K), kbase, qf, s, lane);
  else
    chunk_scores<T, D, KS>(static_cast<const uint16_t*>(K), kbase, qf, s, lane);
  chunk_softmax<D, KS>(s, meta, kbase, o, m_run, l_run, row_ok, qbit, qpos, qscale, all_visible, k_scaled,
                       v_scaled, lane);
  if constexpr (kMode == MmaMode::fp8_registers)
    chunk_pv_fp8<T, D, KS>(static_cast<const unsigned char*>(V), kbase, s, o, lane);
  else
    chunk_pv<T, D, KS>(static_cast<const uint16_t*>(V), kbase, s, o, lane);
}

// kMode: sixteen_bit instances carry none of the FP8 code; fp8_widened serves every plan with an FP8
// cache; fp8_registers plans whose K and V caches are both FP8. kOneTile: every query tile is one
// m-tile (the host's row_cap <= 16, decode's usual case), so the four warps always split each chunk's
// keys and the 32- and 64-key paths are compiled out: a smaller kernel whose once-run prologue and
// epilogue miss the instruction cache less (ncu: "no instruction" was 39% of the epilogue's stalls).
template <class T, int D, MmaMode kMode, bool kOneTile>
__global__ void __launch_bounds__(kThreads, 2) attention_mma_kernel(const AttentionArgs a) {
  wait_for_prior_grid_then_release_next();
  static_assert(sizeof(T) == 2, "tensor-core products need 16-bit operands");
  constexpr bool kAnyFp8 = kMode != MmaMode::sixteen_bit;
  constexpr bool kFp8Registers = kMode == MmaMode::fp8_registers;
  constexpr int kStages = mma_stages(kMode);
  constexpr int kVecs = D / 8;  // 16-byte vectors of a 16-bit row
  constexpr int kTile = kMmaKeys * D;
  constexpr int OP = D + 8;  // fp32 row pitch of the slice combine
  extern __shared__ unsigned char smem_raw[];
  unsigned char* smem =
      reinterpret_cast<unsigned char*>((reinterpret_cast<uintptr_t>(smem_raw) + 127) & ~uintptr_t(127));
  const bool any_fp8 = kAnyFp8 && (a.k_fp8 || a.v_fp8);
  const bool k_fp8 = kAnyFp8 && a.k_fp8, v_fp8 = kAnyFp8 && a.v_fp8;
  const MmaSmem L = mma_smem(D, a.row_cap, a.list_cap, a.union_cap, k_fp8, v_fp8, a.stage_pages != 0, kMode);
  const bool one_tile_stage = mma_tile_stages(k_fp8, v_fp8, kMode) == 1;
  uint16_t* sQ = reinterpret_cast<uint16_t*>(smem + L.q);
  uint16_t* sT = reinterpret_cast<uint16_t*>(smem + L.tiles);  // [stage][K, V][kTile]
  unsigned char* sRaw = smem + L.raw;                           // [stage][K, V][kTile codes], swizzled
  // Static, so every access is a shared-memory load: carved from the dynamic buffer, the copy loop's
  // per-key offsets compiled to generic 64-bit loads (seen in the H100 SASS, ~15 instructions a copy).
  __shared__ MmaKeyMeta sMeta[kStages];
  float* warp_m = reinterpret_cast<float*>(smem + L.ml);  // [warp][16]
  float* warp_l = warp_m + kMmaWarps * 16;
  float* row_m = warp_l + kMmaWarps * 16;  // [kMaxRows]
  float* row_l = row_m + kMaxRows;
  uint32_t* mask = reinterpret_cast<uint32_t*>(smem + L.mask);
  int32_t* list = reinterpret_cast<int32_t*>(smem + L.list);
  int32_t* bpage = reinterpret_cast<int32_t*>(smem + L.pages);  // [block of the split]
  float* bscale = reinterpret_cast<float*>(smem + L.scales);    // [K, V][block of the split]
  __shared__ int list_len;
  __shared__ int bad_page;  // a page id outside the cache was met (poison_tile)
  const int t = threadIdx.x, lane = t & 31, warp = t >> 5;

  int64_t id = blockIdx.x;
  const int split = int(id % a.splits);
  id /= a.splits;
  const int g = int(id % a.hkv);
  id /= a.hkv;
  const QueryTile qt = query_tile(id, a.tiles, a.tile_q, a.cu_q, a.kv_lens, a.bounds);
  if (qt.nq == 0) return;
  const int r = qt.r, q_len = qt.q_len, q0 = qt.q0, nq = qt.nq;
  const int64_t qbase = qt.qbase, kv = qt.kv;
  const int B = a.block_size, G = a.G;
  const int rows = nq * G;  // row = query * G + head in group
  const int mtiles = kOneTile ? 1 : (rows + 15) / 16;
  const int kslices = mtiles == 1 ? 4 : mtiles == 2 ? 2 : 1;  // warps sharing an m-tile
  const int mt = warp / kslices, ks = warp % kslices;
  const bool active = mt < mtiles;
  const int64_t p_first = rules::query_position(q_len, kv, q0);
  const int64_t p_last = rules::query_position(q_len, kv, q0 + nq - 1);
  const int64_t nb = min(rules::local_block(p_last, B) + 1, a.max_blocks);

  // Q rows (16-bit, unscaled; padded rows zero): the first cp.async group.
  const T* q = static_cast<const T*>(a.q);
  for (int i = t; i < mtiles * 16 * kVecs; i += kThreads) {
    const int row = i / kVecs, v = i - row * kVecs;
    const bool ok = row < rows;
    const T* src = ok ? q + (qbase + q0 + row / G) * a.q_s0 + int64_t(g * G + row % G) * a.q_s1 + v * 8 : q;
    mma::cp_async_16(mma::smem_addr(sQ + swz<D>(row, v * 8)), src, ok ? 16 : 0);
  }
  mma::cp_async_commit();

  const bool dense = a.topk == nullptr;
  if (t == 0) bad_page = 0;  // published by tile_blocks' barriers
  const int64_t count = tile_blocks(a, mask, list, &list_len, r, g, qbase, q0, nq, nb);
  const int64_t b0 = count * split / a.splits, b1 = count * (split + 1) / a.splits;
  auto block_at = [&](int64_t bi) -> int64_t { return dense ? bi : int64_t(list[bi]); };
  // The split's keys end to end: B per block, the last block's up to the tile's last query.
  int64_t num_keys = 0;
  if (b1 > b0) {
    const int64_t last = block_at(b1 - 1);
    num_keys = (b1 - b0 - 1) * B + min(int64_t(B), p_last + 1 - rules::block_begin(last, B));
  }
  const int64_t chunks = (num_keys + kMmaKeys - 1) / kMmaKeys;
  // Sparse: the split's page ids (and FP8 scales) in one round of loads up front, so that each
  // chunk's describe reads shared memory only (its global page-table load was a latency on every
  // chunk's critical path: long-scoreboard and barrier stalls in ncu).
  const bool staged = !dense && a.stage_pages != 0;
  if (staged) {
    for (int64_t i = t; i < b1 - b0; i += kThreads) {
      const int64_t pg = a.page_table[r * a.pt_s0 + int64_t(list[b0 + i]) * a.pt_s1];
      const bool ok = pg >= 0 && pg < a.num_pages;  // an id outside the cache is not read
      bpage[i] = ok ? int32_t(pg) : -1;
      if (k_fp8) bscale[i] = ok ? a.k_scale[pg * a.ks_s0 + g * a.ks_s1] : 0.f;
      if (v_fp8) bscale[a.union_cap + i] = ok ? a.v_scale[pg * a.vs_s0 + g * a.vs_s1] : 0.f;
    }
    __syncthreads();
  }

  // Key facts of chunk c (one thread per key), then its copies (every thread, all in flight).
  // Returns whether the key is visible to every row of the tile (true for the threads with no key),
  // so __syncthreads_and tells the chunk's compute whether it can skip the mask.
  const uint32_t tile_bits = nq >= 32 ? 0xffffffffu : (1u << nq) - 1u;
  auto describe = [&](int64_t c, int st) -> bool {
    if (t >= kMmaKeys) return true;
    MmaKeyMeta& m = sMeta[st];
    // 32-bit: a split's keys (blocks x B) are far below 2^31; 64-bit division was a library call.
    const int n = int(c) * kMmaKeys + t;
    int64_t koff = -1, voff = -1;
    int32_t pos = 0;
    uint32_t sel = 0u;
    float ksc = 0.f, vsc = 0.f;
    if (n < num_keys) {
      const int nb_in = n / B;
      const int64_t j = block_at(b0 + nb_in);
      const int64_t off = n - nb_in * B;
      const int64_t pg = staged ? int64_t(bpage[nb_in]) : a.page_table[r * a.pt_s0 + j * a.pt_s1];
      if (pg >= 0 && pg < a.num_pages) {  // an id outside the cache is not read
        koff = pg * a.k_s0 + off * a.k_s1 + g * a.k_s2;
        voff = pg * a.v_s0 + off * a.v_s1 + g * a.v_s2;
        pos = int32_t(rules::block_begin(j, B) + off);
        sel = dense ? 0xffffffffu : mask[j];
        ksc = !k_fp8 ? 1.f : staged ? bscale[nb_in] : a.k_scale[pg * a.ks_s0 + g * a.ks_s1];
        vsc = !v_fp8 ? 1.f : staged ? bscale[a.union_cap + nb_in] : a.v_scale[pg * a.vs_s0 + g * a.vs_s1];
      } else {
        atomicOr(&bad_page, 1);
      }
    }
    m.koff[t] = koff;
    m.voff[t] = voff;
    m.pos[t] = pos;
    m.sel[t] = sel;
    m.kscale[t] = ksc;
    m.vscale[t] = vsc;
    return koff >= 0 && (sel & tile_bits) == tile_bits && pos <= p_first;
  };
  // Thread t copies 16-byte vector t % V of keys t / V, t / V + kThreads / V, ... (V vectors a row):
  // the same vectors every chunk, so it can dequantise exactly its own copies once they land.
  constexpr int kV8 = D / 16;  // 16-byte vectors of an FP8 row
  auto issue = [&](int st) {
    const MmaKeyMeta& m = sMeta[st];
#pragma unroll
    for (int kvi = 0; kvi < 2; ++kvi) {
      const unsigned char* base = kvi ? a.v : a.k;
      const int64_t* offs = kvi ? m.voff : m.koff;
      if (kvi ? v_fp8 : k_fp8) {
        const int v = t % kV8;
#pragma unroll
        for (int i = 0; i < kMmaKeys * kV8 / kThreads; ++i) {
          const int key = t / kV8 + i * (kThreads / kV8);
          const int64_t off = offs[key];
          mma::cp_async_16_or_zero(
              mma::smem_addr(sRaw + std::size_t(st * 2 + kvi) * kTile + fp8_tile_offset<D>(key, v * 16)),
              base + (off < 0 ? 0 : off) + v * 16, off < 0);
        }
      } else {
        const int v = t % kVecs;
#pragma unroll
        for (int i = 0; i < kMmaKeys * kVecs / kThreads; ++i) {
          const int key = t / kVecs + i * (kThreads / kVecs);
          const int64_t off = offs[key];
          mma::cp_async_16_or_zero(mma::smem_addr(sT + (st * 2 + kvi) * kTile + swz<D>(key, v * 8)),
                                   base + (off < 0 ? 0 : off) + v * 16, off < 0);
        }
      }
    }
  };
  // FP8: each thread widens exactly the vectors it copied (its own copies are complete) to T,
  // exactly (E4M3 values are bf16 and half values); the (page, group) scales multiply S and P.
  auto dequantise = [&](int st) {
#pragma unroll
    for (int kvi = 0; kvi < 2; ++kvi) {
      if (!(kvi ? v_fp8 : k_fp8)) continue;
      const int v = t % kV8;
#pragma unroll
      for (int i = 0; i < kMmaKeys * kV8 / kThreads; ++i) {
        const int key = t / kV8 + i * (kThreads / kV8);
        const unsigned char* raw = sRaw + std::size_t(st * 2 + kvi) * kTile + fp8_tile_offset<D>(key, v * 16);
        uint16_t* dst = sT + ((one_tile_stage ? 0 : st) * 2 + kvi) * kTile;
        *reinterpret_cast<uint4*>(dst + swz<D>(key, v * 16)) = fp8x8_widen<T>(raw);
        *reinterpret_cast<uint4*>(dst + swz<D>(key, v * 16 + 8)) = fp8x8_widen<T>(raw + 8);
      }
    }
  };

  // Chunk c is staged in stage c % kStages, kStages - 1 chunks ahead of the one computed. One cp.async
  // group per chunk, empty past the last one, so "all but the newest kStages - 1 groups complete"
  // always means the chunk due has landed. Bit s of `visible`: the chunk in stage s is seen whole by
  // every row (its compute skips the mask).
  uint32_t visible = 0;
  auto stage_chunk = [&](int c) {
    if (c < chunks) {
      const int st = c % kStages;
      const bool whole = __syncthreads_and(describe(c, st));
      visible = whole ? visible | (1u << st) : visible & ~(1u << st);
      issue(st);
    }
    mma::cp_async_commit();
  };
#pragma unroll
  for (int c = 0; c < kStages - 1; ++c) stage_chunk(c);

  // This thread's two rows of its m-tile: validity, query bit and position.
  bool row_ok[2];
  int qbit[2];
  int64_t qpos[2];
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const int row = mt * 16 + (lane >> 2) + 8 * h;
    row_ok[h] = active && row < rows;
    qbit[h] = row_ok[h] ? row / G : 0;
    qpos[h] = p_first + qbit[h];
  }
  mma::cp_async_wait<kStages - 1>();  // Q's group (the first) has landed
  __syncthreads();
  uint32_t qf[D / 16][4];
#pragma unroll
  for (int kk = 0; kk < D / 16; ++kk) {
    if constexpr (kFp8Registers) {  // D in fp8_k_column's order: a0 / a2 (row g), a1 / a3 (row g + 8)
      const int rr = (active ? mt : 0) * 16 + (lane >> 2), c = fp8_k_column(kk, lane & 3);
      const uint2 lo = *reinterpret_cast<const uint2*>(sQ + swz<D>(rr, c));
      const uint2 hi = *reinterpret_cast<const uint2*>(sQ + swz<D>(rr + 8, c));
      qf[kk][0] = lo.x;
      qf[kk][1] = hi.x;
      qf[kk][2] = lo.y;
      qf[kk][3] = hi.y;
    } else {
      const int rr = (active ? mt : 0) * 16 + (lane & 15), c = kk * 16 + (lane >> 4) * 8;
      mma::ldmatrix_x4(mma::smem_addr(sQ + swz<D>(rr, c)), qf[kk][0], qf[kk][1], qf[kk][2], qf[kk][3]);
    }
  }

  float o[D / 8][4];
#pragma unroll
  for (int n = 0; n < D / 8; ++n) o[n][0] = o[n][1] = o[n][2] = o[n][3] = 0.f;
  float m_run[2] = {-INFINITY, -INFINITY}, l_run[2] = {0.f, 0.f};

  for (int c = 0; c < chunks; ++c) {
    const int st = c % kStages;
    stage_chunk(c + kStages - 1);  // into the stage computed last iteration (its trailing barrier passed)
    mma::cp_async_wait<kStages - 1>();
    if (kMode == MmaMode::fp8_widened && any_fp8) dequantise(st);
    __syncthreads();
    if (active) {
      const bool all_visible = (visible >> st) & 1u;
      // 16-bit tiles, or the raw FP8 stage itself in the register mode.
      const void* K = kFp8Registers ? static_cast<const void*>(sRaw + std::size_t(st * 2) * kTile)
                                    : static_cast<const void*>(sT + ((one_tile_stage ? 0 : st) * 2) * kTile);
      const void* V = kFp8Registers ? static_cast<const void*>(sRaw + std::size_t(st * 2 + 1) * kTile)
                                    : static_cast<const void*>(sT + ((one_tile_stage ? 0 : st) * 2 + 1) * kTile);
      if constexpr (kFp8Registers) {
        // 16-key slices only: the 32- and 64-key instances push the register mode past 255 registers
        // (ptxas spilled at D = 128); a warp with a wider share runs its slices one after another.
        constexpr int kSlice = kMmaKeys / 4;
        const int per_warp = kMmaKeys / kslices;
#pragma unroll 1
        for (int k0 = ks * per_warp; k0 < (ks + 1) * per_warp; k0 += kSlice)
          mma_chunk<T, D, kSlice, kMode>(K, V, sMeta[st], k0, qf, o, m_run, l_run, row_ok, qbit, qpos,
                                         a.qscale, all_visible, k_fp8, v_fp8, lane);
      } else {
        if (kOneTile || kslices == 4)
          mma_chunk<T, D, kMmaKeys / 4, kMode>(K, V, sMeta[st], ks * (kMmaKeys / 4), qf, o, m_run, l_run,
                                               row_ok, qbit, qpos, a.qscale, all_visible, k_fp8, v_fp8, lane);
        else if (kslices == 2)
          mma_chunk<T, D, kMmaKeys / 2, kMode>(K, V, sMeta[st], ks * (kMmaKeys / 2), qf, o, m_run, l_run,
                                               row_ok, qbit, qpos, a.qscale, all_visible, k_fp8, v_fp8, lane);
        else
          mma_chunk<T, D, kMmaKeys, kMode>(K, V, sMeta[st], 0, qf, o, m_run, l_run, row_ok, qbit, qpos,
                                           a.qscale, all_visible, k_fp8, v_fp8, lane);
      }
    }
    __syncthreads();
  }

  // Combine the key slices of each row: m and l (log2 domain) per warp, then per row, then O scaled
  // to the row's m summed over the slices (the staging tiles hold the slices' O now).
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    l_run[h] += __shfl_xor_sync(0xffffffffu, l_run[h], 1);
    l_run[h] += __shfl_xor_sync(0xffffffffu, l_run[h], 2);
    if ((lane & 3) == 0) {
      warp_m[warp * 16 + (lane >> 2) + 8 * h] = m_run[h] == -INFINITY ? -INFINITY : m_run[h] * a.qscale;
      warp_l[warp * 16 + (lane >> 2) + 8 * h] = l_run[h];
    }
  }
  __syncthreads();
  if (t < rows) {
    const int tm = t / 16, tr = t % 16;
    float M = -INFINITY, S = 0.f;
    for (int w = 0; w < kslices; ++w) M = fmaxf(M, warp_m[(tm * kslices + w) * 16 + tr]);
    if (M != -INFINITY)
      for (int w = 0; w < kslices; ++w) {
        const float mw = warp_m[(tm * kslices + w) * 16 + tr];
        if (mw != -INFINITY) S += warp_l[(tm * kslices + w) * 16 + tr] * exp2f(mw - M);
      }
    row_m[t] = M;
    row_l[t] = S;
  }
  __syncthreads();
  float* sO = reinterpret_cast<float*>(sT);  // [warp][16][OP]
  if (active) {
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int rr = (lane >> 2) + 8 * h, row = mt * 16 + rr;
      const float mw = warp_m[warp * 16 + rr];
      const float f = (row >= rows || mw == -INFINITY) ? 0.f : exp2f(mw - row_m[row]);
#pragma unroll
      for (int n = 0; n < D / 8; ++n) {
        float* dst = sO + (warp * 16 + rr) * OP;
        if constexpr (kFp8Registers) {  // n-tile n holds the columns fp8_v_column(n, .)
          dst[fp8_v_column(n, (lane & 3) * 2)] = o[n][2 * h] * f;
          dst[fp8_v_column(n, (lane & 3) * 2 + 1)] = o[n][2 * h + 1] * f;
        } else {
          *reinterpret_cast<float2*>(dst + n * 8 + (lane & 3) * 2) = make_float2(o[n][2 * h] * f, o[n][2 * h + 1] * f);
        }
      }
    }
  }
  __syncthreads();

  constexpr float kLn2 = 0.693147180559945309f;
  for (int i = t; i < rows * (D / 4); i += kThreads) {
    const int row = i / (D / 4), c4 = i - row * (D / 4);
    const int tm = row / 16, tr = row % 16;
    float4 acc = make_float4(0.f, 0.f, 0.f, 0.f);
    for (int w = 0; w < kslices; ++w) {
      const float4 x = *reinterpret_cast<const float4*>(sO + ((tm * kslices + w) * 16 + tr) * OP + c4 * 4);
      acc.x += x.x;
      acc.y += x.y;
      acc.z += x.z;
      acc.w += x.w;
    }
    const int64_t qrow = qbase + q0 + row / G;
    const int head = g * G + row % G;
    if (a.splits == 1) {
      const float l = row_l[row], inv = l == 0.f ? 0.f : 1.f / l;
      T* dst = static_cast<T*>(a.out) + qrow * a.o_s0 + int64_t(head) * a.o_s1 + c4 * 4;
      uint2 u;
      u.x = mma::Elem<T>::pack(acc.x * inv, acc.y * inv);
      u.y = mma::Elem<T>::pack(acc.z * inv, acc.w * inv);
      *reinterpret_cast<uint2*>(dst) = u;
      if (c4 == 0)
        a.lse[qrow * a.l_s0 + int64_t(head) * a.l_s1] = l == 0.f ? -INFINITY : (row_m[row] + log2f(l)) * kLn2;
    } else {
      const int64_t prow = (int64_t(split) * a.bounds.total_q + qrow) * a.Hq + head;
      reinterpret_cast<float4*>(a.part_o + prow * D)[c4] = acc;
      if (c4 == 0) {
        a.part_ml[prow] = row_m[row];
        a.part_ml[int64_t(a.splits) * a.bounds.total_q * a.Hq + prow] = row_l[row];
      }
    }
  }
  if (bad_page) poison_tile<T, D>(a, split, qbase + q0, g, rows);  // set before the barrier above
}

}  // namespace paged
}  // namespace cuda
}  // namespace detail
}  // namespace msa
