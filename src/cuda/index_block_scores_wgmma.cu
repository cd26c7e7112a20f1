// Launches the wgmma stage 1 (index_block_scores_wgmma.cuh) for the dtype, LSE option, padded head
// dim and key-chunk width of a call.
#include <cstdlib>
#include <cstring>

#include "cuda/cuda_check.cuh"
#include "cuda/index_block_scores_wgmma.cuh"
#include "cuda/index_wgmma_launch.cuh"

namespace msa {
namespace detail {
namespace cuda {
namespace index {

namespace {

template <bool kBf16, bool kWantLse, int kDim, int kKeys>
void launch(const BlockScoreArgs& args, dim3 grid, cudaStream_t stream) {
  const std::size_t smem = WgmmaScoreTraits<kBf16, kDim, kKeys>::kSmemBytes;
  auto kernel = block_scores_wgmma_kernel<kBf16, kWantLse, kDim, kKeys>;
  MSA_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem)));
  kernel<<<grid, kWgmmaThreads, smem, stream>>>(args);
  MSA_CUDA_CHECK_LAUNCH();
}

template <bool kBf16, bool kWantLse>
void launch_for_shape(const BlockScoreArgs& args, dim3 grid, cudaStream_t stream) {
  // Blocks of at most 64 keys fill a 64-wide chunk; wider blocks stream in 128-key chunks.
  const bool narrow = args.block_size <= 64;
  if (args.padded_dim <= 64) {
    if (narrow) launch<kBf16, kWantLse, 64, 64>(args, grid, stream);
    else launch<kBf16, kWantLse, 64, 128>(args, grid, stream);
  } else {
    if (narrow) launch<kBf16, kWantLse, 128, 64>(args, grid, stream);
    else launch<kBf16, kWantLse, 128, 128>(args, grid, stream);
  }
}

}  // namespace

bool wgmma_block_scores_requested() {
  const char* v = std::getenv("MSA_INDEX_KERNEL");
  return v == nullptr || std::strcmp(v, "mma") != 0;
}

bool wgmma_block_scores_supported(const BlockScoreArgs& args) { return args.padded_dim <= 128; }

void launch_block_scores_wgmma(const BlockScoreArgs& args, bool bf16, bool want_lse, dim3 grid,
                               cudaStream_t stream) {
  if (bf16 && want_lse) launch_for_shape<true, true>(args, grid, stream);
  else if (bf16) launch_for_shape<true, false>(args, grid, stream);
  else if (want_lse) launch_for_shape<false, true>(args, grid, stream);
  else launch_for_shape<false, false>(args, grid, stream);
}

}  // namespace index
}  // namespace cuda
}  // namespace detail
}  // namespace msa
