// A random MSA problem on the host: config, ragged lengths, inputs in one dtype and the float64 copies
// the oracle sees. Every test draws fresh data from its own seed.
#pragma once

#include <random>
#include <vector>

#include "common/host_tensor.h"
#include "msa/config.h"
#include "reference/oracle.h"

namespace msa {
namespace testing {

// A configuration: heads Hq / Hkv, head dims D / Di, block size B, top-k k.
inline Config make_config(int hq, int hkv, int d, int di, int b, int k) {
  Config c;
  c.num_q_heads = hq;
  c.num_kv_heads = hkv;
  c.head_dim = d;
  c.index_head_dim = di;
  c.block_size = b;
  c.topk = k;
  return c;
}

struct TestProblem {
  Config cfg;
  reference::Lengths lens;
  DType dtype;
  HostTensor cu_q, cu_k;
  Varlen varlen;
  HostTensor q, k, v, qi, ki;

  // q_lengths[b] <= k_lengths[b]; queries are the suffix of their sequence.
  TestProblem(const Config& c, const std::vector<int32_t>& q_lengths,
              const std::vector<int32_t>& k_lengths, DType dt, uint64_t seed)
      : cfg(c), dtype(dt) {
    lens.cu_q = prefix_sums(q_lengths);
    lens.cu_k = prefix_sums(k_lengths);
    const int64_t nb = int64_t(lens.cu_q.size());
    cu_q = HostTensor(DType::i32, {nb});
    cu_k = HostTensor(DType::i32, {nb});
    for (int64_t b = 0; b < nb; ++b) {
      cu_q.set(b, lens.cu_q[b]);
      cu_k.set(b, lens.cu_k[b]);
    }
    varlen.cu_seqlens_q = cu_q.view();
    varlen.cu_seqlens_k = cu_k.view();
    const int64_t tq = lens.total_q(), tk = lens.total_k();
    std::mt19937_64 rng(seed);
    q = HostTensor(dt, {tq, cfg.num_q_heads, cfg.head_dim});
    k = HostTensor(dt, {tk, cfg.num_kv_heads, cfg.head_dim});
    v = HostTensor(dt, {tk, cfg.num_kv_heads, cfg.head_dim});
    qi = HostTensor(dt, {tq, cfg.num_kv_heads, cfg.index_head_dim});
    ki = HostTensor(dt, {tk, cfg.index_head_dim});
    q.fill_normal(rng);
    k.fill_normal(rng);
    v.fill_normal(rng);
    qi.fill_normal(rng);
    ki.fill_normal(rng);
  }

  int64_t total_q() const { return lens.total_q(); }
  int64_t total_k() const { return lens.total_k(); }
};

}  // namespace testing
}  // namespace msa
