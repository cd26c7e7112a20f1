// Shared pieces of the CUDA training tests (backward, KL alignment): valid random topk rows, the main
// branch forward on the CPU (out, lse for the backward and the KL teacher) and byte comparisons.
#pragma once

#include <algorithm>
#include <cstring>
#include <random>
#include <vector>

#include "common/host_tensor.h"
#include "msa/ops.h"
#include "msa/rules.h"
#include "problem_fixture.h"

namespace msa {
namespace testing {

// Distinct ids below the local block, the local block, -1 holes anywhere.
inline HostTensor random_topk_tensor(const Config& cfg, const reference::Lengths& lens, std::mt19937_64& rng) {
  const int64_t tq = lens.total_q();
  HostTensor topk(DType::i32, {cfg.num_kv_heads, tq, cfg.topk});
  for (int g = 0; g < cfg.num_kv_heads; ++g)
    for (int64_t row = 0; row < tq; ++row) {
      const int64_t local = rules::local_block(reference::locate_query(lens, row).position, cfg.block_size);
      std::vector<int32_t> ids;
      for (int32_t j = 0; j < local; ++j) ids.push_back(j);
      std::shuffle(ids.begin(), ids.end(), rng);
      ids.resize(size_t(rules::num_nonlocal_selected(local, cfg.topk)));
      if (!ids.empty() && rng() % 3 == 0) ids.pop_back();
      ids.push_back(int32_t(local));
      ids.resize(size_t(cfg.topk), rules::kUnusedSlot);
      std::shuffle(ids.begin(), ids.end(), rng);
      for (int s = 0; s < cfg.topk; ++s) topk.set((g * tq + row) * cfg.topk + s, ids[size_t(s)]);
    }
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
