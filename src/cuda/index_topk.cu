// PLACEHOLDER: replaced by the real kernel before it is committed.
#include "core/backend.h"
#include "cuda/cuda_ops.h"
#include "msa/error.h"
namespace msa { namespace detail { namespace cuda {
std::size_t index_topk_workspace_bytes(const Problem&) { return 0; }
void index_topk(const Problem&, const TensorView&, const TensorView&, const TensorView&, const TensorView&, float, const Context&) { throw NotSupportedError("todo"); }
} } }
