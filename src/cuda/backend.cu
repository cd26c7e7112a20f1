// Entry points of the CUDA backend that are not a kernel of their own.
#include "core/backend.h"
#include "cuda/cuda_check.cuh"
#include "cuda/cuda_ops.h"

namespace msa {
namespace detail {
namespace cuda {

int device_count() {
  int n = 0;
  if (cudaGetDeviceCount(&n) != cudaSuccess) {
    cudaGetLastError();  // no driver or no device: report none, leave no sticky error behind
    return 0;
  }
  return n;
}

std::size_t workspace_bytes(Op op, const Problem& p, int /*num_threads*/) {
  switch (op) {
    case Op::index_topk: return index_topk_workspace_bytes(p);
    case Op::sparse_forward:
    case Op::dense_forward: return attention_forward_workspace_bytes(p);
    default: return 0;
  }
}

// Training kernels (issue 4) are not written yet: say so instead of computing anything.
void attention_backward(const Problem&, const TensorView&, const TensorView&, const TensorView&,
                        const TensorView&, const TensorView&, const TensorView&, const TensorView&,
                        const TensorView&, const TensorView&, const TensorView&, const Context&) {
  throw NotSupportedError("msa: attention backward is not implemented on CUDA yet; use the CPU backend");
}

void kl_alignment(const Problem&, const TensorView&, const TensorView&, const TensorView&,
                  const TensorView&, const TensorView&, const TensorView&, float, const TensorView&,
                  const TensorView&, const TensorView&, const Context&) {
  throw NotSupportedError("msa: KL alignment is not implemented on CUDA yet; use the CPU backend");
}

}  // namespace cuda
}  // namespace detail
}  // namespace msa
