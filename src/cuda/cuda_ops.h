// Workspace sizes of the CUDA operations, each defined next to its kernels.
#pragma once

#include <cstddef>

#include "core/problem.h"

namespace msa {
namespace detail {
namespace cuda {

std::size_t index_topk_workspace_bytes(const Problem& p);
std::size_t attention_forward_workspace_bytes(const Problem& p, bool sparse);
std::size_t attention_backward_workspace_bytes(const Problem& p, bool sparse);
std::size_t kl_alignment_workspace_bytes(const Problem& p);

}  // namespace cuda
}  // namespace detail
}  // namespace msa
