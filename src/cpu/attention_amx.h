// The AMX main-branch forward (attention_forward_amx.cpp), chosen by attention_forward.cpp.
#pragma once

#include <cstddef>

#include "core/problem.h"
#include "msa/ops.h"

namespace msa {
namespace detail {
namespace cpu {

// bf16 inputs, a block size that is a multiple of 32, and amx::usable().
bool attention_forward_uses_amx(const Problem& p);
// Rows (query heads) per (work tile, block) pair of the tile plans, on average: the tile unit
// multiplies 16 rows at a time, so it only pays where a block is shared by enough rows of a tile.
double attention_forward_amx_occupancy(const Problem& p, const TensorView& topk);
std::size_t attention_forward_amx_workspace_bytes(const Problem& p, int threads);
void attention_forward_amx(const Problem& p, const TensorView& q, const TensorView& k,
                           const TensorView& v, const TensorView& topk, const TensorView& out,
                           const TensorView& lse, const Context& ctx);

}  // namespace cpu
}  // namespace detail
}  // namespace msa
