// Block-sparse (and dense causal) attention forward on Hopper: persistent, warp-specialised CTAs
// (one per SM) in the manner of FlashAttention-3. Same contract and tile walk as the other forward
// kernels (attention_forward_kernel.cuh): a tile is 128 rows = (query, head) pairs of ONE GQA group
// flattened query-major (8 queries at G = 16), its keys the sorted union of its queries' blocks
// (attention_block_union.cuh), masked per row to the blocks its query selected and to the causal
// limit.
//
// Roles (three warpgroups):
//  - the producer (one thread): for each tile, loads its Q rows (TMA boxes) and its block union (a
//    bulk copy of the record tile_unions_kernel built in the workspace) into one of two tile slots,
//    then streams its 128-key (or 64-key) K and V chunks with the tensor-memory accelerator (TMA)
//    into a ring of shared-memory stages guarded by mbarriers. It runs ahead of the consumers, so a
//    tile's setup (Q, union, first loads) lands while the previous tile is still computing;
//  - two consumer warpgroups: wgmma products and the online softmax; warpgroup w owns rows
//    64 w .. 64 w + 63 of each tile, writes them out and moves on to the next tile.
//
// Why (measured on the H200, docs/benchmarks.md): the 64-row kernels load each K/V chunk for 64
// rows and run at ~130 useful TFLOP/s; here two warpgroups share one K/V stream, the loads leave the
// compute warps, and a non-persistent version of this kernel spent ~9 us per tile (about a third of a
// sparse tile) on setup with nothing to overlap it (one 200 KB CTA per SM).
//
// Consumer order (as attention_forward_wgmma.cuh): S = Q K^T with Q and K in shared memory (SS), the
// previous chunk's O += P V with P in registers (RS) issued behind it, so the softmax overlaps that
// product. A warpgroup skips the chunks that none of its own queries selected (4 queries at G = 16),
// so only the union of 4 queries' selections costs products while the loads serve the union of 8.
// Each warp releases a stage (an arrive on its "empty" mbarrier) once its products that read the
// stage are complete, or at once for a skipped chunk; the issuer refills a stage when all 8 consumer
// warps released it.
//
// Shared-memory layouts: Q (row, d, warpgroup) and K (key, d, stage) K-major, V (d, key, stage)
// MN-major, all 128-byte swizzled CuTe GMMA atoms. A TMA box is 64 elements (128 bytes) of D by the
// chunk's keys, written with the 128-byte swizzle, which is the byte placement of those layouts when
// the atoms are tiled keys-first (tests/cuda/test_attention_tma_layout.cu checks every element).
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
#include "msa/rules.h"

namespace msa {
namespace detail {
namespace cuda {
namespace tma {

constexpr int kConsumers = 2;                     // consumer warpgroups
constexpr int kTileRows = 64 * kConsumers;        // rows of a tile
constexpr int kThreads = 128 * (kConsumers + 1);  // + the producer warpgroup
constexpr int kMaskWords = 2;                     // a tile spans at most 128 queries (G = 1)
constexpr int kBoxElems = 64;                     // elements of D per TMA box: one 128-byte swizzle row
constexpr int kTileSlots = 2;                     // Q / union buffers: the next tile's fill during this one
constexpr int kTurnBarrier = 1;                   // named barriers 1, 2: the consumers' turns
// Registers after the split (setmaxnreg): the producer warpgroup needs few, the consumers hold S, O, P.
constexpr int kProducerRegs = 40;
constexpr int kConsumerRegs = 232;
static_assert(128 * kProducerRegs + 128 * kConsumers * kConsumerRegs <= 65536, "register file of one SM");

struct TmaAttentionParams {
  AttentionParams a;
  CUtensorMap k_map;  // (d, kv head, key row) of k
  CUtensorMap v_map;  // the same of v
  CUtensorMap q_map;  // (d, q head, query row) of q, boxes of 64 rows (64 / G queries, or 64 heads)
  int tiles_x;        // row tiles of the longest sequence
  int num_kv_heads;
  int batch;
  int num_tiles;      // tiles_x * num_kv_heads * batch; CTA i takes tiles i, i + gridDim.x, ...
  const unsigned char* unions;  // sparse: each tile's union record (tile_unions_kernel)
  int64_t records_per_group;
  int record_bytes;
  int pingpong;  // consumers take turns issuing their products (MSA_TMA_PINGPONG=0: off)
};

// A tile's union as tile_unions_kernel writes it to the workspace and the producer copies it to
// shared memory: the first three arrays of BlockUnionSmem's layout (count, masks, blocks), so the consumers
// and the issuer read it through BlockUnionSmem. Records are indexed per group by
// floor(q_begin * G / 128) + b + x for row tile x of sequence b: injective (a sequence's tiles end
// before the next sequence's first index) and below floor(total_q * G / 128) + batch.
__host__ __device__ inline int union_record_bytes(int union_cap) {
  return (16 + union_cap * 8 * kMaskWords + union_cap * 4 + 15) / 16 * 16;
}
inline int64_t union_records_per_group(int64_t total_q, int group_size, int batch) {
  return total_q * group_size / kTileRows + batch;
}
__host__ __device__ inline int64_t union_record_index(int64_t q_begin, int group_size, int b, int64_t x, int g,
                                                      int64_t records_per_group) {
  return int64_t(g) * records_per_group + q_begin * group_size / kTileRows + b + x;
}

// Shared memory of the TMA kernels: kTileSlots tile slots of kTileTensors row tiles each (the
// forward: Q; the dQ kernel: Q and dO), the K and V rings, their mbarriers, then the slots' union
// records.
template <class E, int D, int kKeys, int kTileTensors = 1, int kMaxStages = 4>
struct TmaSmem {
  static constexpr int kTensors = kTileTensors;
  static constexpr int kQBytes = kTileRows * D * 2;  // one row tile of a slot
  static constexpr int kSlotBytes = kTileTensors * kQBytes;
  static constexpr int kStageBytes = kKeys * D * 2;  // one K (or one V) tile
  // As many stages as fit in 128 KB per ring pair (2 at D = kKeys = 128), at most kMaxStages.
  static constexpr int kStages = (65536 / kStageBytes) < kMaxStages ? (65536 / kStageBytes) : kMaxStages;
  static_assert(kStages >= 2, "double buffering at least");
  using LayoutQ = decltype(cute::tile_to_shape(cute::GMMA::Layout_K_SW128_Atom<E>{},
                                               cute::Shape<cute::_64, cute::Int<D>, cute::Int<kConsumers>>{}));
  // Atoms tiled keys-first (the default order for K, the explicit step for V), so that each 64-wide
  // slice of D is one contiguous [keys][64] box as TMA writes it. Both views describe the same bytes
  // of a [keys][D] tile: K-major (K of S = Q K^T, V of dP = dO V^T) and MN-major (V of O = P V, K of
  // dQ = dS K).
  using LayoutK = decltype(cute::tile_to_shape(cute::GMMA::Layout_K_SW128_Atom<E>{},
                                               cute::Shape<cute::Int<kKeys>, cute::Int<D>, cute::Int<kStages>>{}));
  using LayoutV = decltype(cute::tile_to_shape(cute::GMMA::Layout_MN_SW128_Atom<E>{},
                                               cute::Shape<cute::Int<D>, cute::Int<kKeys>, cute::Int<kStages>>{},
                                               cute::Step<cute::_2, cute::_1, cute::_3>{}));
  static constexpr std::size_t kAlign = 1024;  // the 128-byte swizzle repeats every 1024 bytes
  static constexpr std::size_t kKOffset = std::size_t(kTileSlots) * kSlotBytes;
  static constexpr std::size_t kVOffset = kKOffset + std::size_t(kStages) * kStageBytes;
  static constexpr std::size_t kBarrierOffset = kVOffset + std::size_t(kStages) * kStageBytes;
  static constexpr std::size_t kBarrierBytes = (4 * kStages + 2 * kTileSlots) * sizeof(uint64_t);
  static constexpr std::size_t kUnionOffset = kBarrierOffset + kBarrierBytes;
  static_assert(int(cute::cosize_v<LayoutQ>) * 2 == kQBytes, "Q layout is dense");
  static_assert(int(cute::cosize_v<LayoutK>) * 2 == kStages * kStageBytes, "K layout is dense");
  static_assert(int(cute::cosize_v<LayoutV>) * 2 == kStages * kStageBytes, "V layout is dense");
  static std::size_t bytes(int record_bytes) { return kAlign + kUnionOffset + kTileSlots * std::size_t(record_bytes); }
};

// The regions and mbarriers of TmaSmem carved from a kernel's dynamic shared memory.
template <class Sm, class E>
struct TmaShared {
  unsigned char* base;
  E* k;
  E* v;
  uint64_t* full_k;
  uint64_t* full_v;
  uint64_t* empty_k;
  uint64_t* empty_v;
  uint64_t* tile_ready;  // [slot]: row tiles copied and union loaded
  uint64_t* tile_free;   // [slot]: the consumers are done with them
  int record_bytes;
  __device__ TmaShared(unsigned char* raw, int record_bytes_) : record_bytes(record_bytes_) {
    base = reinterpret_cast<unsigned char*>((reinterpret_cast<uintptr_t>(raw) + Sm::kAlign - 1) &
                                            ~uintptr_t(Sm::kAlign - 1));
    k = reinterpret_cast<E*>(base + Sm::kKOffset);
    v = reinterpret_cast<E*>(base + Sm::kVOffset);
    full_k = reinterpret_cast<uint64_t*>(base + Sm::kBarrierOffset);
    full_v = full_k + Sm::kStages;
    empty_k = full_v + Sm::kStages;
    empty_v = empty_k + Sm::kStages;
    tile_ready = empty_v + Sm::kStages;
    tile_free = tile_ready + kTileSlots;
  }
  // Row tile `tensor` (0: Q, 1: dO) of a slot.
  __device__ E* rows_of(int slot, int tensor = 0) const {
    return reinterpret_cast<E*>(base + slot * Sm::kSlotBytes + tensor * Sm::kQBytes);
  }
  __device__ unsigned char* record_of(int slot) const {
    return base + Sm::kUnionOffset + slot * std::size_t(record_bytes);
  }
  __device__ BlockUnionSmem<kMaskWords> union_of(int slot, const AttentionParams& p) const {
    return BlockUnionSmem<kMaskWords>::carve(record_of(slot), p.bitmap_words, p.union_cap);
  }
  // Barrier counts: one arrival (with the transaction bytes) fills a stage or a slot; each of the
  // 8 consumer warps releases it.
  __device__ void init() const {
    using Barrier = cutlass::arch::ClusterBarrier;
    for (int s = 0; s < Sm::kStages; ++s) {
      Barrier::init(&full_k[s], 1);
      Barrier::init(&full_v[s], 1);
      Barrier::init(&empty_k[s], kConsumers * 4);
      Barrier::init(&empty_v[s], kConsumers * 4);
    }
    for (int s = 0; s < kTileSlots; ++s) {
      Barrier::init(&tile_ready[s], 1);
      Barrier::init(&tile_free[s], kConsumers * 4);
    }
    cutlass::arch::fence_barrier_init();
  }
};

// S = Q K^T with both operands in shared memory (SS); O += P V as in the wgmma kernel (RS).
template <class E, int D, int kKeys>
struct TmaMmas {
  using S = decltype(cute::make_tiled_mma(
      cute::GMMA::ss_op_selector<E, E, float, cute::Shape<cute::_64, cute::Int<kKeys>, cute::Int<D>>,
                                 cute::GMMA::Major::K, cute::GMMA::Major::K>()));
  using O = wgmma::PvMma<E, D, kKeys>;
};

// One tile of the persistent walk: linear index t runs over (row tile, group, sequence) with the
// row tiles latest first (the longest under causal masking start first; the CTAs stride over t).
// Every role evaluates it the same way; false for tiles past their sequence's rows.
struct Tile {
  // 32-bit throughout (the host requires rows of a sequence and the tile count below 2^31): the
  // producer warps run with few registers, and a 64-bit division is a subroutine call.
  int b, g, x, q_begin, lq, k_begin, lk, rows_total, f0, i_first, i_last, p_last, local_last;
  __device__ bool at(const AttentionParams& p, int t, int tiles_x, int num_kv_heads, int batch) {
    return at(p, tiles_x - 1 - t / (batch * num_kv_heads), (t / batch) % num_kv_heads, t % batch);
  }
  // Row tile x_ of group g_ of sequence b_ (tile_unions_kernel's grid names tiles so).
  __device__ bool at(const AttentionParams& p, int x_, int g_, int b_) {
    x = x_;
    g = g_;
    b = b_;
    q_begin = p.cu_q[b];
    lq = p.cu_q[b + 1] - q_begin;
    k_begin = p.cu_k[b];
    lk = p.cu_k[b + 1] - k_begin;
    rows_total = lq * p.group_size;
    f0 = x * kTileRows;
    if (f0 >= rows_total) return false;
    i_first = f0 / p.group_size;
    i_last = (f0 + kTileRows - 1 < rows_total ? f0 + kTileRows - 1 : rows_total - 1) / p.group_size;
    p_last = int(rules::query_position(lq, lk, i_last));
    local_last = rules::local_block(p_last, p.block_size);
    return true;
  }
};

// The chunks a tile walks: every kKeys-key part of each union block, except parts past the tile's
// last position. The producer and both consumers evaluate the same walk.
template <int kKeys>
struct ChunkWalk {
  const int* blocks;  // nullptr: dense (block u is u)
  int block_size;
  int parts_per_block;
  int num_iters;
  __device__ ChunkWalk(const int* blocks_, int num_union, const Tile& tile, int block_size_)
      : blocks(blocks_), block_size(block_size_), parts_per_block(block_size_ / kKeys), num_iters(0) {
    if (num_union > 0) {
      const int last_parts = (tile.p_last - rules::block_begin(block_at(num_union - 1), block_size)) / kKeys + 1;
      num_iters = (num_union - 1) * parts_per_block + int(last_parts < parts_per_block ? last_parts : parts_per_block);
    }
  }
  __device__ int block_at(int u) const { return blocks ? blocks[u] : u; }
  __device__ int key_start(int it) const {
    return rules::block_begin(block_at(it / parts_per_block), block_size) + (it % parts_per_block) * kKeys;
  }
};

// The rows a consumer warpgroup owns in a tile (64 cw .. 64 cw + 63): this thread's two rows
// (row_a and row_a + 8: position, -1 for padding, and query bit in the tile's masks) and the
// warpgroup's queries as mask bits with their last position. A chunk none of those queries selected
// (or wholly after their causal limit) is skipped by the warpgroup.
struct WarpgroupRows {
  int pos[2];
  int qbit[2];
  unsigned long long bits[kMaskWords] = {0ull, 0ull};
  int p_last = -1;
  __device__ WarpgroupRows(const Tile& tile, int G, int cw, int row_a) {
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int f = tile.f0 + row_a + 8 * h;
      const bool valid = f < tile.rows_total;
      pos[h] = valid ? int(rules::query_position(tile.lq, tile.lk, f / G)) : -1;
      qbit[h] = valid ? int(f / G - tile.i_first) : 0;
    }
    if (tile.f0 + 64 * cw < tile.rows_total) {
      const int f_last = tile.f0 + 64 * cw + 63 < tile.rows_total ? tile.f0 + 64 * cw + 63 : tile.rows_total - 1;
      const int qa = int((tile.f0 + 64 * cw) / G - tile.i_first), qb = int(f_last / G - tile.i_first);
#pragma unroll
      for (int w = 0; w < kMaskWords; ++w) {
        const int lo = qa > 64 * w ? qa - 64 * w : 0, hi = qb < 64 * w + 63 ? qb - 64 * w : 63;
        if (lo <= hi) bits[w] = (hi - lo == 63 ? ~0ull : ((1ull << (hi - lo + 1)) - 1ull)) << lo;
      }
      p_last = int(rules::query_position(tile.lq, tile.lk, f_last / G));
    }
  }
  template <int kKeys>
  __device__ bool uses(int it, const ChunkWalk<kKeys>& walk, const BlockUnionSmem<kMaskWords>& su, bool dense) const {
    if (walk.key_start(it) > p_last) return false;
    if (dense) return true;
    const int u = it / walk.parts_per_block;
    return ((su.mask[u * kMaskWords] & bits[0]) | (su.mask[u * kMaskWords + 1] & bits[1])) != 0ull;
  }
  // lim[h]: the last key offset of chunk `it` that row h sees (-1: its query did not select the
  // block, or padding). True when both rows see the whole chunk (no mask needed).
  template <int kKeys>
  __device__ bool limits(int it, const ChunkWalk<kKeys>& walk, const BlockUnionSmem<kMaskWords>& su, bool dense,
                         int64_t (&lim)[2]) const {
    const int ks = walk.key_start(it);
    const int u = it / walk.parts_per_block;
    bool full = true;
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const bool row_sel = dense || ((su.mask[u * kMaskWords + (qbit[h] >> 6)] >> (qbit[h] & 63)) & 1ull);
      lim[h] = row_sel ? pos[h] - ks : -1;
      full = full && lim[h] >= kKeys - 1;
    }
    return full;
  }
};

// The consumers' side of the TMA kernels' synchronisation: waits on a stage's "full" mbarrier,
// per-warp releases (lane 0 arrives, predicated rather than branched around: a branch ptxas cannot
// prove warp-uniform, taken while a wgmma product is in flight, makes it serialize every wgmma,
// C7518), and the ping-pong turns (FlashAttention-3): the two consumer warpgroups take turns issuing
// their products, so one's softmax runs while the other's products occupy the tensor cores. Every
// chunk, computed or skipped, is one turn of each warpgroup, so the turns stay paired; begin() has
// warpgroup 1 hand warpgroup 0 the first turn, end() has warpgroup 0 take the one left over.
template <int kStages>
struct ConsumerSync {
  int cw, lane;
  bool pingpong;
  __device__ void wait_full(uint64_t* bars, int c) const {
    cutlass::arch::ClusterBarrier::wait(&bars[c % kStages], (c / kStages) & 1);
  }
  __device__ void release(uint64_t* bar) const {
    __syncwarp();
    asm volatile(
        "{\n .reg .pred p;\n setp.eq.u32 p, %1, 0;\n @p mbarrier.arrive.shared::cta.b64 _, [%0];\n}\n" ::"r"(
            cute::cast_smem_ptr_to_uint(bar)),
        "r"(lane)
        : "memory");
  }
  __device__ void turn_wait() const {
    if (pingpong) asm volatile("bar.sync %0, 256;\n" ::"r"(kTurnBarrier + cw) : "memory");
  }
  __device__ void turn_pass() const {
    if (pingpong) asm volatile("bar.arrive %0, 256;\n" ::"r"(kTurnBarrier + 1 - cw) : "memory");
  }
  __device__ void begin() const {
    if (pingpong && cw == 1) asm volatile("bar.arrive %0, 256;\n" ::"r"(kTurnBarrier) : "memory");
  }
  __device__ void end() const {
    if (pingpong && cw == 0) asm volatile("bar.sync %0, 256;\n" ::"r"(kTurnBarrier) : "memory");
  }
};

// The producer of the TMA kernels, one thread: for each of the CTA's tiles, loads its row tiles
// (Q, and for the dQ kernel dO, from `row_maps`) and its union record (a bulk copy of the record
// tile_unions_kernel built in the workspace) into one of two tile slots, then streams the tile's K
// and V chunks into the stage rings once the consumers released each stage's previous use. It runs
// ahead of the consumers, so a tile's setup lands while the previous tile still computes.
template <class Sm, class E, int D, int kKeys>
__device__ void run_producer(const TmaAttentionParams& tp, const CUtensorMap* const (&row_maps)[Sm::kTensors],
                             const TmaShared<Sm, E>& sh) {
  using Barrier = cutlass::arch::ClusterBarrier;
  using TxBarrier = cutlass::arch::ClusterTransactionBarrier;
  constexpr int kStages = Sm::kStages;
  const AttentionParams& p = tp.a;
  const int G = p.group_size, B = p.block_size;
  const bool dense = p.topk == nullptr;
  const uint64_t hint = uint64_t(cute::TMA::CacheHintSm90::EVICT_NORMAL);
  int c = 0;  // chunks issued so far, over all tiles
  int j = 0;  // tiles so far
  Tile tile;
  for (int t = blockIdx.x; t < tp.num_tiles; t += gridDim.x) {
    if (!tile.at(p, t, tp.tiles_x, tp.num_kv_heads, tp.batch)) continue;
    const int slot = j % kTileSlots;
    if (j >= kTileSlots) Barrier::wait(&sh.tile_free[slot], ((j / kTileSlots) + 1) & 1);
    TxBarrier::arrive_and_expect_tx(&sh.tile_ready[slot], uint32_t(Sm::kSlotBytes + (dense ? 0 : tp.record_bytes)));
#pragma unroll
    for (int r = 0; r < Sm::kTensors; ++r) {
      E* dst = sh.rows_of(slot, r);
#pragma unroll
      for (int w = 0; w < kConsumers; ++w) {
        const int row0 = tile.f0 + 64 * w;  // a box: 64 rows of the tile, (query, head) major
        const int head0 = tile.g * G + (G > 64 ? row0 % G : 0);
#pragma unroll
        for (int dh = 0; dh < D / kBoxElems; ++dh)
          cute::SM90_TMA_LOAD_3D::copy(row_maps[r], &sh.tile_ready[slot], hint,
                                       dst + w * (64 * D) + dh * (64 * kBoxElems), dh * kBoxElems, head0,
                                       tile.q_begin + row0 / G);
      }
    }
    if (!dense)
      cute::SM90_BULK_COPY_G2S::copy(
          tp.unions + union_record_index(tile.q_begin, G, tile.b, tile.x, tile.g, tp.records_per_group) *
                          tp.record_bytes,
          &sh.tile_ready[slot], sh.record_of(slot), tp.record_bytes);
    Barrier::wait(&sh.tile_ready[slot], (j / kTileSlots) & 1);  // the union is read below
    const BlockUnionSmem<kMaskWords> su = sh.union_of(slot, p);
    const ChunkWalk<kKeys> walk(dense ? nullptr : su.blocks, dense ? tile.local_last + 1 : *su.count, tile, B);
    // Chunk c's K (or V) rows into its stage, once the consumers released the stage's last use.
    auto load_chunk = [&](const CUtensorMap* map, uint64_t* full, uint64_t* empty, E* ring, int row) {
      const int s = c % kStages;
      if (c >= kStages) Barrier::wait(&empty[s], ((c / kStages) + 1) & 1);
      TxBarrier::arrive_and_expect_tx(&full[s], uint32_t(Sm::kStageBytes));
#pragma unroll
      for (int dh = 0; dh < D / kBoxElems; ++dh)
        cute::SM90_TMA_LOAD_3D::copy(map, &full[s], hint, ring + s * (kKeys * D) + dh * (kKeys * kBoxElems),
                                     dh * kBoxElems, tile.g, row);
    };
    for (int it = 0; it < walk.num_iters; ++it, ++c) {
      const int row = tile.k_begin + walk.key_start(it);
      load_chunk(&tp.k_map, sh.full_k, sh.empty_k, sh.k, row);
      load_chunk(&tp.v_map, sh.full_v, sh.empty_v, sh.v, row);
    }
    ++j;
  }
}

template <class T, int D, int kKeys>
__global__ void __launch_bounds__(kThreads, 1)
    attention_forward_tma_kernel(const __grid_constant__ TmaAttentionParams tp) {
  using namespace cute;
  using E = typename wgmma::CuteElem<T>::type;
  using Sm = TmaSmem<E, D, kKeys>;
  using Mm = TmaMmas<E, D, kKeys>;
  using Barrier = cutlass::arch::ClusterBarrier;
  constexpr int kStages = Sm::kStages;
  const AttentionParams& p = tp.a;
  const int batch = tp.batch, num_kv_heads = tp.num_kv_heads;

  extern __shared__ __align__(128) unsigned char smem_raw[];
  const TmaShared<Sm, E> sh(smem_raw, tp.record_bytes);
  E* pK = sh.k;
  E* pV = sh.v;
  uint64_t* full_k = sh.full_k;
  uint64_t* full_v = sh.full_v;
  uint64_t* empty_k = sh.empty_k;
  uint64_t* empty_v = sh.empty_v;
  uint64_t* tile_ready = sh.tile_ready;
  uint64_t* tile_free = sh.tile_free;
  auto union_of = [&](int slot) { return sh.union_of(slot, p); };
  auto q_of = [&](int slot) { return sh.rows_of(slot); };

  const int wg = threadIdx.x / 128, tid = threadIdx.x % 128, lane = tid & 31, warp = tid >> 5;
  const int G = p.group_size, B = p.block_size;
  const bool dense = p.topk == nullptr;

  if (threadIdx.x == 0) sh.init();
  __syncthreads();
  if (wg == 0)
    cutlass::arch::warpgroup_reg_dealloc<kProducerRegs>();
  else
    cutlass::arch::warpgroup_reg_alloc<kConsumerRegs>();

  if (wg == 0) {
    // ---- Producer (run_producer); the rest of the warpgroup has nothing to do.
    if (threadIdx.x != 0) return;
    const CUtensorMap* const maps[1] = {&tp.q_map};
    run_producer<Sm, E, D, kKeys>(tp, maps, sh);
    return;
  }

  // ---- Consumers: warpgroup cw owns rows 64 cw .. 64 cw + 63 of every tile.
  const int cw = wg - 1;
  typename Mm::S mma_s;
  typename Mm::O mma_o;
  auto thr_s = mma_s.get_thread_slice(tid);
  auto thr_o = mma_o.get_thread_slice(tid);
  Tensor sK = make_tensor(make_smem_ptr(pK), typename Sm::LayoutK{});  // (key, d, stage)
  Tensor sV = make_tensor(make_smem_ptr(pV), typename Sm::LayoutV{});  // (d, key, stage)
  Tensor tSrK = thr_s.partition_fragment_B(sK);                        // (MMA, 1, D/16, stage)
  Tensor tOrV = thr_o.partition_fragment_B(sV);                        // (MMA, 1, kKeys/16, stage)
  Tensor tSrS = partition_fragment_C(mma_s, Shape<_64, Int<kKeys>>{});
  Tensor tOrO = partition_fragment_C(mma_o, Shape<_64, Int<D>>{});
  Tensor tOrP = make_tensor<E>(partition_shape_A(mma_o, Shape<_64, Int<kKeys>>{}));
  static_assert(decltype(size(tSrS))::value == kKeys / 2 && decltype(size(tOrP))::value == kKeys / 2 &&
                    decltype(size(tOrO))::value == D / 2,
                "fragment sizes of the m64 layouts (attention_forward_wgmma.cuh describes them)");
  const int row_a = 64 * cw + warp * 16 + (lane >> 2);  // this thread's rows: row_a and row_a + 8

  const ConsumerSync<kStages> sync{cw, lane, tp.pingpong != 0};
  auto to_p = [&] {
#pragma unroll
    for (int e = 0; e < size(tSrS); ++e) tOrP(e) = static_cast<E>(tSrS(e));
  };
  sync.begin();

  int c0 = 0;  // chunks consumed before this tile, over all tiles
  int j = 0;
  Tile tile;
  for (int t = blockIdx.x; t < tp.num_tiles; t += gridDim.x) {
    if (!tile.at(p, t, tp.tiles_x, num_kv_heads, batch)) continue;
    const int slot = j % kTileSlots;
    Barrier::wait(&tile_ready[slot], (j / kTileSlots) & 1);
    const BlockUnionSmem<kMaskWords> su = union_of(slot);
    const ChunkWalk<kKeys> walk(dense ? nullptr : su.blocks, dense ? int(tile.local_last + 1) : *su.count, tile, B);
    Tensor sQ = make_tensor(make_smem_ptr(q_of(slot)), typename Sm::LayoutQ{});
    Tensor tSrQ = thr_s.partition_fragment_A(sQ(_, _, cw));  // (MMA, 1, D/16) descriptors

    const WarpgroupRows rows(tile, G, cw, row_a);
    const int (&pos)[2] = rows.pos;
    auto wg_uses = [&](int it) { return rows.uses(it, walk, su, dense); };

    clear(tOrO);
    float m_run[2] = {-INFINITY, -INFINITY}, l_run[2] = {0.f, 0.f};
    // Mask (unselected rows, causal tail, keys past the sequence) and online softmax of chunk `it`
    // in tSrS (scores stay raw; exp2 with the scale folded in); alpha[h]: the factor O must be
    // rescaled by before P of this chunk is added.
    auto softmax_chunk = [&](int it, float (&alpha)[2]) {
      int64_t lim[2];
      if (!rows.limits(it, walk, su, dense, lim)) wgmma::mask_after<kKeys>(tSrS, lim, lane);
      wgmma::online_softmax<kKeys>(tSrS, m_run, l_run, alpha, p.scale_log2);
    };
    auto add_pv = [&](int c) {
      sync.wait_full(full_v, c);
      wgmma::issue_o(mma_o, tOrP, tOrV(_, _, _, c % kStages), tOrO);
      warpgroup_wait<0>();
      warpgroup_fence_operand(tOrO);
      sync.release(&empty_v[c % kStages]);
    };

    int prev = -1;  // the chunk (global count) whose P V is still to be added
    for (int it = 0; it < walk.num_iters; ++it) {
      const int c = c0 + it;
      sync.turn_wait();
      if (!wg_uses(it)) {
        if (prev >= 0) add_pv(prev);
        prev = -1;
        sync.turn_pass();
        sync.wait_full(full_k, c);
        sync.release(&empty_k[c % kStages]);
        sync.wait_full(full_v, c);
        sync.release(&empty_v[c % kStages]);
        continue;
      }
      float alpha[2];
      sync.wait_full(full_k, c);
      wgmma::issue_s(mma_s, tSrQ, tSrK(_, _, _, c % kStages), tSrS);
      if (prev >= 0) {
        sync.wait_full(full_v, prev);
        wgmma::issue_o(mma_o, tOrP, tOrV(_, _, _, prev % kStages), tOrO);
        sync.turn_pass();
        warpgroup_wait<1>();  // S is ready; the previous P V may still run
      } else {
        sync.turn_pass();
        warpgroup_wait<0>();
      }
      warpgroup_fence_operand(tSrS);
      sync.release(&empty_k[c % kStages]);
      softmax_chunk(it, alpha);
      // ptxas hoists a wgmma wait to the top of its basic block, so the wait for P V sits behind a
      // branch on the softmax's result (the rescale, skipped when no row's maximum moved; uniform
      // per warp, as wait_group in a branch requires).
      warpgroup_fence_operand(tSrS);
      warpgroup_fence_operand(alpha[0]);
      warpgroup_fence_operand(alpha[1]);
      if (__any_sync(0xffffffffu, alpha[0] != 1.f || alpha[1] != 1.f)) {
        warpgroup_wait<0>();
        warpgroup_fence_operand(tOrO);
        wgmma::rescale_rows<D>(tOrO, alpha);
      }
      warpgroup_wait<0>();
      warpgroup_fence_operand(tOrO);
      if (prev >= 0) sync.release(&empty_v[prev % kStages]);
      to_p();
      prev = c;
    }
    if (prev >= 0) add_pv(prev);
    c0 += walk.num_iters;
    sync.release(&tile_free[slot]);  // the union and Q of this tile are no longer read
    ++j;

    // Epilogue: normalise and store (the loads of the next tile are already in flight).
    T* out_row[2];
    float* lse_at[2];
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int f = tile.f0 + row_a + 8 * h;
      const int64_t row = tile.q_begin + f / G, head = int64_t(tile.g) * G + f % G;
      out_row[h] = pos[h] < 0 ? nullptr : static_cast<T*>(p.out) + row * p.o_s0 + head * p.o_s1;
      lse_at[h] = p.lse + row * p.lse_s0 + head * p.lse_s1;
    }
    wgmma::store_rows<T, D>(tOrO, m_run, l_run, out_row, lse_at, p.scale, lane);
  }
  sync.end();
}


// Builds every sparse tile's block union (attention_block_union.cuh) into its workspace record, so
// the forward's producer only copies it: one CTA of 128 threads per (row tile, group, sequence).
// (A template so that the header defines it in every translation unit without a clash.)
template <int kWords = kMaskWords>
__global__ void __launch_bounds__(128) tile_unions_kernel(const AttentionParams p, unsigned char* unions,
                                                          int64_t records_per_group, int record_bytes) {
  extern __shared__ __align__(16) unsigned char smem_union[];
  Tile tile;
  if (!tile.at(p, int(blockIdx.x), int(blockIdx.y), int(blockIdx.z))) return;
  const BlockUnionSmem<kWords> su = BlockUnionSmem<kWords>::carve(smem_union, p.bitmap_words, p.union_cap);
  build_block_union<128, kWords>(su, p.topk, p.topk_s0, p.topk_s1, p.topk_k, p.union_cap, tile.g, tile.q_begin,
                                 tile.lq, tile.lk, p.block_size, tile.i_first, tile.i_last, tile.local_last);
  int4* dst = reinterpret_cast<int4*>(
      unions + union_record_index(tile.q_begin, p.group_size, tile.b, tile.x, tile.g, records_per_group) * record_bytes);
  const int4* src = reinterpret_cast<const int4*>(smem_union);
  for (int i = threadIdx.x; i < record_bytes / 16; i += 128) dst[i] = src[i];
}

}  // namespace tma
}  // namespace cuda
}  // namespace detail
}  // namespace msa
