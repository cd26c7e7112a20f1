// Programmatic dependent launch (Hopper) for the paged run's kernel chain: each kernel of the chain
// is launched with cudaLaunchAttributeProgrammaticStreamSerialization, so its CTAs may be scheduled
// while the kernel before it in the stream is still finishing, and waits on the device
// (griddepcontrol.wait) for that kernel's completion and memory before it touches global memory.
// Meant to save the launch gap between dependent kernels; on the H100 (4556bb3) the batch-1 decode
// step's graph replay took the same time with and without it (0.047 / 0.046 ms). MSA_PAGED_PDL=0
// launches without the attribute (plain stream order; the device waits then return at once).
#pragma once

#include <cuda_runtime.h>

#include <cstdlib>
#include <cstring>
#include <utility>

#include "cuda/cuda_check.cuh"

namespace msa {
namespace detail {
namespace cuda {

// First statement of every chained kernel: nothing before it may read what the previous kernel
// writes or write what it reads. Letting the next kernel launch right after is safe because that
// kernel waits the same way; it only takes SM slots once every CTA of this grid has started.
__device__ __forceinline__ void wait_for_prior_grid_then_release_next() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;" ::: "memory");
  asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}

inline bool programmatic_launch_requested() {
  const char* e = std::getenv("MSA_PAGED_PDL");
  return e == nullptr || std::strcmp(e, "0") != 0;
}

// kernel<<<grid, block, smem, stream>>>(args...) with programmatic stream serialization.
template <class... Params, class... Args>
void launch_chained(void (*kernel)(Params...), dim3 grid, dim3 block, std::size_t smem, cudaStream_t stream,
                    Args&&... args) {
  cudaLaunchAttribute attr[1];
  attr[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attr[0].val.programmaticStreamSerializationAllowed = programmatic_launch_requested() ? 1 : 0;
  cudaLaunchConfig_t cfg{};
  cfg.gridDim = grid;
  cfg.blockDim = block;
  cfg.dynamicSmemBytes = smem;
  cfg.stream = stream;
  cfg.attrs = attr;
  cfg.numAttrs = 1;
  MSA_CUDA_CHECK(cudaLaunchKernelEx(&cfg, kernel, std::forward<Args>(args)...));
}

}  // namespace cuda
}  // namespace detail
}  // namespace msa
