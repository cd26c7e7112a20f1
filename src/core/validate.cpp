#include "core/validate.h"

#include <cmath>
#include <string>

#include "msa/error.h"

namespace msa {

void Config::validate() const {
  MSA_CHECK_ARG(num_q_heads > 0, "num_q_heads", "must be positive, got " + std::to_string(num_q_heads));
  MSA_CHECK_ARG(num_kv_heads > 0, "num_kv_heads",
                "must be positive, got " + std::to_string(num_kv_heads));
  MSA_CHECK_ARG(num_q_heads % num_kv_heads == 0, "num_q_heads",
                "must be a multiple of num_kv_heads (" + std::to_string(num_q_heads) + " % " +
                    std::to_string(num_kv_heads) + " != 0)");
  MSA_CHECK_ARG(head_dim > 0 && head_dim <= 256, "head_dim",
                "must be in 1..256, got " + std::to_string(head_dim));
  MSA_CHECK_ARG(index_head_dim > 0 && index_head_dim <= 256, "index_head_dim",
                "must be in 1..256, got " + std::to_string(index_head_dim));
  MSA_CHECK_ARG(block_size > 0, "block_size", "must be positive, got " + std::to_string(block_size));
  MSA_CHECK_ARG(topk >= 1, "topk", "must be at least 1 (the local block), got " + std::to_string(topk));
  MSA_CHECK_ARG(std::isfinite(scale) && scale >= 0.f, "scale", "must be finite and >= 0 (0 = default)");
  MSA_CHECK_ARG(std::isfinite(index_scale) && index_scale >= 0.f, "index_scale",
                "must be finite and >= 0 (0 = default)");
}

namespace detail {

namespace {

std::string shape_string(const TensorView& t) {
  std::string s = "[";
  for (int d = 0; d < t.ndim; ++d) s += (d ? ", " : "") + std::to_string(t.shape[d]);
  return s + "]";
}

std::string shape_string(std::initializer_list<int64_t> shape) {
  std::string s = "[";
  int d = 0;
  for (int64_t x : shape) s += (d++ ? ", " : "") + std::to_string(x);
  return s + "]";
}

void check_cu_seqlens_tensor(const TensorView& t, const char* name, Device device) {
  MSA_CHECK_ARG(t.defined(), name, "is required");
  MSA_CHECK_ARG(t.dtype == DType::i32, name, std::string("must be int32, got ") + dtype_name(t.dtype));
  MSA_CHECK_ARG(t.device == device, name,
                "must be on " + device_name(device) + ", got " + device_name(t.device));
  MSA_CHECK_ARG(t.ndim == 1 && t.shape[0] >= 2, name,
                "must have shape [batch + 1] with batch >= 1, got " + shape_string(t));
  MSA_CHECK_ARG(t.stride[0] == 1, name, "must be contiguous");
}

void check_prefix_sums(const int32_t* cu, int batch, int64_t total, const char* name) {
  MSA_CHECK_ARG(cu[0] == 0, name, "must start at 0, got " + std::to_string(cu[0]));
  for (int b = 0; b < batch; ++b)
    MSA_CHECK_ARG(cu[b + 1] >= cu[b], name,
                  "must be non-decreasing (entry " + std::to_string(b + 1) + ")");
  MSA_CHECK_ARG(cu[batch] == total, name,
                "last entry " + std::to_string(cu[batch]) + " must equal the packed length " +
                    std::to_string(total));
}

}  // namespace

SequenceSpan sequence_span(const Varlen& varlen, int b) {
  const int32_t* cq = varlen.host_cu_seqlens_q ? varlen.host_cu_seqlens_q
                                               : varlen.cu_seqlens_q.ptr<const int32_t>();
  const int32_t* ck = varlen.host_cu_seqlens_k ? varlen.host_cu_seqlens_k
                                               : varlen.cu_seqlens_k.ptr<const int32_t>();
  SequenceSpan s;
  s.q_begin = cq[b];
  s.q_len = cq[b + 1] - cq[b];
  s.k_begin = ck[b];
  s.k_len = ck[b + 1] - ck[b];
  return s;
}

Problem make_problem(const Config& cfg, const Varlen& varlen, int64_t total_q, int64_t total_k,
                     DType dtype, Device device) {
  cfg.validate();
  check_cu_seqlens_tensor(varlen.cu_seqlens_q, "cu_seqlens_q", device);
  check_cu_seqlens_tensor(varlen.cu_seqlens_k, "cu_seqlens_k", device);
  MSA_CHECK_ARG(varlen.cu_seqlens_k.shape[0] == varlen.cu_seqlens_q.shape[0], "cu_seqlens_k",
                "must have as many entries as cu_seqlens_q (" +
                    std::to_string(varlen.cu_seqlens_q.shape[0]) + "), got " +
                    std::to_string(varlen.cu_seqlens_k.shape[0]));
  MSA_CHECK_ARG(varlen.max_seqlen_q >= 0, "max_seqlen_q", "must be >= 0");
  MSA_CHECK_ARG(varlen.max_seqlen_k >= 0, "max_seqlen_k", "must be >= 0");
  Problem p;
  p.cfg = cfg;
  p.varlen = varlen;
  p.batch = varlen.batch();
  p.total_q = total_q;
  p.total_k = total_k;
  p.dtype = dtype;
  p.device = device;

  const bool host_readable = device.type == DeviceType::cpu ||
                             (varlen.host_cu_seqlens_q && varlen.host_cu_seqlens_k);
  if (host_readable) {
    const int32_t* cq = device.type == DeviceType::cpu && !varlen.host_cu_seqlens_q
                            ? varlen.cu_seqlens_q.ptr<const int32_t>()
                            : varlen.host_cu_seqlens_q;
    const int32_t* ck = device.type == DeviceType::cpu && !varlen.host_cu_seqlens_k
                            ? varlen.cu_seqlens_k.ptr<const int32_t>()
                            : varlen.host_cu_seqlens_k;
    check_prefix_sums(cq, p.batch, total_q, "cu_seqlens_q");
    check_prefix_sums(ck, p.batch, total_k, "cu_seqlens_k");
    int max_q = 0, max_k = 0;
    for (int b = 0; b < p.batch; ++b) {
      const int lq = cq[b + 1] - cq[b], lk = ck[b + 1] - ck[b];
      MSA_CHECK_ARG(lk >= lq, "cu_seqlens_k",
                    "sequence " + std::to_string(b) + " has " + std::to_string(lq) +
                        " queries but only " + std::to_string(lk) +
                        " keys; queries must be a suffix of the keys (Lk >= Lq)");
      max_q = lq > max_q ? lq : max_q;
      max_k = lk > max_k ? lk : max_k;
    }
    MSA_CHECK_ARG(varlen.max_seqlen_q == 0 || varlen.max_seqlen_q >= max_q, "max_seqlen_q",
                  "is " + std::to_string(varlen.max_seqlen_q) + " but a sequence has " +
                      std::to_string(max_q) + " queries");
    MSA_CHECK_ARG(varlen.max_seqlen_k == 0 || varlen.max_seqlen_k >= max_k, "max_seqlen_k",
                  "is " + std::to_string(varlen.max_seqlen_k) + " but a sequence has " +
                      std::to_string(max_k) + " keys");
    if (p.varlen.max_seqlen_q == 0) p.varlen.max_seqlen_q = max_q;
    if (p.varlen.max_seqlen_k == 0) p.varlen.max_seqlen_k = max_k;
    if (!p.varlen.host_cu_seqlens_q) p.varlen.host_cu_seqlens_q = cq;
    if (!p.varlen.host_cu_seqlens_k) p.varlen.host_cu_seqlens_k = ck;
  }
  return p;
}

void check_tensor(const TensorView& t, const char* name, std::initializer_list<int64_t> shape,
                  DType dtype, Device device) {
  MSA_CHECK_ARG(t.defined(), name, "is required (null data pointer)");
  MSA_CHECK_ARG(t.dtype == dtype, name,
                std::string("must be ") + dtype_name(dtype) + ", got " + dtype_name(t.dtype));
  MSA_CHECK_ARG(t.device == device, name,
                "must be on " + device_name(device) + ", got " + device_name(t.device));
  bool same = t.ndim == int(shape.size());
  int d = 0;
  for (int64_t s : shape) same = same && t.shape[d++] == s;
  MSA_CHECK_ARG(same, name,
                "must have shape " + shape_string(shape) + ", got " + shape_string(t));
  MSA_CHECK_ARG(t.ndim == 0 || t.stride[t.ndim - 1] == 1, name,
                "innermost dimension must be contiguous (stride 1), got stride " +
                    std::to_string(t.ndim ? t.stride[t.ndim - 1] : 0));
  for (d = 0; d < t.ndim; ++d)
    MSA_CHECK_ARG(t.stride[d] >= 0, name, "strides must be non-negative");
}

namespace {

void check_no_overlap(const TensorView& t, const char* name) {
  // The dimensions with more than one index, by increasing stride: each must step past everything
  // the smaller ones span. Sufficient for distinct addresses, and true of every permutation of a
  // dense or padded layout (head-major pages, column slices).
  int order[TensorView::kMaxDims];
  int n = 0;
  for (int d = 0; d < t.ndim; ++d) {
    if (t.shape[d] <= 1) continue;
    int i = n++;  // insertion by stride (a few dimensions)
    for (; i > 0 && t.stride[order[i - 1]] > t.stride[d]; --i) order[i] = order[i - 1];
    order[i] = d;
  }
  int64_t span = 1;  // elements covered by the dimensions so far
  for (int i = 0; i < n; ++i) {
    const int d = order[i];
    MSA_CHECK_ARG(t.stride[d] >= span, name,
                  "is written, so its elements must not overlap: dimension " + std::to_string(d) + " has stride " +
                      std::to_string(t.stride[d]) + " but the smaller strides already span " +
                      std::to_string(span) + " elements (a broadcast or overlapping view?)");
    span += t.stride[d] * (t.shape[d] - 1);
  }
}

}  // namespace

void check_output(const TensorView& t, const char* name, std::initializer_list<int64_t> shape, DType dtype,
                  Device device) {
  check_tensor(t, name, shape, dtype, device);
  check_no_overlap(t, name);
}

void check_input_dtype(const TensorView& t, const char* name, Device device) {
  MSA_CHECK_ARG(t.defined(), name, "is required (null data pointer)");
  const bool ok = t.dtype == DType::f32 || t.dtype == DType::f16 || t.dtype == DType::bf16 ||
                  (t.dtype == DType::f64 && device.type == DeviceType::cpu);
  MSA_CHECK_ARG(ok, name,
                std::string("dtype ") + dtype_name(t.dtype) + " is not supported on " +
                    device_name(device) + " (float32, float16, bfloat16" +
                    (device.type == DeviceType::cpu ? ", float64)" : ")"));
}

DType stats_dtype(DType dtype) { return dtype == DType::f64 ? DType::f64 : DType::f32; }

void check_positive(float value, const char* name) {
  MSA_CHECK_ARG(std::isfinite(value) && value > 0.f, name,
                "must be finite and > 0, got " + std::to_string(value));
}

}  // namespace detail
}  // namespace msa
