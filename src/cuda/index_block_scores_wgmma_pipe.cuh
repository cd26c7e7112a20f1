// Stage 1 of the CUDA index branch on Hopper tensor cores, pipelined: the same grid, rows, chunks,
// masking and outputs as block_scores_wgmma_kernel (index_block_scores_wgmma.cuh), rearranged so the
// tensor cores, the pooling and the key loads overlap:
//  - two accumulators per thread: chunk c + 1's wgmma is issued (async) before chunk c is pooled, and
//    only chunk c's batch is waited for (wgmma.wait_group 1), so the pooling runs under the product;
//  - kPipeStages key-chunk buffers filled by cp.async kPipeStages - 1 chunks ahead, one barrier per
//    chunk (it publishes the landed chunk and retires the buffer the refill overwrites);
//  - the pooling takes the max and the sum of exponentials with independent partial chains (the
//    serial fmax / add chain of one row was latency-bound at two warps per scheduler), and each
//    exponential is one FFMA (log2e and 1/T folded into one factor) plus one MUFU.EX2.
// The two accumulators (2 x kKeys / 2 floats; up to 250 registers per thread, no spills) and four
// buffers (161 KB at Di 128) do not fit two CTAs per SM, so this kernel runs one CTA (8 warps) per SM
// and relies on the overlap above instead of a second CTA.
// ptxas keeps a wgmma batch in flight across other code only if no branch it cannot prove
// warp-uniform is taken meanwhile; otherwise it waits after every wgmma (warning C7518). Hence the
// sequence bounds broadcast with __shfl_sync, 32-bit chunk arithmetic (a 64-bit division is a
// subroutine call), loads with a fixed trip count, and predicated output stores. Check with
// -Xptxas -v that no C7517 / C7518 note appears after a change.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "cuda/index_block_pool.cuh"
#include "cuda/index_block_scores_wgmma.cuh"

namespace msa {
namespace detail {
namespace cuda {
namespace index {

constexpr int kPipeStages = 4;  // key-chunk buffers: three chunks in flight while one is multiplied
static_assert(kPipeStages >= 3, "the refill of chunk c + stages - 1 must not hit the chunk being multiplied");

// The vector path of load_swizzled (index_block_scores_wgmma.cuh; this kernel needs
// a.vector_loads) with a trip count every thread shares: these loads run while a wgmma batch is in
// flight, and a branch ptxas cannot prove warp-uniform there makes it serialize every wgmma.
template <int kDim, int kRows, class Tile, class RowOffset>
__device__ __forceinline__ void load_swizzled_vector(Tile&& dst, int valid_rows, const uint16_t* base,
                                                     RowOffset row_offset, const BlockScoreArgs& a) {
  constexpr int segs = kDim / 8;
  static_assert(kRows * segs % kWgmmaThreads == 0, "whole 16-byte segments per thread");
#pragma unroll
  for (int it = 0; it < kRows * segs / kWgmmaThreads; ++it) {
    const int i = it * kWgmmaThreads + int(threadIdx.x);
    const int r = i / segs, s = i - r * segs;
    const bool valid = r < valid_rows && s * 8 < a.head_dim;
    const uint16_t* src = valid ? base + row_offset(r) + s * 8 : base;
    cp_async_16(reinterpret_cast<uint16_t*>(&dst(r, s * 8)), src, valid);
  }
}

template <bool kBf16, bool kWantLse, int kDim, int kKeys>
__global__ void __launch_bounds__(kWgmmaThreads, 1) block_scores_wgmma_pipe_kernel(const BlockScoreArgs a) {
  using namespace cute;
  using Traits = WgmmaScoreTraits<kBf16, kDim, kKeys, kPipeStages>;
  using Elem = typename Traits::Elem;
  extern __shared__ uint8_t smem_raw[];
  Elem* smem = reinterpret_cast<Elem*>((reinterpret_cast<uintptr_t>(smem_raw) + 1023) & ~uintptr_t(1023));
  Tensor sQ = make_tensor(make_smem_ptr(smem), typename Traits::SmemQ{});
  Tensor sK = make_tensor(make_smem_ptr(smem + Traits::kQElems), typename Traits::SmemK{});

  const int b = blockIdx.y;
  // Broadcast from lane 0: ptxas then treats everything derived from the sequence bounds (chunk
  // counts, chunk ranges) as warp-uniform. Branches it cannot prove uniform while a wgmma batch is in
  // flight make it serialize every wgmma.
  const int32_t cq0 = __shfl_sync(0xffffffffu, a.cu_q[b], 0), cq1 = __shfl_sync(0xffffffffu, a.cu_q[b + 1], 0);
  const int32_t ck0 = __shfl_sync(0xffffffffu, a.cu_k[b], 0), ck1 = __shfl_sync(0xffffffffu, a.cu_k[b + 1], 0);
  const int64_t q_begin = cq0, lq = int64_t(cq1) - cq0;
  const int64_t k_begin = ck0, lk = int64_t(ck1) - ck0;
  // Later tiles see more keys: launch them first so the causal tail does not straggle.
  const int64_t q0 = int64_t(gridDim.x - 1 - blockIdx.x) * a.queries_per_cta;
  if (q0 >= lq) return;
  const int G = a.groups_per_cta, g0 = blockIdx.z * G;
  const int64_t tile_q = lq - q0 < a.queries_per_cta ? lq - q0 : a.queries_per_cta;
  const int64_t p_min = rules::query_position(lq, lk, q0);
  const int64_t p_max = rules::query_position(lq, lk, q0 + tile_q - 1);
  const int B = a.block_size;

  // Rows: r = query_in_tile * G + group_in_cta. Rows past the tile or past Hkv load as zeros.
  {
    const uint16_t* qbase = a.qi + (q_begin + q0) * a.qi_s0;
    auto row_offset = [&](int r) {
      const int qq = r / G, gg = g0 + r - (r / G) * G;
      return int64_t(qq) * a.qi_s0 + int64_t(gg < a.num_kv_heads ? gg : 0) * a.qi_s1;
    };
    load_swizzled_vector<kDim, kScoreRows>(sQ, int(tile_q) * G, qbase, row_offset, a);
  }

  const int subchunks = (B + kKeys - 1) / kKeys;
  // Broadcast again: the 64-bit division inside local_block is a subroutine call whose result ptxas
  // does not know to be uniform, and the loop below exits on this count with a wgmma batch in flight.
  const int num_chunks = __shfl_sync(0xffffffffu, int(rules::local_block(p_max, B) + 1) * subchunks, 0);
  auto chunk_range = [&](int64_t c, int64_t& kb, int64_t& ke) {
    chunk_key_range<kKeys>(int(c), subchunks, B, p_max, kb, ke);
  };
  auto load_chunk = [&](int64_t c) {
    int64_t kb, ke;
    chunk_range(c, kb, ke);
    const uint16_t* kbase = a.ki + (k_begin + kb) * a.ki_s0;
    auto row_offset = [&](int r) { return int64_t(r) * a.ki_s0; };
    load_swizzled_vector<kDim, kKeys>(sK(_, _, int(c % kPipeStages)), int(ke - kb), kbase, row_offset, a);
  };

  typename Traits::TiledMma mma;
  auto thr_mma = mma.get_slice(threadIdx.x);
  Tensor acc0 = partition_fragment_C(mma, Shape<Int<kScoreRows>, Int<kKeys>>{});  // (MMA, 1, 1)
  Tensor acc1 = partition_fragment_C(mma, Shape<Int<kScoreRows>, Int<kKeys>>{});
  Tensor tScS = thr_mma.partition_C(make_identity_tensor(Shape<Int<kScoreRows>, Int<kKeys>>{}));
  static_assert(decltype(size(acc0))::value == kKeys / 2, "64 x kKeys per 128 threads");

  const PoolTile pool_tile{q_begin, lq, lk, q0, tile_q, p_min, p_max, g0};
  RowPool<2, kKeys, kWantLse> rows;
  rows.init(a, pool_tile, [&](int i) { return int(get<0>(tScS(i))); });
  const float lse_log2 = a.lse_factor * 1.4426950408889634f;

  // Issues chunk c's product into `acc` as one wgmma batch and returns without waiting for it.
  auto issue = [&](int64_t c, auto& acc) {
    // Descriptors are rebuilt from a base the compiler cannot see through, so they are not hoisted
    // out of the loop into long-lived registers.
    Elem* base = smem;
    asm volatile("" : "+l"(base));
    Tensor tSrQ = thr_mma.make_fragment_A(
        thr_mma.partition_A(make_tensor(make_smem_ptr(base), typename Traits::SmemQ{})));
    Tensor tSrK = thr_mma.make_fragment_B(thr_mma.partition_B(
        make_tensor(make_smem_ptr(base + Traits::kQElems), typename Traits::SmemK{})));
    const int stage = int(c % kPipeStages);
    warpgroup_fence_operand(acc);
    warpgroup_arrive();
    mma.accumulate_ = GMMA::ScaleOut::Zero;
#pragma unroll
    for (int k = 0; k < kDim / 16; ++k) {
      gemm(mma, tSrQ(_, _, k), tSrK(_, _, k, stage), acc);
      mma.accumulate_ = GMMA::ScaleOut::One;
    }
    warpgroup_commit_batch();
    warpgroup_fence_operand(acc);
  };

  // Pools chunk c (its product complete in `acc`); RowPool writes a block's outputs when c ends it.
  auto pool = [&](int64_t c, auto& acc) {
    int64_t kb, ke;
    chunk_range(c, kb, ke);
    rows.pool(a, pool_tile, int(c), subchunks, kb, ke, acc, [&](int i) { return int(get<1>(tScS(i))); }, lse_log2);
  };

  // Prologue: qi and chunk 0 in group 0, chunks 1 .. stages - 2 in one group each (empty past the end).
#pragma unroll
  for (int s = 0; s < kPipeStages - 1; ++s) {
    if (s < num_chunks) load_chunk(s);
    cp_async_commit();
  }
  cp_async_wait<kPipeStages - 2>();
  // cp.async and plain stores are generic-proxy writes; wgmma reads through the async proxy.
  fence_async_proxy_shared();
  __syncthreads();
  issue(0, acc0);

  // Chunk c's product is in flight in one accumulator; `advance` issues chunk c + 1's into the other.
  // Before it, cp.async groups hold chunks 0 .. c + stages - 2, one each.
  auto advance = [&](int64_t c, auto& next) {
    cp_async_wait<kPipeStages - 3>();  // chunk c + 1 has landed (this thread's part)
    fence_async_proxy_shared();
    // Publishes chunk c + 1 to both warpgroups; and every warpgroup has waited for chunk c - 1's
    // product, so its buffer, (c + stages - 1) % stages, may be refilled.
    __syncthreads();
    issue(c + 1, next);  // first, so the tensor cores get it before this thread's loads are issued
    // Unconditional: a chunk past the end has no keys (kb == ke) and zero-fills its buffer, and no
    // branch is taken while a wgmma batch is in flight.
    load_chunk(c + kPipeStages - 1);
    cp_async_commit();
  };
  // Unrolled by two so each accumulator keeps a fixed role (registers cannot be indexed), with one
  // test of "is there a next chunk" per chunk so that on every path ptxas sees which accumulator is
  // in flight (else it waits after every wgmma).
  for (int64_t c = 0;; c += 2) {
    if (c + 1 >= num_chunks) {
      warpgroup_wait<0>();
      warpgroup_fence_operand(acc0);
      pool(c, acc0);
      break;
    }
    advance(c, acc1);
    warpgroup_wait<1>();  // chunk c done; chunk c + 1 keeps the tensor cores busy while c is pooled
    warpgroup_fence_operand(acc0);
    pool(c, acc0);
    if (c + 2 >= num_chunks) {
      warpgroup_wait<0>();
      warpgroup_fence_operand(acc1);
      pool(c + 1, acc1);
      break;
    }
    advance(c + 1, acc0);
    warpgroup_wait<1>();
    warpgroup_fence_operand(acc1);
    pool(c + 1, acc1);
  }
}

}  // namespace index
}  // namespace cuda
}  // namespace detail
}  // namespace msa
