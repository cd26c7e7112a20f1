// PLACEHOLDER: replaced by the real implementation before it is committed.
#include "core/backend.h"
#include "cpu/cpu_ops.h"
#include "msa/error.h"
namespace msa { namespace detail { namespace cpu {
std::size_t kl_alignment_workspace_bytes(const Problem&, int) { return 0; }
} } }
namespace msa { namespace detail { namespace cpu {
void kl_alignment(const Problem&, const TensorView&, const TensorView&, const TensorView&, const TensorView&, const TensorView&, const TensorView&, float, const TensorView&, const TensorView&, const TensorView&, const Context&) { throw NotSupportedError("todo"); }
} } }
