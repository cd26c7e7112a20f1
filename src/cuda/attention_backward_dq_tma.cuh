// dQ of the block-sparse (and dense causal) attention backward on Hopper: the TMA forward's
// persistent, warp-specialised walk (attention_forward_tma.cuh: 128-row tiles of one GQA group, the
// block union of the tile's queries, a producer thread streaming K and V chunks by TMA, two consumer
// warpgroups of 64 rows each taking turns on the tensor cores) with the backward's per-chunk work:
//   S = Q K^T and dP = dO V^T (both operands in shared memory), P = exp2(S scale log2e - lse log2e)
//   masked to the row's selected blocks and causal limit, dS = P (dP - delta), dQ += dS K (dS from
//   registers, K's stage read through its MN-major view), dQ * scale stored once per row.
// Same results as attention_backward_dq_kernel (attention_backward_kernel.cuh), deterministic (no
// atomics; each row's chunks in ascending order).
//
// Why (H200, docs/benchmarks.md): the 64-row mma.sync dQ kernel took ~80 of the backward's 183 ms at
// 128K, Hq 64 / Hkv 4. Chunks are 64 keys: the S, dP and dQ accumulators (32 + 32 + 64 floats per
// thread) and two tile slots of Q and dO (128 KB at D = 128) leave room for two stages of 64-key K
// and V.
#pragma once

#include <cuda.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "cuda/attention_backward_kernel.cuh"  // kLog2e
#include "cuda/attention_forward_tma.cuh"
#include "cuda/wgmma_issue.cuh"

namespace msa {
namespace detail {
namespace cuda {
namespace tma {

constexpr int kDqKeys = 64;
constexpr int kDqStages = 2;

struct TmaDqParams {
  TmaAttentionParams t;  // tiles, unions, K / V / Q maps; t.a.lse is the forward's lse
  CUtensorMap do_map;    // (d, q head, query row) of dout, boxes as the Q map's
  const float* delta;    // [total_q, Hq]: rowsum(dout * out)
  void* dq;
  int64_t dq_s0, dq_s1;
  int num_q_heads;
};

template <class E, int D>
using DqSmem = TmaSmem<E, D, kDqKeys, 2, kDqStages>;

template <class T, int D>
__global__ void __launch_bounds__(kThreads, 1) attention_backward_dq_tma_kernel(const __grid_constant__ TmaDqParams dp) {
  using namespace cute;
  using E = typename wgmma::CuteElem<T>::type;
  using Sm = DqSmem<E, D>;
  using Mm = TmaMmas<E, D, kDqKeys>;  // S: the SS products (S, dP); O: dS K
  using Barrier = cutlass::arch::ClusterBarrier;
  constexpr int kStages = Sm::kStages;
  const TmaAttentionParams& tp = dp.t;
  const AttentionParams& p = tp.a;

  extern __shared__ __align__(128) unsigned char smem_raw[];
  const TmaShared<Sm, E> sh(smem_raw, tp.record_bytes);
  const int wg = threadIdx.x / 128, tid = threadIdx.x % 128, lane = tid & 31, warp = tid >> 5;
  const int G = p.group_size, B = p.block_size;
  const bool dense = p.topk == nullptr;

  if (threadIdx.x == 0) sh.init();
  __syncthreads();
  if (wg == 0) {
    cutlass::arch::warpgroup_reg_dealloc<kProducerRegs>();
    if (threadIdx.x != 0) return;
    const CUtensorMap* const maps[2] = {&tp.q_map, &dp.do_map};
    run_producer<Sm, E, D, kDqKeys>(tp, maps, sh);
    return;
  }
  cutlass::arch::warpgroup_reg_alloc<kConsumerRegs>();

  // ---- Consumers: warpgroup cw owns rows 64 cw .. 64 cw + 63 of every tile.
  const int cw = wg - 1;
  typename Mm::S mma_s;
  typename Mm::O mma_q;
  auto thr_s = mma_s.get_thread_slice(tid);
  auto thr_q = mma_q.get_thread_slice(tid);
  Tensor sK = make_tensor(make_smem_ptr(sh.k), typename Sm::LayoutK{});    // (key, d, stage)
  Tensor sV = make_tensor(make_smem_ptr(sh.v), typename Sm::LayoutK{});    // (key, d, stage): B of dO V^T
  Tensor sKmn = make_tensor(make_smem_ptr(sh.k), typename Sm::LayoutV{});  // (d, key, stage): B of dS K
  Tensor tSrK = thr_s.partition_fragment_B(sK);
  Tensor tSrV = thr_s.partition_fragment_B(sV);
  Tensor tQrK = thr_q.partition_fragment_B(sKmn);
  Tensor tSrS = partition_fragment_C(mma_s, Shape<_64, Int<kDqKeys>>{});
  Tensor tSrdP = partition_fragment_C(mma_s, Shape<_64, Int<kDqKeys>>{});
  Tensor tQrdQ = partition_fragment_C(mma_q, Shape<_64, Int<D>>{});
  Tensor tQrdS = make_tensor<E>(partition_shape_A(mma_q, Shape<_64, Int<kDqKeys>>{}));
  static_assert(decltype(size(tSrS))::value == kDqKeys / 2 && decltype(size(tQrdS))::value == kDqKeys / 2 &&
                    decltype(size(tQrdQ))::value == D / 2,
                "fragment sizes of the m64 layouts (attention_forward_wgmma.cuh describes them)");
  const int row_a = 64 * cw + warp * 16 + (lane >> 2);  // this thread's rows: row_a and row_a + 8

  const ConsumerSync<kStages> sync{cw, lane, tp.pingpong != 0};
  sync.begin();

  int c0 = 0;  // chunks consumed before this tile, over all tiles
  int j = 0;
  Tile tile;
  for (int t = blockIdx.x; t < tp.num_tiles; t += gridDim.x) {
    if (!tile.at(p, t, tp.tiles_x, tp.num_kv_heads, tp.batch)) continue;
    const int slot = j % kTileSlots;
    Barrier::wait(&sh.tile_ready[slot], (j / kTileSlots) & 1);
    const BlockUnionSmem<kMaskWords> su = sh.union_of(slot, p);
    const ChunkWalk<kDqKeys> walk(dense ? nullptr : su.blocks, dense ? int(tile.local_last + 1) : *su.count, tile, B);
    Tensor sQ = make_tensor(make_smem_ptr(sh.rows_of(slot, 0)), typename Sm::LayoutQ{});
    Tensor sdO = make_tensor(make_smem_ptr(sh.rows_of(slot, 1)), typename Sm::LayoutQ{});
    Tensor tSrQ = thr_s.partition_fragment_A(sQ(_, _, cw));
    Tensor tSrdO = thr_s.partition_fragment_A(sdO(_, _, cw));
    const WarpgroupRows rows(tile, G, cw, row_a);

    // This thread's rows: lse * log2 e and delta (padding rows: any finite value, every key masked).
    float lse2[2], delta[2];
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int f = tile.f0 + row_a + 8 * h;
      const int64_t row = tile.q_begin + f / G, head = int64_t(tile.g) * G + f % G;
      const bool valid = rows.pos[h] >= 0;
      lse2[h] = valid ? p.lse[row * p.lse_s0 + head * p.lse_s1] * kLog2e : 0.f;
      delta[h] = valid ? dp.delta[row * dp.num_q_heads + head] : 0.f;
    }

    clear(tQrdQ);
    // dQ += dS K of chunk c is left running while the next chunk's S and dP are issued: the wait
    // for those also completes it (a warpgroup's wgmma batches retire in order), and only then are
    // dS's registers rewritten and K's stage released.
    int k_pending = -1;  // the stage whose dS K product may still run
    auto retire_dq = [&] {
      if (k_pending < 0) return;
      warpgroup_wait<0>();
      warpgroup_fence_operand(tQrdQ);
      sync.release(&sh.empty_k[k_pending]);
      k_pending = -1;
    };
    // Broadcast from lane 0 (values read from shared memory): ptxas then knows these branches to be
    // warp-uniform, and keeps the dS K product in flight across them.
    const int num_iters = __shfl_sync(0xffffffffu, walk.num_iters, 0);
    for (int it = 0; it < num_iters; ++it) {
      const int c = c0 + it;
      const int s = c % kStages;
      sync.turn_wait();
      if (!__shfl_sync(0xffffffffu, int(rows.uses(it, walk, su, dense)), 0)) {
        sync.turn_pass();
        retire_dq();
        sync.wait_full(sh.full_k, c);
        sync.release(&sh.empty_k[s]);
        sync.wait_full(sh.full_v, c);
        sync.release(&sh.empty_v[s]);
        continue;
      }
      sync.wait_full(sh.full_k, c);
      wgmma::issue_s(mma_s, tSrQ, tSrK(_, _, _, s), tSrS);
      sync.wait_full(sh.full_v, c);
      wgmma::issue_s(mma_s, tSrdO, tSrV(_, _, _, s), tSrdP);
      sync.turn_pass();
      warpgroup_wait<0>();
      warpgroup_fence_operand(tSrS);
      warpgroup_fence_operand(tSrdP);
      warpgroup_fence_operand(tQrdQ);
      if (k_pending >= 0) sync.release(&sh.empty_k[k_pending]);
      sync.release(&sh.empty_v[s]);

      // P (0 where masked: unselected rows, causal tail, keys past the sequence) and dS = P (dP -
      // delta), as 16-bit A operand. Element e sits on row half (e / 2) % 2, key 8 (e / 4) +
      // 2 (lane % 4) + e % 2 (attention_forward_wgmma.cuh).
      int64_t lim[2];
      rows.limits(it, walk, su, dense, lim);
#pragma unroll
      for (int e = 0; e < size(tSrS); ++e) {
        const int h = (e / 2) % 2;
        const int key = (e / 4) * 8 + (lane & 3) * 2 + (e & 1);
        const float pr = exp2_ftz(fmaf(tSrS(e), p.scale_log2, -lse2[h]));
        tQrdS(e) = static_cast<E>(key > lim[h] ? 0.f : pr * (tSrdP(e) - delta[h]));
      }
      warpgroup_fence_operand(tQrdS);
      wgmma::issue_o(mma_q, tQrdS, tQrK(_, _, _, s), tQrdQ);
      k_pending = s;
    }
    retire_dq();
    c0 += num_iters;
    sync.release(&sh.tile_free[slot]);  // the union, Q and dO of this tile are no longer read
    ++j;

    // Epilogue: dQ * scale, once per row (the next tile's loads are already in flight).
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      if (rows.pos[h] < 0) continue;
      const int f = tile.f0 + row_a + 8 * h;
      const int64_t row = tile.q_begin + f / G, head = int64_t(tile.g) * G + f % G;
      T* dst = static_cast<T*>(dp.dq) + row * dp.dq_s0 + head * dp.dq_s1 + (lane & 3) * 2;
#pragma unroll
      for (int n = 0; n < D / 8; ++n)
        *reinterpret_cast<uint32_t*>(dst + n * 8) =
            mma::Elem<T>::pack(tQrdQ(2 * h + 4 * n) * p.scale, tQrdQ(1 + 2 * h + 4 * n) * p.scale);
    }
  }
  sync.end();
}

}  // namespace tma
}  // namespace cuda
}  // namespace detail
}  // namespace msa
