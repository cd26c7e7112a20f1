// Workspace sizes of the CPU operations, each defined next to its kernel.
#pragma once

#include <cstddef>

#include "core/problem.h"

namespace msa {
namespace detail {
namespace cpu {

std::size_t index_topk_workspace_bytes(const Problem& p, int num_threads);
std::size_t attention_forward_workspace_bytes(const Problem& p, int num_threads);
std::size_t attention_backward_workspace_bytes(const Problem& p, int num_threads);
std::size_t kl_alignment_workspace_bytes(const Problem& p, int num_threads);

// Threads a call will use: ctx.num_threads, or every hardware thread when 0.
int thread_count(int requested);

}  // namespace cpu
}  // namespace detail
}  // namespace msa
