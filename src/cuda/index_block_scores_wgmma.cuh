// Stage 1 of the CUDA index branch on Hopper tensor cores (wgmma): the same outputs as
// block_scores_kernel in index_block_scores.cuh (same grid, rows, chunks, masking, block LSE), so
// stage 2 is unchanged.
//
// A CTA is two warpgroups; each owns 64 of the CTA's 128 (query, group) rows and multiplies them
// with a key chunk of kKeys tokens per step (wgmma m64 x kKeys x k16, both operands in shared
// memory in the 128-byte-swizzled K-major layout). qi is loaded once per CTA; key chunks stream
// through two shared-memory stages with cp.async, issued by all 256 threads. The accumulator is
// pooled in registers; token scores never reach global memory.
//
// Head dims are zero-padded to kDim (64 or 128): one swizzle atom row is 64 halfs.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include <cute/arch/mma_sm90_gmma.hpp>
#include <cute/atom/mma_atom.hpp>
#include <cute/atom/mma_traits_sm90_gmma.hpp>
#include <cute/tensor.hpp>

#include "cuda/index_block_scores.cuh"
#include "msa/rules.h"

namespace msa {
namespace detail {
namespace cuda {
namespace index {

constexpr int kWgmmaThreads = 256;  // two consumer warpgroups
constexpr int kWgmmaStages = 2;     // key-chunk buffers; 2 keeps two CTAs resident per SM
static_assert(kWgmmaThreads / 128 * 64 == kScoreRows, "same rows per CTA as the HMMA kernel");

template <bool kBf16, int kDim, int kKeys, int kStages = kWgmmaStages>
struct WgmmaScoreTraits {
  using Elem = std::conditional_t<kBf16, cute::bfloat16_t, cute::half_t>;
  using Atom = std::conditional_t<
      kBf16,
      std::conditional_t<kKeys == 128, cute::SM90_64x128x16_F32BF16BF16_SS<cute::GMMA::Major::K, cute::GMMA::Major::K>,
                         cute::SM90_64x64x16_F32BF16BF16_SS<cute::GMMA::Major::K, cute::GMMA::Major::K>>,
      std::conditional_t<kKeys == 128, cute::SM90_64x128x16_F32F16F16_SS<cute::GMMA::Major::K, cute::GMMA::Major::K>,
                         cute::SM90_64x64x16_F32F16F16_SS<cute::GMMA::Major::K, cute::GMMA::Major::K>>>;
  // Two warpgroups stacked along M: threads 0-127 take rows 0-63, threads 128-255 rows 64-127.
  using TiledMma = decltype(cute::make_tiled_mma(Atom{}, cute::Layout<cute::Shape<cute::_2, cute::_1, cute::_1>>{}));
  using SmemQ = decltype(cute::tile_to_shape(cute::GMMA::Layout_K_SW128_Atom<Elem>{},
                                             cute::Shape<cute::Int<kScoreRows>, cute::Int<kDim>>{}));
  using SmemK = decltype(cute::tile_to_shape(
      cute::GMMA::Layout_K_SW128_Atom<Elem>{},
      cute::Shape<cute::Int<kKeys>, cute::Int<kDim>, cute::Int<kStages>>{}));
  static constexpr std::size_t kQElems = std::size_t(kScoreRows) * kDim;
  static constexpr std::size_t kKElems = std::size_t(kKeys) * kDim * kStages;
  // +1024: the swizzle atoms need 1024-byte alignment, which the kernel makes by hand.
  static constexpr std::size_t kSmemBytes = (kQElems + kKElems) * 2 + 1024;
};

__device__ __forceinline__ void fence_async_proxy_shared() {
  asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
}

// Copies `rows` rows of Di 16-bit values into the swizzled tile `dst` (a CuTe smem tensor of
// uint16_t view rows x kDim), zeros past `valid_rows` and past Di. Rows come from
// base + row_offset(r). The 128-byte swizzle permutes 16-byte units only, so each 8-half segment
// stays contiguous and one 16-byte cp.async fills it.
template <int kDim, class Tile, class RowOffset>
__device__ __forceinline__ void load_swizzled(Tile&& dst, int rows, int valid_rows,
                                              const uint16_t* base, RowOffset row_offset,
                                              const BlockScoreArgs& a) {
  if (a.vector_loads) {
    constexpr int segs = kDim / 8;
    for (int i = threadIdx.x; i < rows * segs; i += kWgmmaThreads) {
      const int r = i / segs, s = i - r * segs;
      const bool valid = r < valid_rows && s * 8 < a.head_dim;
      const uint16_t* src = valid ? base + row_offset(r) + s * 8 : base;
      cp_async_16(reinterpret_cast<uint16_t*>(&dst(r, s * 8)), src, valid);
    }
  } else {
    for (int i = threadIdx.x; i < rows * kDim; i += kWgmmaThreads) {
      const int r = i / kDim, d = i - r * kDim;
      const uint16_t v = (r < valid_rows && d < a.head_dim) ? base[row_offset(r) + d] : uint16_t(0);
      *reinterpret_cast<uint16_t*>(&dst(r, d)) = v;
    }
  }
}

template <bool kBf16, bool kWantLse, int kDim, int kKeys>
__global__ void __launch_bounds__(kWgmmaThreads, 2) block_scores_wgmma_kernel(const BlockScoreArgs a) {
  using namespace cute;
  using Traits = WgmmaScoreTraits<kBf16, kDim, kKeys>;
  using Elem = typename Traits::Elem;
  extern __shared__ uint8_t smem_raw[];
  Elem* smem = reinterpret_cast<Elem*>((reinterpret_cast<uintptr_t>(smem_raw) + 1023) & ~uintptr_t(1023));
  Tensor sQ = make_tensor(make_smem_ptr(smem), typename Traits::SmemQ{});
  Tensor sK = make_tensor(make_smem_ptr(smem + Traits::kQElems), typename Traits::SmemK{});

  const int b = blockIdx.y;
  const int64_t q_begin = a.cu_q[b], lq = a.cu_q[b + 1] - q_begin;
  const int64_t k_begin = a.cu_k[b], lk = a.cu_k[b + 1] - k_begin;
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
    load_swizzled<kDim>(sQ, kScoreRows, int(tile_q) * G, qbase, row_offset, a);
  }

  const int64_t num_blocks = rules::local_block(p_max, B) + 1;
  const int subchunks = (B + kKeys - 1) / kKeys;
  const int64_t num_chunks = num_blocks * subchunks;
  auto chunk_range = [&](int64_t c, int64_t& kb, int64_t& ke) {
    chunk_key_range<kKeys>(int(c), subchunks, B, p_max, kb, ke);
  };
  auto load_chunk = [&](int64_t c) {
    int64_t kb, ke;
    chunk_range(c, kb, ke);
    const uint16_t* kbase = a.ki + (k_begin + kb) * a.ki_s0;
    auto row_offset = [&](int r) { return int64_t(r) * a.ki_s0; };
    load_swizzled<kDim>(sK(_, _, int(c % kWgmmaStages)), kKeys, int(ke - kb), kbase, row_offset, a);
  };

  typename Traits::TiledMma mma;
  auto thr_mma = mma.get_slice(threadIdx.x);
  Tensor acc = partition_fragment_C(mma, Shape<Int<kScoreRows>, Int<kKeys>>{});  // (MMA, 1, 1)
  // (row, column) in the CTA tile of every accumulator element, from the same partitioning.
  Tensor tScS = thr_mma.partition_C(make_identity_tensor(Shape<Int<kScoreRows>, Int<kKeys>>{}));
  static_assert(decltype(size(acc))::value == kKeys / 2, "64 x kKeys per 128 threads");

  // The wgmma accumulator holds, per thread, pairs of columns in 8-column steps on two rows 8 apart
  // (the mma.sync m16n8 layout repeated along N): element i sits on row half (i / 2) % 2, as
  // tScS says (checked on the host for every thread: bench/index_wgmma_layout_check.cu).
  constexpr int kAcc = kKeys / 2;
  int64_t qrow[2], pos[2];
  int grp[2];
  bool row_ok[2];
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const int r = get<0>(tScS(2 * h));
    const int qq = r / G;
    grp[h] = g0 + r - qq * G;
    row_ok[h] = qq < tile_q && grp[h] < a.num_kv_heads;
    qrow[h] = q_begin + q0 + qq;
    pos[h] = rules::query_position(lq, lk, q0 + qq);
  }

  float run_max[2] = {-INFINITY, -INFINITY}, run_sum[2] = {0.f, 0.f};
  const float lse_log2 = a.lse_factor * 1.4426950408889634f;

  load_chunk(0);
  cp_async_commit();
  for (int64_t c = 0; c < num_chunks; ++c) {
    if (c + 1 < num_chunks) load_chunk(c + 1);
    cp_async_commit();
    cp_async_wait<1>();
    // cp.async and plain stores are generic-proxy writes; wgmma reads through the async proxy.
    fence_async_proxy_shared();
    __syncthreads();

    int64_t kb, ke;
    chunk_range(c, kb, ke);
    const int stage = int(c % kWgmmaStages);
    // Operand descriptors are rebuilt from a base the compiler cannot see through: hoisted out of
    // the loop they would pin 48 registers and spill the LSE variant.
    Elem* base = smem;
    asm volatile("" : "+l"(base));
    // (MMA, 1, kDim/16) and (MMA, 1, kDim/16, stages) shared-memory descriptors
    Tensor tSrQ = thr_mma.make_fragment_A(
        thr_mma.partition_A(make_tensor(make_smem_ptr(base), typename Traits::SmemQ{})));
    Tensor tSrK = thr_mma.make_fragment_B(thr_mma.partition_B(
        make_tensor(make_smem_ptr(base + Traits::kQElems), typename Traits::SmemK{})));
    warpgroup_fence_operand(acc);
    warpgroup_arrive();
    mma.accumulate_ = GMMA::ScaleOut::Zero;
#pragma unroll
    for (int k = 0; k < kDim / 16; ++k) {
      gemm(mma, tSrQ(_, _, k), tSrK(_, _, k, stage), acc);
      mma.accumulate_ = GMMA::ScaleOut::One;
    }
    warpgroup_commit_batch();
    warpgroup_wait<0>();
    warpgroup_fence_operand(acc);

    // Pool: mask columns past the chunk or past the row's causal limit, then max over the chunk.
    const bool need_mask = ke - kb < kKeys || ke - 1 > p_min;
    if (need_mask) {
      // rules::causally_visible(t, p) is t <= p: a row sees the chunk's columns below col_end.
      int col_end[2];
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int64_t end = ke < pos[h] + 1 ? ke : pos[h] + 1;
        col_end[h] = end > kb ? int(end - kb) : 0;
      }
#pragma unroll
      for (int i = 0; i < kAcc; ++i)
        if (get<1>(tScS(i)) >= col_end[(i / 2) % 2]) acc(i) = -INFINITY;
    }
    float cmax[2] = {-INFINITY, -INFINITY};
#pragma unroll
    for (int i = 0; i < kAcc; ++i) cmax[(i / 2) % 2] = fmaxf(cmax[(i / 2) % 2], acc(i));
    quad_max(cmax);  // quads hold the other columns of the same two rows
    if constexpr (kWantLse) {
      // Online logsumexp (relative to the running max) so a block spanning chunks stays exact.
      float m_ref[2], s[2] = {0.f, 0.f};
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const float m_new = fmaxf(run_max[h], cmax[h]);
        m_ref[h] = m_new == -INFINITY ? 0.f : m_new;
      }
#pragma unroll
      for (int i = 0; i < kAcc; ++i) {
        const int h = (i / 2) % 2;
        s[h] += exp2f((acc(i) - m_ref[h]) * lse_log2);
      }
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        // No early exit for rows that see nothing yet: every lane must reach the shuffles.
        s[h] += __shfl_xor_sync(0xffffffffu, s[h], 1);
        s[h] += __shfl_xor_sync(0xffffffffu, s[h], 2);
        run_sum[h] = run_sum[h] * exp2f((run_max[h] - m_ref[h]) * lse_log2) + s[h];
        run_max[h] = fmaxf(run_max[h], cmax[h]);
      }
    } else {
      run_max[0] = fmaxf(run_max[0], cmax[0]);
      run_max[1] = fmaxf(run_max[1], cmax[1]);
    }

    finish_block<kWantLse>(a, c, subchunks, B, (threadIdx.x & 3) == 0, row_ok, pos, grp, qrow, run_max, run_sum);
    __syncthreads();  // every warpgroup's wgmma has read this stage before the next refill
  }
}

}  // namespace index
}  // namespace cuda
}  // namespace detail
}  // namespace msa
