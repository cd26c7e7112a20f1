// Block-sparse (and dense causal) attention forward on Hopper warpgroup tensor-core products (wgmma,
// sm_90a). Same contract and tile walk as attention_forward_kernel.cuh (rows = (query, head) pairs of
// one GQA group, query-major; the CTA walks the sorted union of its queries' blocks, 64 keys at a
// time, masking per row the blocks its query did not select and the causal tail; online softmax in
// fp32), with 128-row tiles: two warpgroups of 64 rows share the K/V tiles.
//
// Shared memory holds Q (loaded once), and two stages of K and V, in the 128-byte swizzled layouts
// that wgmma reads through descriptors: K-major for Q and K (head dim contiguous), MN-major for V (so
// V as stored, [keys][D], is the B operand of P V without a transpose). S = Q K^T reads both operands
// from shared memory (SS); P goes from the S accumulators to 16-bit registers and O += P V takes it
// as the register A operand (RS).
//
// The loaders write every 16-byte chunk through the CuTe smem tensors (&sQ(row, d, ..)), never by
// evaluating the layout: the atom's Swizzle<3,4,3> acts on BYTE addresses (it is applied by the
// swizzle pointer that make_tensor builds), so layout(row, d) applied to an element offset is not the
// address wgmma's descriptor reads (that mistake made S = Q K^T wrong on the H100).
//
// Fragment layout relied on (checked on the host against CuTe's partitioning of these exact tiled
// MMAs, for every thread and element): in a 64 x N accumulator, thread t of the warpgroup holds
// element e = i + 2 h + 4 n at row 16 (t / 32) + (t % 32) / 4 + 8 h, column 8 n + 2 (t % 4) + i; the
// A-operand fragment of the 64 x 64 P (4 k-blocks of 16) has the same (row, column) at the same e,
// so P is the S accumulator converted element by element.
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
#include "msa/rules.h"

namespace msa {
namespace detail {
namespace cuda {
namespace wgmma {

constexpr int kWarpgroups = 2;
constexpr int kRows = 64 * kWarpgroups;  // rows of a CTA tile
constexpr int kKeys = 64;                // keys per pipeline stage
constexpr int kThreads = 128 * kWarpgroups;
constexpr int kMaskWords = kRows / 64;  // a tile spans at most kRows queries (G = 1)
static_assert(kKeys == kAttnKeys, "the host checks block sizes against kAttnKeys");

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
  // The 128-byte swizzle repeats every 1024 bytes: tiles start 1024-byte aligned.
  static constexpr std::size_t kAlign = 1024;
  static constexpr std::size_t kTileBytes = std::size_t(kQElems + kKElems + kVElems) * 2;
  static_assert((kQElems * 2) % kAlign == 0 && (kKElems * 2) % kAlign == 0, "tiles stay 1024-aligned");
  static std::size_t bytes(int bitmap_words, int union_cap) {
    return kAlign + kTileBytes + BlockUnionSmem<kMaskWords>::bytes(bitmap_words, union_cap);
  }
};

// The products of one warpgroup: S (64 x kKeys) = Q K^T from shared memory, O (64 x D) += P V with P
// in registers (bench/attention_wgmma_layout_check.cu checks the fragment layouts described above).
template <class E, int D>
struct Mmas {
  using S = decltype(cute::make_tiled_mma(
      cute::GMMA::ss_op_selector<E, E, float, cute::Shape<cute::_64, cute::Int<kKeys>, cute::Int<D>>,
                                 cute::GMMA::Major::K, cute::GMMA::Major::K>()));
  using O = decltype(cute::make_tiled_mma(
      cute::GMMA::rs_op_selector<E, E, float, cute::Shape<cute::_64, cute::Int<D>, cute::Int<kKeys>>,
                                 cute::GMMA::Major::K, cute::GMMA::Major::MN>()));
};

// S = Q K^T of one warpgroup over the whole head dim; `q` and `k` are this warpgroup's (MMA, 1, D/16)
// descriptor slices, `s` is overwritten (the first k-block scales the old accumulator by zero).
template <class Mma, class TQ, class TK, class TS>
__device__ __forceinline__ void product_s(Mma& mma, const TQ& q, const TK& k, TS& s) {
  using namespace cute;
  warpgroup_fence_operand(s);
  warpgroup_arrive();
  mma.accumulate_ = GMMA::ScaleOut::Zero;
#pragma unroll
  for (int kb = 0; kb < size<2>(q); ++kb) {
    cute::gemm(mma, q(_, _, kb), k(_, _, kb), s);
    mma.accumulate_ = GMMA::ScaleOut::One;
  }
  warpgroup_commit_batch();
  warpgroup_wait<0>();
  warpgroup_fence_operand(s);
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
  warpgroup_fence_operand(o);
  warpgroup_arrive();
  mma.accumulate_ = GMMA::ScaleOut::One;
#pragma unroll
  for (int kb = 0; kb < size<2>(p); ++kb) cute::gemm(mma, p(_, _, kb), v(_, _, kb), o);
  warpgroup_commit_batch();
  warpgroup_wait<0>();
  warpgroup_fence_operand(o);
  warpgroup_fence_operand(p);
}

// wgmma reads shared memory through the async proxy: make this thread's completed cp.async writes
// visible to it (the barrier that follows publishes them CTA-wide).
__device__ __forceinline__ void fence_async_shared() {
  asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
}

template <class T, int D>
__global__ void __launch_bounds__(kThreads, 1) attention_forward_wgmma_kernel(const AttentionParams p) {
  using namespace cute;
  using E = typename CuteElem<T>::type;
  using S = Smem<E, D>;
  extern __shared__ __align__(128) unsigned char smem_raw[];
  unsigned char* smem_base = reinterpret_cast<unsigned char*>(
      (reinterpret_cast<uintptr_t>(smem_raw) + S::kAlign - 1) & ~uintptr_t(S::kAlign - 1));
  E* pQ = reinterpret_cast<E*>(smem_base);
  E* pK = pQ + S::kQElems;
  E* pV = pK + S::kKElems;
  const BlockUnionSmem<kMaskWords> su =
      BlockUnionSmem<kMaskWords>::carve(smem_base + S::kTileBytes, p.bitmap_words, p.union_cap);

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int wg = tid / 128, wt = tid % 128;
  const int b = blockIdx.z, g = blockIdx.y;
  const int G = p.group_size, B = p.block_size;
  const int64_t q_begin = p.cu_q[b], lq = p.cu_q[b + 1] - q_begin;
  const int64_t k_begin = p.cu_k[b], lk = p.cu_k[b + 1] - k_begin;
  const int64_t rows_total = lq * G;
  // Longest tiles (latest queries) launch first: better tail balance under causal masking.
  const int64_t f0 = int64_t(gridDim.x - 1 - blockIdx.x) * kRows;
  if (f0 >= rows_total) return;
  const int64_t i_first = f0 / G;
  const int64_t i_last = (f0 + kRows - 1 < rows_total ? f0 + kRows - 1 : rows_total - 1) / G;
  const int64_t p_first = rules::query_position(lq, lk, i_first);
  const int64_t p_last = rules::query_position(lq, lk, i_last);
  const int64_t local_last = rules::local_block(p_last, B);
  const bool dense = p.topk == nullptr;
  const bool partial_tile = f0 + kRows > rows_total;

  const uint16_t* q = static_cast<const uint16_t*>(p.q);
  const uint16_t* k = static_cast<const uint16_t*>(p.k);
  const uint16_t* v = static_cast<const uint16_t*>(p.v);
  constexpr int kChunks = D / 8;  // 16-byte chunks of a row; 8 consecutive d stay contiguous in every layout
  // Swizzled views of the tiles: element (row, d) of these tensors is where wgmma reads it.
  Tensor sQ = make_tensor(make_smem_ptr(pQ), typename S::LayoutQ{});  // (row in warpgroup, d, warpgroup)
  Tensor sK = make_tensor(make_smem_ptr(pK), typename S::LayoutK{});  // (key, d, stage)
  Tensor sV = make_tensor(make_smem_ptr(pV), typename S::LayoutV{});  // (d, key, stage)

  // Q tile (first cp.async group); padding rows are zero-filled.
  for (int i = tid; i < kRows * kChunks; i += kThreads) {
    const int r = i / kChunks, c = i % kChunks;
    const int64_t f = f0 + r;
    const uint16_t* src = f < rows_total ? q + (q_begin + f / G) * p.q_s0 + (int64_t(g) * G + f % G) * p.q_s1 : nullptr;
    mma::cp_async_16(mma::smem_addr(&sQ(r % 64, c * 8, r / 64)), src ? src + c * 8 : q, src ? 16 : 0);
  }
  mma::cp_async_commit();

  int num_union = int(local_last + 1);
  if (!dense)
    num_union = build_block_union<kThreads, kMaskWords>(su, p.topk, p.topk_s0, p.topk_s1, p.topk_k, p.union_cap, g,
                                                        q_begin, lq, lk, B, i_first, i_last, local_last);
  auto block_at = [&](int u) -> int64_t { return dense ? int64_t(u) : int64_t(su.blocks[u]); };

  // Key tiles: every sub-tile of each union block, except sub-tiles past the tile's last position.
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
  auto load_kv = [&](int it, int stage) {
    const int64_t ks = key_start(it);
    for (int i = tid; i < kKeys * kChunks; i += kThreads) {
      const int r = i / kChunks, c = i % kChunks;
      const int64_t t = ks + r;
      const bool in = t < lk;
      const uint16_t* ksrc = in ? k + (k_begin + t) * p.k_s0 + int64_t(g) * p.k_s1 + c * 8 : k;
      const uint16_t* vsrc = in ? v + (k_begin + t) * p.v_s0 + int64_t(g) * p.v_s1 + c * 8 : v;
      mma::cp_async_16(mma::smem_addr(&sK(r, c * 8, stage)), ksrc, in ? 16 : 0);
      mma::cp_async_16(mma::smem_addr(&sV(c * 8, r, stage)), vsrc, in ? 16 : 0);
    }
  };
  if (num_iters > 0) load_kv(0, 0);
  mma::cp_async_commit();

  // This thread's two rows (16 (warp) + lane / 4, and 8 below): position (-1 = padding) and query bit.
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
  const int nq = int(i_last - i_first + 1);
  unsigned long long all_queries[kMaskWords];
#pragma unroll
  for (int w = 0; w < kMaskWords; ++w) {
    const int bits = nq - 64 * w;
    all_queries[w] = bits >= 64 ? ~0ull : bits <= 0 ? 0ull : ((1ull << bits) - 1ull);
  }

  typename Mmas<E, D>::S mma_s;
  typename Mmas<E, D>::O mma_o;
  auto thr_s = mma_s.get_thread_slice(wt);
  auto thr_o = mma_o.get_thread_slice(wt);
  Tensor tSrQ = thr_s.partition_fragment_A(sQ);  // (MMA, 1, D/16, warpgroup) descriptors
  Tensor tSrK = thr_s.partition_fragment_B(sK);  // (MMA, 1, D/16, stage) descriptors
  Tensor tOrV = thr_o.partition_fragment_B(sV);  // (MMA, 1, kKeys/16, stage) descriptors
  Tensor tSrS = partition_fragment_C(mma_s, Shape<_64, Int<kKeys>>{});
  Tensor tOrO = partition_fragment_C(mma_o, Shape<_64, Int<D>>{});
  Tensor tOrP = make_tensor<E>(partition_shape_A(mma_o, Shape<_64, Int<kKeys>>{}));
  static_assert(decltype(size(tSrS))::value == kKeys / 2 && decltype(size(tOrP))::value == kKeys / 2 &&
                    decltype(size(tOrO))::value == D / 2,
                "fragment sizes of the m64 layouts described above");
  clear(tOrO);
  float m_run[2] = {-INFINITY, -INFINITY}, l_run[2] = {0.f, 0.f};

  for (int it = 0; it < num_iters; ++it) {
    const int stage = it & 1;
    if (it + 1 < num_iters) {
      load_kv(it + 1, stage ^ 1);
      mma::cp_async_commit();
      mma::cp_async_wait<1>();
    } else {
      mma::cp_async_wait<0>();
    }
    fence_async_shared();
    __syncthreads();
    const int64_t ks = key_start(it);

    product_s(mma_s, tSrQ(_, _, _, wg), tSrK(_, _, _, stage), tSrS);

    // Mask unselected rows and the causal tail; skipped when the whole sub-tile is visible to all rows.
    const unsigned long long* sel = su.mask + std::size_t(it / sub_per_block) * kMaskWords;
    bool all_selected = true;
    if (!dense) {
#pragma unroll
      for (int w = 0; w < kMaskWords; ++w) all_selected = all_selected && sel[w] == all_queries[w];
    }
    if (partial_tile || !all_selected || ks + kKeys - 1 > p_first) {
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const bool row_sel = dense || ((sel[qbit[h] >> 6] >> (qbit[h] & 63)) & 1ull);
        const int64_t lim = row_sel ? pos[h] - ks : -1;  // last visible key offset in this sub-tile
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

    // Online softmax (scores stay raw; exp2 with the scale folded in).
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      float mx = m_run[h];
#pragma unroll
      for (int n = 0; n < kKeys / 8; ++n) mx = fmaxf(mx, fmaxf(tSrS(2 * h + 4 * n), tSrS(1 + 2 * h + 4 * n)));
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
      const float m_scaled = mx == -INFINITY ? 0.f : mx * p.scale_log2;
      const float alpha = exp2f(m_run[h] * p.scale_log2 - m_scaled);
      m_run[h] = mx;
      float sum = 0.f;
#pragma unroll
      for (int n = 0; n < kKeys / 8; ++n) {
#pragma unroll
        for (int j = 0; j < 2; ++j) {
          const float e = exp2f(fmaf(tSrS(j + 2 * h + 4 * n), p.scale_log2, -m_scaled));
          tSrS(j + 2 * h + 4 * n) = e;
          sum += e;
        }
      }
      l_run[h] = l_run[h] * alpha + sum;
#pragma unroll
      for (int n = 0; n < D / 8; ++n) {
        tOrO(2 * h + 4 * n) *= alpha;
        tOrO(1 + 2 * h + 4 * n) *= alpha;
      }
    }

    product_o(mma_o, tSrS, tOrP, tOrV(_, _, _, stage), tOrO);
    __syncthreads();  // both warpgroups are done with this stage before it is refilled
  }
  mma::cp_async_wait<0>();

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

}  // namespace wgmma
}  // namespace cuda
}  // namespace detail
}  // namespace msa
