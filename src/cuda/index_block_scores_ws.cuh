// Stage 1 of the CUDA index branch on Hopper, warp-specialised: the same outputs as the other stage 1
// kernels (index_block_scores.cuh: block max, optional block LSE, per (group, query, visible block)),
// with 256 rows per CTA instead of 128.
//
// Why (measured on the H200, docs/benchmarks.md): every 128-row CTA of the pipelined kernel reads
// each visible 128-key chunk of ki (32 KB) for 4 MFLOP of products, i.e. 128 FLOP per byte of L2
// traffic: at 128K (Hkv 4) it moved ~3.8 TB/s from L2 at ~490 TFLOP/s, and its compute warps also
// issued the cp.async loads. Here a chunk serves 256 rows (half the L2 traffic per FLOP) and arrives
// by TMA.
//
// Roles (three warpgroups, as the TMA attention forward, attention_forward_tma.cuh):
//  - the producer (one thread) streams the tile's key chunks by TMA into a ring of kWsStages
//    shared-memory stages guarded by full / empty mbarriers;
//  - two consumer warpgroups, each owning 128 rows (two m64 wgmma tiles, 128 accumulator floats per
//    thread): wait for a chunk, issue its product, wait for it, release the stage, pool it
//    (RowPool). Their products take turns on the tensor cores (ping-pong, FlashAttention-3), so one
//    warpgroup pools while the other's product runs; both walk the same chunks, so the turns pair.
// qi is loaded once per CTA by the consumers with cp.async (rows are (query, group) pairs of any G).
//
// Shared memory: Q (row, d, consumer) and the K ring (key, d, stage), 128-byte swizzled K-major
// GMMA atoms tiled rows-first, so each 64-wide slice of a K stage is one [kKeys][64] TMA box (the
// placement tests/cuda/test_attention_tma_layout.cu checks for the attention forward's K ring).
#pragma once

#include <cuda.h>
#include <cuda_runtime.h>

#include <cstdint>

#include <cute/arch/copy_sm90_desc.hpp>
#include <cute/arch/copy_sm90_tma.hpp>
#include <cute/tensor.hpp>
#include <cutlass/arch/barrier.h>
#include <cutlass/arch/reg_reconfig.h>

#include "cuda/index_block_pool.cuh"
#include "cuda/index_block_scores_wgmma.cuh"
#include "cuda/wgmma_issue.cuh"

namespace msa {
namespace detail {
namespace cuda {
namespace index {

constexpr int kWsConsumers = 2;
constexpr int kWsConsumerRows = 128;  // two m64 tiles per consumer warpgroup
constexpr int kWsRows = kWsConsumers * kWsConsumerRows;
constexpr int kWsThreads = 128 * (kWsConsumers + 1);
constexpr int kWsStages = 4;
constexpr int kWsBoxElems = 64;  // elements of Di per TMA box: one 128-byte swizzle row
constexpr int kWsTurnBarrier = 1;  // named barriers 1, 2: the consumers' turns
constexpr int kWsQBarrier = 3;     // named barrier 3: Q loaded by both consumers
constexpr int kWsProducerRegs = 40;
constexpr int kWsConsumerRegs = 232;
static_assert(128 * kWsProducerRegs + 128 * kWsConsumers * kWsConsumerRegs <= 65536, "register file of one SM");

struct WsBlockScoreParams {
  BlockScoreArgs a;
  CUtensorMap ki_map;  // (d, 1, key row) of ki, boxes of 64 x 1 x kKeys
  int pingpong;        // consumers take turns issuing their products (MSA_INDEX_PINGPONG=0: off)
};

template <bool kBf16, int kDim, int kKeys>
struct WsScoreTraits {
  using Elem = std::conditional_t<kBf16, cute::bfloat16_t, cute::half_t>;
  using TiledMma = decltype(cute::make_tiled_mma(typename WgmmaScoreTraits<kBf16, kDim, kKeys>::Atom{}));
  using SmemQ = decltype(cute::tile_to_shape(
      cute::GMMA::Layout_K_SW128_Atom<Elem>{},
      cute::Shape<cute::Int<kWsConsumerRows>, cute::Int<kDim>, cute::Int<kWsConsumers>>{}));
  using SmemK = decltype(cute::tile_to_shape(cute::GMMA::Layout_K_SW128_Atom<Elem>{},
                                             cute::Shape<cute::Int<kKeys>, cute::Int<kDim>, cute::Int<kWsStages>>{}));
  static constexpr std::size_t kQBytes = std::size_t(kWsRows) * kDim * 2;
  static constexpr std::size_t kStageBytes = std::size_t(kKeys) * kDim * 2;
  static constexpr std::size_t kBarrierOffset = kQBytes + kWsStages * kStageBytes;
  // +1024: the swizzle atoms need 1024-byte alignment, which the kernel makes by hand.
  static constexpr std::size_t kSmemBytes = 1024 + kBarrierOffset + 2 * kWsStages * sizeof(uint64_t);
  static_assert(int(cute::cosize_v<SmemQ>) * 2 == kQBytes, "Q layout is dense");
  static_assert(int(cute::cosize_v<SmemK>) * 2 == kWsStages * kStageBytes, "K layout is dense");
};

template <bool kBf16, bool kWantLse, int kDim, int kKeys>
__global__ void __launch_bounds__(kWsThreads, 1) block_scores_ws_kernel(const __grid_constant__ WsBlockScoreParams wp) {
  using namespace cute;
  using Tr = WsScoreTraits<kBf16, kDim, kKeys>;
  using Elem = typename Tr::Elem;
  using Barrier = cutlass::arch::ClusterBarrier;
  using TxBarrier = cutlass::arch::ClusterTransactionBarrier;
  const BlockScoreArgs& a = wp.a;
  extern __shared__ uint8_t smem_raw[];
  uint8_t* smem = reinterpret_cast<uint8_t*>((reinterpret_cast<uintptr_t>(smem_raw) + 1023) & ~uintptr_t(1023));
  Elem* pQ = reinterpret_cast<Elem*>(smem);
  Elem* pK = reinterpret_cast<Elem*>(smem + Tr::kQBytes);
  uint64_t* full = reinterpret_cast<uint64_t*>(smem + Tr::kBarrierOffset);
  uint64_t* empty = full + kWsStages;

  const int b = blockIdx.y;
  const int64_t q_begin = a.cu_q[b], lq = a.cu_q[b + 1] - q_begin;
  const int64_t k_begin = a.cu_k[b], lk = a.cu_k[b + 1] - k_begin;
  // Later tiles see more keys: launch them first so the causal tail does not straggle.
  const int64_t q0 = int64_t(gridDim.x - 1 - blockIdx.x) * a.queries_per_cta;
  if (q0 >= lq) return;  // the whole CTA, before any barrier
  const int G = a.groups_per_cta, g0 = blockIdx.z * G, B = a.block_size;
  const int64_t tile_q = lq - q0 < a.queries_per_cta ? lq - q0 : a.queries_per_cta;
  const PoolTile tile{q_begin, lq, lk, q0, tile_q, rules::query_position(lq, lk, q0),
                      rules::query_position(lq, lk, q0 + tile_q - 1), g0};
  const int subchunks = (B + kKeys - 1) / kKeys;
  const int num_chunks = int(rules::local_block(tile.p_max, B) + 1) * subchunks;

  const int wg = threadIdx.x / 128;
  if (threadIdx.x == 0) {
    for (int s = 0; s < kWsStages; ++s) {
      Barrier::init(&full[s], 1);
      Barrier::init(&empty[s], kWsConsumers * 4);
    }
    cutlass::arch::fence_barrier_init();
  }
  __syncthreads();

  if (wg == 0) {
    // ---- Producer: one thread streams chunk c's keys into stage c % kWsStages once all 8 consumer
    // warps released the stage's previous chunk. Rows past the chunk's keys (the next block, another
    // sequence) are loaded and masked by the pooling; rows past ki read as zeros.
    cutlass::arch::warpgroup_reg_dealloc<kWsProducerRegs>();
    if (threadIdx.x != 0) return;
    const uint64_t hint = uint64_t(TMA::CacheHintSm90::EVICT_NORMAL);
    for (int c = 0; c < num_chunks; ++c) {
      const int s = c % kWsStages;
      if (c >= kWsStages) Barrier::wait(&empty[s], ((c / kWsStages) + 1) & 1);
      TxBarrier::arrive_and_expect_tx(&full[s], uint32_t(Tr::kStageBytes));
      int64_t kb, ke;
      chunk_key_range<kKeys>(c, subchunks, B, tile.p_max, kb, ke);
#pragma unroll
      for (int dh = 0; dh < kDim / kWsBoxElems; ++dh)
        SM90_TMA_LOAD_3D::copy(&wp.ki_map, &full[s], hint, pK + s * (kKeys * kDim) + dh * (kKeys * kWsBoxElems),
                               dh * kWsBoxElems, 0, int(k_begin + kb));
    }
    return;
  }

  // ---- Consumers: warpgroup cw owns rows 128 cw .. 128 cw + 127.
  cutlass::arch::warpgroup_reg_alloc<kWsConsumerRegs>();
  const int cw = wg - 1, tid = threadIdx.x % 128, lane = tid & 31;
  Tensor sQ = make_tensor(make_smem_ptr(pQ), typename Tr::SmemQ{});  // (row, d, consumer)
  Tensor sK = make_tensor(make_smem_ptr(pK), typename Tr::SmemK{});  // (key, d, stage)
  {
    // Rows past the tile or past Hkv load as zeros or as group 0 (never written out).
    constexpr int segs = kDim / 8;
    const uint16_t* qbase = a.qi + (q_begin + q0) * a.qi_s0;
    const int valid_rows = int(tile_q) * G;
    for (int i = threadIdx.x - 128; i < kWsRows * segs; i += 128 * kWsConsumers) {
      const int r = i / segs, sg = i - r * segs;
      const int qq = r / G, gg = g0 + r - qq * G;
      const bool valid = r < valid_rows && sg * 8 < a.head_dim;
      const uint16_t* src =
          valid ? qbase + int64_t(qq) * a.qi_s0 + int64_t(gg < a.num_kv_heads ? gg : 0) * a.qi_s1 + sg * 8 : a.qi;
      cp_async_16(reinterpret_cast<uint16_t*>(&sQ(r % kWsConsumerRows, sg * 8, r / kWsConsumerRows)), src, valid);
    }
    cp_async_commit();
    cp_async_wait<0>();
    fence_async_proxy_shared();  // cp.async writes are generic-proxy; wgmma reads through the async proxy
    asm volatile("bar.sync %0, %1;\n" ::"n"(kWsQBarrier), "n"(128 * kWsConsumers) : "memory");
  }

  typename Tr::TiledMma mma;
  auto thr = mma.get_thread_slice(tid);
  Tensor tSrQ = thr.partition_fragment_A(sQ(_, _, cw));  // (MMA, 2, kDim/16) descriptors
  Tensor tSrK = thr.partition_fragment_B(sK);            // (MMA, 1, kDim/16, stage)
  Tensor acc = partition_fragment_C(mma, Shape<Int<kWsConsumerRows>, Int<kKeys>>{});
  Tensor tScS = thr.partition_C(make_identity_tensor(Shape<Int<kWsConsumerRows>, Int<kKeys>>{}));
  static_assert(decltype(size(acc))::value == kKeys, "two m64 tiles of kKeys / 2 floats per thread");

  RowPool<4, kKeys, kWantLse> rows;
  rows.init(a, tile, [&](int i) { return kWsConsumerRows * cw + int(get<0>(tScS(i))); });
  const float lse_log2 = a.lse_factor * 1.4426950408889634f;

  const bool pingpong = wp.pingpong != 0;
  auto turn_wait = [&] {
    if (pingpong) asm volatile("bar.sync %0, 256;\n" ::"r"(kWsTurnBarrier + cw) : "memory");
  };
  auto turn_pass = [&] {
    if (pingpong) asm volatile("bar.arrive %0, 256;\n" ::"r"(kWsTurnBarrier + 1 - cw) : "memory");
  };
  if (pingpong && cw == 1) asm volatile("bar.arrive %0, 256;\n" ::"r"(kWsTurnBarrier) : "memory");

  for (int c = 0; c < num_chunks; ++c) {
    const int s = c % kWsStages;
    Barrier::wait(&full[s], (c / kWsStages) & 1);
    turn_wait();
    wgmma::issue_s(mma, tSrQ, tSrK(_, _, _, s), acc);
    turn_pass();
    warpgroup_wait<0>();
    warpgroup_fence_operand(acc);
    __syncwarp();
    if (lane == 0) Barrier::arrive(&empty[s]);  // this warp's reads of the stage are complete
    int64_t kb, ke;
    chunk_key_range<kKeys>(c, subchunks, B, tile.p_max, kb, ke);
    rows.pool(a, tile, c, subchunks, kb, ke, acc, [&](int i) { return int(get<1>(tScS(i))); }, lse_log2);
  }
  if (pingpong && cw == 0) asm volatile("bar.sync %0, 256;\n" ::"r"(kWsTurnBarrier) : "memory");
}

}  // namespace index
}  // namespace cuda
}  // namespace detail
}  // namespace msa
