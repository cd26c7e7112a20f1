// dK, dV of the block-sparse (and dense causal) attention backward on Hopper warpgroup products
// (wgmma, sm_90a). The key-major walk of attention_backward_dkdv_kernel (attention_backward_kernel.cuh):
// a CTA owns keys of one group and visits, in ascending order, the queries that selected their block
// (key_query_lists.cuh), gathered 64 rows at a time; here each warpgroup owns 64 of the CTA's keys (two
// warpgroups share every gathered tile where the block holds 128 keys) and the four products of a
// tile are wgmma:
//   S^T = K Q^T and dP^T = V dO^T (SS: K, V and the tile's Q, dO in shared memory, K-major),
//   P^T = exp2(S^T scale log2e - lse log2e), 0 past each query row's causal limit, dS^T = P^T (dP^T -
//   delta), both converted in registers to the A operands of
//   dV += P^T dO and dK += dS^T Q (RS: dO and Q read through the MN-major view of their tiles).
// Same results and split partials as the mma.sync kernel, without dQ partials (on sm_90 dQ comes from
// attention_backward_dq_tma.cuh). Deterministic: fixed list order, no atomics.
//
// Why: in the mma.sync kernel each of the four warps owns 16 keys, so every warp reads the whole Q and
// dO tiles from shared memory twice per tile (ldmatrix), eight reads of each per tile; a warpgroup
// product reads an operand tile once. At 128K tokens (Hq 64 / Hkv 4) that kernel took 102 of the
// backward's ~142 ms on an H200 (~170 TFLOP/s).
//
// Tiles are written by cp.async through the CuTe smem tensors (&sQ(row, d, stage)), as the wgmma
// forward's loaders (attention_forward_wgmma.cuh says why), and the accumulator element order is the
// one that file documents: element e = i + 2 h + 4 n of a 64 x N accumulator sits at row 16 warp +
// lane / 4 + 8 h, column 8 n + 2 (lane % 4) + i, as does element e of a 64 x K register A operand.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include <cute/tensor.hpp>

#include "cuda/attention_backward_kernel.cuh"
#include "cuda/attention_forward_wgmma.cuh"  // CuteElem, PvMma
#include "cuda/exp2_ftz.cuh"
#include "cuda/key_query_lists.cuh"
#include "cuda/wgmma_issue.cuh"
#include "msa/rules.h"

namespace msa {
namespace detail {
namespace cuda {

// Shared memory: K and V (key, d, warpgroup), kStages stages of Q and dO (row, d, stage) as 128-byte
// swizzled K-major tiles, then per stage and row the causal limit, lse and delta, then the staged
// queries. Two warpgroups take three stages (one CTA per SM), one warpgroup two (two CTAs per SM).
template <class E, int D, int kWarpgroups>
struct DkdvWgmmaSmem {
  static constexpr int kStages = kWarpgroups == 2 ? 3 : 2;
  using LayoutKV = decltype(cute::tile_to_shape(cute::GMMA::Layout_K_SW128_Atom<E>{},
                                                cute::Shape<cute::_64, cute::Int<D>, cute::Int<kWarpgroups>>{}));
  using LayoutRows = decltype(cute::tile_to_shape(cute::GMMA::Layout_K_SW128_Atom<E>{},
                                                  cute::Shape<cute::_64, cute::Int<D>, cute::Int<kStages>>{}));
  // The same bytes as LayoutRows seen (d, row, stage): the B operand of dV += P^T dO and dK += dS^T Q.
  using LayoutRowsMN = decltype(cute::tile_to_shape(cute::GMMA::Layout_MN_SW128_Atom<E>{},
                                                    cute::Shape<cute::Int<D>, cute::_64, cute::Int<kStages>>{},
                                                    cute::Step<cute::_2, cute::_1, cute::_3>{}));
  static constexpr std::size_t kTileBytes = std::size_t(64) * D * 2;
  static constexpr std::size_t kAlign = 1024;  // the 128-byte swizzle repeats every 1024 bytes
  static constexpr std::size_t kK = 0, kV = kWarpgroups * kTileBytes, kQ = 2 * kWarpgroups * kTileBytes;
  static constexpr std::size_t kDo = kQ + kStages * kTileBytes;
  static constexpr std::size_t kRowArrays = kDo + kStages * kTileBytes;  // lim, lse, delta: [kStages][64]
  static constexpr std::size_t kBytes = kAlign + kRowArrays + 3 * kStages * 64 * 4 + GatheredQueryStage::kBytes;
  static_assert(int(cute::cosize_v<LayoutRows>) * 2 == kStages * kTileBytes, "Q stages are dense");
  static_assert(int(cute::cosize_v<LayoutRowsMN>) * 2 == kStages * kTileBytes, "the MN view covers the same bytes");
};

// kWarpgroups = 2 (B a multiple of 128): 128 keys of one block a CTA, the two warpgroups sharing every
// gathered tile (half the copies per product), three stages, each tile's copies issued once the
// previous tile's score products are on the tensor cores. kWarpgroups = 1 (B = 64): 64 keys a CTA, two
// stages so that two CTAs share an SM, each tile's copies issued before the previous tile's products.
// Measured at 128K tokens, Hq 64 / Hkv 4, on an H200: 65.8 ms with one warpgroup, 66.3 with its copies
// issued late, 52.8 with two.
template <class T, int D, int kWarpgroups>
__global__ void __launch_bounds__(128 * kWarpgroups, 3 - kWarpgroups)
    attention_backward_dkdv_wgmma_kernel(const BackwardParams p) {
  using namespace cute;
  using E = typename wgmma::CuteElem<T>::type;
  using Sm = DkdvWgmmaSmem<E, D, kWarpgroups>;
  constexpr int kStages = Sm::kStages;
  constexpr bool kLate = kWarpgroups == 2;
  using MmaS = decltype(make_tiled_mma(
      GMMA::ss_op_selector<E, E, float, Shape<_64, _64, Int<D>>, GMMA::Major::K, GMMA::Major::K>()));
  using MmaO = wgmma::PvMma<E, D, 64>;
  constexpr int kThreads = 128 * kWarpgroups, kKeys = 64 * kWarpgroups;
  constexpr int kAhead = kStages - 1;  // tiles whose copies are in flight ahead of the current one

  extern __shared__ __align__(128) unsigned char smem_raw[];
  unsigned char* base = reinterpret_cast<unsigned char*>((reinterpret_cast<uintptr_t>(smem_raw) + Sm::kAlign - 1) &
                                                         ~uintptr_t(Sm::kAlign - 1));
  int* const s_lim = reinterpret_cast<int*>(base + Sm::kRowArrays);  // [kStages][64]
  float* const s_lse = reinterpret_cast<float*>(s_lim + kStages * 64);
  float* const s_delta = s_lse + kStages * 64;
  GatheredQueryStage staged(reinterpret_cast<int*>(s_delta + kStages * 64));

  const int wg = threadIdx.x / 128, tid = threadIdx.x % 128, lane = tid & 31, warp = tid >> 5;
  const int b = int(blockIdx.z) / p.key_splits, split = int(blockIdx.z) % p.key_splits, g = blockIdx.y;
  const int G = p.group_size, B = p.block_size;
  const int64_t q_begin = p.cu_q[b], lq = p.cu_q[b + 1] - q_begin;
  const int64_t k_begin = p.cu_k[b], lk = p.cu_k[b + 1] - k_begin;
  const int64_t ks = int64_t(blockIdx.x) * kKeys;
  if (ks >= lk) return;
  const GatheredWalk walk(p.lists, p.topk == nullptr, G, g, b, k_begin, ks, lq, lk, B, p.key_splits, split);
  const int64_t num_tiles = walk.num_tiles();

  const uint16_t* q = static_cast<const uint16_t*>(p.q);
  const uint16_t* dout = static_cast<const uint16_t*>(p.dout);
  const uint16_t* k = static_cast<const uint16_t*>(p.k);
  const uint16_t* v = static_cast<const uint16_t*>(p.v);

  Tensor sK = make_tensor(make_smem_ptr(reinterpret_cast<E*>(base + Sm::kK)), typename Sm::LayoutKV{});  // (key, d, wg)
  Tensor sV = make_tensor(make_smem_ptr(reinterpret_cast<E*>(base + Sm::kV)), typename Sm::LayoutKV{});
  Tensor sQ = make_tensor(make_smem_ptr(reinterpret_cast<E*>(base + Sm::kQ)), typename Sm::LayoutRows{});  // (row, d, stage)
  Tensor sdO = make_tensor(make_smem_ptr(reinterpret_cast<E*>(base + Sm::kDo)), typename Sm::LayoutRows{});
  Tensor sQmn = make_tensor(make_smem_ptr(reinterpret_cast<E*>(base + Sm::kQ)), typename Sm::LayoutRowsMN{});  // (d, row, stage)
  Tensor sdOmn = make_tensor(make_smem_ptr(reinterpret_cast<E*>(base + Sm::kDo)), typename Sm::LayoutRowsMN{});

  constexpr int kChunks = D / 8;
  // K and V of these keys (zeros past the sequence).
  for (int i = threadIdx.x; i < kKeys * kChunks; i += kThreads) {
    const int r = i / kChunks, c = i % kChunks;
    const bool in = ks + r < lk;
    const int64_t t = k_begin + ks + r;
    mma::cp_async_16_or_zero(mma::smem_addr(&sK(r % 64, c * 8, r / 64)),
                             in ? k + t * p.k_s0 + int64_t(g) * p.k_s1 + c * 8 : k, !in);
    mma::cp_async_16_or_zero(mma::smem_addr(&sV(r % 64, c * 8, r / 64)),
                             in ? v + t * p.v_s0 + int64_t(g) * p.v_s1 + c * 8 : v, !in);
  }

  // Tile u, its queries staged in buffer u & 1, into stage u % kStages: Q and dO rows, lse and delta
  // by cp.async, and per row the last key offset from ks it may see (-1: padding row, or its query is
  // before these keys). Waits on no global read.
  auto load_rows = [&](int64_t u) {
    const int buf = int(u & 1), stage = int(u % kStages);
#pragma unroll 4
    for (int i = threadIdx.x; i < 64 * kChunks; i += kThreads) {
      const int r = i / kChunks, c = i % kChunks;
      int head;
      const int qi = staged.row_query(walk.tiles, buf, u, r, head);
      const int64_t hq = int64_t(g) * G + head;
      const uint16_t* qs = qi < 0 ? q : q + (q_begin + qi) * p.q_s0 + hq * p.q_s1 + c * 8;
      const uint16_t* ds = qi < 0 ? dout : dout + (q_begin + qi) * p.do_s0 + hq * p.do_s1 + c * 8;
      mma::cp_async_16_or_zero(mma::smem_addr(&sQ(r, c * 8, stage)), qs, qi < 0);
      mma::cp_async_16_or_zero(mma::smem_addr(&sdO(r, c * 8, stage)), ds, qi < 0);
    }
    if (threadIdx.x < 64) {
      const int r = threadIdx.x;
      int head;
      const int i = staged.row_query(walk.tiles, buf, u, r, head);
      const int64_t row = q_begin + i, hq = int64_t(g) * G + head;
      const int lim = gathered_limit(lq, lk, i, ks, kKeys);
      const bool visible = lim >= 0;
      mma::cp_async_4_or_zero(mma::smem_addr(s_lse + stage * 64 + r),
                              visible ? p.lse + row * p.lse_s0 + hq * p.lse_s1 : p.lse, !visible);
      mma::cp_async_4_or_zero(mma::smem_addr(s_delta + stage * 64 + r),
                              visible ? p.delta + row * p.num_q_heads + hq : p.delta, !visible);
      s_lim[stage * 64 + r] = lim;
    }
  };
  // One cp.async group per tile (empty past the walk), so that a fixed wait count finds tile u's.
  auto issue_tile = [&](int64_t u) {
    if (u < num_tiles) load_rows(u);
    mma::cp_async_commit();
  };
  // The staged queries: buffer t & 1 holds tile t's from before its copies are issued until they are.
  staged.fetch(walk, 0);
  staged.store(0);
  staged.fetch(walk, 1);
  staged.store(1);
  __syncthreads();
  issue_tile(0);  // with K and V
  if (kAhead == 2) {
    issue_tile(1);
    staged.fetch(walk, 2);
    __syncthreads();  // tile 0's copies have read buffer 0
    staged.store(0);
    staged.fetch(walk, 3);
  } else {
    staged.fetch(walk, 2);
  }

  MmaS mma_s;
  MmaO mma_o;
  auto thr_s = mma_s.get_thread_slice(tid);
  auto thr_o = mma_o.get_thread_slice(tid);
  Tensor tSrK = thr_s.partition_fragment_A(sK(_, _, wg));  // A of S^T
  Tensor tSrV = thr_s.partition_fragment_A(sV(_, _, wg));  // A of dP^T
  Tensor tSrQ = thr_s.partition_fragment_B(sQ);            // B of S^T, per stage
  Tensor tSrdO = thr_s.partition_fragment_B(sdO);          // B of dP^T, per stage
  Tensor tOrdO = thr_o.partition_fragment_B(sdOmn);        // B of dV, per stage
  Tensor tOrQ = thr_o.partition_fragment_B(sQmn);          // B of dK, per stage
  Tensor tSrS = partition_fragment_C(mma_s, Shape<_64, _64>{});
  Tensor tSrdP = partition_fragment_C(mma_s, Shape<_64, _64>{});
  Tensor tOrdV = partition_fragment_C(mma_o, Shape<_64, Int<D>>{});
  Tensor tOrdK = partition_fragment_C(mma_o, Shape<_64, Int<D>>{});
  Tensor tOrP = make_tensor<E>(partition_shape_A(mma_o, Shape<_64, _64>{}));
  Tensor tOrdS = make_tensor<E>(partition_shape_A(mma_o, Shape<_64, _64>{}));
  static_assert(decltype(size(tSrS))::value == 32 && decltype(size(tOrP))::value == 32 &&
                    decltype(size(tOrdV))::value == D / 2,
                "fragment sizes of the m64 layouts (attention_forward_wgmma.cuh describes them)");
  clear(tOrdV);
  clear(tOrdK);
  const int key_a = 64 * wg + warp * 16 + (lane >> 2);  // this thread's keys from ks: key_a and key_a + 8

  for (int64_t u = 0; u < num_tiles; ++u) {
    const int stage = int(u % kStages);
    if (!kLate) issue_tile(u + kAhead);
    mma::cp_async_wait<kLate ? kAhead - 1 : kAhead>();  // tile u's group (and K / V)
    wgmma::fence_async_shared();  // this thread's copies, visible to wgmma after the barrier
    __syncthreads();
    wgmma::issue_s(mma_s, tSrK, tSrQ(_, _, _, stage), tSrS);
    wgmma::issue_s(mma_s, tSrV, tSrdO(_, _, _, stage), tSrdP);
    // Stage (u + kAhead) % kStages was last read by tile u - 1, whose products every thread waited
    // for before the barrier above.
    if (kLate) issue_tile(u + kAhead);

    const int* lim = s_lim + stage * 64;
    const float* lse = s_lse + stage * 64;
    const float* dlt = s_delta + stage * 64;
    warpgroup_wait<0>();
    warpgroup_fence_operand(tSrS);
    warpgroup_fence_operand(tSrdP);
    // Column (query row) 8 n + 2 (lane % 4) + i holds elements e = i + 2 h + 4 n, keys key_a + 8 h.
#pragma unroll
    for (int n = 0; n < 8; ++n)
#pragma unroll
      for (int i = 0; i < 2; ++i) {
        const int col = n * 8 + (lane & 3) * 2 + i;
        const int col_lim = lim[col];
        const float col_lse2 = lse[col] * kLog2e, col_delta = dlt[col];
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          const int e = i + 2 * h + 4 * n;
          const float pr = key_a + 8 * h > col_lim ? 0.f : exp2_ftz(fmaf(tSrS(e), p.scale_log2, -col_lse2));
          tOrP(e) = static_cast<E>(pr);
          tOrdS(e) = static_cast<E>(pr * (tSrdP(e) - col_delta));
        }
      }
    warpgroup_fence_operand(tOrP);
    warpgroup_fence_operand(tOrdS);
    wgmma::issue_o(mma_o, tOrP, tOrdO(_, _, _, stage), tOrdV);
    wgmma::issue_o(mma_o, tOrdS, tOrQ(_, _, _, stage), tOrdK);
    // Tile u + kAhead + 1 into the buffer tile u + kAhead - 1's copies read (before the barrier).
    staged.store(int((u + kAhead + 1) & 1));
    staged.fetch(walk, u + kAhead + 2);
    // The products read this stage's tiles and the P^T, dS^T registers: done before either is rewritten.
    warpgroup_wait<0>();
    warpgroup_fence_operand(tOrdV);
    warpgroup_fence_operand(tOrdK);
    if (!kLate) __syncthreads();  // the next tile's copies go to the stage just read
  }
  mma::cp_async_wait<0>();  // the K/V group when no query tile was visited

#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const int64_t t = ks + key_a + 8 * h;
    if (t >= lk) continue;
    store_dkdv_row<T, D>(
        p, split, k_begin + t, g, (lane & 3) * 2,
        [&](int n) { return make_float2(tOrdK(2 * h + 4 * n), tOrdK(1 + 2 * h + 4 * n)); },
        [&](int n) { return make_float2(tOrdV(2 * h + 4 * n), tOrdV(1 + 2 * h + 4 * n)); });
  }
}

}  // namespace cuda
}  // namespace detail
}  // namespace msa
