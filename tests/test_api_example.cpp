// The C++ example of README.md, compiled and run here so that it cannot rot: the code between the
// readme-example markers must appear verbatim in README.md (checked below).
#include <gtest/gtest.h>

#include <cmath>
#include <string>

#include "doc_example.h"

// [readme-example]
#include <cstdint>
#include <vector>

#include "msa/ops.h"

// MSA prefill of one 1000-token sequence on the CPU: index top-k, then sparse attention.
std::vector<float> msa_prefill_example() {
  using msa::DType;
  using msa::TensorView;
  msa::Config cfg;  // defaults: D = Di = 128, block 128, top-16 blocks
  cfg.num_q_heads = 8;
  cfg.num_kv_heads = 2;
  const int64_t T = 1000, Hq = 8, Hkv = 2, D = 128, Di = 128, K = cfg.topk;

  std::vector<int32_t> cu_seqlens = {0, int32_t(T)};  // queries = keys: prefill
  msa::Varlen varlen;
  varlen.cu_seqlens_q = TensorView::contiguous(cu_seqlens.data(), DType::i32, {2});
  varlen.cu_seqlens_k = varlen.cu_seqlens_q;

  std::vector<float> q(T * Hq * D, 0.01f), k(T * Hkv * D, 0.02f), v(T * Hkv * D, 1.f);
  std::vector<float> qi(T * Hkv * Di, 0.1f), ki(T * Di, 0.1f);
  std::vector<float> out(T * Hq * D), lse(T * Hq);
  std::vector<int32_t> topk(Hkv * T * K);
  auto f32 = [](std::vector<float>& x, std::initializer_list<int64_t> shape) {
    return TensorView::contiguous(x.data(), DType::f32, shape);
  };
  const TensorView topk_view = TensorView::contiguous(topk.data(), DType::i32, {Hkv, T, K});

  msa::index_topk(cfg, varlen, f32(qi, {T, Hkv, Di}), f32(ki, {T, Di}), topk_view,
                  TensorView{} /* no selected LSE */);
  msa::sparse_attention_forward(cfg, varlen, f32(q, {T, Hq, D}), f32(k, {T, Hkv, D}),
                                f32(v, {T, Hkv, D}), topk_view, f32(out, {T, Hq, D}),
                                f32(lse, {T, Hq}));
  return out;  // bad arguments throw msa::ArgumentError naming the argument
}
// [/readme-example]

namespace {

TEST(ApiExample, RunsAndAveragesConstantValues) {
  // v is all ones, so every output is a softmax-weighted mean of ones.
  const std::vector<float> out = msa_prefill_example();
  ASSERT_EQ(out.size(), size_t(1000 * 8 * 128));
  for (float x : out) ASSERT_NEAR(x, 1.f, 1e-5f);
}

TEST(ApiExample, IsTheCodeShownInTheReadme) {
  msa::testing::expect_example_in_doc(__FILE__, "README.md", "readme-example");
}

}  // namespace
