// Launches the wgmma stage 1 for the dtype, LSE option, padded head dim and key-chunk width of a
// call: the pipelined kernel (index_block_scores_wgmma_pipe.cuh) unless MSA_INDEX_KERNEL=wgmma asks
// for the first one (index_block_scores_wgmma.cuh), which waits for each chunk's product.
#include <cstdlib>
#include <cstring>

#include "cuda/cuda_check.cuh"
#include "cuda/index_block_scores_wgmma.cuh"
#include "cuda/index_block_scores_wgmma_pipe.cuh"
#include "cuda/index_wgmma_launch.cuh"

namespace msa {
namespace detail {
namespace cuda {
namespace index {

namespace {

template <bool kBf16, bool kWantLse, int kDim, int kKeys>
void launch(const BlockScoreArgs& args, bool pipelined, dim3 grid, cudaStream_t stream) {
  if (pipelined) {
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
void launch_for_shape(const BlockScoreArgs& args, bool pipelined, dim3 grid, cudaStream_t stream) {
  // Blocks of at most 64 keys fill a 64-wide chunk; wider blocks stream in 128-key chunks.
  const bool narrow = args.block_size <= 64;
  if (args.padded_dim <= 64) {
    if (narrow) launch<kBf16, kWantLse, 64, 64>(args, pipelined, grid, stream);
    else launch<kBf16, kWantLse, 64, 128>(args, pipelined, grid, stream);
  } else {
    if (narrow) launch<kBf16, kWantLse, 128, 64>(args, pipelined, grid, stream);
    else launch<kBf16, kWantLse, 128, 128>(args, pipelined, grid, stream);
  }
}

bool index_kernel_is(const char* name) {
  const char* v = std::getenv("MSA_INDEX_KERNEL");
  return v != nullptr && std::strcmp(v, name) == 0;
}

}  // namespace

bool wgmma_block_scores_requested() { return !index_kernel_is("mma"); }

bool wgmma_pipe_block_scores_requested() { return !index_kernel_is("wgmma"); }

bool wgmma_block_scores_supported(const BlockScoreArgs& args) { return args.padded_dim <= 128; }

void launch_block_scores_wgmma(const BlockScoreArgs& args, bool bf16, bool want_lse, dim3 grid,
                               cudaStream_t stream) {
  // The pipelined kernel loads with 16-byte cp.async only; scalar loads stay on the first kernel.
  const bool pipe = wgmma_pipe_block_scores_requested() && args.vector_loads;
  if (bf16 && want_lse) launch_for_shape<true, true>(args, pipe, grid, stream);
  else if (bf16) launch_for_shape<true, false>(args, pipe, grid, stream);
  else if (want_lse) launch_for_shape<false, true>(args, pipe, grid, stream);
  else launch_for_shape<false, false>(args, pipe, grid, stream);
}

}  // namespace index
}  // namespace cuda
}  // namespace detail
}  // namespace msa
