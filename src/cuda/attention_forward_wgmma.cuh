// Block-sparse (and dense causal) attention forward on Hopper warpgroup tensor-core products (wgmma,
// sm_90a). Same contract and tile walk as attention_forward_kernel.cuh: a CTA is ONE warpgroup that
// owns a 64-row tile (rows = (query, head) pairs of one GQA group, query-major: 4 queries at G = 16,
// one at G = 64, 64 at G = 1), walks the sorted union of its queries' blocks 64 keys at a time,
// masks per row the blocks its query did not select and the causal tail, and keeps an online
// softmax in fp32. 64-row tiles keep the union of a tile as small as the mma.sync kernel's (a
// 128-row tile covers twice the queries at G = 16, hence about twice the blocks); the CTA is small
// (96 KB of shared memory at D = 128, at most 255 registers) so two CTAs share an SM and hide each
// other's softmax and loads.
//
// Pipelining (within the warpgroup, in the manner of FlashAttention-3's intra-warpgroup overlap):
// iteration j issues S_j = Q K_j^T and then O += P_{j-1} V_{j-1} without waiting, waits for S_j
// only (wait_group 1) and runs the mask and softmax of chunk j while the P V product is still on the
// tensor cores, then waits for it, rescales O and converts S_j to P_j. Q stays in registers for the
// whole walk (the A operand of S, RS); K and V sit in two 3-slot rings of 128-byte swizzled tiles:
// K-major for K (head dim contiguous), MN-major for V (V as stored, [keys][D], is the B operand of
// P V without a transpose). The loads of iteration j (one cp.async group: K_{j+2}, V_{j+1}) overwrite
// the slots of K_{j-1} and V_{j-2}, whose products were waited for before the barrier of iteration j.
//
// The loaders write every 16-byte chunk through the CuTe smem tensors (&sK(key, d, slot)), never by
// evaluating the layout: the atom's Swizzle<3,4,3> acts on BYTE addresses (it is applied by the
// swizzle pointer that make_tensor builds), so layout(row, d) applied to an element offset is not the
// address wgmma's descriptor reads (that mistake made S = Q K^T wrong on the H100).
//
// Fragment layout relied on (checked on the host against CuTe's partitioning of these exact tiled
// MMAs, for every thread and element, by bench/attention_wgmma_layout_check.cu): in a 64 x N
// accumulator, thread t of the warpgroup holds element e = i + 2 h + 4 n at row 16 (t / 32) +
// (t % 32) / 4 + 8 h, column 8 n + 2 (t % 4) + i; a 64 x K register A operand (Q: K = D, P: K = 64)
// has the same (row, column) at the same e, so P is the S accumulator converted element by element
// and Q is loaded from global memory straight into its fragment.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>

#include <cute/tensor.hpp>

#include "cuda/attention_block_union.cuh"
#include "cuda/attention_forward_kernel.cuh"
#include "cuda/attention_mma.cuh"
#include "cuda/exp2_ftz.cuh"
#include "cuda/wgmma_issue.cuh"
#include "msa/rules.h"

namespace msa {
namespace detail {
namespace cuda {
namespace wgmma {

constexpr int kKeys = 64;         // keys per pipeline chunk (a block is B / 64 chunks)
constexpr int kTileRows = 64;     // rows of a CTA tile: one warpgroup
constexpr int kTileThreads = 128;
constexpr int kStages = 3;        // slots of each of the K and V rings
constexpr int kMaskWords = 1;     // a tile spans at most 64 queries (G = 1)
static_assert(kKeys == kAttnKeys, "the host checks block sizes against kAttnKeys");
static_assert(kTileRows == kAttnRows, "same tiles (and union capacity) as the mma.sync kernel");

template <class T>
struct CuteElem;
template <>
struct CuteElem<__nv_bfloat16> {
  using type = cute::bfloat16_t;
};
template <>
struct CuteElem<__half> {
  using type = cute::half_t;
};

// The kernel's shared memory: the K ring (key, d, slot), the V ring (d, key, slot), then the union
// bookkeeping.
template <class E, int D>
struct Ring {
  using LayoutK = decltype(cute::tile_to_shape(cute::GMMA::Layout_K_SW128_Atom<E>{},
                                               cute::Shape<cute::Int<kKeys>, cute::Int<D>, cute::Int<kStages>>{}));
  using LayoutV = decltype(cute::tile_to_shape(cute::GMMA::Layout_MN_SW128_Atom<E>{},
                                               cute::Shape<cute::Int<D>, cute::Int<kKeys>, cute::Int<kStages>>{}));
  static constexpr int kKElems = int(cute::cosize_v<LayoutK>);
  static constexpr int kVElems = int(cute::cosize_v<LayoutV>);
  // The 128-byte swizzle repeats every 1024 bytes: tiles start 1024-byte aligned.
  static constexpr std::size_t kAlign = 1024;
  static constexpr std::size_t kTileBytes = std::size_t(kKElems + kVElems) * 2;
  static_assert((kKElems * 2) % kAlign == 0 && (kVElems * 2) % kAlign == 0, "tiles stay 1024-aligned");
  static std::size_t bytes(int bitmap_words, int union_cap) {
    return kAlign + kTileBytes + BlockUnionSmem<kMaskWords>::bytes(bitmap_words, union_cap);
  }
};

// O (64 x D) += P V over `keys` keys, P in registers and V ([keys][D] as stored, MN-major) in shared
// memory (RS); also the TMA kernel's.
template <class E, int D, int keys>
using PvMma = decltype(cute::make_tiled_mma(
    cute::GMMA::rs_op_selector<E, E, float, cute::Shape<cute::_64, cute::Int<D>, cute::Int<keys>>,
                               cute::GMMA::Major::K, cute::GMMA::Major::MN>()));

// The kernel's products: S (64 x kKeys) = Q K^T with Q in registers and K from the ring (RS), O (64 x
// D) += P V with P in registers and V from the ring (RS).
template <class E, int D>
struct TileMmas {
  using S = decltype(cute::make_tiled_mma(
      cute::GMMA::rs_op_selector<E, E, float, cute::Shape<cute::_64, cute::Int<kKeys>, cute::Int<D>>,
                                 cute::GMMA::Major::K, cute::GMMA::Major::K>()));
  using O = PvMma<E, D, kKeys>;
};

// ---- Fixtures of bench/attention_wgmma_probe.cu: the same 128-byte swizzle atoms and P V product as
// the kernel, with Q in shared memory (SS product) for two warpgroups of 64 rows and two K/V stages.
constexpr int kWarpgroups = 2;

template <class E, int D>
struct Smem {
  // Q: (row in warpgroup, d, warpgroup); K: (key, d, stage); V: (d, key, stage).
  using LayoutQ = decltype(cute::tile_to_shape(cute::GMMA::Layout_K_SW128_Atom<E>{},
                                               cute::Shape<cute::_64, cute::Int<D>, cute::Int<kWarpgroups>>{}));
  using LayoutK = decltype(cute::tile_to_shape(cute::GMMA::Layout_K_SW128_Atom<E>{},
                                               cute::Shape<cute::Int<kKeys>, cute::Int<D>, cute::_2>{}));
  using LayoutV = decltype(cute::tile_to_shape(cute::GMMA::Layout_MN_SW128_Atom<E>{},
                                               cute::Shape<cute::Int<D>, cute::Int<kKeys>, cute::_2>{}));
  static constexpr int kQElems = int(cute::cosize_v<LayoutQ>);
  static constexpr int kKElems = int(cute::cosize_v<LayoutK>);
  static constexpr int kVElems = int(cute::cosize_v<LayoutV>);
  static constexpr std::size_t kAlign = 1024;
  static constexpr std::size_t kTileBytes = std::size_t(kQElems + kKElems + kVElems) * 2;
  static_assert((kQElems * 2) % kAlign == 0 && (kKElems * 2) % kAlign == 0, "tiles stay 1024-aligned");
};

template <class E, int D>
struct Mmas {
  using S = decltype(cute::make_tiled_mma(
      cute::GMMA::ss_op_selector<E, E, float, cute::Shape<cute::_64, cute::Int<kKeys>, cute::Int<D>>,
                                 cute::GMMA::Major::K, cute::GMMA::Major::K>()));
  using O = typename TileMmas<E, D>::O;
};

// S = Q K^T of one warpgroup over the whole head dim (SS); `q` and `k` are this warpgroup's (MMA, 1,
// D/16) descriptor slices, `s` is overwritten (the first k-block scales the old accumulator by zero).
template <class Mma, class TQ, class TK, class TS>
__device__ __forceinline__ void product_s(Mma& mma, const TQ& q, const TK& k, TS& s) {
  issue_s(mma, q, k, s);
  cute::warpgroup_wait<0>();
  cute::warpgroup_fence_operand(s);
}

// O += P V of one warpgroup: P is the S accumulator `s` rounded to 16 bits element by element into
// the register A fragment `p` (the layouts coincide: see the top of this file), V the (MMA, 1,
// kKeys/16) descriptor slice `v`.
template <class Mma, class TS, class TP, class TV, class TO>
__device__ __forceinline__ void product_o(Mma& mma, const TS& s, TP& p, const TV& v, TO& o) {
  using namespace cute;
  using E = typename TP::value_type;
#pragma unroll
  for (int e = 0; e < size(s); ++e) p(e) = static_cast<E>(s(e));
  warpgroup_fence_operand(p);
  issue_o(mma, p, v, o);
  warpgroup_wait<0>();
  warpgroup_fence_operand(o);
  warpgroup_fence_operand(p);
}
// ---- end of the probe's fixtures.

// wgmma reads shared memory through the async proxy: make this thread's completed cp.async writes
// visible to it (the barrier that follows publishes them CTA-wide).
__device__ __forceinline__ void fence_async_shared() {
  asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
}

// ---- Per-row pieces of the m64 accumulator layout (described at the top of this file: thread t holds
// rows h = 0, 1 and, of chunk column 8 n + 2 (t % 4) + j, element j + 2 h + 4 n), shared by this
// kernel and the TMA kernel (attention_forward_tma.cuh).

// Sets to -inf every score of row h after key offset lim[h] of the chunk (lim < 0: the whole row).
template <int kKeys, class TS>
__device__ __forceinline__ void mask_after(TS& s, const int64_t (&lim)[2], int lane) {
#pragma unroll
  for (int h = 0; h < 2; ++h) {
#pragma unroll
    for (int n = 0; n < kKeys / 8; ++n) {
#pragma unroll
      for (int j = 0; j < 2; ++j) {
        const int key = n * 8 + (lane & 3) * 2 + j;
        if (key > lim[h]) s(j + 2 * h + 4 * n) = -INFINITY;
      }
    }
  }
}

// Online softmax of one chunk of raw scores in `s` (overwritten by their exponentials, exp2 with the
// scale folded in): updates the rows' running max and sum, and returns in alpha[h] the factor by which
// O must be rescaled before this chunk's P V is added.
template <int kKeys, class TS>
__device__ __forceinline__ void online_softmax(TS& s, float (&m_run)[2], float (&l_run)[2], float (&alpha)[2],
                                               float scale_log2) {
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    float mx = m_run[h];
#pragma unroll
    for (int n = 0; n < kKeys / 8; ++n) mx = fmaxf(mx, fmaxf(s(2 * h + 4 * n), s(1 + 2 * h + 4 * n)));
    mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
    mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
    const float m_scaled = mx == -INFINITY ? 0.f : mx * scale_log2;
    alpha[h] = exp2_ftz(m_run[h] * scale_log2 - m_scaled);
    m_run[h] = mx;
    float sum = 0.f;
#pragma unroll
    for (int n = 0; n < kKeys / 8; ++n) {
#pragma unroll
      for (int j = 0; j < 2; ++j) {
        const float e = exp2_ftz(fmaf(s(j + 2 * h + 4 * n), scale_log2, -m_scaled));
        s(j + 2 * h + 4 * n) = e;
        sum += e;
      }
    }
    l_run[h] = l_run[h] * alpha[h] + sum;
  }
}

// O (64 x D accumulator) rows times alpha[h].
template <int D, class TO>
__device__ __forceinline__ void rescale_rows(TO& o, const float (&alpha)[2]) {
#pragma unroll
  for (int n = 0; n < D / 8; ++n) {
    o(4 * n) *= alpha[0];
    o(1 + 4 * n) *= alpha[0];
    o(2 + 4 * n) *= alpha[1];
    o(3 + 4 * n) *= alpha[1];
  }
}

// Epilogue: row h normalised and stored at out_row[h] (its (query, head) row of out; nullptr:
// padding, nothing stored), its lse at lse_at[h]. A row that saw no key (only with malformed topk
// rows) gets out = 0 and lse = -inf.
template <class T, int D, class TO>
__device__ __forceinline__ void store_rows(const TO& o, const float (&m_run)[2], const float (&l_run)[2],
                                           T* const (&out_row)[2], float* const (&lse_at)[2], float scale,
                                           int lane) {
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    float l = l_run[h];
    l += __shfl_xor_sync(0xffffffffu, l, 1);
    l += __shfl_xor_sync(0xffffffffu, l, 2);
    if (out_row[h] == nullptr) continue;
    const float inv = l > 0.f ? 1.f / l : 0.f;
    T* dst = out_row[h] + (lane & 3) * 2;
#pragma unroll
    for (int n = 0; n < D / 8; ++n) {
      const uint32_t packed = mma::Elem<T>::pack(o(2 * h + 4 * n) * inv, o(1 + 2 * h + 4 * n) * inv);
      *reinterpret_cast<uint32_t*>(dst + n * 8) = packed;
    }
    if ((lane & 3) == 0) *lse_at[h] = l > 0.f ? m_run[h] * scale + logf(l) : -INFINITY;
  }
}

template <class T, int D>
__global__ void __launch_bounds__(kTileThreads, 2) attention_forward_wgmma_kernel(const AttentionParams p) {
  using namespace cute;
  using E = typename CuteElem<T>::type;
  using R = Ring<E, D>;
  using M = TileMmas<E, D>;
  extern __shared__ __align__(128) unsigned char smem_raw[];
  unsigned char* smem_base = reinterpret_cast<unsigned char*>(
      (reinterpret_cast<uintptr_t>(smem_raw) + R::kAlign - 1) & ~uintptr_t(R::kAlign - 1));
  E* pK = reinterpret_cast<E*>(smem_base);
  E* pV = pK + R::kKElems;
  const BlockUnionSmem<kMaskWords> su =
      BlockUnionSmem<kMaskWords>::carve(smem_base + R::kTileBytes, p.bitmap_words, p.union_cap);

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int b = blockIdx.z, g = blockIdx.y;
  const int G = p.group_size, B = p.block_size;
  const int64_t q_begin = p.cu_q[b], lq = p.cu_q[b + 1] - q_begin;
  const int64_t k_begin = p.cu_k[b], lk = p.cu_k[b + 1] - k_begin;
  const int64_t rows_total = lq * G;
  // Longest tiles (latest queries) launch first: better tail balance under causal masking.
  const int64_t f0 = int64_t(gridDim.x - 1 - blockIdx.x) * kTileRows;
  if (f0 >= rows_total) return;
  const int64_t i_first = f0 / G;
  const int64_t i_last = (f0 + kTileRows - 1 < rows_total ? f0 + kTileRows - 1 : rows_total - 1) / G;
  const int64_t p_first = rules::query_position(lq, lk, i_first);
  const int64_t p_last = rules::query_position(lq, lk, i_last);
  const int64_t local_last = rules::local_block(p_last, B);
  const bool dense = p.topk == nullptr;
  const bool partial_tile = f0 + kTileRows > rows_total;

  const uint16_t* q = static_cast<const uint16_t*>(p.q);
  const uint16_t* k = static_cast<const uint16_t*>(p.k);
  const uint16_t* v = static_cast<const uint16_t*>(p.v);

  typename M::S mma_s;
  typename M::O mma_o;
  auto thr_s = mma_s.get_thread_slice(tid);
  auto thr_o = mma_o.get_thread_slice(tid);

  // This thread's two rows (16 (warp) + lane / 4, and 8 below): position (-1 = padding), query bit.
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

  // Q straight into the register A fragment (element 2 h + 4 n and the next: row h, columns 8 n +
  // 2 (lane % 4) + {0, 1}: one aligned 32-bit load); padding rows are zero. Issued before the union
  // build so the loads are in flight during it.
  Tensor tSrQ = make_tensor<E>(partition_shape_A(mma_s, Shape<_64, Int<D>>{}));  // (MMA, 1, D/16)
  static_assert(decltype(size(tSrQ))::value == D / 2, "Q fragment size of the m64 layout");
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const int64_t f = f0 + row_a + 8 * h;
    const uint32_t* src = pos[h] >= 0 ? reinterpret_cast<const uint32_t*>(
                                            q + (q_begin + f / G) * p.q_s0 + (int64_t(g) * G + f % G) * p.q_s1 +
                                            (lane & 3) * 2)
                                      : nullptr;
#pragma unroll
    for (int n = 0; n < D / 8; ++n) {
      const uint32_t bits = src ? __ldg(src + n * 4) : 0u;
      tSrQ(2 * h + 4 * n) = E::bitcast(uint16_t(bits & 0xffffu));
      tSrQ(1 + 2 * h + 4 * n) = E::bitcast(uint16_t(bits >> 16));
    }
  }

  int num_union = int(local_last + 1);
  if (!dense)
    num_union = build_block_union<kTileThreads, kMaskWords>(su, p.topk, p.topk_s0, p.topk_s1, p.topk_k, p.union_cap,
                                                            g, q_begin, lq, lk, B, i_first, i_last, local_last);
  auto block_at = [&](int u) -> int64_t { return dense ? int64_t(u) : int64_t(su.blocks[u]); };

  // Key chunks: every 64-key sub-tile of each union block, except sub-tiles past the tile's last
  // position.
  const int sub_per_block = B / kKeys;
  int num_iters = 0;
  if (num_union > 0) {
    const int64_t last_block = block_at(num_union - 1);
    const int64_t last_subs = (p_last - rules::block_begin(last_block, B)) / kKeys + 1;
    num_iters = (num_union - 1) * sub_per_block + int(last_subs < sub_per_block ? last_subs : sub_per_block);
  }
  auto key_start = [&](int it) -> int64_t {
    return rules::block_begin(block_at(it / sub_per_block), B) + int64_t(it % sub_per_block) * kKeys;
  };

  constexpr int kChunks = D / 8;  // 16-byte chunks of a row; 8 consecutive d stay contiguous in every layout
  Tensor sK = make_tensor(make_smem_ptr(pK), typename R::LayoutK{});  // (key, d, slot)
  Tensor sV = make_tensor(make_smem_ptr(pV), typename R::LayoutV{});  // (d, key, slot)
  // Rows past the sequence are zero-filled (their scores are masked; zero V keeps P V finite).
  auto load_k = [&](int it) {
    if (it >= num_iters) return;
    const int64_t ks = key_start(it);
    const int slot = it % kStages;
    for (int i = tid; i < kKeys * kChunks; i += kTileThreads) {
      const int r = i / kChunks, c = i % kChunks;
      const int64_t t = ks + r;
      const bool in = t < lk;
      const uint16_t* src = in ? k + (k_begin + t) * p.k_s0 + int64_t(g) * p.k_s1 + c * 8 : k;
      mma::cp_async_16(mma::smem_addr(&sK(r, c * 8, slot)), src, in ? 16 : 0);
    }
  };
  auto load_v = [&](int it) {
    if (it >= num_iters) return;
    const int64_t ks = key_start(it);
    const int slot = it % kStages;
    for (int i = tid; i < kKeys * kChunks; i += kTileThreads) {
      const int r = i / kChunks, c = i % kChunks;
      const int64_t t = ks + r;
      const bool in = t < lk;
      const uint16_t* src = in ? v + (k_begin + t) * p.v_s0 + int64_t(g) * p.v_s1 + c * 8 : v;
      mma::cp_async_16(mma::smem_addr(&sV(c * 8, r, slot)), src, in ? 16 : 0);
    }
  };
  // cp.async groups: {K_0}, {K_1, V_0}, then iteration j commits {K_{j+2}, V_{j+1}} (empty past the
  // end). Iteration j needs K_j and V_{j-1}, both in the group committed two before its own: it
  // waits until at most one group is pending.
  load_k(0);
  mma::cp_async_commit();
  load_k(1);
  load_v(0);
  mma::cp_async_commit();

  Tensor tSrK = thr_s.partition_fragment_B(sK);  // (MMA, 1, D/16, slot) descriptors
  Tensor tOrV = thr_o.partition_fragment_B(sV);  // (MMA, 1, kKeys/16, slot) descriptors
  Tensor tSrS = partition_fragment_C(mma_s, Shape<_64, Int<kKeys>>{});
  Tensor tOrO = partition_fragment_C(mma_o, Shape<_64, Int<D>>{});
  Tensor tOrP = make_tensor<E>(partition_shape_A(mma_o, Shape<_64, Int<kKeys>>{}));
  static_assert(decltype(size(tSrS))::value == kKeys / 2 && decltype(size(tOrP))::value == kKeys / 2 &&
                    decltype(size(tOrO))::value == D / 2,
                "fragment sizes of the m64 layouts described above");
  clear(tOrO);
  float m_run[2] = {-INFINITY, -INFINITY}, l_run[2] = {0.f, 0.f};
  const int nq = int(i_last - i_first + 1);
  const unsigned long long all_queries = nq >= 64 ? ~0ull : ((1ull << nq) - 1ull);

  // Mask (unselected rows, causal tail, keys past the sequence) and online softmax of chunk `it` in
  // tSrS (scores stay raw; exp2 with the scale folded in); returns the factors alpha[h] by which O
  // must be rescaled before P of this chunk is added.
  auto softmax_chunk = [&](int it, float (&alpha)[2]) {
    const int64_t ks = key_start(it);
    const unsigned long long sel = dense ? all_queries : su.mask[it / sub_per_block];
    // Skipped when the whole chunk is visible to every row.
    if (partial_tile || sel != all_queries || ks + kKeys - 1 > p_first) {
      int64_t lim[2];  // last visible key offset of each row in this chunk
#pragma unroll
      for (int h = 0; h < 2; ++h) lim[h] = ((sel >> qbit[h]) & 1ull) ? pos[h] - ks : -1;
      mask_after<kKeys>(tSrS, lim, lane);
    }
    online_softmax<kKeys>(tSrS, m_run, l_run, alpha, p.scale_log2);
  };
  auto to_p = [&] {
#pragma unroll
    for (int e = 0; e < size(tSrS); ++e) tOrP(e) = static_cast<E>(tSrS(e));
  };

  if (num_iters > 0) {
    float alpha[2];
    mma::cp_async_wait<1>();
    fence_async_shared();
    __syncthreads();
    load_k(2);
    load_v(1);
    mma::cp_async_commit();
    issue_s(mma_s, tSrQ, tSrK(_, _, _, 0), tSrS);
    warpgroup_wait<0>();
    warpgroup_fence_operand(tSrS);
    softmax_chunk(0, alpha);  // O is still zero: no rescale
    to_p();

    for (int it = 1; it < num_iters; ++it) {
      mma::cp_async_wait<1>();
      fence_async_shared();
      __syncthreads();  // K_it, V_{it-1} visible; every product of iteration it-1 is complete
      load_k(it + 2);
      load_v(it + 1);
      mma::cp_async_commit();

      issue_s(mma_s, tSrQ, tSrK(_, _, _, it % kStages), tSrS);
      issue_o(mma_o, tOrP, tOrV(_, _, _, (it - 1) % kStages), tOrO);
      warpgroup_wait<1>();  // S_it is ready; P_{it-1} V_{it-1} may still run
      warpgroup_fence_operand(tSrS);
      softmax_chunk(it, alpha);
      // The wait for P V must stay after the softmax, but ptxas hoists a wgmma wait to the top of
      // its basic block. So the softmax is pinned (operand fences) and followed by a branch on its
      // result: the rescale, skipped when no row's maximum moved. The condition is CTA-wide, i.e.
      // uniform over the warpgroup (the CTA), as a wait_group inside a branch requires.
      warpgroup_fence_operand(tSrS);
      warpgroup_fence_operand(alpha[0]);
      warpgroup_fence_operand(alpha[1]);
      if (__syncthreads_or(alpha[0] != 1.f || alpha[1] != 1.f)) {
        warpgroup_wait<0>();
        warpgroup_fence_operand(tOrO);
        rescale_rows<D>(tOrO, alpha);
      }
      warpgroup_wait<0>();
      warpgroup_fence_operand(tOrO);
      to_p();
    }

    mma::cp_async_wait<0>();
    fence_async_shared();
    __syncthreads();  // V of the last chunk visible
    issue_o(mma_o, tOrP, tOrV(_, _, _, (num_iters - 1) % kStages), tOrO);
    warpgroup_wait<0>();
    warpgroup_fence_operand(tOrO);
  }
  mma::cp_async_wait<0>();

  T* out_row[2];
  float* lse_at[2];
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const int64_t f = f0 + row_a + 8 * h;
    const int64_t row = q_begin + f / G, head = int64_t(g) * G + f % G;
    out_row[h] = pos[h] < 0 ? nullptr : static_cast<T*>(p.out) + row * p.o_s0 + head * p.o_s1;
    lse_at[h] = p.lse + row * p.lse_s0 + head * p.lse_s1;
  }
  store_rows<T, D>(tOrO, m_run, l_run, out_row, lse_at, p.scale, lane);
}

}  // namespace wgmma
}  // namespace cuda
}  // namespace detail
}  // namespace msa
