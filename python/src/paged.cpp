// msa._C bindings of the serving API (include/msa/paged.h, docs/serving.md): PagedPlan, paged_plan,
// paged_append_kv, paged_check_batch, paged_run. Caches in FP8 E4M3 are passed as uint8 arrays of the same shape (torch:
// `t.view(torch.uint8)`), each with its f32 scale; other arrays convert as in the rest of the module.
#include <nanobind/nanobind.h>
#include <nanobind/ndarray.h>
#include <nanobind/stl/optional.h>
#include <nanobind/stl/string.h>

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "msa/error.h"
#include "msa/paged.h"
#include "tensor_view.h"

namespace nb = nanobind;
using namespace nb::literals;
using msa::python::InArray;
using msa::python::OutArray;
using msa::python::to_view;

namespace {

using OptIn = std::optional<InArray>;
using OptOut = std::optional<OutArray>;

// A cache array: uint8 means FP8 E4M3 bytes; anything else converts as usual.
msa::TensorView cache_view(const OutArray& a, const char* name) {
  const nb::dlpack::dtype dt = a.dtype();
  if (dt.code != uint8_t(nb::dlpack::dtype_code::UInt) || dt.bits != 8 || dt.lanes != 1)
    return to_view(a, name);
  MSA_CHECK_ARG(a.ndim() <= size_t(msa::TensorView::kMaxDims), name, "has too many dimensions");
  const bool cuda = a.device_type() == nb::device::cuda::value ||
                    a.device_type() == nb::device::cuda_managed::value;
  MSA_CHECK_ARG(cuda || a.device_type() == nb::device::cpu::value ||
                    a.device_type() == nb::device::cuda_host::value,
                name, "unsupported device; expected CPU or CUDA memory");
  msa::TensorView t;
  t.data = a.data();
  t.dtype = msa::DType::fp8_e4m3;
  t.device = cuda ? msa::Device::cuda(a.device_id()) : msa::Device::cpu();
  t.ndim = int(a.ndim());
  for (int d = 0; d < t.ndim; ++d) {
    t.shape[d] = int64_t(a.shape(size_t(d)));
    t.stride[d] = int64_t(a.stride(size_t(d)));
  }
  return t;
}

msa::DType paged_dtype(const std::string& name) {
  for (msa::DType d : {msa::DType::f32, msa::DType::f16, msa::DType::bf16})
    if (name == msa::dtype_name(d)) return d;
  throw msa::ArgumentError("dtype", "unknown dtype '" + name + "'; expected float32, float16 or bfloat16");
}

std::vector<int32_t> host_lengths(const InArray& a, const char* name) {
  const msa::TensorView v = to_view(a, name);
  MSA_CHECK_ARG(v.device.type == msa::DeviceType::cpu && v.dtype == msa::DType::i32 && v.ndim == 1,
                name, "must be a 1-d int32 host array");
  const int32_t* p = v.ptr<const int32_t>();
  std::vector<int32_t> out(size_t(v.shape[0]));
  for (int64_t i = 0; i < v.shape[0]; ++i) out[size_t(i)] = p[i * v.stride[0]];
  return out;
}

msa::PagedKVCache make_cache(const OutArray& k, const OutArray& v, const OutArray& ki,
                             const OptIn& k_scale, const OptIn& v_scale, const OptIn& ki_scale) {
  msa::PagedKVCache c;
  c.k = cache_view(k, "k_cache");
  c.v = cache_view(v, "v_cache");
  c.ki = cache_view(ki, "ki_cache");
  c.k_scale = to_view(k_scale, "k_scale");
  c.v_scale = to_view(v_scale, "v_scale");
  c.ki_scale = to_view(ki_scale, "ki_scale");
  return c;
}

msa::PagedBatch make_batch(const InArray& cu_q, const InArray& kv_lens, const InArray& page_table) {
  return {to_view(cu_q, "cu_seqlens_q"), to_view(kv_lens, "kv_lens"), to_view(page_table, "page_table")};
}

msa::Context paged_context(std::uintptr_t stream, const OptOut& workspace) {
  msa::Context ctx;
  ctx.stream = reinterpret_cast<void*>(stream);
  if (workspace) {
    ctx.workspace.data = workspace->data();
    ctx.workspace.bytes = workspace->nbytes();
  }
  return ctx;
}

}  // namespace

void bind_paged(nb::module_& m) {
  nb::class_<msa::PagedPlan>(m, "PagedPlan", "One serving step's schedule (include/msa/paged.h).")
      .def_ro("batch", &msa::PagedPlan::batch)
      .def_ro("total_q", &msa::PagedPlan::total_q)
      .def_ro("max_q_len", &msa::PagedPlan::max_q_len)
      .def_ro("max_kv_len", &msa::PagedPlan::max_kv_len)
      .def_ro("workspace_bytes", &msa::PagedPlan::workspace_bytes)
      .def_prop_ro("dense", [](const msa::PagedPlan& p) { return p.options.dense; });

  m.def(
      "paged_plan",
      [](const msa::Config& cfg, const InArray& q_lens, const InArray& kv_lens,
         const std::string& dtype, const std::string& device, int device_index, bool dense,
         int num_threads, int num_workers) {
        const std::vector<int32_t> ql = host_lengths(q_lens, "q_lens"), kl = host_lengths(kv_lens, "kv_lens");
        MSA_CHECK_ARG(ql.size() == kl.size(), "kv_lens", "must have as many entries as q_lens");
        MSA_CHECK_ARG(device == "cpu" || device == "cuda", "device", "must be 'cpu' or 'cuda'");
        msa::PagedOptions opt;
        opt.dense = dense;
        opt.num_threads = num_threads;
        opt.num_workers = num_workers;
        const msa::Device dev = device == "cpu" ? msa::Device::cpu() : msa::Device::cuda(device_index);
        return msa::paged_plan(cfg, ql.data(), kl.data(), int(ql.size()), paged_dtype(dtype), dev, opt);
      },
      "cfg"_a, "q_lens"_a, "kv_lens"_a, "dtype"_a = "bfloat16", "device"_a = "cpu",
      "device_index"_a = 0, "dense"_a = false, "num_threads"_a = 0, "num_workers"_a = 0);

  m.def(
      "paged_append_kv",
      [](const msa::PagedPlan& plan, const InArray& cu_q, const InArray& kv_lens,
         const InArray& page_table, const InArray& k_new, const InArray& v_new, const InArray& ki_new,
         const OutArray& k_cache, const OutArray& v_cache, const OutArray& ki_cache,
         const OptIn& k_scale, const OptIn& v_scale, const OptIn& ki_scale, std::uintptr_t stream) {
        const msa::PagedBatch b = make_batch(cu_q, kv_lens, page_table);
        const msa::PagedKVCache c = make_cache(k_cache, v_cache, ki_cache, k_scale, v_scale, ki_scale);
        const msa::TensorView kn = to_view(k_new, "k_new"), vn = to_view(v_new, "v_new"),
                              kin = to_view(ki_new, "ki_new");
        const msa::Context ctx = paged_context(stream, std::nullopt);
        nb::gil_scoped_release release;
        msa::paged_append_kv(plan, b, kn, vn, kin, c, ctx);
      },
      "plan"_a, "cu_seqlens_q"_a, "kv_lens"_a, "page_table"_a, "k_new"_a, "v_new"_a, "ki_new"_a,
      "k_cache"_a, "v_cache"_a, "ki_cache"_a, "k_scale"_a.none() = nb::none(),
      "v_scale"_a.none() = nb::none(), "ki_scale"_a.none() = nb::none(), "stream"_a = 0);

  m.def(
      "paged_check_batch",
      [](const msa::PagedPlan& plan, const InArray& cu_q, const InArray& kv_lens, const InArray& page_table,
         const OutArray& k_cache, const OutArray& v_cache, const OutArray& ki_cache, const OptIn& k_scale,
         const OptIn& v_scale, const OptIn& ki_scale, std::uintptr_t stream) {
        const msa::PagedBatch b = make_batch(cu_q, kv_lens, page_table);
        const msa::PagedKVCache c = make_cache(k_cache, v_cache, ki_cache, k_scale, v_scale, ki_scale);
        const msa::Context ctx = paged_context(stream, std::nullopt);
        nb::gil_scoped_release release;
        msa::paged_check_batch(plan, b, c, ctx);
      },
      "plan"_a, "cu_seqlens_q"_a, "kv_lens"_a, "page_table"_a, "k_cache"_a, "v_cache"_a, "ki_cache"_a,
      "k_scale"_a.none() = nb::none(), "v_scale"_a.none() = nb::none(), "ki_scale"_a.none() = nb::none(),
      "stream"_a = 0);

  m.def(
      "paged_run",
      [](const msa::PagedPlan& plan, const InArray& cu_q, const InArray& kv_lens,
         const InArray& page_table, const InArray& q, const OptIn& qi, const OutArray& k_cache,
         const OutArray& v_cache, const OutArray& ki_cache, const OutArray& out, const OutArray& lse,
         const OptOut& topk, const OutArray& workspace, const OptIn& k_scale, const OptIn& v_scale,
         const OptIn& ki_scale, std::uintptr_t stream) {
        const msa::PagedBatch b = make_batch(cu_q, kv_lens, page_table);
        const msa::PagedKVCache c = make_cache(k_cache, v_cache, ki_cache, k_scale, v_scale, ki_scale);
        const msa::TensorView q_v = to_view(q, "q"), qi_v = to_view(qi, "qi");
        const msa::TensorView out_v = to_view(out, "out"), lse_v = to_view(lse, "lse"),
                              topk_v = to_view(topk, "topk");
        const msa::Context ctx = paged_context(stream, workspace);
        nb::gil_scoped_release release;
        msa::paged_run(plan, b, q_v, qi_v, c, out_v, lse_v, topk_v, ctx);
      },
      "plan"_a, "cu_seqlens_q"_a, "kv_lens"_a, "page_table"_a, "q"_a, "qi"_a.none(), "k_cache"_a,
      "v_cache"_a, "ki_cache"_a, "out"_a, "lse"_a, "topk"_a.none(), "workspace"_a,
      "k_scale"_a.none() = nb::none(), "v_scale"_a.none() = nb::none(),
      "ki_scale"_a.none() = nb::none(), "stream"_a = 0);
}
