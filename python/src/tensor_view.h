// Conversion of DLPack arrays (torch tensors, numpy arrays, ...) received through nanobind into the
// library's non-owning msa::TensorView. Unsupported dtypes, devices or ranks raise ArgumentError
// naming the argument, exactly like the C++ validation does.
#pragma once

#include <nanobind/nanobind.h>
#include <nanobind/ndarray.h>

#include <optional>

#include "msa/tensor.h"

namespace msa {
namespace python {

// Inputs may be read-only arrays; outputs must be writable.
using InArray = nanobind::ndarray<nanobind::ro>;
using OutArray = nanobind::ndarray<>;

TensorView to_view(const InArray& a, const char* name);
TensorView to_view(const OutArray& a, const char* name);
// None -> an undefined view (data == nullptr), which the C++ API reads as "absent".
TensorView to_view(const std::optional<InArray>& a, const char* name);
TensorView to_view(const std::optional<OutArray>& a, const char* name);

}  // namespace python
}  // namespace msa
