// Launches the wgmma stage 1 for the dtype, LSE option, padded head dim and key-chunk width of a
// call: the warp-specialised TMA kernel (index_block_scores_ws.cuh, 256 rows per CTA) where ki
// admits a tensor map, else the pipelined kernel (index_block_scores_wgmma_pipe.cuh); MSA_INDEX_KERNEL
// picks one by name (index_wgmma_launch.cuh).
#include <cstdlib>
#include <cstring>

#include "cuda/cuda_check.cuh"
#include "cuda/index_block_scores_wgmma.cuh"
#include "cuda/index_block_scores_wgmma_pipe.cuh"
#include "cuda/index_block_scores_ws.cuh"
#include "cuda/index_wgmma_launch.cuh"
#include "cuda/tensor_map.h"

namespace msa {
namespace detail {
namespace cuda {
namespace index {

namespace {

enum class Stage1 { ws, pipe, first };

template <bool kBf16, bool kWantLse, int kDim, int kKeys>
void launch(BlockScoreArgs args, Stage1 kind, int64_t max_q, int batch, cudaStream_t stream) {
  if (kind == Stage1::ws) {
    WsBlockScoreParams wp{};
    // ki as a [total_k, 1, Di] tensor: one box is 64 dims of kKeys key rows.
    TensorView ki;
    ki.data = const_cast<uint16_t*>(args.ki);
    ki.dtype = kBf16 ? DType::bf16 : DType::f16;
    ki.ndim = 3;
    ki.shape[0] = args.total_k;
    ki.shape[1] = 1;
    ki.shape[2] = args.head_dim;
    ki.stride[0] = args.ki_s0;
    ki.stride[1] = args.head_dim;
    ki.stride[2] = 1;
    if (encode_rows_map(&wp.ki_map, ki, kWsBoxElems, 1, kKeys)) {
      const char* pp = std::getenv("MSA_INDEX_PINGPONG");
      wp.pingpong = !(pp != nullptr && std::strcmp(pp, "0") == 0);
      const dim3 grid = block_score_grid(args, kWsRows, max_q, batch);
      wp.a = args;
      using Tr = WsScoreTraits<kBf16, kDim, kKeys>;
      auto kernel = block_scores_ws_kernel<kBf16, kWantLse, kDim, kKeys>;
      MSA_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(Tr::kSmemBytes)));
      kernel<<<grid, kWsThreads, Tr::kSmemBytes, stream>>>(wp);
      MSA_CUDA_CHECK_LAUNCH();
      return;
    }
    kind = Stage1::pipe;  // the driver refused the layout
  }
  const dim3 grid = block_score_grid(args, kScoreRows, max_q, batch);
  if (kind == Stage1::pipe) {
    const std::size_t smem = WgmmaScoreTraits<kBf16, kDim, kKeys, kPipeStages>::kSmemBytes;
    auto kernel = block_scores_wgmma_pipe_kernel<kBf16, kWantLse, kDim, kKeys>;
    MSA_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem)));
    kernel<<<grid, kWgmmaThreads, smem, stream>>>(args);
  } else {
    const std::size_t smem = WgmmaScoreTraits<kBf16, kDim, kKeys>::kSmemBytes;
    auto kernel = block_scores_wgmma_kernel<kBf16, kWantLse, kDim, kKeys>;
    MSA_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem)));
    kernel<<<grid, kWgmmaThreads, smem, stream>>>(args);
  }
  MSA_CUDA_CHECK_LAUNCH();
}

template <bool kBf16, bool kWantLse>
void launch_for_shape(const BlockScoreArgs& args, Stage1 kind, int64_t max_q, int batch, cudaStream_t stream) {
  // Blocks of at most 64 keys fill a 64-wide chunk; wider blocks stream in 128-key chunks.
  const bool narrow = args.block_size <= 64;
  if (args.padded_dim <= 64) {
    if (narrow) launch<kBf16, kWantLse, 64, 64>(args, kind, max_q, batch, stream);
    else launch<kBf16, kWantLse, 64, 128>(args, kind, max_q, batch, stream);
  } else {
    if (narrow) launch<kBf16, kWantLse, 128, 64>(args, kind, max_q, batch, stream);
    else launch<kBf16, kWantLse, 128, 128>(args, kind, max_q, batch, stream);
  }
}

bool index_kernel_is(const char* name) {
  const char* v = std::getenv("MSA_INDEX_KERNEL");
  return v != nullptr && std::strcmp(v, name) == 0;
}

}  // namespace

bool wgmma_block_scores_requested() { return !index_kernel_is("mma"); }

bool wgmma_block_scores_supported(const BlockScoreArgs& args) { return args.padded_dim <= 128; }

void launch_block_scores_wgmma(BlockScoreArgs args, bool bf16, bool want_lse, int64_t max_q, int batch,
                               cudaStream_t stream) {
  // The pipelined and the TMA kernels load 16 bytes at a time; scalar loads stay on the first kernel.
  Stage1 kind = index_kernel_is("wgmma") ? Stage1::first : index_kernel_is("wgmma_pipe") ? Stage1::pipe : Stage1::ws;
  if (!args.vector_loads) kind = Stage1::first;
  if (bf16 && want_lse) launch_for_shape<true, true>(args, kind, max_q, batch, stream);
  else if (bf16) launch_for_shape<true, false>(args, kind, max_q, batch, stream);
  else if (want_lse) launch_for_shape<false, true>(args, kind, max_q, batch, stream);
  else launch_for_shape<false, false>(args, kind, max_q, batch, stream);
}

}  // namespace index
}  // namespace cuda
}  // namespace detail
}  // namespace msa
