// Argument checks of paged_append_kv / paged_run (ArgumentError names the argument), then dispatch to
// the backend where the tensors live.
#include <initializer_list>
#include <string>

#include "core/backend.h"
#include "core/paged_backend.h"
#include "core/validate.h"
#include "msa/error.h"
#include "msa/paged.h"
#include "msa/rules.h"

namespace msa {

using detail::check_output;
using detail::check_tensor;

namespace {

// A scale tensor is given exactly when its cache is FP8: f32, [num_pages, Hkv] or [num_pages].
void check_scale(const PagedPlan& plan, const TensorView& cache, const char* cache_name,
                 const TensorView& scale, const char* name, std::initializer_list<int64_t> shape) {
  if (cache.dtype != DType::fp8_e4m3) {
    MSA_CHECK_ARG(!scale.defined(), name,
                  std::string("is given but ") + cache_name + " is " + dtype_name(cache.dtype) +
                      " (scales belong to float8_e4m3fn caches only)");
    return;
  }
  MSA_CHECK_ARG(scale.defined(), name,
                std::string("is required: ") + cache_name + " is float8_e4m3fn (value = byte x scale)");
  check_tensor(scale, name, shape, DType::f32, plan.device);
}

int64_t num_pages_of(const PagedPlan& plan, const PagedKVCache& cache) {
  MSA_CHECK_ARG(cache.k.defined() && cache.k.ndim == 4, "k_cache",
                "must have 4 dimensions [num_pages, B, Hkv, D]");
  const Config& c = plan.cfg;
  const int64_t pages = cache.k.shape[0];
  // Each cache is in the plan's dtype or FP8 E4M3 (then with its scale), independently.
  auto cache_dtype = [&](const TensorView& t) {
    return t.dtype == DType::fp8_e4m3 ? DType::fp8_e4m3 : plan.dtype;
  };
  // Written by paged_append_kv; any non-overlapping strides (token- or head-major pages) are fine.
  check_output(cache.k, "k_cache", {pages, c.block_size, c.num_kv_heads, c.head_dim}, cache_dtype(cache.k),
               plan.device);
  check_output(cache.v, "v_cache", {pages, c.block_size, c.num_kv_heads, c.head_dim}, cache_dtype(cache.v),
               plan.device);
  check_output(cache.ki, "ki_cache", {pages, c.block_size, c.index_head_dim}, cache_dtype(cache.ki), plan.device);
  check_scale(plan, cache.k, "k_cache", cache.k_scale, "k_scale", {pages, c.num_kv_heads});
  check_scale(plan, cache.v, "v_cache", cache.v_scale, "v_scale", {pages, c.num_kv_heads});
  check_scale(plan, cache.ki, "ki_cache", cache.ki_scale, "ki_scale", {pages});
  return pages;
}

// Shapes of the batch tensors, and that the page table is wide enough for the plan's lengths.
void check_batch_shapes(const PagedPlan& plan, const PagedBatch& batch) {
  const int nb = plan.batch;
  check_tensor(batch.cu_seqlens_q, "cu_seqlens_q", {nb + 1}, DType::i32, plan.device);
  check_tensor(batch.kv_lens, "kv_lens", {nb}, DType::i32, plan.device);
  MSA_CHECK_ARG(batch.page_table.defined() && batch.page_table.ndim == 2, "page_table",
                "must have 2 dimensions [batch, max_pages]");
  const int64_t width = batch.page_table.shape[1];
  check_tensor(batch.page_table, "page_table", {nb, width}, DType::i32, plan.device);
  for (int r = 0; r < nb; ++r) {
    const int64_t need = rules::num_blocks(plan.kv_lens[r], plan.cfg.block_size);
    MSA_CHECK_ARG(width >= need, "page_table",
                  "has " + std::to_string(width) + " columns but request " + std::to_string(r) +
                      " with kv_len " + std::to_string(plan.kv_lens[r]) + " needs " +
                      std::to_string(need) + " pages");
  }
}

// The batch's contents, in host memory: lengths equal to the plan's and every page id a request
// uses inside the cache. table_stride: int32 elements from a page-table row to the next.
void check_batch_values(const PagedPlan& plan, const int32_t* cu, const int32_t* kv, const int32_t* table,
                        int64_t table_stride, int64_t num_pages) {
  const int nb = plan.batch;
  for (int r = 0; r <= nb; ++r)
    MSA_CHECK_ARG(cu[r] == plan.cu_seqlens_q[r], "cu_seqlens_q",
                  "entry " + std::to_string(r) + " is " + std::to_string(cu[r]) + ", the plan has " +
                      std::to_string(plan.cu_seqlens_q[r]));
  for (int r = 0; r < nb; ++r) {
    MSA_CHECK_ARG(kv[r] == plan.kv_lens[r], "kv_lens",
                  "entry " + std::to_string(r) + " is " + std::to_string(kv[r]) + ", the plan has " +
                      std::to_string(plan.kv_lens[r]));
    const int32_t* row = table + r * table_stride;
    const int64_t need = rules::num_blocks(plan.kv_lens[r], plan.cfg.block_size);
    for (int64_t j = 0; j < need; ++j)
      MSA_CHECK_ARG(row[j] >= 0 && row[j] < num_pages, "page_table",
                    "page id " + std::to_string(row[j]) + " at [" + std::to_string(r) + ", " +
                        std::to_string(j) + "] is outside the cache's " + std::to_string(num_pages) +
                        " pages");
  }
}

// Every call checks the shapes; the CPU reads its tensors directly, so it checks their contents too.
// (A GPU backend contains bad contents in its kernels; paged_check_batch checks them on demand.)
void check_batch(const PagedPlan& plan, const PagedBatch& batch, int64_t num_pages) {
  check_batch_shapes(plan, batch);
  if (plan.device.type != DeviceType::cpu) return;
  check_batch_values(plan, batch.cu_seqlens_q.ptr<const int32_t>(), batch.kv_lens.ptr<const int32_t>(),
                     batch.page_table.ptr<const int32_t>(), batch.page_table.stride[0], num_pages);
}

[[noreturn]] void no_backend(const PagedPlan& plan) {
  throw NotSupportedError("msa: the paged serving API has no " + device_name(plan.device) +
                          " backend yet (CPU only)");
}

}  // namespace

void paged_append_kv(const PagedPlan& plan, const PagedBatch& batch, const TensorView& k_new,
                     const TensorView& v_new, const TensorView& ki_new, const PagedKVCache& cache,
                     const Context& ctx) {
  (void)ctx;  // used by the CUDA backend only
  const int64_t pages = num_pages_of(plan, cache);
  check_batch(plan, batch, pages);
  const Config& c = plan.cfg;
  check_tensor(k_new, "k_new", {plan.total_q, c.num_kv_heads, c.head_dim}, plan.dtype, plan.device);
  check_tensor(v_new, "v_new", {plan.total_q, c.num_kv_heads, c.head_dim}, plan.dtype, plan.device);
  check_tensor(ki_new, "ki_new", {plan.total_q, c.index_head_dim}, plan.dtype, plan.device);
#ifdef MSA_WITH_CUDA
  if (plan.device.type == DeviceType::cuda)
    return detail::cuda::on_device(
        plan.device, [&] { detail::cuda::paged_append_kv(plan, batch, k_new, v_new, ki_new, cache, ctx); });
#endif
  if (plan.device.type != DeviceType::cpu) no_backend(plan);
  detail::cpu::paged_append_kv(plan, batch, k_new, v_new, ki_new, cache);
}

void paged_check_batch(const PagedPlan& plan, const PagedBatch& batch, const PagedKVCache& cache,
                       const Context& ctx) {
  const int64_t pages = num_pages_of(plan, cache);
  check_batch(plan, batch, pages);
  if (plan.device.type == DeviceType::cpu) return;  // check_batch read the contents already
#ifdef MSA_WITH_CUDA
  if (plan.device.type == DeviceType::cuda) {
    const detail::HostBatch host = detail::cuda::on_device(
        plan.device, [&] { return detail::cuda::paged_batch_to_host(batch, ctx); });
    check_batch_values(plan, host.cu_seqlens_q.data(), host.kv_lens.data(), host.page_table.data(),
                       batch.page_table.shape[1], pages);
    return;
  }
#endif
  no_backend(plan);
}

void paged_run(const PagedPlan& plan, const PagedBatch& batch, const TensorView& q,
               const TensorView& qi, const PagedKVCache& cache, const TensorView& out,
               const TensorView& lse, const TensorView& topk, const Context& ctx) {
  const int64_t pages = num_pages_of(plan, cache);
  check_batch(plan, batch, pages);
  const Config& c = plan.cfg;
  const int64_t tq = plan.total_q;
  check_tensor(q, "q", {tq, c.num_q_heads, c.head_dim}, plan.dtype, plan.device);
  check_output(out, "out", {tq, c.num_q_heads, c.head_dim}, plan.dtype, plan.device);
  check_output(lse, "lse", {tq, c.num_q_heads}, DType::f32, plan.device);
  if (!plan.options.dense) {
    check_tensor(qi, "qi", {tq, c.num_kv_heads, c.index_head_dim}, plan.dtype, plan.device);
    check_output(topk, "topk", {c.num_kv_heads, tq, c.topk}, DType::i32, plan.device);
  } else if (topk.defined()) {
    check_tensor(topk, "topk", {c.num_kv_heads, tq, c.topk}, DType::i32, plan.device);
  }
  MSA_CHECK_ARG(ctx.workspace.data != nullptr, "workspace",
                "is required: pass plan.workspace_bytes (" + std::to_string(plan.workspace_bytes) +
                    " bytes) in ctx.workspace");
  MSA_CHECK_ARG(ctx.workspace.bytes >= plan.workspace_bytes, "workspace",
                "needs " + std::to_string(plan.workspace_bytes) + " bytes, got " +
                    std::to_string(ctx.workspace.bytes));
  if (plan.total_q == 0) return;
#ifdef MSA_WITH_CUDA
  if (plan.device.type == DeviceType::cuda)
    return detail::cuda::on_device(
        plan.device, [&] { detail::cuda::paged_run(plan, batch, q, qi, cache, out, lse, topk, ctx); });
#endif
  if (plan.device.type != DeviceType::cpu) no_backend(plan);
  detail::cpu::paged_run(plan, batch, q, qi, cache, out, lse, topk, ctx.workspace);
}

}  // namespace msa
