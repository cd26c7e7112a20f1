// Host side of the CUDA attention forward (sparse over topk, or dense causal when topk is undefined):
// checks what the kernels need beyond the common validation, sizes grids and shared memory, and
// launches one of
//   - the warp-specialised TMA + wgmma kernel over 128-row tile unions (attention_forward_tma.cuh),
//     the default on sm_90 wherever the gathered kernel is not chosen (MSA_ATTENTION_KERNEL=tma asks
//     for it). Measured on the H200 at Hq 64 / Hkv 4 / D 128, 128K, smooth selections
//     (bench/bench_prefill.py, 0988faf): 25.7 ms against the mma.sync kernel's 67.0 ms;
//   - the query-major mma.sync kernel over 64-row tile unions (attention_forward_kernel.cuh): other
//     devices, or MSA_ATTENTION_KERNEL=mma;
//   - the key-major gathered kernel and its merge (attention_forward_gathered.cuh), sparse, where the
//     per-row partials fit (query_partials.cuh): groups of at most kGatheredMaxGroup heads, or
//     MSA_ATTENTION_KERNEL=gathered;
//   - the wgmma kernel (attention_forward_wgmma.cuh) with MSA_ATTENTION_KERNEL=wgmma on sm_90a.
// The gathered kernel is the default for groups of at most kGatheredMaxGroup heads (a 64-row query
// tile then holds 16 or more queries, whose block unions the tile kernel walks mostly masked) where
// its partials fit; MSA_ATTENTION_KERNEL=mma forces the tile kernel. Measured on the H100 at
// Hq 8 / Hkv 2 / D 64 / B 64, 32K: iid selections 1.24 + 1.11 ms vs 4.56 ms (bench/profile_layer.py);
// the quality-study model's training step (examples/msa_quality/step_timing.py, 0ff415e) 76.8 vs
// 92.6 ms, 73.4 vs 84.1 ms at 16K. It lost on one selection pattern, the session-5 study model's
// nearly uniform fresh index (102.2 vs 94.5 ms, before the merge read its partials as vectors).
// Wider groups (Hq 64 / Hkv 4, the prefill benchmark) keep the tile kernel: 4 queries a tile share
// most blocks.
//
// Known limitation: ids in topk outside [0, local block of their query] (other than -1) are skipped,
// never read out of bounds and never reported; a duplicated id counts once.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>
#include <memory>
#include <cstdint>
#include <cstdlib>
#include <string>
#include <vector>

#include "core/backend.h"
#include "cuda/attention_forward_gathered.cuh"
#include "cuda/attention_forward_kernel.cuh"
#include "cuda/attention_forward_tma.cuh"
#include "cuda/attention_forward_wgmma.cuh"
#include "cuda/attention_host.cuh"
#include "cuda/attention_tma_host.cuh"
#include "cuda/cuda_check.cuh"
#include "cuda/cuda_ops.h"
#include "cuda/key_query_lists.cuh"
#include "cuda/key_splits.h"
#include "cuda/query_partials.cuh"
#include "cuda/tensor_map.h"
#include "cuda/workspace.cuh"
#include "msa/error.h"

namespace msa {
namespace detail {
namespace cuda {

namespace {

template <class T, int D>
void launch(const Problem& p, const AttentionParams& params, int max_q, cudaStream_t stream) {
  const std::size_t smem = AttentionSmem<D>::bytes(params.bitmap_words, params.union_cap);
  allow_dynamic_smem(reinterpret_cast<const void*>(attention_forward_kernel<T, D>), smem, "attention forward");
  const int64_t tiles = (int64_t(max_q) * params.group_size + kAttnRows - 1) / kAttnRows;
  MSA_CHECK_ARG(p.batch <= 65535, "cu_seqlens_q", "the CUDA attention forward takes at most 65535 sequences");
  MSA_CHECK_ARG(tiles < (int64_t(1) << 31), "q", "too many query rows per sequence");
  const dim3 grid(unsigned(tiles), unsigned(p.cfg.num_kv_heads), unsigned(p.batch));
  attention_forward_kernel<T, D><<<grid, kAttnThreads, smem, stream>>>(params);
  MSA_CUDA_CHECK_LAUNCH();
}

// The wgmma (sm_90a warpgroup) kernel, 64-row tiles of one warpgroup, is compiled in with
// -DMSA_EXPERIMENTAL_WGMMA_ATTENTION (ON by default) and selected by MSA_ATTENTION_KERNEL=wgmma. It is
// not the default: on the H100 (commit 5a06e48, bench_prefill / bench_training) it was slower than
// the mma.sync kernel both sparse (128K, Hq64/Hkv4: 72.2 vs 66.4 ms) and dense (1698 vs 1552 ms).
bool wgmma_requested() {
#if defined(MSA_EXPERIMENTAL_WGMMA_ATTENTION)
  const char* e = std::getenv("MSA_ATTENTION_KERNEL");
  if (e == nullptr || std::string(e) != "wgmma") return false;
  // The kernel is built for sm_90a only: any other device takes the mma.sync kernel.
  return is_sm90();
#else
  return false;
#endif
}

template <class T, int D>
void launch_wgmma(const Problem& p, const AttentionParams& params, int max_q, cudaStream_t stream) {
  using Ring = wgmma::Ring<typename wgmma::CuteElem<T>::type, D>;
  const std::size_t smem = Ring::bytes(params.bitmap_words, params.union_cap);
  allow_dynamic_smem(reinterpret_cast<const void*>(wgmma::attention_forward_wgmma_kernel<T, D>), smem,
                     "attention forward (wgmma)");
  const int64_t tiles = (int64_t(max_q) * params.group_size + wgmma::kTileRows - 1) / wgmma::kTileRows;
  MSA_CHECK_ARG(p.batch <= 65535, "cu_seqlens_q", "the CUDA attention forward takes at most 65535 sequences");
  MSA_CHECK_ARG(tiles < (int64_t(1) << 31), "q", "too many query rows per sequence");
  const dim3 grid(unsigned(tiles), unsigned(p.cfg.num_kv_heads), unsigned(p.batch));
  wgmma::attention_forward_wgmma_kernel<T, D><<<grid, wgmma::kTileThreads, smem, stream>>>(params);
  MSA_CUDA_CHECK_LAUNCH();
}

// 128-key chunks where blocks are made of them; MSA_TMA_KEYS=64 forces 64 (an experiment knob).
int tma_chunk_keys(const Problem& p) {
  const char* ke = std::getenv("MSA_TMA_KEYS");
  const bool force64 = ke != nullptr && std::string(ke) == "64";
  return p.cfg.block_size % 128 == 0 && !force64 ? 128 : 64;
}

// Where the TMA kernel applies (otherwise the 64-row kernels run): tma_tiles_applicable, whose
// shared-memory bound excludes G <= 2 (two tile slots' unions of 8 queries' selections at G = 16).
bool tma_applicable(const Problem& p, bool sparse) {
  using E = cute::bfloat16_t;  // sizes are those of any 16-bit type
  const bool k128 = tma_chunk_keys(p) == 128;
  return tma_tiles_applicable(p, sparse, [&](int record_bytes) {
    return p.cfg.head_dim == 128
               ? (k128 ? tma::TmaSmem<E, 128, 128>::bytes(record_bytes) : tma::TmaSmem<E, 128, 64>::bytes(record_bytes))
               : (k128 ? tma::TmaSmem<E, 64, 128>::bytes(record_bytes) : tma::TmaSmem<E, 64, 64>::bytes(record_bytes));
  });
}

// Returns false (nothing launched) when the driver cannot describe q, k or v as a TMA tensor (not
// expected for rows that pass check_aligned_rows): the caller then takes another kernel.
template <class T, int D>
bool launch_tma(const Problem& p, const AttentionParams& a, const TensorView& q, const TensorView& k,
                const TensorView& v, int max_q, const TmaTileLayout& lay, ScratchArena& arena, cudaStream_t stream) {
  const int keys = tma_chunk_keys(p);
  tma::TmaAttentionParams tp{};
  tp.a = a;
  if (!prepare_tma_tiles(p, tp, q, k, v, keys, max_q, lay, arena, stream)) return false;
  using E = typename wgmma::CuteElem<T>::type;
  auto launch_keys = [&](auto kernel, std::size_t smem) {
    allow_dynamic_smem(reinterpret_cast<const void*>(kernel), smem, "attention forward (tma)");
    kernel<<<tma_ctas(tp), tma::kThreads, smem, stream>>>(tp);
    MSA_CUDA_CHECK_LAUNCH();
  };
  if (keys == 128)
    launch_keys(tma::attention_forward_tma_kernel<T, D, 128>, tma::TmaSmem<E, D, 128>::bytes(lay.record_bytes));
  else
    launch_keys(tma::attention_forward_tma_kernel<T, D, 64>, tma::TmaSmem<E, D, 64>::bytes(lay.record_bytes));
  return true;
}

template <class T>
bool launch_tma_dim(const Problem& p, const AttentionParams& a, const TensorView& q, const TensorView& k,
                    const TensorView& v, int max_q, const TmaTileLayout& lay, ScratchArena& arena,
                    cudaStream_t stream) {
  if (p.cfg.head_dim == 128) return launch_tma<T, 128>(p, a, q, k, v, max_q, lay, arena, stream);
  return launch_tma<T, 64>(p, a, q, k, v, max_q, lay, arena, stream);
}

constexpr int kGatheredMaxGroup = 4;

// The key-major gathered kernel: sparse, asked for (MSA_ATTENTION_KERNEL=gathered) or by default for
// groups of at most kGatheredMaxGroup heads (any other MSA_ATTENTION_KERNEL value opts out), and its
// partials (D floats and an lse per (row, slot part)) within budget. One rule for the workspace size
// and the launch.
bool gathered_forward(const Problem& p, bool sparse) {
  if (!sparse) return false;
  const char* e = std::getenv("MSA_ATTENTION_KERNEL");
  const bool wanted = e == nullptr || *e == '\0' ? p.cfg.group_size() <= kGatheredMaxGroup
                                                 : std::string(e) == "gathered";
  return wanted &&
         query_partials_fit(p.total_q, p.cfg.num_q_heads, p.cfg.topk, p.cfg.block_size, p.cfg.head_dim + 1);
}

// The warp-specialised TMA kernel (attention_forward_tma.cuh) on sm_90: the default wherever the
// gathered kernel is not chosen (dense; sparse groups wider than kGatheredMaxGroup heads, or whose
// partials do not fit), or asked for with MSA_ATTENTION_KERNEL=tma; any other value opts out. It
// needs K and V describable as TMA tensors (row coordinates below 2^31; launch_tma checks the rest).
bool tma_forward(const Problem& p, bool sparse) {
  const char* e = std::getenv("MSA_ATTENTION_KERNEL");
  const bool unset = e == nullptr || *e == '\0';
  const bool wanted = unset ? !gathered_forward(p, sparse) : std::string(e) == "tma";
  return wanted && is_sm90() && tma_applicable(p, sparse);
}

// Workspace of the gathered path: the key -> query lists, then the partials.
struct GatheredForwardLayout {
  KeyQueryListPlan lists;
  std::size_t partials;  // (row, slot part) pairs
  explicit GatheredForwardLayout(const Problem& p)
      : lists(p, "attention forward"),
        partials(std::size_t(p.total_q) * p.cfg.num_q_heads * partials_per_row(p.cfg.topk, p.cfg.block_size)) {}
  std::size_t bytes(const Problem& p) const {
    return lists.bytes() + align_up(partials * p.cfg.head_dim * sizeof(float)) + align_up(partials * sizeof(float));
  }
};

template <class T, int D>
void launch_gathered(const Problem& p, GatheredForwardParams& gp, int64_t max_k, ScratchArena& arena,
                     const GatheredForwardLayout& lay, cudaStream_t stream) {
  MSA_CHECK_ARG(p.batch <= 65535, "cu_seqlens_q", "the CUDA attention forward takes at most 65535 sequences");
  gp.lists = lay.lists.build(p, gp.a.topk, gp.a.topk_s0, gp.a.topk_s1, arena, stream);
  gp.part_out = arena.take<float>(lay.partials * D);
  gp.part_lse = arena.take<float>(lay.partials);
  gp.partials_per_row = partials_per_row(p.cfg.topk, p.cfg.block_size);
  gp.num_q_heads = p.cfg.num_q_heads;
  gp.key_splits = std::max(1, std::min(kMaxKeySplits, 65535 / p.batch));
  const int64_t k_tiles = (max_k + kAttnKeys - 1) / kAttnKeys;
  if (k_tiles > 0) {
    constexpr std::size_t smem = GatheredForwardSmem<D>::kBytes;
    allow_dynamic_smem(reinterpret_cast<const void*>(attention_forward_gathered_kernel<T, D>), smem,
                       "attention forward");
    const dim3 grid(unsigned(k_tiles), unsigned(p.cfg.num_kv_heads), unsigned(p.batch * gp.key_splits));
    attention_forward_gathered_kernel<T, D><<<grid, kAttnThreads, smem, stream>>>(gp);
    MSA_CUDA_CHECK_LAUNCH();
  }
  const int64_t rows = p.total_q * p.cfg.num_q_heads;
  attention_forward_merge_kernel<T, D><<<unsigned((rows + 3) / 4), 128, 0, stream>>>(gp, p.batch, rows);
  MSA_CUDA_CHECK_LAUNCH();
}

template <class T>
void launch_dim(const Problem& p, const AttentionParams& params, int max_q, bool use_wgmma, cudaStream_t stream) {
  if (use_wgmma) {
    if (p.cfg.head_dim == 128) return launch_wgmma<T, 128>(p, params, max_q, stream);
    return launch_wgmma<T, 64>(p, params, max_q, stream);
  }
  if (p.cfg.head_dim == 128) return launch<T, 128>(p, params, max_q, stream);
  return launch<T, 64>(p, params, max_q, stream);
}

}  // namespace

std::size_t attention_forward_workspace_bytes(const Problem& p, bool sparse) {
  if (gathered_forward(p, sparse)) return GatheredForwardLayout(p).bytes(p);
  return tma_forward(p, sparse) ? TmaTileLayout(p, sparse).bytes : 0;
}

void attention_forward(const Problem& p, const TensorView& q, const TensorView& k, const TensorView& v,
                       const TensorView& topk, const TensorView& out, const TensorView& lse,
                       const Context& ctx) {
  check_attention_support(p, "forward");
  check_aligned_rows(q, "q", "forward");
  check_aligned_rows(k, "k", "forward");
  check_aligned_rows(v, "v", "forward");
  check_aligned_pairs(out, "out", "forward");
  if (p.total_q == 0) return;
  const cudaStream_t stream = static_cast<cudaStream_t>(ctx.stream);

  const bool use_tma = tma_forward(p, topk.defined());
  const bool use_wgmma = !use_tma && wgmma_requested();
  AttentionParams a{};
  set_shared_params(a, p, q, k, v, topk, out, lse);
  a.scale_log2 = a.scale * 1.4426950408889634f;
  // The longest sequence is bounded by total_k when the caller gave no max_seqlen_k.
  const int64_t max_k = p.varlen.max_seqlen_k > 0 ? p.varlen.max_seqlen_k : p.total_k;
  if (!use_tma && !use_wgmma && gathered_forward(p, topk.defined())) {
    const GatheredForwardLayout lay(p);
    ScratchArena arena(ctx, lay.bytes(p));
    GatheredForwardParams gp{};
    gp.a = a;
    if (p.dtype == DType::bf16) {
      if (p.cfg.head_dim == 128) return launch_gathered<__nv_bfloat16, 128>(p, gp, max_k, arena, lay, stream);
      return launch_gathered<__nv_bfloat16, 64>(p, gp, max_k, arena, lay, stream);
    }
    if (p.cfg.head_dim == 128) return launch_gathered<__half, 128>(p, gp, max_k, arena, lay, stream);
    return launch_gathered<__half, 64>(p, gp, max_k, arena, lay, stream);
  }
  const int max_q =
      max_length(p, p.varlen.max_seqlen_q, p.varlen.cu_seqlens_q, p.varlen.host_cu_seqlens_q, stream);
  if (max_q == 0) return;
  if (use_tma) {
    const TmaTileLayout lay(p, topk.defined());
    ScratchArena arena(ctx, lay.bytes);
    AttentionParams t = a;
    t.bitmap_words = lay.caps.bitmap_words;
    t.union_cap = lay.caps.union_cap;
    const bool launched = p.dtype == DType::bf16 ? launch_tma_dim<__nv_bfloat16>(p, t, q, k, v, max_q, lay, arena, stream)
                                                 : launch_tma_dim<__half>(p, t, q, k, v, max_q, lay, arena, stream);
    if (launched) return;
  }
  if (a.topk) set_union_capacity(a, max_k, use_wgmma ? wgmma::kTileRows : kAttnRows, p.cfg);
  if (p.dtype == DType::bf16) return launch_dim<__nv_bfloat16>(p, a, max_q, use_wgmma, stream);
  return launch_dim<__half>(p, a, max_q, use_wgmma, stream);
}

}  // namespace cuda
}  // namespace detail
}  // namespace msa
