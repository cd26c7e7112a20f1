// The CUDA index branch (SPEC.md "Index branch"): stage 1 writes one fp32 block score (and, when
// asked, one block LSE) per (group, query, visible block) into scratch; stage 2 selects per row.
// Both run on ctx.stream with no host round trip between them.
//
// Grids are sized from varlen.max_seqlen_q / max_seqlen_k. When those are 0 and no host copy of
// cu_seqlens was given, they are computed from one device-to-host copy of cu_seqlens: that path
// synchronizes the stream and is therefore not CUDA-graph capturable.
#include <cuda_runtime.h>

#include <algorithm>
#include <string>
#include <vector>

#include "core/backend.h"
#include "cuda/cuda_check.cuh"
#include "cuda/cuda_ops.h"
#include "cuda/index_block_scores.cuh"
#include "cuda/index_select.cuh"
#include "cuda/index_wgmma_launch.cuh"
#include "cuda/rows_aligned.h"
#include "cuda/workspace.cuh"
#include "msa/error.h"
#include "msa/rules.h"

namespace msa {
namespace detail {
namespace cuda {

namespace {

struct Bounds {
  int64_t max_q = 0, max_k = 0;
};

Bounds sequence_bounds(const Problem& p, cudaStream_t stream) {
  Bounds bd{p.varlen.max_seqlen_q, p.varlen.max_seqlen_k};
  if (bd.max_q > 0 && bd.max_k > 0) return bd;
  std::vector<int32_t> cq(size_t(p.batch) + 1), ck(size_t(p.batch) + 1);
  MSA_CUDA_CHECK(cudaMemcpyAsync(cq.data(), p.varlen.cu_seqlens_q.data, cq.size() * 4,
                                 cudaMemcpyDeviceToHost, stream));
  MSA_CUDA_CHECK(cudaMemcpyAsync(ck.data(), p.varlen.cu_seqlens_k.data, ck.size() * 4,
                                 cudaMemcpyDeviceToHost, stream));
  MSA_CUDA_CHECK(cudaStreamSynchronize(stream));
  Bounds found;
  for (int b = 0; b < p.batch; ++b) {
    found.max_q = std::max<int64_t>(found.max_q, cq[b + 1] - cq[b]);
    found.max_k = std::max<int64_t>(found.max_k, ck[b + 1] - ck[b]);
  }
  if (bd.max_q == 0) bd.max_q = found.max_q;
  if (bd.max_k == 0) bd.max_k = found.max_k;
  return bd;
}

// Row stride of the block-score arrays: a multiple of 4 so stage 2 reads float4s.
int64_t score_ld(const Problem& p, const Bounds& bd) {
  const int64_t nb = std::max<int64_t>(rules::num_blocks(bd.max_k, p.cfg.block_size), 1);
  return (nb + 3) / 4 * 4;
}

std::size_t score_array_bytes(const Problem& p, const Bounds& bd) {
  return align_up(std::size_t(p.cfg.num_kv_heads) * std::size_t(p.total_q) *
                  std::size_t(score_ld(p, bd)) * sizeof(float));
}

template <bool kBf16, bool kWantLse>
void launch_block_scores(const index::BlockScoreArgs& args, dim3 grid, cudaStream_t stream) {
  const std::size_t smem = index::block_score_smem_bytes(args.padded_dim);
  auto kernel = index::block_scores_kernel<kBf16, kWantLse>;
  MSA_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem)));
  kernel<<<grid, index::kScoreThreads, smem, stream>>>(args);
  MSA_CUDA_CHECK_LAUNCH();
}

}  // namespace

std::size_t index_topk_workspace_bytes(const Problem& p) {
  if (p.total_q == 0) return 0;
  const Bounds bd = sequence_bounds(p, nullptr);
  return 2 * score_array_bytes(p, bd);  // scores and block LSEs: an upper bound either way
}

void index_topk(const Problem& p, const TensorView& qi, const TensorView& ki,
                const TensorView& topk, const TensorView& selected_lse, float temperature,
                const Context& ctx) {
  MSA_CHECK_ARG(p.dtype == DType::bf16 || p.dtype == DType::f16, "qi",
                std::string("the CUDA index branch takes bfloat16 or float16, got ") +
                    dtype_name(p.dtype));
  if (p.total_q == 0) return;
  const Config& cfg = p.cfg;
  cudaStream_t stream = static_cast<cudaStream_t>(ctx.stream);
  const Bounds bd = sequence_bounds(p, stream);
  if (bd.max_q == 0) return;
  const bool want_lse = selected_lse.defined();
  const int64_t ld = score_ld(p, bd);

  ScratchArena arena(ctx, (want_lse ? 2 : 1) * score_array_bytes(p, bd));
  const std::size_t per_array = score_array_bytes(p, bd) / sizeof(float);
  float* scores = arena.take<float>(per_array);
  float* lses = want_lse ? arena.take<float>(per_array) : nullptr;

  index::BlockScoreArgs s{};
  s.qi = qi.ptr<const uint16_t>();
  s.qi_s0 = qi.stride[0];
  s.qi_s1 = qi.stride[1];
  s.ki = ki.ptr<const uint16_t>();
  s.ki_s0 = ki.stride[0];
  s.cu_q = p.varlen.cu_seqlens_q.ptr<const int32_t>();
  s.cu_k = p.varlen.cu_seqlens_k.ptr<const int32_t>();
  s.num_kv_heads = cfg.num_kv_heads;
  s.head_dim = cfg.index_head_dim;
  s.padded_dim = (cfg.index_head_dim + 15) / 16 * 16;
  s.block_size = cfg.block_size;
  s.iscale = cfg.index_softmax_scale();
  s.lse_factor = s.iscale / temperature;
  s.vector_loads = cfg.index_head_dim % 8 == 0 && rows_aligned(qi, 16) && rows_aligned(ki, 16);
  s.scores = scores;
  s.lses = lses;
  s.ld = ld;
  s.total_q = p.total_q;
  s.total_k = p.total_k;

  const bool bf16 = p.dtype == DType::bf16;
  if (index::wgmma_block_scores_requested() && index::wgmma_block_scores_supported(s)) {
    index::launch_block_scores_wgmma(s, bf16, want_lse, bd.max_q, p.batch, stream);  // same outputs
  } else {
    const dim3 grid = index::block_score_grid(s, index::kScoreRows, bd.max_q, p.batch);
    if (bf16 && want_lse) launch_block_scores<true, true>(s, grid, stream);
    else if (bf16) launch_block_scores<true, false>(s, grid, stream);
    else if (want_lse) launch_block_scores<false, true>(s, grid, stream);
    else launch_block_scores<false, false>(s, grid, stream);
  }

  index::SelectArgs t{};
  t.scores = scores;
  t.lses = lses;
  t.ld = ld;
  t.cu_q = s.cu_q;
  t.cu_k = s.cu_k;
  t.batch = p.batch;
  t.num_kv_heads = cfg.num_kv_heads;
  t.block_size = cfg.block_size;
  t.k = cfg.topk;
  t.total_q = p.total_q;
  t.topk = topk.ptr<int32_t>();
  t.topk_s0 = topk.stride[0];
  t.topk_s1 = topk.stride[1];
  t.selected_lse = want_lse ? selected_lse.ptr<float>() : nullptr;
  t.lse_s0 = want_lse ? selected_lse.stride[0] : 0;
  t.lse_s1 = want_lse ? selected_lse.stride[1] : 0;
  const int64_t rows = int64_t(cfg.num_kv_heads) * p.total_q;
  const unsigned select_blocks = unsigned((rows + index::kSelectWarps - 1) / index::kSelectWarps);
  index::select_topk_kernel<<<select_blocks, index::kSelectWarps * 32, 0, stream>>>(t);
  MSA_CUDA_CHECK_LAUNCH();
}

}  // namespace cuda
}  // namespace detail
}  // namespace msa
