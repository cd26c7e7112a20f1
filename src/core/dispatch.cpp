// Validation of every public operation, then dispatch to the backend where the tensors live.
#include <cmath>
#include <string>

#include "core/backend.h"
#include "core/validate.h"
#include "msa/error.h"
#include "msa/ops.h"

namespace msa {

using detail::check_input_dtype;
using detail::check_output;
using detail::check_tensor;
using detail::Problem;
using detail::stats_dtype;

namespace {

#if defined(MSA_WITH_CUDA)
#define MSA_DISPATCH(p, fn, ...)                                                       \
  ((p).device.type == DeviceType::cpu                                                  \
       ? detail::cpu::fn(__VA_ARGS__)                                                  \
       : detail::cuda::on_device((p).device, [&] { return detail::cuda::fn(__VA_ARGS__); }))
#else
#define MSA_DISPATCH(p, fn, ...)                                                       \
  ((p).device.type == DeviceType::cpu                                                  \
       ? detail::cpu::fn(__VA_ARGS__)                                                  \
       : throw NotSupportedError("msa: this build has no CUDA backend (built without nvcc)"))
#endif

void check_topk(const Problem& p, const TensorView& topk) {
  check_tensor(topk, "topk", {p.cfg.num_kv_heads, p.total_q, p.cfg.topk}, DType::i32, p.device);
}

void check_workspace(const Problem& p, Op op, const Context& ctx) {
  if (!ctx.workspace.data) return;
  const std::size_t need = MSA_DISPATCH(p, workspace_bytes, op, p, ctx.num_threads);
  MSA_CHECK_ARG(ctx.workspace.bytes >= need, "workspace",
                "needs " + std::to_string(need) + " bytes, got " +
                    std::to_string(ctx.workspace.bytes));
}

// Problem for the main-branch operations, anchored on q (dtype, device, total_q) and k (total_k).
Problem main_problem(const Config& cfg, const Varlen& varlen, const TensorView& q,
                     const TensorView& k) {
  check_input_dtype(q, "q", q.device);
  MSA_CHECK_ARG(q.ndim == 3, "q", "must have 3 dimensions [total_q, Hq, D]");
  MSA_CHECK_ARG(k.defined() && k.ndim == 3, "k", "must have 3 dimensions [total_k, Hkv, D]");
  Problem p = detail::make_problem(cfg, varlen, q.shape[0], k.shape[0], q.dtype, q.device);
  check_tensor(q, "q", {p.total_q, cfg.num_q_heads, cfg.head_dim}, p.dtype, p.device);
  check_tensor(k, "k", {p.total_k, cfg.num_kv_heads, cfg.head_dim}, p.dtype, p.device);
  return p;
}

void check_forward_io(const Problem& p, const TensorView& v, const TensorView& out,
                      const TensorView& lse) {
  check_tensor(v, "v", {p.total_k, p.cfg.num_kv_heads, p.cfg.head_dim}, p.dtype, p.device);
  check_output(out, "out", {p.total_q, p.cfg.num_q_heads, p.cfg.head_dim}, p.dtype, p.device);
  check_output(lse, "lse", {p.total_q, p.cfg.num_q_heads}, stats_dtype(p.dtype), p.device);
}

void check_backward_io(const Problem& p, const TensorView& dout, const TensorView& dq,
                       const TensorView& dk, const TensorView& dv) {
  check_tensor(dout, "dout", {p.total_q, p.cfg.num_q_heads, p.cfg.head_dim}, p.dtype, p.device);
  check_output(dq, "dq", {p.total_q, p.cfg.num_q_heads, p.cfg.head_dim}, p.dtype, p.device);
  check_output(dk, "dk", {p.total_k, p.cfg.num_kv_heads, p.cfg.head_dim}, p.dtype, p.device);
  check_output(dv, "dv", {p.total_k, p.cfg.num_kv_heads, p.cfg.head_dim}, p.dtype, p.device);
}

}  // namespace

std::size_t workspace_bytes(Op op, const Config& cfg, const Varlen& varlen, int64_t total_q,
                            int64_t total_k, Device device, int num_threads, DType dtype) {
  Problem p = detail::make_problem(cfg, varlen, total_q, total_k, dtype, device);
  return MSA_DISPATCH(p, workspace_bytes, op, p, num_threads);
}

void index_topk(const Config& cfg, const Varlen& varlen, const TensorView& qi, const TensorView& ki,
                const TensorView& topk, const TensorView& selected_lse, float temperature,
                const Context& ctx) {
  check_input_dtype(qi, "qi", qi.device);
  MSA_CHECK_ARG(qi.ndim == 3, "qi", "must have 3 dimensions [total_q, Hkv, Di]");
  MSA_CHECK_ARG(ki.defined() && ki.ndim == 2, "ki", "must have 2 dimensions [total_k, Di]");
  detail::check_positive(temperature, "temperature");
  Problem p = detail::make_problem(cfg, varlen, qi.shape[0], ki.shape[0], qi.dtype, qi.device);
  check_tensor(qi, "qi", {p.total_q, cfg.num_kv_heads, cfg.index_head_dim}, p.dtype, p.device);
  check_tensor(ki, "ki", {p.total_k, cfg.index_head_dim}, p.dtype, p.device);
  check_output(topk, "topk", {cfg.num_kv_heads, p.total_q, cfg.topk}, DType::i32, p.device);
  if (selected_lse.defined())
    check_output(selected_lse, "selected_lse", {cfg.num_kv_heads, p.total_q}, stats_dtype(p.dtype), p.device);
  check_workspace(p, Op::index_topk, ctx);
  MSA_DISPATCH(p, index_topk, p, qi, ki, topk, selected_lse, temperature, ctx);
}

void sparse_attention_forward(const Config& cfg, const Varlen& varlen, const TensorView& q,
                              const TensorView& k, const TensorView& v, const TensorView& topk,
                              const TensorView& out, const TensorView& lse, const Context& ctx) {
  Problem p = main_problem(cfg, varlen, q, k);
  check_forward_io(p, v, out, lse);
  check_topk(p, topk);
  check_workspace(p, Op::sparse_forward, ctx);
  MSA_DISPATCH(p, attention_forward, p, q, k, v, topk, out, lse, ctx);
}

void sparse_attention_backward(const Config& cfg, const Varlen& varlen, const TensorView& q,
                               const TensorView& k, const TensorView& v, const TensorView& topk,
                               const TensorView& out, const TensorView& lse, const TensorView& dout,
                               const TensorView& dq, const TensorView& dk, const TensorView& dv,
                               const Context& ctx) {
  Problem p = main_problem(cfg, varlen, q, k);
  check_forward_io(p, v, out, lse);
  check_backward_io(p, dout, dq, dk, dv);
  check_topk(p, topk);
  check_workspace(p, Op::sparse_backward, ctx);
  MSA_DISPATCH(p, attention_backward, p, q, k, v, topk, out, lse, dout, dq, dk, dv, ctx);
}

void kl_alignment(const Config& cfg, const Varlen& varlen, const TensorView& q, const TensorView& k,
                  const TensorView& lse, const TensorView& qi, const TensorView& ki,
                  const TensorView& topk, float coeff, const TensorView& loss,
                  const TensorView& dqi, const TensorView& dki, const Context& ctx) {
  Problem p = main_problem(cfg, varlen, q, k);
  MSA_CHECK_ARG(std::isfinite(coeff), "coeff", "must be finite");
  check_tensor(lse, "lse", {p.total_q, cfg.num_q_heads}, stats_dtype(p.dtype), p.device);
  check_tensor(qi, "qi", {p.total_q, cfg.num_kv_heads, cfg.index_head_dim}, p.dtype, p.device);
  check_tensor(ki, "ki", {p.total_k, cfg.index_head_dim}, p.dtype, p.device);
  if (topk.defined()) check_topk(p, topk);
  check_tensor(loss, "loss", {1}, stats_dtype(p.dtype), p.device);
  check_output(dqi, "dqi", {p.total_q, cfg.num_kv_heads, cfg.index_head_dim}, p.dtype, p.device);
  check_output(dki, "dki", {p.total_k, cfg.index_head_dim}, p.dtype, p.device);
  check_workspace(p, Op::kl_alignment, ctx);
  MSA_DISPATCH(p, kl_alignment, p, q, k, lse, qi, ki, topk, coeff, loss, dqi, dki, ctx);
}

void dense_attention_forward(const Config& cfg, const Varlen& varlen, const TensorView& q,
                             const TensorView& k, const TensorView& v, const TensorView& out,
                             const TensorView& lse, const Context& ctx) {
  Problem p = main_problem(cfg, varlen, q, k);
  check_forward_io(p, v, out, lse);
  check_workspace(p, Op::dense_forward, ctx);
  MSA_DISPATCH(p, attention_forward, p, q, k, v, TensorView{}, out, lse, ctx);
}

void dense_attention_backward(const Config& cfg, const Varlen& varlen, const TensorView& q,
                              const TensorView& k, const TensorView& v, const TensorView& out,
                              const TensorView& lse, const TensorView& dout, const TensorView& dq,
                              const TensorView& dk, const TensorView& dv, const Context& ctx) {
  Problem p = main_problem(cfg, varlen, q, k);
  check_forward_io(p, v, out, lse);
  check_backward_io(p, dout, dq, dk, dv);
  check_workspace(p, Op::dense_backward, ctx);
  MSA_DISPATCH(p, attention_backward, p, q, k, v, TensorView{}, out, lse, dout, dq, dk, dv, ctx);
}

bool cuda_available() {
#if defined(MSA_WITH_CUDA)
  return detail::cuda::device_count() > 0;
#else
  return false;
#endif
}

int cuda_device_count() {
#if defined(MSA_WITH_CUDA)
  return detail::cuda::device_count();
#else
  return 0;
#endif
}

}  // namespace msa
