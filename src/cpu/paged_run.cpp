// CPU paged_run: one OpenMP region per layer, in phases separated by the implicit barriers of
// `omp for`: (1) block scores over each request's ki pages, (2) top-k selection per (query, group),
// (3) sparse attention over the selected pages, per (request, group, query tile, key split),
// (4) LSE merge of split tiles. The work lists come from the plan; nothing is allocated.
#include <omp.h>

#include <algorithm>

#include "core/paged_backend.h"
#include "cpu/amx.h"
#include "cpu/element.h"
#include "cpu/paged_attention.h"
#include "cpu/paged_index.h"

namespace msa {
namespace detail {
namespace cpu {

namespace {

// The index's scratch with the tile-unit rows where bf16 can use them. At run time (thread_bytes
// set) a plan made while AMX was off (MSA_CPU_AMX=0) keeps the smaller layout it was sized for.
paged::IndexScratch index_scratch(const PagedPlan& plan, bool planning) {
  int64_t max_rows = 1;
  for (const PagedIndexWork& w : plan.index_work)
    max_rows = std::max<int64_t>(max_rows, int64_t(w.q_end - w.q_begin) * plan.cfg.num_kv_heads);
  const int64_t blocks = std::max<int64_t>(1, rules::num_blocks(plan.max_kv_len, plan.cfg.block_size));
  const bool amx = plan.dtype == DType::bf16 && amx::usable();
  paged::IndexScratch lay(max_rows, plan.cfg.index_head_dim, blocks, amx);
  if (amx && !planning && lay.bytes > plan.thread_bytes)
    lay = paged::IndexScratch(max_rows, plan.cfg.index_head_dim, blocks, false);
  return lay;
}

std::size_t attention_scratch_bytes(const attn::Geometry& geo) {
  attn::Carver c;
  paged::AttentionScratch s(c, geo);
  return c.used() + geo.Dp * sizeof(float) + attn::Scratch::kAlign;  // + the merge row
}

template <class T>
void run_impl(const PagedPlan& plan, const PagedBatch& batch, const TensorView& q,
              const TensorView& qi, const PagedKVCache& cache, const TensorView& out,
              const TensorView& lse, const TensorView& topk, const Workspace& workspace) {
  const std::uintptr_t a = reinterpret_cast<std::uintptr_t>(workspace.data);
  unsigned char* ws = static_cast<unsigned char*>(workspace.data) + (align_up(a) - a);
  const paged::IndexScratch ilay = index_scratch(plan, false);
  const attn::Geometry geo = paged::attention_geometry(plan);
  const int hkv = plan.cfg.num_kv_heads;
  const int64_t n_index = int64_t(plan.index_work.size());
  const int64_t n_attn = int64_t(plan.attention_work.size());

#pragma omp parallel num_threads(plan.num_threads)
  {
    unsigned char* mine = paged::thread_scratch(ws, plan, omp_get_thread_num());
    if (!plan.options.dense) {
#pragma omp for schedule(dynamic, 1)
      for (int64_t i = 0; i < n_index; ++i)
        paged::score_blocks<T>(plan, plan.index_work[size_t(i)], qi, cache.ki, cache.ki_scale,
                               batch.page_table, ws, mine, ilay);
      int32_t* cand = reinterpret_cast<int32_t*>(mine + ilay.candidates);
#pragma omp for schedule(dynamic, 16)
      for (int64_t row = 0; row < plan.total_q * hkv; ++row) {
        const int64_t qrow = row / hkv;
        const int r = int(std::upper_bound(plan.cu_seqlens_q.begin(), plan.cu_seqlens_q.end(),
                                           int32_t(qrow)) - plan.cu_seqlens_q.begin()) - 1;
        paged::select_row(plan, r, qrow - plan.cu_seqlens_q[r], int(row % hkv), ws, cand, topk);
      }
    }
    attn::Carver c(mine);
    paged::AttentionScratch sc(c, geo);
    float* merge_row = c.take<float>(geo.Dp);
#pragma omp for schedule(dynamic, 1)
    for (int64_t i = 0; i < n_attn; ++i)
      paged::attend_tile<T>(plan, geo, plan.attention_work[size_t(i)], q, cache, batch.page_table,
                            topk, out, lse, ws, sc);
#pragma omp for schedule(dynamic, 1)
    for (int64_t i = 0; i < n_attn; ++i) {
      const PagedAttentionWork& w = plan.attention_work[size_t(i)];
      if (w.splits > 1 && w.split == 0)
        paged::merge_splits<T>(plan, geo, &w, out, lse, ws, merge_row);
    }
  }
}

}  // namespace

std::size_t paged_thread_bytes(const PagedPlan& plan) {
  const attn::Geometry geo = paged::attention_geometry(plan);
  for (const PagedAttentionWork& w : plan.attention_work)
    if (w.q_end - w.q_begin > geo.tile_q)
      throw Error("msa: paged plan's attention tile exceeds the CPU tile size");
  return std::max(index_scratch(plan, true).bytes, attention_scratch_bytes(geo));
}

void paged_run(const PagedPlan& plan, const PagedBatch& batch, const TensorView& q,
               const TensorView& qi, const PagedKVCache& cache, const TensorView& out,
               const TensorView& lse, const TensorView& topk, const Workspace& workspace) {
  MSA_CPU_DISPATCH_FLOAT(plan.dtype, [&] {
    if constexpr (std::is_same_v<scalar_t, double>)
      throw Error("msa: paged serving has no float64 path");
    else
      run_impl<scalar_t>(plan, batch, q, qi, cache, out, lse, topk, workspace);
  });
}

}  // namespace cpu
}  // namespace detail
}  // namespace msa
