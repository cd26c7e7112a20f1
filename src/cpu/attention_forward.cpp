// PLACEHOLDER: replaced by the real implementation before it is committed.
#include "core/backend.h"
#include "cpu/cpu_ops.h"
#include "msa/error.h"
namespace msa { namespace detail { namespace cpu {
std::size_t attention_forward_workspace_bytes(const Problem&, int) { return 0; }
} } }
namespace msa { namespace detail { namespace cpu {
void attention_forward(const Problem&, const TensorView&, const TensorView&, const TensorView&, const TensorView&, const TensorView&, const TensorView&, const Context&) { throw NotSupportedError("todo"); }
} } }
