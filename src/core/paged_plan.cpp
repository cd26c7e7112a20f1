// paged_plan: validates a step's lengths and builds its work schedule and workspace layout on the
// host (docs/serving.md "Schedule").
#include <algorithm>
#include <string>

#include "core/paged_backend.h"
#include "cpu/cpu_ops.h"
#include "cuda/paged_layout.h"
#include "msa/error.h"
#include "msa/paged.h"
#include "msa/rules.h"

namespace msa {

namespace {

constexpr int kIndexTileRows = 256;      // (query, group) rows sharing one pass over a request's ki pages
constexpr int kAttentionTileRows = 128;  // (query, head) rows of one group sharing each K/V page
constexpr int kMinIndexBlocks = 8;       // smallest block range worth an index work item
constexpr int kItemsPerWorker = 2;       // enough items per worker to balance ragged requests
constexpr int kPartialColumnPad = 16;    // partial rows are padded like the CPU accumulator rows
constexpr std::size_t kAlign = 64;

std::size_t align_up(std::size_t n) { return (n + kAlign - 1) / kAlign * kAlign; }
int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

}  // namespace

PagedPlan paged_plan(const Config& cfg, const int32_t* q_lens, const int32_t* kv_lens, int batch,
                     DType dtype, Device device, const PagedOptions& options) {
  cfg.validate();
  MSA_CHECK_ARG(batch >= 1, "batch", "must be at least 1, got " + std::to_string(batch));
  MSA_CHECK_ARG(q_lens != nullptr, "q_lens", "is required");
  MSA_CHECK_ARG(kv_lens != nullptr, "kv_lens", "is required");
  MSA_CHECK_ARG(dtype == DType::f32 || dtype == DType::bf16 || dtype == DType::f16, "dtype",
                std::string("must be float32, bfloat16 or float16, got ") + dtype_name(dtype));
  MSA_CHECK_ARG(options.num_threads >= 0, "num_threads", "must be >= 0");

  PagedPlan plan;
  plan.cfg = cfg;
  plan.dtype = dtype;
  plan.device = device;
  plan.options = options;
#ifdef MSA_WITH_CUDA
  if (device.type == DeviceType::cuda && options.num_workers == 0)
    plan.options.num_workers = detail::cuda::paged_default_workers(device.index);
#endif
  plan.batch = batch;
  plan.cu_seqlens_q.assign(size_t(batch) + 1, 0);
  plan.kv_lens.assign(kv_lens, kv_lens + batch);
  for (int r = 0; r < batch; ++r) {
    const std::string req = "request " + std::to_string(r);
    MSA_CHECK_ARG(q_lens[r] >= 0, "q_lens", req + " has a negative length " + std::to_string(q_lens[r]));
    MSA_CHECK_ARG(kv_lens[r] >= q_lens[r], "q_lens",
                  req + " has q_len " + std::to_string(q_lens[r]) + " > kv_len " +
                      std::to_string(kv_lens[r]) + " (kv_len counts the new tokens too)");
    const int64_t next = int64_t(plan.cu_seqlens_q[r]) + q_lens[r];
    MSA_CHECK_ARG(next < (int64_t(1) << 31), "q_lens", "total query count overflows int32");
    plan.cu_seqlens_q[r + 1] = int32_t(next);
    plan.max_q_len = std::max(plan.max_q_len, q_lens[r]);
    plan.max_kv_len = std::max(plan.max_kv_len, kv_lens[r]);
  }
  plan.total_q = plan.cu_seqlens_q[batch];

  const int B = cfg.block_size, hkv = cfg.num_kv_heads, G = cfg.group_size(), K = cfg.topk;
  const bool cpu = device.type == DeviceType::cpu;
  plan.num_threads = cpu ? detail::cpu::thread_count(options.num_threads) : 1;
  const int workers = cpu ? plan.num_threads : (plan.options.num_workers > 0 ? plan.options.num_workers : 132);

  // Block scores of every (query, group) row over its request's blocks.
  plan.score_offset.assign(size_t(batch), 0);
  int64_t score_floats = 0;
  for (int r = 0; r < batch; ++r) {
    plan.score_offset[r] = score_floats;
    if (!options.dense) score_floats += int64_t(q_lens[r]) * hkv * rules::num_blocks(kv_lens[r], B);
  }

  // Index work: query tiles x ranges of the tile's visible blocks, split until every worker has
  // items (long requests with few queries - decode at small batch - need the block split).
  if (!options.dense) {
    const int tq = std::max(1, kIndexTileRows / hkv);
    int64_t block_visits = 0;
    for (int r = 0; r < batch; ++r)
      for (int q0 = 0; q0 < q_lens[r]; q0 += tq) {
        const int q1 = std::min(q_lens[r], q0 + tq);
        block_visits += rules::local_block(rules::query_position(q_lens[r], kv_lens[r], q1 - 1), B) + 1;
      }
    const int64_t chunk = std::max<int64_t>(
        kMinIndexBlocks, ceil_div(block_visits, int64_t(kItemsPerWorker) * workers));
    for (int r = 0; r < batch; ++r)
      for (int q0 = 0; q0 < q_lens[r]; q0 += tq) {
        const int q1 = std::min(q_lens[r], q0 + tq);
        const int64_t nblk =
            rules::local_block(rules::query_position(q_lens[r], kv_lens[r], q1 - 1), B) + 1;
        for (int64_t j0 = 0; j0 < nblk; j0 += chunk)
          plan.index_work.push_back({r, q0, q1, int32_t(j0), int32_t(std::min(nblk, j0 + chunk))});
      }
  }

  // Attention work: (request, group, query tile), each split over its blocks when there are fewer
  // tiles than workers; splits > 1 leave partial (o, max, sum) rows merged by their LSE.
  const int tqa = std::max(1, kAttentionTileRows / G);
  const int64_t dp = ceil_div(cfg.head_dim, kPartialColumnPad) * kPartialColumnPad;
  int64_t tiles = 0;
  for (int r = 0; r < batch; ++r) tiles += ceil_div(q_lens[r], tqa) * hkv;
  const int64_t want_splits = tiles ? ceil_div(int64_t(kItemsPerWorker) * workers, tiles) : 1;
  int64_t partial_floats = 0;
  for (int r = 0; r < batch; ++r)
    for (int q0 = 0; q0 < q_lens[r]; q0 += tqa) {
      const int q1 = std::min(q_lens[r], q0 + tqa);
      const int64_t nblk =
          rules::local_block(rules::query_position(q_lens[r], kv_lens[r], q1 - 1), B) + 1;
      const int64_t max_union = options.dense ? nblk : std::min<int64_t>(nblk, int64_t(q1 - q0) * K);
      const int splits = int(std::max<int64_t>(1, std::min(want_splits, max_union)));
      const int64_t rows = int64_t(q1 - q0) * G;
      for (int g = 0; g < hkv; ++g)
        for (int s = 0; s < splits; ++s) {
          plan.attention_work.push_back({r, g, q0, q1, s, splits, partial_floats});
          if (splits > 1) partial_floats += rows * (dp + 2);
        }
    }

  plan.scores_offset = 0;
  plan.partials_offset = align_up(std::size_t(score_floats) * sizeof(float));
  plan.thread_offset = plan.partials_offset + align_up(std::size_t(partial_floats) * sizeof(float));
  plan.thread_bytes = cpu ? align_up(detail::cpu::paged_thread_bytes(plan)) : 0;
  // Slack so a caller's buffer of any alignment can be aligned to kAlign.
  plan.workspace_bytes = plan.thread_offset + plan.thread_bytes * std::size_t(plan.num_threads) + kAlign;
  // The CUDA backend lays the workspace out by its own grid (cuda/paged_layout.h).
  if (device.type == DeviceType::cuda)
    plan.workspace_bytes = std::max(plan.workspace_bytes, detail::cuda::paged::layout_of(plan).bytes);
  return plan;
}

}  // namespace msa
