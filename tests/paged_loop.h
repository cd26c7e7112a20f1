// An engine-style serving loop on the host for the paged tests: one cache carried across steps, pages
// taken from a shuffled free list as sequences cross block boundaries, and per step the inputs of
// paged_append_kv / paged_run plus the contiguous problem of every request's tokens so far with the
// step's new tokens as its queries (the reference). Shared by the CPU and CUDA loop tests.
#pragma once

#include <algorithm>
#include <numeric>
#include <random>
#include <utility>
#include <vector>

#include "common/host_tensor.h"
#include "msa/paged.h"
#include "msa/rules.h"
#include "paged_fixture.h"
#include "problem_fixture.h"

namespace msa {
namespace testing {

// Copies row `src_row` of `src` ([rows, ...] contiguous) into row `dst_row` of `dst`.
inline void copy_row(const HostTensor& src, int64_t src_row, HostTensor& dst, int64_t dst_row) {
  int64_t width = 1;
  for (size_t d = 1; d < src.shape().size(); ++d) width *= src.shape()[d];
  for (int64_t i = 0; i < width; ++i) dst.set(dst_row * width + i, src.get(src_row * width + i));
}

// One step's inputs.
struct LoopStep {
  std::vector<int32_t> q_lens, kv_lens;
  HostTensor table, cu_q, kv, k_new, v_new, ki_new;
  TestProblem ref;  // the contiguous problem; its q / qi are the step's queries
  LoopStep(const Config& cfg, std::vector<int32_t> ql, std::vector<int32_t> kl, DType dt)
      : q_lens(std::move(ql)), kv_lens(std::move(kl)), ref(cfg, q_lens, kv_lens, dt, 7) {}
};

class ServingLoop {
 public:
  Config cfg;
  DType dtype;
  KvLayout layout;
  HostTensor k_cache, v_cache, ki_cache;  // host storage in `layout`, NaN where nothing was written
  std::vector<int32_t> lens;              // tokens cached so far, per request

  // final_lens: each request's length after the last step (its tokens are drawn up front).
  ServingLoop(const Config& c, DType dt, KvLayout kv_layout, const std::vector<int32_t>& final_lens, uint64_t seed)
      : cfg(c), dtype(dt), layout(kv_layout), lens(final_lens.size(), 0), all_(c, final_lens, final_lens, dt, seed),
        pages_(final_lens.size()) {
    const int B = cfg.block_size;
    int64_t num_pages = 2;  // spare pages never handed out
    for (int32_t n : final_lens) num_pages += rules::num_blocks(n, B);
    free_.resize(size_t(num_pages));
    std::iota(free_.begin(), free_.end(), 0);
    std::shuffle(free_.begin(), free_.end(), std::mt19937_64(seed + 1));
    k_cache = HostTensor(dt, kv_storage_shape(layout, num_pages, B, cfg.num_kv_heads, cfg.head_dim));
    v_cache = HostTensor(dt, kv_storage_shape(layout, num_pages, B, cfg.num_kv_heads, cfg.head_dim));
    ki_cache = HostTensor(dt, {num_pages, B, cfg.index_head_dim});
    k_cache.poison();
    v_cache.poison();
    ki_cache.poison();
  }

  // Logical views of caches stored in this loop's layout (host or device storage).
  PagedKVCache cache(const TensorView& k, const TensorView& v, const TensorView& ki) const {
    return {kv_logical_view(k, layout), kv_logical_view(v, layout), ki, {}, {}, {}};
  }
  PagedKVCache host_cache() { return cache(k_cache.view(), v_cache.view(), ki_cache.view()); }

  // The next step: n_new[r] new tokens for request r (new pages as needed); advances `lens`.
  LoopStep next(const std::vector<int32_t>& n_new) {
    const int batch = int(n_new.size()), B = cfg.block_size;
    std::vector<int32_t> kv(static_cast<size_t>(batch), 0);
    for (int r = 0; r < batch; ++r) {
      kv[size_t(r)] = lens[size_t(r)] + n_new[size_t(r)];
      while (int64_t(pages_[size_t(r)].size()) < rules::num_blocks(kv[size_t(r)], B)) {
        pages_[size_t(r)].push_back(free_.back());
        free_.pop_back();
      }
    }
    LoopStep s(cfg, n_new, kv, dtype);
    size_t width = 1;
    for (const auto& p : pages_) width = std::max(width, p.size());
    s.table = HostTensor(DType::i32, {batch, int64_t(width)});
    s.cu_q = HostTensor(DType::i32, {batch + 1});
    s.kv = HostTensor(DType::i32, {batch});
    s.cu_q.set(0, 0);
    for (int r = 0; r < batch; ++r) {
      for (size_t j = 0; j < width; ++j)
        s.table.set(int64_t(r) * int64_t(width) + int64_t(j), j < pages_[size_t(r)].size() ? pages_[size_t(r)][j] : -1);
      s.cu_q.set(r + 1, s.cu_q.get(r) + n_new[size_t(r)]);
      s.kv.set(r, kv[size_t(r)]);
    }
    const int64_t tq = s.ref.total_q();
    s.k_new = HostTensor(dtype, {tq, cfg.num_kv_heads, cfg.head_dim});
    s.v_new = HostTensor(dtype, {tq, cfg.num_kv_heads, cfg.head_dim});
    s.ki_new = HostTensor(dtype, {tq, cfg.index_head_dim});
    for (int r = 0; r < batch; ++r) {
      const int64_t first = all_.lens.cu_k[size_t(r)];  // = its first query row too (every token is a query)
      for (int32_t t = 0; t < kv[size_t(r)]; ++t) {
        const int64_t row = s.ref.lens.cu_k[size_t(r)] + t;
        copy_row(all_.k, first + t, s.ref.k, row);
        copy_row(all_.v, first + t, s.ref.v, row);
        copy_row(all_.ki, first + t, s.ref.ki, row);
      }
      for (int32_t i = 0; i < n_new[size_t(r)]; ++i) {
        const int64_t tok = first + lens[size_t(r)] + i, row = s.ref.lens.cu_q[size_t(r)] + i;
        copy_row(all_.q, tok, s.ref.q, row);
        copy_row(all_.qi, tok, s.ref.qi, row);
        copy_row(all_.k, tok, s.k_new, row);
        copy_row(all_.v, tok, s.v_new, row);
        copy_row(all_.ki, tok, s.ki_new, row);
      }
    }
    lens = kv;
    return s;
  }

 private:
  TestProblem all_;  // every token of every request, each one also a query
  std::vector<int32_t> free_;
  std::vector<std::vector<int32_t>> pages_;  // per request, its pages in logical order
};

// The steps of the loop tests: prompts of 5, 70 and 17 tokens, then 12 decode steps of 1 to 3 new
// tokens (speculative decoding); request 0 pauses every fourth step, request 2 stops after step 7.
inline std::vector<std::vector<int32_t>> loop_schedule() {
  std::vector<std::vector<int32_t>> steps = {{5, 70, 17}};
  for (int s = 0; s < 12; ++s) {
    std::vector<int32_t> n(3);
    for (int r = 0; r < 3; ++r)
      n[size_t(r)] = (r == 0 && s % 4 == 3) || (r == 2 && s >= 7) ? 0 : 1 + (s + r) % 3;
    steps.push_back(n);
  }
  return steps;
}

inline std::vector<int32_t> final_lengths(const std::vector<std::vector<int32_t>>& steps) {
  std::vector<int32_t> lens(steps.front().size(), 0);
  for (const auto& n : steps)
    for (size_t r = 0; r < n.size(); ++r) lens[r] += n[r];
  return lens;
}

}  // namespace testing
}  // namespace msa
