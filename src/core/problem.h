// A validated problem: configuration, lengths and the facts every backend derives from them.
#pragma once

#include <cstdint>

#include "msa/config.h"
#include "msa/tensor.h"

namespace msa {
namespace detail {

struct Problem {
  Config cfg;
  Varlen varlen;
  int batch = 0;
  int64_t total_q = 0;
  int64_t total_k = 0;
  DType dtype = DType::f32;  // dtype of the floating inputs
  Device device;
};

// Host view of one sequence of a varlen batch.
struct SequenceSpan {
  int64_t q_begin = 0, q_len = 0;  // rows in the packed query tensors
  int64_t k_begin = 0, k_len = 0;  // rows in the packed key tensors
  int64_t query_position(int64_t i) const { return k_len - q_len + i; }
};

// cu_seqlens must be host-readable (CPU tensors, or the host copies in Varlen).
SequenceSpan sequence_span(const Varlen& varlen, int b);

}  // namespace detail
}  // namespace msa
