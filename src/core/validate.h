// Argument checks shared by every operation: one place that turns bad input into an ArgumentError
// naming the argument.
#pragma once

#include <initializer_list>

#include "core/problem.h"
#include "msa/tensor.h"

namespace msa {
namespace detail {

// Checks config, cu_seqlens (dtype, device, shape; contents where host-readable: starts at 0,
// non-decreasing, ends at total_q/total_k, Lk_b >= Lq_b, max_seqlen bounds) and returns the Problem.
Problem make_problem(const Config& cfg, const Varlen& varlen, int64_t total_q, int64_t total_k,
                     DType dtype, Device device);

// Exact shape, dtype and device; innermost dimension contiguous; non-negative outer strides.
void check_tensor(const TensorView& t, const char* name, std::initializer_list<int64_t> shape,
                  DType dtype, Device device);

// check_tensor for a tensor the operation writes; also distinct indices must be distinct addresses (no
// stride 0, no overlapping strides such as a broadcast view), else threads would write one element in turn.
void check_output(const TensorView& t, const char* name, std::initializer_list<int64_t> shape, DType dtype,
                  Device device);

// Floating dtype accepted for the inputs of an operation.
void check_input_dtype(const TensorView& t, const char* name, Device device);

// dtype of lse / selected_lse / loss for inputs of `dtype` (f32, or f64 for f64 inputs).
DType stats_dtype(DType dtype);

// Rejects non-positive or non-finite values of a float setting.
void check_positive(float value, const char* name);

}  // namespace detail
}  // namespace msa
