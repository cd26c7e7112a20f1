// A random serving step on the host: the contiguous varlen problem (TestProblem) and the same tokens
// in a paged cache with a shuffled page table. The prefix (kv_len - q_len tokens) is written into the
// pages directly; the step's new tokens are left for paged_append_kv. Unwritten cache slots hold NaN,
// so a kernel that reads past kv_len fails.
#pragma once

#include <algorithm>
#include <numeric>
#include <random>
#include <vector>

#include "common/host_tensor.h"
#include "msa/paged.h"
#include "msa/rules.h"
#include "problem_fixture.h"

namespace msa {
namespace testing {

struct PagedStep {
  std::vector<int32_t> q_lens, kv_lens;
  TestProblem p;  // contiguous: queries [total_q], keys [sum kv_len]
  int64_t num_pages = 0, width = 0;
  HostTensor k_cache, v_cache, ki_cache, page_table, cu_q, kv;
  HostTensor k_new, v_new, ki_new;  // the new tokens, packed like q

  PagedStep(const Config& cfg, std::vector<int32_t> ql, std::vector<int32_t> kl, DType dt,
            uint64_t seed, int spare_pages = 3)
      : q_lens(std::move(ql)), kv_lens(std::move(kl)), p(cfg, q_lens, kv_lens, dt, seed) {
    const int B = cfg.block_size, hkv = cfg.num_kv_heads, D = cfg.head_dim, Di = cfg.index_head_dim;
    const int batch = int(q_lens.size());
    for (int r = 0; r < batch; ++r) {
      const int64_t nb = rules::num_blocks(kv_lens[r], B);
      num_pages += nb;
      width = std::max(width, nb);
    }
    num_pages += spare_pages;
    width += 1;  // a wider table than needed is allowed
    std::mt19937_64 rng(seed ^ 0x9e3779b97f4a7c15ull);
    std::vector<int32_t> perm(static_cast<size_t>(num_pages));
    std::iota(perm.begin(), perm.end(), 0);
    std::shuffle(perm.begin(), perm.end(), rng);

    k_cache = HostTensor(dt, {num_pages, B, hkv, D});
    v_cache = HostTensor(dt, {num_pages, B, hkv, D});
    ki_cache = HostTensor(dt, {num_pages, B, Di});
    k_cache.poison();
    v_cache.poison();
    ki_cache.poison();
    page_table = HostTensor(DType::i32, {batch, width});
    cu_q = HostTensor(DType::i32, {batch + 1});
    kv = HostTensor(DType::i32, {batch});
    const int64_t tq = p.total_q();
    k_new = HostTensor(dt, {tq, hkv, D});
    v_new = HostTensor(dt, {tq, hkv, D});
    ki_new = HostTensor(dt, {tq, Di});

    size_t next = 0;
    for (int r = 0; r < batch; ++r) {
      cu_q.set(r + 1, p.lens.cu_q[r + 1]);
      kv.set(r, kv_lens[r]);
      for (int64_t j = 0; j < width; ++j)
        page_table.set(int64_t(r) * width + j,
                       j < rules::num_blocks(kv_lens[r], B) ? perm[next++] : -1);
      const int64_t k0 = p.lens.cu_k[r], prefix = kv_lens[r] - q_lens[r];
      for (int64_t t = 0; t < kv_lens[r]; ++t) {
        const int64_t page = int64_t(page_table.get(int64_t(r) * width + t / B)), slot = t % B;
        const bool cached = t < prefix;
        const int64_t nrow = p.lens.cu_q[r] + (t - prefix);  // packed row of a new token
        for (int h = 0; h < hkv; ++h)
          for (int d = 0; d < D; ++d) {
            const int64_t src = ((k0 + t) * hkv + h) * D + d;
            const int64_t dst = ((page * B + slot) * hkv + h) * D + d;
            if (cached) {
              k_cache.set(dst, p.k.get(src));
              v_cache.set(dst, p.v.get(src));
            } else {
              k_new.set((nrow * hkv + h) * D + d, p.k.get(src));
              v_new.set((nrow * hkv + h) * D + d, p.v.get(src));
            }
          }
        for (int d = 0; d < Di; ++d) {
          if (cached)
            ki_cache.set((page * B + slot) * Di + d, p.ki.get((k0 + t) * Di + d));
          else
            ki_new.set(nrow * Di + d, p.ki.get((k0 + t) * Di + d));
        }
      }
    }
  }

  PagedKVCache cache() { return {k_cache.view(), v_cache.view(), ki_cache.view(), {}, {}, {}}; }
  PagedBatch batch() { return {cu_q.view(), kv.view(), page_table.view()}; }
  PagedPlan plan(const PagedOptions& opt = {}) {
    return paged_plan(p.cfg, q_lens.data(), kv_lens.data(), int(q_lens.size()), p.dtype,
                      Device::cpu(), opt);
  }
};

}  // namespace testing
}  // namespace msa
