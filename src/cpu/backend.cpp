// Entry points of the CPU backend that are not a kernel of their own.
#include <omp.h>

#include "core/backend.h"
#include "cpu/cpu_ops.h"
#include "msa/error.h"

namespace msa {
namespace detail {
namespace cpu {

int thread_count(int requested) { return requested > 0 ? requested : omp_get_max_threads(); }

std::size_t workspace_bytes(Op op, const Problem& p, int num_threads) {
  switch (op) {
    case Op::index_topk: return index_topk_workspace_bytes(p, num_threads);
    case Op::sparse_forward:
    case Op::dense_forward: return attention_forward_workspace_bytes(p, num_threads);
    case Op::sparse_backward:
    case Op::dense_backward: return attention_backward_workspace_bytes(p, num_threads);
    case Op::kl_alignment: return kl_alignment_workspace_bytes(p, num_threads);
  }
  return 0;
}

}  // namespace cpu
}  // namespace detail
}  // namespace msa
