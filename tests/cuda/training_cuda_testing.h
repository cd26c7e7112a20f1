// Shared pieces of the CUDA training tests (backward, KL alignment): valid random topk rows, the main
// branch forward on the CPU (out, lse for the backward and the KL teacher) and byte comparisons.
#pragma once

#include <algorithm>
#include <cstring>
#include <random>
#include <vector>

#include "common/host_tensor.h"
#include "cuda/attention_case_testing.h"
#include "msa/ops.h"
#include "msa/rules.h"
#include "problem_fixture.h"

namespace msa {
namespace testing {

// random_topk (attention_case_testing.h) as an i32 tensor [Hkv, total_q, k].
inline HostTensor random_topk_tensor(const Config& cfg, const reference::Lengths& lens, std::mt19937_64& rng) {
  const std::vector<int32_t> ids = random_topk(cfg, lens, rng);
  HostTensor topk(DType::i32, {cfg.num_kv_heads, lens.total_q(), cfg.topk});
  for (size_t i = 0; i < ids.size(); ++i) topk.set(int64_t(i), ids[i]);
  return topk;
}

// out and lse of the main branch (CPU backend), sparse over topk or dense when topk is null.
inline void cpu_forward(TestProblem& p, HostTensor* topk, HostTensor& out, HostTensor& lse) {
  const int64_t tq = p.total_q();
  out = HostTensor(p.dtype, {tq, p.cfg.num_q_heads, p.cfg.head_dim});
  lse = HostTensor(DType::f32, {tq, p.cfg.num_q_heads});
  if (topk)
    sparse_attention_forward(p.cfg, p.varlen, p.q.view(), p.k.view(), p.v.view(), topk->view(), out.view(),
                             lse.view());
  else
    dense_attention_forward(p.cfg, p.varlen, p.q.view(), p.k.view(), p.v.view(), out.view(), lse.view());
}

inline bool same_bytes(HostTensor& a, HostTensor& b) {
  const size_t n = size_t(a.numel()) * dtype_size(a.dtype());
  return a.numel() == b.numel() && std::memcmp(a.data(), b.data(), n) == 0;
}

}  // namespace testing
}  // namespace msa
