#include "tensor_view.h"

#include <string>

#include "msa/error.h"

namespace nb = nanobind;

namespace msa {
namespace python {

namespace {

DType to_dtype(nb::dlpack::dtype dt, const char* name) {
  using Code = nb::dlpack::dtype_code;
  MSA_CHECK_ARG(dt.lanes == 1, name, "vector dtypes (lanes != 1) are not supported");
  const auto code = Code(dt.code);
  if (code == Code::Float && dt.bits == 32) return DType::f32;
  if (code == Code::Float && dt.bits == 16) return DType::f16;
  if (code == Code::Float && dt.bits == 64) return DType::f64;
  if (code == Code::Bfloat && dt.bits == 16) return DType::bf16;
  if (code == Code::Int && dt.bits == 32) return DType::i32;
  throw ArgumentError(name, "unsupported dtype (DLPack code " + std::to_string(int(dt.code)) +
                                ", " + std::to_string(int(dt.bits)) +
                                " bits); expected float32, float16, bfloat16, float64 or int32");
}

Device to_device(int32_t device_type, int32_t device_id, const char* name) {
  // Pinned host memory (kDLCUDAHost) is ordinary CPU-addressable memory; managed memory is
  // addressable from the GPU it belongs to.
  if (device_type == nb::device::cpu::value || device_type == nb::device::cuda_host::value)
    return Device::cpu();
  if (device_type == nb::device::cuda::value || device_type == nb::device::cuda_managed::value)
    return Device::cuda(device_id);
  throw ArgumentError(name, "unsupported device (DLPack device type " +
                                std::to_string(device_type) + "); expected CPU or CUDA memory");
}

template <class Array>
TensorView view_of(const Array& a, const void* data, const char* name) {
  MSA_CHECK_ARG(a.ndim() <= size_t(TensorView::kMaxDims), name,
                "has " + std::to_string(a.ndim()) + " dimensions; at most " +
                    std::to_string(TensorView::kMaxDims) + " are supported");
  TensorView t;
  t.data = const_cast<void*>(data);
  t.dtype = to_dtype(a.dtype(), name);
  t.device = to_device(a.device_type(), a.device_id(), name);
  t.ndim = int(a.ndim());
  for (int d = 0; d < t.ndim; ++d) {
    t.shape[d] = int64_t(a.shape(size_t(d)));
    t.stride[d] = int64_t(a.stride(size_t(d)));  // DLPack strides are in elements already
  }
  return t;
}

}  // namespace

TensorView to_view(const InArray& a, const char* name) { return view_of(a, a.data(), name); }
TensorView to_view(const OutArray& a, const char* name) { return view_of(a, a.data(), name); }

TensorView to_view(const std::optional<InArray>& a, const char* name) {
  return a ? to_view(*a, name) : TensorView{};
}
TensorView to_view(const std::optional<OutArray>& a, const char* name) {
  return a ? to_view(*a, name) : TensorView{};
}

}  // namespace python
}  // namespace msa
