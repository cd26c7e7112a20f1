// The C++ serving example of docs/serving.md ("Calls"), compiled and run here so that it cannot rot:
// the code between the serving-example markers must appear verbatim in docs/serving.md.
#include <gtest/gtest.h>

#include <algorithm>
#include <string>

#include "doc_example.h"

// [serving-example]
#include <cstdint>
#include <vector>

#include "msa/paged.h"

// One decode step of two requests over a paged cache on the CPU: request 0 adds 1 token to 2999
// cached ones, request 1 adds 3 (speculative decoding) to 297. Returns out and topk.
std::pair<std::vector<float>, std::vector<int32_t>> msa_decode_step_example() {
  using msa::DType;
  msa::Config cfg;  // defaults: D = Di = 128, pages (blocks) of B = 128 tokens, top-16 blocks
  cfg.num_q_heads = 8;
  cfg.num_kv_heads = 2;
  const int64_t Hq = 8, Hkv = 2, D = 128, Di = 128, B = 128, K = cfg.topk;
  const int64_t num_pages = 32, max_pages = 24, total_q = 1 + 3;
  std::vector<int32_t> q_lens = {1, 3}, kv_lens = {3000, 300};  // kv_lens count the new tokens too
  std::vector<int32_t> cu_seqlens_q = {0, 1, 4};
  // The engine's page allocator gave request 0 pages 8..31 and request 1 pages 2, 0, 5.
  std::vector<int32_t> page_table(2 * max_pages, -1);
  for (int j = 0; j < 24; ++j) page_table[j] = 8 + j;
  page_table[max_pages + 0] = 2, page_table[max_pages + 1] = 0, page_table[max_pages + 2] = 5;

  // One layer's cache, token-major [num_pages, B, Hkv, D] (constant here; earlier steps filled it).
  std::vector<float> k_cache(num_pages * B * Hkv * D, 0.02f), v_cache(num_pages * B * Hkv * D, 1.f);
  std::vector<float> ki_cache(num_pages * B * Di, 0.1f);
  // The step's new K / V / index-key rows and its queries, packed over the batch (total_q rows).
  std::vector<float> k_new(total_q * Hkv * D, 0.02f), v_new(total_q * Hkv * D, 1.f);
  std::vector<float> ki_new(total_q * Di, 0.1f), q(total_q * Hq * D, 0.01f), qi(total_q * Hkv * Di, 0.1f);
  std::vector<float> out(total_q * Hq * D), lse(total_q * Hq);
  std::vector<int32_t> topk(Hkv * total_q * K);
  auto view = [](auto& x, DType dtype, std::initializer_list<int64_t> shape) {
    return msa::TensorView::contiguous(x.data(), dtype, shape);  // CUDA: pass Device::cuda(i)
  };

  // Once per step, on the host (outside any CUDA graph capture): the schedule and its workspace.
  const msa::PagedPlan plan =
      msa::paged_plan(cfg, q_lens.data(), kv_lens.data(), 2, DType::f32, msa::Device::cpu());
  std::vector<unsigned char> workspace(plan.workspace_bytes);  // or one buffer kept across steps
  msa::Context ctx;
  ctx.workspace = {workspace.data(), workspace.size()};
  const msa::PagedBatch batch{view(cu_seqlens_q, DType::i32, {3}), view(kv_lens, DType::i32, {2}),
                              view(page_table, DType::i32, {2, max_pages})};

  // Per layer (the same plan and batch): write the new tokens into their pages, then attend.
  const msa::PagedKVCache cache{view(k_cache, DType::f32, {num_pages, B, Hkv, D}),
                                view(v_cache, DType::f32, {num_pages, B, Hkv, D}),
                                view(ki_cache, DType::f32, {num_pages, B, Di}), {}, {}, {}};
  msa::paged_append_kv(plan, batch, view(k_new, DType::f32, {total_q, Hkv, D}),
                       view(v_new, DType::f32, {total_q, Hkv, D}), view(ki_new, DType::f32, {total_q, Di}),
                       cache, ctx);
  msa::paged_run(plan, batch, view(q, DType::f32, {total_q, Hq, D}), view(qi, DType::f32, {total_q, Hkv, Di}),
                 cache, view(out, DType::f32, {total_q, Hq, D}), view(lse, DType::f32, {total_q, Hq}),
                 view(topk, DType::i32, {Hkv, total_q, K}), ctx);
  return {out, topk};  // topk: logical block ids per (group, token), -1 past the visible blocks
}
// [/serving-example]

namespace {

TEST(PagedApiExample, RunsOneDecodeStep) {
  const auto [out, topk] = msa_decode_step_example();
  ASSERT_EQ(out.size(), size_t(4 * 8 * 128));
  for (float x : out) ASSERT_NEAR(x, 1.f, 1e-5f);  // v is all ones: every output is a mean of ones
  // topk [Hkv = 2][total_q = 4][16]: request 0's token (position 2999) sees 24 blocks and keeps 16
  // with its own block 23; request 1's tokens (positions 297..299) see blocks 0..2, all kept.
  for (int g = 0; g < 2; ++g) {
    const int32_t* row = topk.data() + (g * 4 + 0) * 16;
    EXPECT_NE(std::find(row, row + 16, 23), row + 16) << "group " << g;
    EXPECT_EQ(std::count(row, row + 16, -1), 0);
    for (int t = 1; t < 4; ++t) {
      const int32_t* r1 = topk.data() + (g * 4 + t) * 16;
      std::vector<int32_t> kept(r1, r1 + 3);
      std::sort(kept.begin(), kept.end());
      EXPECT_EQ(kept, (std::vector<int32_t>{0, 1, 2})) << "group " << g << " token " << t;
      EXPECT_EQ(std::count(r1, r1 + 16, -1), 13);
    }
  }
}

TEST(PagedApiExample, IsTheCodeShownInServingMd) {
  msa::testing::expect_example_in_doc(__FILE__, "docs/serving.md", "serving-example");
}

}  // namespace
