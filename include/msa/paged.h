// Serving API of MSA (SPEC.md "Inference"): a paged KV cache and one forward step of a batch of
// requests, each with 1..n new query tokens (decode: 1..16, speculative/MTP included; chunked
// prefill: any number) that are the causal suffix of the request's cached tokens.
//
// Style of FlashInfer's BatchDecode/BatchPrefill wrappers:
//   1. paged_plan(...)      host only, once per step, outside any CUDA graph capture: validates the
//                           lengths, builds the work schedule and sizes the workspace. One plan serves
//                           every layer of the step.
//   2. paged_append_kv(...) writes the step's new k / v / ki rows into their pages (per layer).
//   3. paged_run(...)       per layer: index top-k over each request's cached blocks, then sparse
//                           attention over the selected pages only. Every output and all scratch is
//                           preallocated by the caller (ctx.workspace, plan.workspace_bytes); run
//                           allocates nothing and reads no lengths back to the host, so a CUDA backend
//                           can capture it in a graph.
// Layouts (innermost dimension contiguous, outer strides free):
//   k_cache, v_cache [num_pages, B, Hkv, D]    ki_cache [num_pages, B, Di]    (one page = one block)
//   page_table [batch, max_pages] int32: logical block j of request r lives in page page_table[r][j]
//   q [total_q, Hq, D]  qi [total_q, Hkv, Di]  out [total_q, Hq, D]  lse [total_q, Hq] f32
//   topk [Hkv, total_q, k] int32: LOGICAL block ids (as in ops.h), -1 for unused slots
// See docs/serving.md for the design and its choices.
#pragma once

#include <cstddef>
#include <cstdint>
#include <vector>

#include "msa/config.h"
#include "msa/ops.h"
#include "msa/tensor.h"

namespace msa {

// One layer's cache. Each of k, v, ki is in the query dtype (f32, bf16 or f16) or FP8 E4M3
// (DType::fp8_e4m3, value = byte x scale) with its scale: k_scale / v_scale [num_pages, Hkv] f32,
// ki_scale [num_pages] f32, given exactly when that cache is FP8. The caller sets a page's scales
// before paged_append_kv writes into it; append quantises with them (docs/serving.md "FP8 caches").
struct PagedKVCache {
  TensorView k, v, ki;
  TensorView k_scale, v_scale, ki_scale;  // FP8 only; undefined otherwise
};

// K or V pages stored head-major, [num_pages, Hkv, B, D] in memory (FlashInfer's "HND", TensorRT-LLM's
// pages): the logical [num_pages, B, Hkv, D] view the API takes, dims 1 and 2 swapped in the strides.
// Each (page, head) is then one contiguous run of B rows, the order the decode attention reads them in
// (docs/serving.md, "Page layout in memory"). page_stride: elements from a page to the next; 0 means
// Hkv * B * D (2 * Hkv * B * D for K and V interleaved per page, FlashInfer's [pages, 2, Hkv, B, D]).
TensorView head_major_kv_cache(void* data, DType dtype, int64_t num_pages, int block_size, int num_kv_heads,
                               int head_dim, Device device = Device::cpu(), int64_t page_stride = 0);

// The per-step batch description, on the device of the tensors. cu_seqlens_q [batch + 1] int32 (prefix
// sums of q_len), kv_lens [batch] int32 (tokens in the cache INCLUDING this step's new ones),
// page_table [batch, max_pages] int32. They must hold the lengths the plan was made with, and page ids
// in [0, num_pages): the CPU throws ArgumentError otherwise. A GPU cannot read device tensors back
// without a synchronisation (paged_check_batch does, on demand): it writes NaN to the out / lse rows of every query tile (a request's
// queries x one group's heads) that reads a page outside the cache, and clamps lengths to the plan's maxima (total_q, max_q_len, max_kv_len) so that a batch
// unlike its plan gives wrong rows but never reads or writes outside the tensors.
struct PagedBatch {
  TensorView cu_seqlens_q;
  TensorView kv_lens;
  TensorView page_table;
};

struct PagedOptions {
  bool dense = false;   // dense causal attention over every cached block (warmup, baseline); no index
  int num_threads = 0;  // CPU: threads of the schedule, 0 = all hardware threads
  int num_workers = 0;  // CUDA: SMs the schedule fills, 0 = all of the device
};

// Work items of the schedule. Public so a backend can copy them to its device; callers treat them
// as opaque.
struct PagedIndexWork {   // score blocks [block_begin, block_end) for queries [q_begin, q_end)
  int32_t request, q_begin, q_end, block_begin, block_end;
};
struct PagedAttentionWork {  // group `group`, queries [q_begin, q_end), key split `split` of `splits`
  int32_t request, group, q_begin, q_end, split, splits;
  int64_t partial_offset;  // floats into the partials region (splits > 1 only)
};

struct PagedPlan {
  Config cfg;
  DType dtype = DType::bf16;  // q / qi / cache / out dtype
  Device device;
  PagedOptions options;
  int batch = 0;
  int64_t total_q = 0;
  int max_q_len = 0, max_kv_len = 0;
  std::vector<int32_t> cu_seqlens_q;   // host copy [batch + 1]
  std::vector<int32_t> kv_lens;        // host copy [batch]
  std::vector<int64_t> score_offset;   // floats into the block-score region, per request
  std::vector<PagedIndexWork> index_work;
  std::vector<PagedAttentionWork> attention_work;
  int num_threads = 1;
  // Workspace layout (bytes, 64-byte aligned offsets).
  std::size_t scores_offset = 0, partials_offset = 0, thread_offset = 0, thread_bytes = 0;
  std::size_t workspace_bytes = 0;  // pass at least this much in ctx.workspace
};

// Host-side planning. q_lens[r] >= 0 new tokens, kv_lens[r] >= q_lens[r] cached tokens (the new ones
// included), r < batch. dtype is the dtype of q / caches.
PagedPlan paged_plan(const Config& cfg, const int32_t* q_lens, const int32_t* kv_lens, int batch,
                     DType dtype, Device device, const PagedOptions& options = {});

// Writes the new tokens' rows: token i of request r (packed row cu_seqlens_q[r] + i) goes to absolute
// position kv_lens[r] - q_len[r] + i, i.e. page page_table[r][pos / B], slot pos % B.
// k_new, v_new [total_q, Hkv, D], ki_new [total_q, Di], in the cache dtype.
void paged_append_kv(const PagedPlan& plan, const PagedBatch& batch, const TensorView& k_new,
                     const TensorView& v_new, const TensorView& ki_new, const PagedKVCache& cache,
                     const Context& ctx = {});

// Checks the batch tensors' contents against the plan and the cache: cu_seqlens_q and kv_lens equal
// to the plan's lengths, every page id a request uses in [0, num_pages); throws ArgumentError naming
// the tensor, entry and value. paged_run does this itself on the CPU only. On a GPU this copies the
// three tensors to the host and synchronises ctx.stream, so call it outside graph capture (it throws
// inside one): a debug mode, a test, or once per step where a sync is affordable.
void paged_check_batch(const PagedPlan& plan, const PagedBatch& batch, const PagedKVCache& cache,
                       const Context& ctx = {});

// One layer of the step. topk is written (the selection the main branch used; left untouched in dense
// mode, where it may be undefined). ctx.workspace must hold plan.workspace_bytes.
void paged_run(const PagedPlan& plan, const PagedBatch& batch, const TensorView& q,
               const TensorView& qi, const PagedKVCache& cache, const TensorView& out,
               const TensorView& lse, const TensorView& topk, const Context& ctx);

}  // namespace msa
