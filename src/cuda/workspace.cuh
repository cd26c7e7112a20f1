// Carving scratch buffers out of the caller's workspace, or out of a stream-ordered allocation when
// the caller passed none. Alignment is 256 bytes, as cudaMalloc gives.
#pragma once

#include <cuda_runtime.h>

#include <cstddef>

#include "cuda/cuda_check.cuh"
#include "msa/ops.h"

namespace msa {
namespace detail {
namespace cuda {

constexpr std::size_t kWorkspaceAlign = 256;
inline std::size_t align_up(std::size_t n) { return (n + kWorkspaceAlign - 1) / kWorkspaceAlign * kWorkspaceAlign; }

// Owns an internal allocation when the caller gave no workspace; frees it stream-ordered.
class ScratchArena {
 public:
  ScratchArena(const Context& ctx, std::size_t bytes_needed)
      : stream_(static_cast<cudaStream_t>(ctx.stream)) {
    if (ctx.workspace.data) {
      base_ = static_cast<char*>(ctx.workspace.data);
    } else if (bytes_needed) {
      MSA_CUDA_CHECK(cudaMallocAsync(reinterpret_cast<void**>(&owned_), bytes_needed, stream_));
      base_ = owned_;
    }
  }
  ~ScratchArena() {
    if (owned_) cudaFreeAsync(owned_, stream_);
  }
  ScratchArena(const ScratchArena&) = delete;
  ScratchArena& operator=(const ScratchArena&) = delete;

  template <class T>
  T* take(std::size_t count) {
    T* p = reinterpret_cast<T*>(base_ + offset_);
    offset_ += align_up(count * sizeof(T));
    return p;
  }

 private:
  cudaStream_t stream_;
  char* base_ = nullptr;
  char* owned_ = nullptr;
  std::size_t offset_ = 0;
};

}  // namespace cuda
}  // namespace detail
}  // namespace msa
