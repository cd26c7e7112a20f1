// A small reader/writer of NumPy .npy files (format version 1.0/2.0, C order, little endian):
// float32, float16, float64 and int32 arrays, enough to move inputs and outputs in and out of `msa run`.
#pragma once

#include <string>

#include "common/host_tensor.h"

namespace msa {
namespace tool {

// Reads `path` into a HostTensor of the file's dtype (float64 files are read as f64).
// Throws std::runtime_error with the path on any problem.
HostTensor read_npy(const std::string& path);

// Writes `t` to `path`. bf16 is written as float32 (exact); other dtypes as themselves.
void write_npy(const std::string& path, const HostTensor& t);

// A copy of `t` in `dtype` (values rounded to it); integer tensors are only copied to i32.
HostTensor convert(const HostTensor& t, DType dtype);

}  // namespace tool
}  // namespace msa
