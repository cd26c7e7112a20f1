// Block-sparse (and dense causal) attention forward on Hopper, warp-specialised: a producer warp
// streams K and V with the tensor-memory accelerator (TMA) into a ring of shared-memory stages
// guarded by mbarriers, and two consumer warpgroups run the wgmma products and the online softmax.
// Same contract and tile walk as the other forward kernels (attention_forward_kernel.cuh): a tile is
// 128 rows = (query, head) pairs of ONE GQA group flattened query-major (8 queries at G = 16), its
// keys the sorted union of its queries' blocks (attention_block_union.cuh), masked per row to the
// blocks its query selected and to the causal limit.
//
// Why this shape (measured on the H100, docs/benchmarks.md): the 64-row kernels load each K/V chunk
// for 64 rows only, about 64 FLOP per byte fetched, which the memory system cannot feed at the
// tensor cores' rate; two warpgroups sharing one K/V stream double the rows per byte, and the union
// of 8 consecutive queries' selections is still small (about 24 blocks for 16 selected, on the
// benchmark's smooth index inputs at 128K). The loads move off the compute warps entirely: one thread
// issues each 128-key tile as TMA boxes, and the ring keeps two tiles (K and V: 128 KB at D = 128)
// in flight.
//
// Consumer warpgroup w owns rows 64 w .. 64 w + 63 of the tile: S = Q K^T with Q and K in shared
// memory (SS), O += P V with P in registers (RS), in the order of attention_forward_wgmma.cuh (the
// next S issued before the current softmax, so the softmax overlaps the P V product on the tensor
// cores). A warpgroup skips the chunks that none of its own 4 queries (at G = 16) selected, so only
// the union of 4 queries' selections costs products, while the loads serve the union of 8. Each warp
// releases a stage (an arrive on its "empty" mbarrier) once its products that read the stage are
// complete, or at once for a skipped chunk; the producer refills a stage when all 8 consumer warps
// released it.
//
// Shared-memory layouts: Q (row, d, warpgroup) and K (key, d, stage) K-major, V (d, key, stage)
// MN-major, all 128-byte swizzled CuTe GMMA atoms. A TMA box is 64 elements (128 bytes) of D by the
// tile's keys, written with the 128-byte swizzle, which is the byte placement of those layouts when
// the atoms are tiled keys-first (tests/test_attention_tma_layout.cpp checks every element).
#pragma once

#include <cuda.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>

#include <cute/arch/copy_sm90_desc.hpp>
#include <cute/arch/copy_sm90_tma.hpp>
#include <cute/tensor.hpp>
#include <cutlass/arch/barrier.h>
#include <cutlass/arch/reg_reconfig.h>

#include "cuda/attention_block_union.cuh"
#include "cuda/attention_forward_kernel.cuh"
#include "cuda/attention_forward_wgmma.cuh"
#include "cuda/attention_mma.cuh"
#include "msa/rules.h"

namespace msa {
namespace detail {
namespace cuda {
namespace tma {

constexpr int kConsumers = 2;                   // consumer warpgroups
constexpr int kTileRows = 64 * kConsumers;      // rows of a CTA tile
constexpr int kThreads = 128 * (kConsumers + 1);  // + the producer warpgroup
constexpr int kMaskWords = 2;                   // a tile spans at most 128 queries (G = 1)
constexpr int kBoxElems = 64;                   // elements of D per TMA box: one 128-byte swizzle row

// Registers after the split (setmaxnreg): the producer needs few, the consumers hold S, O and P.
constexpr int kProducerRegs = 40;
constexpr int kConsumerRegs = 232;
static_assert(128 * kProducerRegs + 128 * kConsumers * kConsumerRegs <= 65536, "register file of one SM");

struct TmaAttentionParams {
  AttentionParams a;
  CUtensorMap k_map;  // (d, kv head, key row) of k
  CUtensorMap v_map;  // the same of v
};

template <class E, int D, int kKeys>
struct TmaSmem {
  static constexpr int kQBytes = kTileRows * D * 2;
  static constexpr int kStageBytes = kKeys * D * 2;  // one K (or one V) tile
  // As many stages as fit in 128 KB per ring pair (2 at D = kKeys = 128), at most 4.
  static constexpr int kStages = (65536 / kStageBytes) < 4 ? (65536 / kStageBytes) : 4;
  static_assert(kStages >= 2, "double buffering at least");
  using LayoutQ = decltype(cute::tile_to_shape(cute::GMMA::Layout_K_SW128_Atom<E>{},
                                               cute::Shape<cute::_64, cute::Int<D>, cute::Int<kConsumers>>{}));
  // Atoms tiled keys-first (the default order for K, the explicit step for V), so that each 64-wide
  // slice of D is one contiguous [keys][64] box as TMA writes it.
  using LayoutK = decltype(cute::tile_to_shape(cute::GMMA::Layout_K_SW128_Atom<E>{},
                                               cute::Shape<cute::Int<kKeys>, cute::Int<D>, cute::Int<kStages>>{}));
  using LayoutV = decltype(cute::tile_to_shape(cute::GMMA::Layout_MN_SW128_Atom<E>{},
                                               cute::Shape<cute::Int<D>, cute::Int<kKeys>, cute::Int<kStages>>{},
                                               cute::Step<cute::_2, cute::_1, cute::_3>{}));
  static constexpr std::size_t kAlign = 1024;  // the 128-byte swizzle repeats every 1024 bytes
  static constexpr std::size_t kKOffset = kQBytes;
  static constexpr std::size_t kVOffset = kKOffset + std::size_t(kStages) * kStageBytes;
  static constexpr std::size_t kBarrierOffset = kVOffset + std::size_t(kStages) * kStageBytes;
  static constexpr std::size_t kBarrierBytes = 4 * kStages * sizeof(uint64_t);
  static constexpr std::size_t kUnionOffset = kBarrierOffset + kBarrierBytes;
  static_assert(int(cute::cosize_v<LayoutQ>) * 2 == kQBytes, "Q layout is dense");
  static_assert(int(cute::cosize_v<LayoutK>) * 2 == kStages * kStageBytes, "K layout is dense");
  static_assert(int(cute::cosize_v<LayoutV>) * 2 == kStages * kStageBytes, "V layout is dense");
  static std::size_t bytes(int bitmap_words, int union_cap) {
    return kAlign + kUnionOffset + BlockUnionSmem<kMaskWords>::bytes(bitmap_words, union_cap);
  }
};

template <class E, int D, int kKeys>
struct TmaMmas {
  using S = decltype(cute::make_tiled_mma(
      cute::GMMA::ss_op_selector<E, E, float, cute::Shape<cute::_64, cute::Int<kKeys>, cute::Int<D>>,
                                 cute::GMMA::Major::K, cute::GMMA::Major::K>()));
  using O = decltype(cute::make_tiled_mma(
      cute::GMMA::rs_op_selector<E, E, float, cute::Shape<cute::_64, cute::Int<D>, cute::Int<kKeys>>,
                                 cute::GMMA::Major::K, cute::GMMA::Major::MN>()));
};

// The chunks a tile walks: every kKeys-key part of each union block, except parts past the tile's
// last position. The producer and both consumers evaluate the same walk.
struct ChunkWalk {
  const int* blocks;  // nullptr: dense (block u is u)
  int block_size;
  int parts_per_block;
  int num_iters;
  __device__ int64_t block_at(int u) const { return blocks ? int64_t(blocks[u]) : int64_t(u); }
  template <int kKeys>
  __device__ int64_t key_start(int it) const {
    return rules::block_begin(block_at(it / parts_per_block), block_size) +
           int64_t(it % parts_per_block) * kKeys;
  }
};

template <class T, int D, int kKeys>
__global__ void __launch_bounds__(kThreads, 1)
    attention_forward_tma_kernel(const __grid_constant__ TmaAttentionParams tp) {
  using namespace cute;
  using E = typename wgmma::CuteElem<T>::type;
  using Sm = TmaSmem<E, D, kKeys>;
  using Mm = TmaMmas<E, D, kKeys>;
  using Barrier = cutlass::arch::ClusterBarrier;
  using TxBarrier = cutlass::arch::ClusterTransactionBarrier;
  constexpr int kStages = Sm::kStages;
  const AttentionParams& p = tp.a;

  extern __shared__ __align__(128) unsigned char smem_raw[];
  unsigned char* smem = reinterpret_cast<unsigned char*>(
      (reinterpret_cast<uintptr_t>(smem_raw) + Sm::kAlign - 1) & ~uintptr_t(Sm::kAlign - 1));
  E* pQ = reinterpret_cast<E*>(smem);
  E* pK = reinterpret_cast<E*>(smem + Sm::kKOffset);
  E* pV = reinterpret_cast<E*>(smem + Sm::kVOffset);
  uint64_t* full_k = reinterpret_cast<uint64_t*>(smem + Sm::kBarrierOffset);
  uint64_t* full_v = full_k + kStages;
  uint64_t* empty_k = full_v + kStages;
  uint64_t* empty_v = empty_k + kStages;
  const BlockUnionSmem<kMaskWords> su =
      BlockUnionSmem<kMaskWords>::carve(smem + Sm::kUnionOffset, p.bitmap_words, p.union_cap);

  const int wg = threadIdx.x / 128, tid = threadIdx.x % 128, lane = tid & 31, warp = tid >> 5;
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
  const int64_t p_last = rules::query_position(lq, lk, i_last);
  const int64_t local_last = rules::local_block(p_last, B);
  const bool dense = p.topk == nullptr;

  if (threadIdx.x == 0) {
    for (int s = 0; s < kStages; ++s) {
      Barrier::init(&full_k[s], 1);
      Barrier::init(&full_v[s], 1);
      Barrier::init(&empty_k[s], kConsumers * 4);
      Barrier::init(&empty_v[s], kConsumers * 4);
    }
    cutlass::arch::fence_barrier_init();
  }

  using LayoutQ = typename Sm::LayoutQ;
  Tensor sQ = make_tensor(make_smem_ptr(pQ), LayoutQ{});  // (row, d, warpgroup)
  // Consumers copy their 64 Q rows (zeros past the sequence) while the CTA builds the union.
  const int cw = wg - 1;  // consumer index; -1 for the producer
  if (wg > 0) {
    const uint16_t* q = static_cast<const uint16_t*>(p.q);
    constexpr int kChunks = D / 8;
    for (int i = tid; i < 64 * kChunks; i += 128) {
      const int r = i / kChunks, c = i % kChunks;
      const int64_t f = f0 + 64 * cw + r;
      const bool in = f < rows_total;
      const uint16_t* src =
          in ? q + (q_begin + f / G) * p.q_s0 + (int64_t(g) * G + f % G) * p.q_s1 + c * 8 : q;
      mma::cp_async_16(mma::smem_addr(&sQ(r, c * 8, cw)), src, in ? 16 : 0);
    }
    mma::cp_async_commit();
  }

  int num_union = int(local_last + 1);
  if (dense)
    __syncthreads();  // publishes the barrier initialisation (build_block_union ends with a barrier)
  else
    num_union = build_block_union<kThreads, kMaskWords>(su, p.topk, p.topk_s0, p.topk_s1, p.topk_k, p.union_cap, g,
                                                         q_begin, lq, lk, B, i_first, i_last, local_last);
  ChunkWalk walk{dense ? nullptr : su.blocks, B, B / kKeys, 0};
  if (num_union > 0) {
    const int64_t last_parts = (p_last - rules::block_begin(walk.block_at(num_union - 1), B)) / kKeys + 1;
    walk.num_iters = (num_union - 1) * walk.parts_per_block +
                     int(last_parts < walk.parts_per_block ? last_parts : walk.parts_per_block);
  }
  const int num_iters = walk.num_iters;

  if (wg == 0) {
    // ---- Producer: one thread issues every TMA box; the rest of the warpgroup is done.
    cutlass::arch::warpgroup_reg_dealloc<kProducerRegs>();
    if (tid == 0) {
      const uint64_t hint = uint64_t(TMA::CacheHintSm90::EVICT_NORMAL);
      for (int it = 0; it < num_iters; ++it) {
        const int s = it % kStages;
        const int32_t row = int32_t(k_begin + walk.key_start<kKeys>(it));
        if (it >= kStages) Barrier::wait(&empty_k[s], ((it / kStages) + 1) & 1);
        TxBarrier::arrive_and_expect_tx(&full_k[s], uint32_t(Sm::kStageBytes));
#pragma unroll
        for (int dh = 0; dh < D / kBoxElems; ++dh)
          SM90_TMA_LOAD_3D::copy(&tp.k_map, &full_k[s], hint, pK + s * (kKeys * D) + dh * (kKeys * kBoxElems),
                                 dh * kBoxElems, g, row);
        if (it >= kStages) Barrier::wait(&empty_v[s], ((it / kStages) + 1) & 1);
        TxBarrier::arrive_and_expect_tx(&full_v[s], uint32_t(Sm::kStageBytes));
#pragma unroll
        for (int dh = 0; dh < D / kBoxElems; ++dh)
          SM90_TMA_LOAD_3D::copy(&tp.v_map, &full_v[s], hint, pV + s * (kKeys * D) + dh * (kKeys * kBoxElems),
                                 dh * kBoxElems, g, row);
      }
    }
    return;
  }

  // ---- Consumers.
  cutlass::arch::warpgroup_reg_alloc<kConsumerRegs>();
  typename Mm::S mma_s;
  typename Mm::O mma_o;
  auto thr_s = mma_s.get_thread_slice(tid);
  auto thr_o = mma_o.get_thread_slice(tid);
  Tensor sK = make_tensor(make_smem_ptr(pK), typename Sm::LayoutK{});  // (key, d, stage)
  Tensor sV = make_tensor(make_smem_ptr(pV), typename Sm::LayoutV{});  // (d, key, stage)
  Tensor tSrQ = thr_s.partition_fragment_A(sQ(_, _, cw));  // (MMA, 1, D/16) descriptors
  Tensor tSrK = thr_s.partition_fragment_B(sK);            // (MMA, 1, D/16, stage)
  Tensor tOrV = thr_o.partition_fragment_B(sV);            // (MMA, 1, kKeys/16, stage)
  Tensor tSrS = partition_fragment_C(mma_s, Shape<_64, Int<kKeys>>{});
  Tensor tOrO = partition_fragment_C(mma_o, Shape<_64, Int<D>>{});
  Tensor tOrP = make_tensor<E>(partition_shape_A(mma_o, Shape<_64, Int<kKeys>>{}));
  static_assert(decltype(size(tSrS))::value == kKeys / 2 && decltype(size(tOrP))::value == kKeys / 2 &&
                    decltype(size(tOrO))::value == D / 2,
                "fragment sizes of the m64 layouts (attention_forward_wgmma.cuh describes them)");

  // This thread's two rows (16 (warp) + lane / 4, and 8 below): position (-1 = padding), query bit.
  const int row_a = 64 * cw + warp * 16 + (lane >> 2);
  int64_t pos[2];
  int qbit[2];
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const int64_t f = f0 + row_a + 8 * h;
    const bool valid = f < rows_total;
    pos[h] = valid ? rules::query_position(lq, lk, f / G) : -1;
    qbit[h] = valid ? int(f / G - i_first) : 0;
  }

  // Q visible to the async proxy, for the whole warpgroup.
  mma::cp_async_wait<0>();
  wgmma::fence_async_shared();
  cutlass::arch::NamedBarrier::arrive_and_wait(128, 1 + cw);

  clear(tOrO);
  float m_run[2] = {-INFINITY, -INFINITY}, l_run[2] = {0.f, 0.f};

  // Mask (unselected rows, causal tail, keys past the sequence) and online softmax of chunk `it` in
  // tSrS (scores stay raw; exp2 with the scale folded in); alpha[h]: the factor O must be rescaled by
  // before P of this chunk is added.
  auto softmax_chunk = [&](int it, float (&alpha)[2]) {
    const int64_t ks = walk.key_start<kKeys>(it);
    const int u = it / walk.parts_per_block;
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const bool row_sel =
          dense || ((su.mask[u * kMaskWords + (qbit[h] >> 6)] >> (qbit[h] & 63)) & 1ull);
      const int64_t lim = row_sel ? pos[h] - ks : -1;  // last visible key offset in this chunk
      if (lim < kKeys - 1) {
#pragma unroll
        for (int n = 0; n < kKeys / 8; ++n) {
#pragma unroll
          for (int j = 0; j < 2; ++j) {
            const int key = n * 8 + (lane & 3) * 2 + j;
            if (key > lim) tSrS(j + 2 * h + 4 * n) = -INFINITY;
          }
        }
      }
    }
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      float mx = m_run[h];
#pragma unroll
      for (int n = 0; n < kKeys / 8; ++n) mx = fmaxf(mx, fmaxf(tSrS(2 * h + 4 * n), tSrS(1 + 2 * h + 4 * n)));
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
      const float m_scaled = mx == -INFINITY ? 0.f : mx * p.scale_log2;
      alpha[h] = wgmma::exp2_ftz(m_run[h] * p.scale_log2 - m_scaled);
      m_run[h] = mx;
      float sum = 0.f;
#pragma unroll
      for (int n = 0; n < kKeys / 8; ++n) {
#pragma unroll
        for (int j = 0; j < 2; ++j) {
          const float e = wgmma::exp2_ftz(fmaf(tSrS(j + 2 * h + 4 * n), p.scale_log2, -m_scaled));
          tSrS(j + 2 * h + 4 * n) = e;
          sum += e;
        }
      }
      l_run[h] = l_run[h] * alpha[h] + sum;
    }
  };
  auto to_p = [&] {
#pragma unroll
    for (int e = 0; e < size(tSrS); ++e) tOrP(e) = static_cast<E>(tSrS(e));
  };
  auto wait_full = [&](uint64_t* bars, int it) { Barrier::wait(&bars[it % kStages], (it / kStages) & 1); };
  // Each warp releases a stage after its own wait for the products that read it.
  auto release = [&](uint64_t* bars, int it) {
    __syncwarp();
    if (lane == 0) Barrier::arrive(&bars[it % kStages]);
  };

  // The queries of this warpgroup's rows as bits of the tile's query masks, and its last position:
  // a chunk none of them selected (or wholly after their causal limit) is skipped by this warpgroup,
  // which only waits for the stage and releases it (the other warpgroup may use it). A pending P V is
  // added before a skip, so a warpgroup never holds a V stage across another chunk's wait.
  unsigned long long wg_bits[kMaskWords] = {0ull, 0ull};
  int64_t wg_p_last = -1;
  if (f0 + 64 * cw < rows_total) {
    const int64_t f_last = f0 + 64 * cw + 63 < rows_total ? f0 + 64 * cw + 63 : rows_total - 1;
    const int qa = int((f0 + 64 * cw) / G - i_first), qb = int(f_last / G - i_first);
#pragma unroll
    for (int w = 0; w < kMaskWords; ++w) {
      const int lo = qa > 64 * w ? qa - 64 * w : 0, hi = qb < 64 * w + 63 ? qb - 64 * w : 63;
      if (lo <= hi) wg_bits[w] = (hi - lo == 63 ? ~0ull : ((1ull << (hi - lo + 1)) - 1ull)) << lo;
    }
    wg_p_last = rules::query_position(lq, lk, f_last / G);
  }
  auto wg_uses = [&](int it) {
    if (walk.key_start<kKeys>(it) > wg_p_last) return false;
    if (dense) return true;
    const int u = it / walk.parts_per_block;
    return ((su.mask[u * kMaskWords] & wg_bits[0]) | (su.mask[u * kMaskWords + 1] & wg_bits[1])) != 0ull;
  };
  auto rescale_o = [&](const float (&alpha)[2]) {
#pragma unroll
    for (int n = 0; n < D / 8; ++n) {
      tOrO(4 * n) *= alpha[0];
      tOrO(1 + 4 * n) *= alpha[0];
      tOrO(2 + 4 * n) *= alpha[1];
      tOrO(3 + 4 * n) *= alpha[1];
    }
  };
  auto add_pv = [&](int c) {
    wait_full(full_v, c);
    wgmma::issue_o(mma_o, tOrP, tOrV(_, _, _, c % kStages), tOrO);
    warpgroup_wait<0>();
    warpgroup_fence_operand(tOrO);
    release(empty_v, c);
  };

  int prev = -1;  // the chunk whose P V is still to be added
  for (int it = 0; it < num_iters; ++it) {
    if (!wg_uses(it)) {
      if (prev >= 0) add_pv(prev);
      prev = -1;
      wait_full(full_k, it);
      release(empty_k, it);
      wait_full(full_v, it);
      release(empty_v, it);
      continue;
    }
    float alpha[2];
    wait_full(full_k, it);
    wgmma::issue_s(mma_s, tSrQ, tSrK(_, _, _, it % kStages), tSrS);
    if (prev >= 0) {
      wait_full(full_v, prev);
      wgmma::issue_o(mma_o, tOrP, tOrV(_, _, _, prev % kStages), tOrO);
      warpgroup_wait<1>();  // S_it is ready; P_prev V_prev may still run
    } else {
      warpgroup_wait<0>();
    }
    warpgroup_fence_operand(tSrS);
    release(empty_k, it);
    softmax_chunk(it, alpha);
    // ptxas hoists a wgmma wait to the top of its basic block, so the wait for P V sits behind a
    // branch on the softmax's result (the rescale, skipped when no row's maximum moved; uniform per
    // warp, as wait_group in a branch requires).
    warpgroup_fence_operand(tSrS);
    warpgroup_fence_operand(alpha[0]);
    warpgroup_fence_operand(alpha[1]);
    if (__any_sync(0xffffffffu, alpha[0] != 1.f || alpha[1] != 1.f)) {
      warpgroup_wait<0>();
      warpgroup_fence_operand(tOrO);
      rescale_o(alpha);
    }
    warpgroup_wait<0>();
    warpgroup_fence_operand(tOrO);
    if (prev >= 0) release(empty_v, prev);
    to_p();
    prev = it;
  }
  if (prev >= 0) add_pv(prev);

  // Epilogue: normalize and store. A row that saw no key (only with malformed topk rows) gets
  // out = 0 and lse = -inf.
  T* out = static_cast<T*>(p.out);
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    float l = l_run[h];
    l += __shfl_xor_sync(0xffffffffu, l, 1);
    l += __shfl_xor_sync(0xffffffffu, l, 2);
    if (pos[h] < 0) continue;
    const int64_t f = f0 + row_a + 8 * h;
    const int64_t row = q_begin + f / G;
    const int64_t head = int64_t(g) * G + f % G;
    const float inv = l > 0.f ? 1.f / l : 0.f;
    T* dst = out + row * p.o_s0 + head * p.o_s1 + (lane & 3) * 2;
#pragma unroll
    for (int n = 0; n < D / 8; ++n) {
      const uint32_t packed = mma::Elem<T>::pack(tOrO(2 * h + 4 * n) * inv, tOrO(1 + 2 * h + 4 * n) * inv);
      *reinterpret_cast<uint32_t*>(dst + n * 8) = packed;
    }
    if ((lane & 3) == 0)
      p.lse[row * p.lse_s0 + head * p.lse_s1] = l > 0.f ? m_run[h] * p.scale + logf(l) : -INFINITY;
  }
}

}  // namespace tma
}  // namespace cuda
}  // namespace detail
}  // namespace msa
