// Host side of the CUDA attention forward (sparse over topk, or dense causal when topk is undefined):
// checks what the kernel needs beyond the common validation, sizes the grid and shared memory, and
// launches attention_forward_kernel (attention_forward_kernel.cuh).
//
// Known limitation: ids in topk outside [0, local block of their query] (other than -1) are skipped,
// never read out of bounds and never reported; a duplicated id counts once.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <string>
#include <vector>

#include "core/backend.h"
#include "cuda/attention_forward_kernel.cuh"
#include "cuda/attention_forward_wgmma.cuh"
#include "cuda/cuda_check.cuh"
#include "cuda/cuda_ops.h"
#include "msa/error.h"

namespace msa {
namespace detail {
namespace cuda {

namespace {

void check_aligned_rows(const TensorView& t, const char* name) {
  const bool ok = reinterpret_cast<uintptr_t>(t.data) % 16 == 0 && t.stride[0] % 8 == 0 &&
                  t.stride[1] % 8 == 0;
  MSA_CHECK_ARG(ok, name, "the CUDA attention forward needs 16-byte aligned rows (data pointer and "
                          "outer strides multiples of 8 elements)");
}

// Longest query count of the batch: the caller's bound, or one host copy of cu_seqlens_q.
int max_seqlen_q(const Problem& p, cudaStream_t stream) {
  if (p.varlen.max_seqlen_q > 0) return p.varlen.max_seqlen_q;
  std::vector<int32_t> cu(size_t(p.batch) + 1);
  if (p.varlen.host_cu_seqlens_q) {
    std::copy(p.varlen.host_cu_seqlens_q, p.varlen.host_cu_seqlens_q + p.batch + 1, cu.begin());
  } else {
    MSA_CUDA_CHECK(cudaMemcpyAsync(cu.data(), p.varlen.cu_seqlens_q.data, cu.size() * sizeof(int32_t),
                                   cudaMemcpyDeviceToHost, stream));
    MSA_CUDA_CHECK(cudaStreamSynchronize(stream));
  }
  int m = 0;
  for (int b = 0; b < p.batch; ++b) m = std::max(m, cu[b + 1] - cu[b]);
  return m;
}

template <class T, int D>
void launch(const Problem& p, const AttentionParams& params, int max_q, cudaStream_t stream) {
  const std::size_t smem = AttentionSmem<D>::bytes(params.bitmap_words, params.union_cap);
  int dev = 0, optin = 0;
  MSA_CUDA_CHECK(cudaGetDevice(&dev));
  MSA_CUDA_CHECK(cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev));
  if (smem > std::size_t(optin))
    throw NotSupportedError("msa: CUDA attention forward needs " + std::to_string(smem) +
                            " bytes of shared memory for this topk / sequence length (device has " +
                            std::to_string(optin) + ")");
  MSA_CUDA_CHECK(cudaFuncSetAttribute(attention_forward_kernel<T, D>,
                                      cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem)));
  const int64_t tiles = (int64_t(max_q) * params.group_size + kAttnRows - 1) / kAttnRows;
  MSA_CHECK_ARG(p.batch <= 65535, "cu_seqlens_q", "the CUDA attention forward takes at most 65535 sequences");
  MSA_CHECK_ARG(tiles < (int64_t(1) << 31), "q", "too many query rows per sequence");
  const dim3 grid(unsigned(tiles), unsigned(p.cfg.num_kv_heads), unsigned(p.batch));
  attention_forward_kernel<T, D><<<grid, kAttnThreads, smem, stream>>>(params);
  MSA_CUDA_CHECK_LAUNCH();
}

// Opt-in wgmma (sm_90a warpgroup) kernel: MSA_ATTENTION_KERNEL=wgmma; 128-row tiles.
bool wgmma_requested() {
  const char* e = std::getenv("MSA_ATTENTION_KERNEL");
  return e != nullptr && std::string(e) == "wgmma";
}

template <class T, int D>
void launch_wgmma(const Problem& p, const AttentionParams& params, int max_q, cudaStream_t stream) {
  using Smem = wgmma::Smem<typename wgmma::CuteElem<T>::type, D>;
  const std::size_t smem = Smem::bytes(params.bitmap_words, params.union_cap);
  int dev = 0, optin = 0;
  MSA_CUDA_CHECK(cudaGetDevice(&dev));
  MSA_CUDA_CHECK(cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev));
  if (smem > std::size_t(optin))
    throw NotSupportedError("msa: CUDA attention forward (wgmma) needs " + std::to_string(smem) +
                            " bytes of shared memory for this topk / sequence length (device has " +
                            std::to_string(optin) + ")");
  MSA_CUDA_CHECK(cudaFuncSetAttribute(wgmma::attention_forward_wgmma_kernel<T, D>,
                                      cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem)));
  const int64_t tiles = (int64_t(max_q) * params.group_size + wgmma::kRows - 1) / wgmma::kRows;
  MSA_CHECK_ARG(p.batch <= 65535, "cu_seqlens_q", "the CUDA attention forward takes at most 65535 sequences");
  MSA_CHECK_ARG(tiles < (int64_t(1) << 31), "q", "too many query rows per sequence");
  const dim3 grid(unsigned(tiles), unsigned(p.cfg.num_kv_heads), unsigned(p.batch));
  wgmma::attention_forward_wgmma_kernel<T, D><<<grid, wgmma::kThreads, smem, stream>>>(params);
  MSA_CUDA_CHECK_LAUNCH();
}

template <class T>
void launch_dim(const Problem& p, const AttentionParams& params, int max_q, cudaStream_t stream) {
  if (wgmma_requested()) {
    if (p.cfg.head_dim == 128) return launch_wgmma<T, 128>(p, params, max_q, stream);
    return launch_wgmma<T, 64>(p, params, max_q, stream);
  }
  if (p.cfg.head_dim == 128) return launch<T, 128>(p, params, max_q, stream);
  return launch<T, 64>(p, params, max_q, stream);
}

}  // namespace

std::size_t attention_forward_workspace_bytes(const Problem&) { return 0; }

void attention_forward(const Problem& p, const TensorView& q, const TensorView& k, const TensorView& v,
                       const TensorView& topk, const TensorView& out, const TensorView& lse,
                       const Context& ctx) {
  MSA_CHECK_ARG(p.dtype == DType::bf16 || p.dtype == DType::f16, "q",
                std::string("dtype ") + dtype_name(p.dtype) +
                    " is not supported by the CUDA attention forward (bfloat16, float16)");
  MSA_CHECK_ARG(p.cfg.head_dim == 128 || p.cfg.head_dim == 64, "head_dim",
                "the CUDA attention forward supports 64 and 128, got " + std::to_string(p.cfg.head_dim));
  MSA_CHECK_ARG(p.cfg.block_size % kAttnKeys == 0, "block_size",
                "the CUDA attention forward needs a multiple of 64, got " +
                    std::to_string(p.cfg.block_size));
  check_aligned_rows(q, "q");
  check_aligned_rows(k, "k");
  check_aligned_rows(v, "v");
  MSA_CHECK_ARG(out.stride[0] % 2 == 0 && out.stride[1] % 2 == 0 &&
                    reinterpret_cast<uintptr_t>(out.data) % 4 == 0,
                "out", "the CUDA attention forward needs 4-byte aligned element pairs");
  if (p.total_q == 0) return;
  const cudaStream_t stream = static_cast<cudaStream_t>(ctx.stream);

  AttentionParams a{};
  a.q = q.data;
  a.k = k.data;
  a.v = v.data;
  a.out = out.data;
  a.lse = lse.ptr<float>();
  a.topk = topk.defined() ? topk.ptr<int32_t>() : nullptr;
  a.cu_q = p.varlen.cu_seqlens_q.ptr<int32_t>();
  a.cu_k = p.varlen.cu_seqlens_k.ptr<int32_t>();
  a.q_s0 = q.stride[0], a.q_s1 = q.stride[1];
  a.k_s0 = k.stride[0], a.k_s1 = k.stride[1];
  a.v_s0 = v.stride[0], a.v_s1 = v.stride[1];
  a.o_s0 = out.stride[0], a.o_s1 = out.stride[1];
  a.lse_s0 = lse.stride[0], a.lse_s1 = lse.stride[1];
  a.topk_s0 = topk.defined() ? topk.stride[0] : 0;
  a.topk_s1 = topk.defined() ? topk.stride[1] : 0;
  a.topk_k = p.cfg.topk;
  a.group_size = p.cfg.group_size();
  a.block_size = p.cfg.block_size;
  a.scale = p.cfg.softmax_scale();
  a.scale_log2 = a.scale * 1.4426950408889634f;
  if (a.topk) {
    // Bitmap over the blocks of the longest sequence (bounded by total_k when the caller gave no
    // max_seqlen_k); the union holds at most (queries of a tile) * k blocks.
    const int64_t max_k = p.varlen.max_seqlen_k > 0 ? p.varlen.max_seqlen_k : p.total_k;
    const int64_t blocks = (max_k + p.cfg.block_size - 1) / p.cfg.block_size + 1;
    const int rows = wgmma_requested() ? wgmma::kRows : kAttnRows;
    const int64_t tile_queries = (rows - 1) / a.group_size + 2;
    a.bitmap_words = int(blocks / 32 + 1);
    a.union_cap = int(std::min<int64_t>(std::min<int64_t>(tile_queries, rows) * p.cfg.topk, blocks));
  }
  const int max_q = max_seqlen_q(p, stream);
  if (max_q == 0) return;
  if (p.dtype == DType::bf16) return launch_dim<__nv_bfloat16>(p, a, max_q, stream);
  return launch_dim<__half>(p, a, max_q, stream);
}

}  // namespace cuda
}  // namespace detail
}  // namespace msa
