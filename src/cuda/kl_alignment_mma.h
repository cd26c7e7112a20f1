// Host entry of the tensor-core KL alignment (kl_alignment_mma.cu); kl_alignment.cu dispatches to it.
#pragma once

#include <cstddef>

#include "core/backend.h"

namespace msa {
namespace detail {
namespace cuda {

// Whether the tensor-core kernels take this problem (dtype, head dims, block size, group size, row
// alignment); otherwise the FFMA kernel runs.
bool kl_alignment_mma_supports(const Problem& p, const TensorView& q, const TensorView& k,
                               const TensorView& qi, const TensorView& ki);
// Workspace of the tensor-core path (sparse, the larger mode).
std::size_t kl_alignment_mma_workspace_bytes(const Problem& p);
void kl_alignment_mma(const Problem& p, const TensorView& q, const TensorView& k, const TensorView& lse,
                      const TensorView& qi, const TensorView& ki, const TensorView& topk, float coeff,
                      const TensorView& loss, const TensorView& dqi, const TensorView& dki, const Context& ctx);

}  // namespace cuda
}  // namespace detail
}  // namespace msa
