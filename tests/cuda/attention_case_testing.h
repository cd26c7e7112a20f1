// Pieces of a CUDA attention test case shared by the forward (attention_cuda_testing.h), backward and
// KL alignment (training_cuda_testing.h) helpers: the Config of a case and valid random topk rows.
#pragma once

#include <algorithm>
#include <random>
#include <vector>

#include "msa/config.h"
#include "msa/rules.h"
#include "problem_fixture.h"

namespace msa {
namespace testing {

// One attention test case: Hq, Hkv, head dim, block size, k, per-sequence query and key lengths, dtype.
struct Case {
  int hq, hkv, d, block, k;
  std::vector<int32_t> lq, lk;
  DType dtype;
};

// Hq, Hkv, head dim, block size and k of a case; every other field keeps its default.
inline Config attention_config(int hq, int hkv, int d, int block, int k) {
  return make_config(hq, hkv, d, Config{}.index_head_dim, block, k);
}

// Valid random topk rows [Hkv, total_q, k]: distinct ids below the local block, the local block,
// -1 holes anywhere.
inline std::vector<int32_t> random_topk(const Config& cfg, const reference::Lengths& lens, std::mt19937_64& rng) {
  const int64_t tq = lens.total_q();
  std::vector<int32_t> topk(size_t(cfg.num_kv_heads * tq * cfg.topk), rules::kUnusedSlot);
  for (int g = 0; g < cfg.num_kv_heads; ++g)
    for (int64_t row = 0; row < tq; ++row) {
      const int64_t local = rules::local_block(reference::locate_query(lens, row).position, cfg.block_size);
      std::vector<int32_t> ids;
      for (int32_t j = 0; j < local; ++j) ids.push_back(j);
      std::shuffle(ids.begin(), ids.end(), rng);
      ids.resize(size_t(rules::num_nonlocal_selected(local, cfg.topk)));
      if (!ids.empty() && rng() % 3 == 0) ids.pop_back();  // a hole
      ids.push_back(int32_t(local));
      ids.resize(size_t(cfg.topk), rules::kUnusedSlot);
      std::shuffle(ids.begin(), ids.end(), rng);
      std::copy(ids.begin(), ids.end(), topk.begin() + (g * tq + row) * cfg.topk);
    }
  return topk;
}

}  // namespace testing
}  // namespace msa
