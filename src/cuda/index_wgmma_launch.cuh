// Entry to the wgmma (Hopper tensor-core) stage 1 of the index branch, kept apart from its kernels so
// index_topk.cu does not compile CuTe. It is the default where it applies (H100, first wgmma kernel:
// 29.0 ms against the mma.sync kernel's 43.2 ms at 128K, Hkv 4; bench/results). MSA_INDEX_KERNEL
// picks the stage 1: unset (or ws) the warp-specialised TMA kernel (index_block_scores_ws.cuh) where
// ki's layout allows a tensor map, else the pipelined wgmma kernel; "wgmma_pipe" the pipelined
// kernel; "wgmma" the first wgmma kernel (no overlap of product and pooling); "mma" the mma.sync
// kernel.
#pragma once

#include <cuda_runtime.h>

#include "cuda/index_block_scores.cuh"

namespace msa {
namespace detail {
namespace cuda {
namespace index {

// False only when the environment asks for the mma.sync stage 1 (MSA_INDEX_KERNEL=mma).
bool wgmma_block_scores_requested();

// Whether the wgmma kernel covers these arguments (head dims up to 128); else use the HMMA kernel.
bool wgmma_block_scores_supported(const BlockScoreArgs& args);

// Same outputs as block_scores_kernel (index_block_scores.cuh); sets the rows per CTA and the grid
// of the kernel it picks.
void launch_block_scores_wgmma(BlockScoreArgs args, bool bf16, bool want_lse, int64_t max_q, int batch,
                               cudaStream_t stream);

}  // namespace index
}  // namespace cuda
}  // namespace detail
}  // namespace msa
