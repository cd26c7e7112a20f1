// The serving API driven the way an engine drives it: one cache carried across steps, a prefill step
// then decode steps of 1 to 3 new tokens per request (speculative decoding), requests that pause
// (0 new tokens) or finish, pages taken from a shuffled free list as sequences grow past a block
// boundary. After every step, selections and outputs equal the contiguous API over each request's
// tokens so far (paged_compare.h). Both page layouts, bf16 and f32, dense mode too.
#include <gtest/gtest.h>

#include <algorithm>
#include <numeric>
#include <random>
#include <string>
#include <vector>

#include "msa/paged.h"
#include "msa/rules.h"
#include "paged_compare.h"
#include "paged_fixture.h"

namespace msa {
namespace {

using testing::KvLayout;

Config loop_config() {
  Config c;
  c.num_q_heads = 8;
  c.num_kv_heads = 2;
  c.head_dim = 32;
  c.index_head_dim = 16;
  c.block_size = 16;
  c.topk = 4;
  return c;
}

// Copies row `src_row` of `src` ([rows, ...] contiguous) into row `dst_row` of `dst`.
void copy_row(const HostTensor& src, int64_t src_row, HostTensor& dst, int64_t dst_row) {
  int64_t width = 1;
  for (size_t d = 1; d < src.shape().size(); ++d) width *= src.shape()[d];
  for (int64_t i = 0; i < width; ++i) dst.set(dst_row * width + i, src.get(src_row * width + i));
}

struct Loop {
  Config cfg = loop_config();
  DType dtype;
  KvLayout layout;
  bool dense;
  // Every token of every request, each one also a query: rows of request r start at cu[r].
  std::vector<int32_t> final_lens;
  testing::TestProblem all;
  HostTensor k_cache, v_cache, ki_cache;
  std::vector<int32_t> free_pages;
  std::vector<std::vector<int32_t>> pages;  // per request, its pages in logical order
  std::vector<int32_t> lens;                // tokens cached so far

  Loop(DType dt, KvLayout kv_layout, bool dense_mode, std::vector<int32_t> final_lengths, uint64_t seed)
      : dtype(dt), layout(kv_layout), dense(dense_mode), final_lens(std::move(final_lengths)),
        all(cfg, final_lens, final_lens, dt, seed), lens(final_lens.size(), 0) {
    const int B = cfg.block_size;
    int64_t num_pages = 2;  // spare pages never handed out
    for (int32_t n : final_lens) num_pages += rules::num_blocks(n, B);
    free_pages.resize(size_t(num_pages));
    std::iota(free_pages.begin(), free_pages.end(), 0);
    std::shuffle(free_pages.begin(), free_pages.end(), std::mt19937_64(seed + 1));
    k_cache = HostTensor(dt, testing::kv_storage_shape(layout, num_pages, B, cfg.num_kv_heads, cfg.head_dim));
    v_cache = HostTensor(dt, testing::kv_storage_shape(layout, num_pages, B, cfg.num_kv_heads, cfg.head_dim));
    ki_cache = HostTensor(dt, {num_pages, B, cfg.index_head_dim});
    k_cache.poison();
    v_cache.poison();
    ki_cache.poison();
    pages.resize(final_lens.size());
  }

  PagedKVCache cache() {
    return {testing::kv_logical_view(k_cache.view(), layout), testing::kv_logical_view(v_cache.view(), layout),
            ki_cache.view(), {}, {}, {}};
  }

  // One step: `n_new[r]` new tokens for request r. Checks it against the contiguous API.
  void step(const std::vector<int32_t>& n_new) {
    const int batch = int(n_new.size()), B = cfg.block_size;
    std::vector<int32_t> kv(static_cast<size_t>(batch), 0);
    for (int r = 0; r < batch; ++r) {
      kv[size_t(r)] = lens[size_t(r)] + n_new[size_t(r)];
      while (int64_t(pages[size_t(r)].size()) < rules::num_blocks(kv[size_t(r)], B)) {  // a new page
        pages[size_t(r)].push_back(free_pages.back());
        free_pages.pop_back();
      }
    }
    size_t width = 1;
    for (const auto& p : pages) width = std::max(width, p.size());
    HostTensor table(DType::i32, {batch, int64_t(width)}), cu_q(DType::i32, {batch + 1}), kv_t(DType::i32, {batch});
    cu_q.set(0, 0);
    for (int r = 0; r < batch; ++r) {
      for (size_t j = 0; j < width; ++j)
        table.set(int64_t(r) * int64_t(width) + int64_t(j), j < pages[size_t(r)].size() ? pages[size_t(r)][j] : -1);
      cu_q.set(r + 1, cu_q.get(r) + n_new[size_t(r)]);
      kv_t.set(r, kv[size_t(r)]);
    }
    // This step's tokens (new k / v / ki, and their queries), and the contiguous problem of every
    // request's tokens so far with this step's as its queries.
    testing::TestProblem ref(cfg, n_new, kv, dtype, 7);
    const int64_t tq = ref.total_q();
    HostTensor k_new(dtype, {tq, cfg.num_kv_heads, cfg.head_dim}), v_new(dtype, {tq, cfg.num_kv_heads, cfg.head_dim});
    HostTensor ki_new(dtype, {tq, cfg.index_head_dim});
    for (int r = 0; r < batch; ++r) {
      const int64_t first = all.lens.cu_k[size_t(r)];
      for (int32_t t = 0; t < kv[size_t(r)]; ++t) {
        const int64_t row = ref.lens.cu_k[size_t(r)] + t;
        copy_row(all.k, first + t, ref.k, row);
        copy_row(all.v, first + t, ref.v, row);
        copy_row(all.ki, first + t, ref.ki, row);
      }
      for (int32_t i = 0; i < n_new[size_t(r)]; ++i) {
        const int64_t tok = first + lens[size_t(r)] + i, row = ref.lens.cu_q[size_t(r)] + i;
        copy_row(all.q, tok, ref.q, row);
        copy_row(all.qi, tok, ref.qi, row);
        copy_row(all.k, tok, k_new, row);
        copy_row(all.v, tok, v_new, row);
        copy_row(all.ki, tok, ki_new, row);
      }
    }
    PagedOptions opt;
    opt.dense = dense;
    const PagedPlan plan = paged_plan(cfg, n_new.data(), kv.data(), batch, dtype, Device::cpu(), opt);
    std::vector<unsigned char> ws(plan.workspace_bytes);
    Context ctx;
    ctx.workspace = {ws.data(), ws.size()};
    const PagedBatch b{cu_q.view(), kv_t.view(), table.view()};
    paged_append_kv(plan, b, k_new.view(), v_new.view(), ki_new.view(), cache(), ctx);
    testing::PagedOutputs got(cfg, tq, dtype);
    paged_run(plan, b, ref.q.view(), ref.qi.view(), cache(), got.out.view(), got.lse.view(),
              dense ? TensorView{} : got.topk.view(), ctx);
    testing::expect_paged_equals_contiguous(ref, got, dense);
    lens = kv;
  }
};

struct LoopCase {
  DType dtype;
  KvLayout layout;
  bool dense;
};

class PagedDecodeLoop : public ::testing::TestWithParam<LoopCase> {};

TEST_P(PagedDecodeLoop, PrefillThenSpeculativeDecodeSteps) {
  const LoopCase lc = GetParam();
  // Prompts of 5, 70 and 17 tokens, then 12 steps; request 0 pauses every fourth step, request 2
  // stops after step 7. Final lengths: what those steps add up to.
  const std::vector<int32_t> prompts = {5, 70, 17};
  const int steps = 12;
  auto new_tokens = [&](int step, int r) -> int32_t {
    if (r == 0 && step % 4 == 3) return 0;
    if (r == 2 && step >= 7) return 0;
    return 1 + (step + r) % 3;
  };
  std::vector<int32_t> final_lens = prompts;
  for (int s = 0; s < steps; ++s)
    for (int r = 0; r < 3; ++r) final_lens[size_t(r)] += new_tokens(s, r);
  Loop loop(lc.dtype, lc.layout, lc.dense, final_lens, 4242);
  SCOPED_TRACE("prefill");
  loop.step(prompts);
  for (int s = 0; s < steps; ++s) {
    SCOPED_TRACE("decode step " + std::to_string(s));
    std::vector<int32_t> n = {new_tokens(s, 0), new_tokens(s, 1), new_tokens(s, 2)};
    loop.step(n);
    if (::testing::Test::HasFatalFailure()) return;
  }
  for (int r = 0; r < 3; ++r) EXPECT_EQ(loop.lens[size_t(r)], final_lens[size_t(r)]);
}

INSTANTIATE_TEST_SUITE_P(
    Cpu, PagedDecodeLoop,
    ::testing::Values(LoopCase{DType::bf16, KvLayout::token_major, false},
                      LoopCase{DType::bf16, KvLayout::head_major, false},
                      LoopCase{DType::f32, KvLayout::token_major, false},
                      LoopCase{DType::bf16, KvLayout::head_major, true}),
    [](const ::testing::TestParamInfo<LoopCase>& i) {
      return std::string(dtype_name(i.param.dtype)) + "_" + testing::kv_layout_name(i.param.layout) +
             (i.param.dense ? "_dense" : "");
    });

}  // namespace
}  // namespace msa
