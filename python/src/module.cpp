// The nanobind extension msa._C: a thin mirror of include/msa/ops.h (see docs/python.md).
// Every op converts its DLPack arguments to TensorViews with the GIL held, then releases the GIL for
// the computation. C++ errors become msa.ArgumentError / msa.NotSupportedError / msa.Error, classes
// defined in python/msa/_errors.py so that they can carry docstrings and the `.argument` attribute.
#include <nanobind/nanobind.h>
#include <nanobind/ndarray.h>
#include <nanobind/stl/optional.h>
#include <nanobind/stl/string.h>

#include <cstdint>
#include <optional>
#include <string>

#include "msa/error.h"
#include "msa/ops.h"
#include "tensor_view.h"

namespace nb = nanobind;
using namespace nb::literals;

void bind_paged(nb::module_& m);  // paged.cpp: the serving API
using msa::python::InArray;
using msa::python::OutArray;
using msa::python::to_view;

namespace {

using OptIn = std::optional<InArray>;
using OptOut = std::optional<OutArray>;

// Python exception classes, looked up once at import and kept alive for the process.
struct ErrorTypes {
  PyObject* error = nullptr;
  PyObject* argument_error = nullptr;
  PyObject* not_supported = nullptr;
};
ErrorTypes g_errors;

void raise_python(PyObject* type, const char* what, const std::string* argument) {
  nb::object instance = nb::borrow(type)(what);
  if (argument) instance.attr("argument") = *argument;
  PyErr_SetObject(type, instance.ptr());
}

void translate(const std::exception_ptr& p, void*) {
  try {
    std::rethrow_exception(p);
  } catch (const msa::ArgumentError& e) {
    raise_python(g_errors.argument_error, e.what(), &e.argument());
  } catch (const msa::NotSupportedError& e) {
    raise_python(g_errors.not_supported, e.what(), nullptr);
  } catch (const msa::Error& e) {
    raise_python(g_errors.error, e.what(), nullptr);
  }
}

msa::Op parse_op(const std::string& op) {
  if (op == "index_topk") return msa::Op::index_topk;
  if (op == "sparse_forward") return msa::Op::sparse_forward;
  if (op == "sparse_backward") return msa::Op::sparse_backward;
  if (op == "kl_alignment") return msa::Op::kl_alignment;
  if (op == "dense_forward") return msa::Op::dense_forward;
  if (op == "dense_backward") return msa::Op::dense_backward;
  throw msa::ArgumentError("op", "unknown operation '" + op +
                                     "'; expected index_topk, sparse_forward, sparse_backward, "
                                     "kl_alignment, dense_forward or dense_backward");
}

// dtype of the floating inputs, by name (as torch and numpy print it, without the module).
msa::DType parse_dtype(const std::string& name) {
  for (msa::DType d : {msa::DType::f32, msa::DType::f16, msa::DType::bf16, msa::DType::f64})
    if (name == msa::dtype_name(d)) return d;
  throw msa::ArgumentError("dtype", "unknown dtype '" + name +
                                        "'; expected float32, float16, bfloat16 or float64");
}

msa::Varlen make_varlen(const InArray& cu_q, const InArray& cu_k, int max_q, int max_k) {
  msa::Varlen v;
  v.cu_seqlens_q = to_view(cu_q, "cu_seqlens_q");
  v.cu_seqlens_k = to_view(cu_k, "cu_seqlens_k");
  v.max_seqlen_q = max_q;
  v.max_seqlen_k = max_k;
  return v;
}

msa::Context make_context(std::uintptr_t stream, const OptOut& workspace, int num_threads,
                          bool deterministic = false) {
  msa::Context ctx;
  ctx.stream = reinterpret_cast<void*>(stream);
  ctx.num_threads = num_threads;
  ctx.deterministic = deterministic;
  if (workspace) {
    // Any dtype will do (uint8 is usual): the workspace is raw bytes.
    ctx.workspace.data = workspace->data();
    ctx.workspace.bytes = workspace->nbytes();
  }
  return ctx;
}

// Keyword arguments every op takes (python_api.md "common").
#define MSA_COMMON_ARGS                                                                 \
  "max_seqlen_q"_a = 0, "max_seqlen_k"_a = 0, "stream"_a = 0,                          \
      "workspace"_a.none() = nb::none(), "num_threads"_a = 0

void bind_config(nb::module_& m) {
  nb::class_<msa::Config>(m, "Config", "Problem configuration (include/msa/config.h).")
      .def(
          "__init__",
          [](msa::Config* c, int num_q_heads, int num_kv_heads, int head_dim, int index_head_dim,
             int block_size, int topk, float scale, float index_scale) {
            new (c) msa::Config{num_q_heads, num_kv_heads, head_dim,  index_head_dim,
                                block_size,  topk,         scale,     index_scale};
          },
          "num_q_heads"_a = 64, "num_kv_heads"_a = 4, "head_dim"_a = 128,
          "index_head_dim"_a = 128, "block_size"_a = 128, "topk"_a = 16, "scale"_a = 0.f,
          "index_scale"_a = 0.f)
      .def_rw("num_q_heads", &msa::Config::num_q_heads)
      .def_rw("num_kv_heads", &msa::Config::num_kv_heads)
      .def_rw("head_dim", &msa::Config::head_dim)
      .def_rw("index_head_dim", &msa::Config::index_head_dim)
      .def_rw("block_size", &msa::Config::block_size)
      .def_rw("topk", &msa::Config::topk)
      .def_rw("scale", &msa::Config::scale)
      .def_rw("index_scale", &msa::Config::index_scale)
      .def("group_size", &msa::Config::group_size)
      .def("softmax_scale", &msa::Config::softmax_scale)
      .def("index_softmax_scale", &msa::Config::index_softmax_scale)
      .def("validate", &msa::Config::validate)
      .def("__repr__", [](const msa::Config& c) {
        return "msa.Config(num_q_heads=" + std::to_string(c.num_q_heads) +
               ", num_kv_heads=" + std::to_string(c.num_kv_heads) +
               ", head_dim=" + std::to_string(c.head_dim) +
               ", index_head_dim=" + std::to_string(c.index_head_dim) +
               ", block_size=" + std::to_string(c.block_size) + ", topk=" + std::to_string(c.topk) +
               ", scale=" + std::to_string(c.scale) +
               ", index_scale=" + std::to_string(c.index_scale) + ")";
      });
}

void bind_ops(nb::module_& m) {
  m.def("cuda_available", &msa::cuda_available, "Whether this build has a CUDA backend and a GPU.");
  m.def("cuda_device_count", &msa::cuda_device_count);

  m.def(
      "workspace_bytes",
      [](const std::string& op, const msa::Config& cfg, const InArray& cu_q, const InArray& cu_k,
         int64_t total_q, int64_t total_k, int max_q, int max_k, int num_threads,
         const std::string& dtype) {
        const msa::Varlen v = make_varlen(cu_q, cu_k, max_q, max_k);
        return msa::workspace_bytes(parse_op(op), cfg, v, total_q, total_k, v.cu_seqlens_q.device,
                                    num_threads, parse_dtype(dtype));
      },
      "op"_a, "cfg"_a, "cu_seqlens_q"_a, "cu_seqlens_k"_a, "total_q"_a, "total_k"_a,
      "max_seqlen_q"_a = 0, "max_seqlen_k"_a = 0, "num_threads"_a = 0, "dtype"_a = "float32");

  m.def(
      "index_topk",
      [](const msa::Config& cfg, const InArray& qi, const InArray& ki, const InArray& cu_q,
         const InArray& cu_k, const OutArray& topk, const OptOut& selected_lse, float temperature,
         int max_q, int max_k, std::uintptr_t stream, const OptOut& workspace, int num_threads) {
        const msa::Varlen v = make_varlen(cu_q, cu_k, max_q, max_k);
        const msa::TensorView qi_v = to_view(qi, "qi"), ki_v = to_view(ki, "ki");
        const msa::TensorView topk_v = to_view(topk, "topk");
        const msa::TensorView lse_v = to_view(selected_lse, "selected_lse");
        const msa::Context ctx = make_context(stream, workspace, num_threads);
        nb::gil_scoped_release release;
        msa::index_topk(cfg, v, qi_v, ki_v, topk_v, lse_v, temperature, ctx);
      },
      "cfg"_a, "qi"_a, "ki"_a, "cu_seqlens_q"_a, "cu_seqlens_k"_a, "topk"_a,
      "selected_lse"_a.none() = nb::none(), "temperature"_a = 1.f, MSA_COMMON_ARGS);

  m.def(
      "sparse_attention_forward",
      [](const msa::Config& cfg, const InArray& q, const InArray& k, const InArray& v,
         const InArray& topk, const InArray& cu_q, const InArray& cu_k, const OutArray& out,
         const OutArray& lse, int max_q, int max_k, std::uintptr_t stream, const OptOut& workspace,
         int num_threads) {
        const msa::Varlen vl = make_varlen(cu_q, cu_k, max_q, max_k);
        const msa::TensorView q_v = to_view(q, "q"), k_v = to_view(k, "k"), v_v = to_view(v, "v");
        const msa::TensorView topk_v = to_view(topk, "topk");
        const msa::TensorView out_v = to_view(out, "out"), lse_v = to_view(lse, "lse");
        const msa::Context ctx = make_context(stream, workspace, num_threads);
        nb::gil_scoped_release release;
        msa::sparse_attention_forward(cfg, vl, q_v, k_v, v_v, topk_v, out_v, lse_v, ctx);
      },
      "cfg"_a, "q"_a, "k"_a, "v"_a, "topk"_a, "cu_seqlens_q"_a, "cu_seqlens_k"_a, "out"_a, "lse"_a,
      MSA_COMMON_ARGS);

  m.def(
      "sparse_attention_backward",
      [](const msa::Config& cfg, const InArray& q, const InArray& k, const InArray& v,
         const InArray& topk, const InArray& out, const InArray& lse, const InArray& dout,
         const InArray& cu_q, const InArray& cu_k, const OutArray& dq, const OutArray& dk,
         const OutArray& dv, bool deterministic, int max_q, int max_k, std::uintptr_t stream,
         const OptOut& workspace, int num_threads) {
        const msa::Varlen vl = make_varlen(cu_q, cu_k, max_q, max_k);
        const msa::TensorView q_v = to_view(q, "q"), k_v = to_view(k, "k"), v_v = to_view(v, "v");
        const msa::TensorView topk_v = to_view(topk, "topk");
        const msa::TensorView out_v = to_view(out, "out"), lse_v = to_view(lse, "lse");
        const msa::TensorView dout_v = to_view(dout, "dout");
        const msa::TensorView dq_v = to_view(dq, "dq"), dk_v = to_view(dk, "dk"),
                              dv_v = to_view(dv, "dv");
        const msa::Context ctx = make_context(stream, workspace, num_threads, deterministic);
        nb::gil_scoped_release release;
        msa::sparse_attention_backward(cfg, vl, q_v, k_v, v_v, topk_v, out_v, lse_v, dout_v, dq_v,
                                       dk_v, dv_v, ctx);
      },
      "cfg"_a, "q"_a, "k"_a, "v"_a, "topk"_a, "out"_a, "lse"_a, "dout"_a, "cu_seqlens_q"_a,
      "cu_seqlens_k"_a, "dq"_a, "dk"_a, "dv"_a, "deterministic"_a = false, MSA_COMMON_ARGS);

  m.def(
      "kl_alignment",
      [](const msa::Config& cfg, const InArray& q, const InArray& k, const InArray& lse,
         const InArray& qi, const InArray& ki, const OptIn& topk, const InArray& cu_q,
         const InArray& cu_k, float coeff, const OutArray& loss, const OutArray& dqi,
         const OutArray& dki, int max_q, int max_k, std::uintptr_t stream, const OptOut& workspace,
         int num_threads) {
        const msa::Varlen vl = make_varlen(cu_q, cu_k, max_q, max_k);
        const msa::TensorView q_v = to_view(q, "q"), k_v = to_view(k, "k");
        const msa::TensorView lse_v = to_view(lse, "lse");
        const msa::TensorView qi_v = to_view(qi, "qi"), ki_v = to_view(ki, "ki");
        const msa::TensorView topk_v = to_view(topk, "topk");
        const msa::TensorView loss_v = to_view(loss, "loss");
        const msa::TensorView dqi_v = to_view(dqi, "dqi"), dki_v = to_view(dki, "dki");
        const msa::Context ctx = make_context(stream, workspace, num_threads);
        nb::gil_scoped_release release;
        msa::kl_alignment(cfg, vl, q_v, k_v, lse_v, qi_v, ki_v, topk_v, coeff, loss_v, dqi_v,
                          dki_v, ctx);
      },
      "cfg"_a, "q"_a, "k"_a, "lse"_a, "qi"_a, "ki"_a, "topk"_a.none(), "cu_seqlens_q"_a,
      "cu_seqlens_k"_a, "coeff"_a, "loss"_a, "dqi"_a, "dki"_a, MSA_COMMON_ARGS);

  m.def(
      "dense_attention_forward",
      [](const msa::Config& cfg, const InArray& q, const InArray& k, const InArray& v,
         const InArray& cu_q, const InArray& cu_k, const OutArray& out, const OutArray& lse,
         int max_q, int max_k, std::uintptr_t stream, const OptOut& workspace, int num_threads) {
        const msa::Varlen vl = make_varlen(cu_q, cu_k, max_q, max_k);
        const msa::TensorView q_v = to_view(q, "q"), k_v = to_view(k, "k"), v_v = to_view(v, "v");
        const msa::TensorView out_v = to_view(out, "out"), lse_v = to_view(lse, "lse");
        const msa::Context ctx = make_context(stream, workspace, num_threads);
        nb::gil_scoped_release release;
        msa::dense_attention_forward(cfg, vl, q_v, k_v, v_v, out_v, lse_v, ctx);
      },
      "cfg"_a, "q"_a, "k"_a, "v"_a, "cu_seqlens_q"_a, "cu_seqlens_k"_a, "out"_a, "lse"_a,
      MSA_COMMON_ARGS);

  m.def(
      "dense_attention_backward",
      [](const msa::Config& cfg, const InArray& q, const InArray& k, const InArray& v,
         const InArray& out, const InArray& lse, const InArray& dout, const InArray& cu_q,
         const InArray& cu_k, const OutArray& dq, const OutArray& dk, const OutArray& dv,
         bool deterministic, int max_q, int max_k, std::uintptr_t stream, const OptOut& workspace,
         int num_threads) {
        const msa::Varlen vl = make_varlen(cu_q, cu_k, max_q, max_k);
        const msa::TensorView q_v = to_view(q, "q"), k_v = to_view(k, "k"), v_v = to_view(v, "v");
        const msa::TensorView out_v = to_view(out, "out"), lse_v = to_view(lse, "lse");
        const msa::TensorView dout_v = to_view(dout, "dout");
        const msa::TensorView dq_v = to_view(dq, "dq"), dk_v = to_view(dk, "dk"),
                              dv_v = to_view(dv, "dv");
        const msa::Context ctx = make_context(stream, workspace, num_threads, deterministic);
        nb::gil_scoped_release release;
        msa::dense_attention_backward(cfg, vl, q_v, k_v, v_v, out_v, lse_v, dout_v, dq_v, dk_v,
                                      dv_v, ctx);
      },
      "cfg"_a, "q"_a, "k"_a, "v"_a, "out"_a, "lse"_a, "dout"_a, "cu_seqlens_q"_a,
      "cu_seqlens_k"_a, "dq"_a, "dk"_a, "dv"_a, "deterministic"_a = false, MSA_COMMON_ARGS);
}

}  // namespace

NB_MODULE(_C, m) {
  m.doc() = "msa C++ operations (mirror of include/msa/ops.h)";
  nb::module_ errors = nb::module_::import_("msa._errors");
  g_errors.error = errors.attr("Error").inc_ref().ptr();
  g_errors.argument_error = errors.attr("ArgumentError").inc_ref().ptr();
  g_errors.not_supported = errors.attr("NotSupportedError").inc_ref().ptr();
  nb::register_exception_translator(&translate);
  bind_config(m);
  bind_ops(m);
  bind_paged(m);
}
