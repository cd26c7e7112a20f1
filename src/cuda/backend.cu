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

DeviceScope::DeviceScope(Device device) {
  int current = 0;
  MSA_CUDA_CHECK(cudaGetDevice(&current));
  if (current == device.index) return;
  MSA_CUDA_CHECK(cudaSetDevice(device.index));
  previous_ = current;
}

DeviceScope::~DeviceScope() {
  if (previous_ >= 0) cudaSetDevice(previous_);  // no throw from a destructor; it was current before
}

std::size_t workspace_bytes(Op op, const Problem& p, int /*num_threads*/) {
  switch (op) {
    case Op::index_topk: return index_topk_workspace_bytes(p);
    case Op::sparse_forward: return attention_forward_workspace_bytes(p, true);
    case Op::dense_forward: return attention_forward_workspace_bytes(p, false);
    case Op::sparse_backward: return attention_backward_workspace_bytes(p, true);
    case Op::dense_backward: return attention_backward_workspace_bytes(p, false);
    case Op::kl_alignment: return kl_alignment_workspace_bytes(p);
    default: return 0;
  }
}

}  // namespace cuda
}  // namespace detail
}  // namespace msa
