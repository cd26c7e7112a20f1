// Host-side pieces shared by the CUDA attention forward and backward (attention_forward.cu,
// attention_backward.cu; the tensor-core KL uses the first two): the dynamic shared-memory opt-in,
// argument checks, the longest sequence, the tile-union capacities and the parameters both kernels'
// structs carry. `op` ("forward" / "backward") names the caller in errors.
#pragma once

#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <string>
#include <vector>

#include "core/backend.h"
#include "cuda/attention_forward_kernel.cuh"  // kAttnKeys
#include "cuda/cuda_check.cuh"
#include "cuda/rows_aligned.h"
#include "msa/error.h"

namespace msa {
namespace detail {
namespace cuda {

// Opts `kernel` in to `bytes` of dynamic shared memory, or NotSupportedError naming `who` (e.g.
// "attention forward") when the device cannot give that much to one block.
inline void allow_dynamic_smem(const void* kernel, std::size_t bytes, const std::string& who) {
  int dev = 0, optin = 0;
  MSA_CUDA_CHECK(cudaGetDevice(&dev));
  MSA_CUDA_CHECK(cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev));
  if (bytes > std::size_t(optin))
    throw NotSupportedError("msa: CUDA " + who + " needs " + std::to_string(bytes) +
                            " bytes of shared memory for this topk / sequence length (device has " +
                            std::to_string(optin) + ")");
  MSA_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(bytes)));
}

// What the HMMA/wgmma attention kernels support: 16-bit floats, head dims 64 and 128, blocks made of
// whole 64-key tiles.
inline void check_attention_support(const Problem& p, const char* op) {
  MSA_CHECK_ARG(p.dtype == DType::bf16 || p.dtype == DType::f16, "q",
                std::string("dtype ") + dtype_name(p.dtype) + " is not supported by the CUDA attention " +
                    op + " (bfloat16, float16)");
  MSA_CHECK_ARG(p.cfg.head_dim == 128 || p.cfg.head_dim == 64, "head_dim",
                std::string("the CUDA attention ") + op + " supports 64 and 128, got " +
                    std::to_string(p.cfg.head_dim));
  MSA_CHECK_ARG(p.cfg.block_size % kAttnKeys == 0, "block_size",
                std::string("the CUDA attention ") + op + " needs a multiple of 64, got " +
                    std::to_string(p.cfg.block_size));
}

// Rows read with 16-byte cp.async.
inline void check_aligned_rows(const TensorView& t, const char* name, const char* op) {
  MSA_CHECK_ARG(rows_aligned(t, 16), name,
                std::string("the CUDA attention ") + op +
                    " needs 16-byte aligned rows (data pointer and outer strides multiples of 8 elements)");
}

// Outputs written as element pairs.
inline void check_aligned_pairs(const TensorView& t, const char* name, const char* op) {
  MSA_CHECK_ARG(rows_aligned(t, 2 * dtype_size(t.dtype)), name,
                std::string("the CUDA attention ") + op + " needs 4-byte aligned element pairs");
}

// Longest sequence (queries or keys): the caller's bound, or one host copy of the prefix sums.
inline int max_length(const Problem& p, int given, const TensorView& cu_dev, const int32_t* cu_host,
                      cudaStream_t stream) {
  if (given > 0) return given;
  std::vector<int32_t> cu(size_t(p.batch) + 1);
  if (cu_host) {
    std::copy(cu_host, cu_host + p.batch + 1, cu.begin());
  } else {
    MSA_CUDA_CHECK(cudaMemcpyAsync(cu.data(), cu_dev.data, cu.size() * sizeof(int32_t),
                                   cudaMemcpyDeviceToHost, stream));
    MSA_CUDA_CHECK(cudaStreamSynchronize(stream));
  }
  int m = 0;
  for (int b = 0; b < p.batch; ++b) m = std::max(m, cu[b + 1] - cu[b]);
  return m;
}

// Capacities of the tile union (attention_block_union.cuh): a bitmap over the blocks of the longest
// sequence (max_k keys); the union holds at most (queries of a `rows`-row tile) * k blocks.
template <class Params>
void set_union_capacity(Params& a, int64_t max_k, int rows, const Config& cfg) {
  const int64_t blocks = (max_k + cfg.block_size - 1) / cfg.block_size + 1;
  const int64_t tile_queries = (rows - 1) / a.group_size + 2;
  a.bitmap_words = int(blocks / 32 + 1);
  a.union_cap = int(std::min<int64_t>(std::min<int64_t>(tile_queries, rows) * cfg.topk, blocks));
}

// The fields AttentionParams and BackwardParams share: inputs, output, LSE, sequence bounds, strides,
// shape and softmax scale.
template <class Params>
void set_shared_params(Params& a, const Problem& p, const TensorView& q, const TensorView& k,
                       const TensorView& v, const TensorView& topk, const TensorView& out,
                       const TensorView& lse) {
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
}

}  // namespace cuda
}  // namespace detail
}  // namespace msa
