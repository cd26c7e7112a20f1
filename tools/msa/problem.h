// The inputs of one `msa run`: seeded random tensors, or tensors loaded from .npy files.
#pragma once

#include <cstdint>
#include <vector>

#include "common/host_tensor.h"
#include "msa/config.h"
#include "options.h"

namespace msa {
namespace tool {

struct RunProblem {
  Config cfg;
  DType dtype = DType::bf16;
  std::vector<int32_t> cu_q, cu_k;  // host prefix sums, batch + 1 entries
  HostTensor q, k, v, qi, ki;

  int batch() const { return int(cu_q.size()) - 1; }
  // Rows of the packed tensors; the library checks that cu_seqlens agree with them.
  int64_t total_q() const { return q.shape()[0]; }
  int64_t total_k() const { return k.shape()[0]; }
};

// Standard normal values, a pure function of (seed, stream, element index): the same on any number
// of threads, and fast enough for the billion-element inputs of the GPU defaults.
void fill_normal(HostTensor& t, uint64_t seed, uint64_t stream);

RunProblem make_random_problem(const RunOptions& o);

// Loads q, k, v, qi, ki (converted to o.dtype) and, when present, cu_seqlens_q/k from o.inputs_dir;
// without them the batch is one sequence of total_q queries over total_k keys.
RunProblem load_problem(const RunOptions& o);

}  // namespace tool
}  // namespace msa
