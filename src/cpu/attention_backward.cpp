// PLACEHOLDER: replaced by the real implementation before it is committed.
#include "core/backend.h"
#include "cpu/cpu_ops.h"
#include "msa/error.h"
namespace msa { namespace detail { namespace cpu {
std::size_t attention_backward_workspace_bytes(const Problem&, int) { return 0; }
} } }
namespace msa { namespace detail { namespace cpu {
void attention_backward(const Problem&, const TensorView&, const TensorView&, const TensorView&, const TensorView&, const TensorView&, const TensorView&, const TensorView&, const TensorView&, const TensorView&, const TensorView&, const Context&) { throw NotSupportedError("todo"); }
} } }
