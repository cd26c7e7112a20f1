// Shared helpers of the CUDA attention forward tests (mma.sync and wgmma kernels): random valid topk
// rows, one poisoned-output CUDA run, the float64 oracle comparison, and a sparse + dense case check.
#pragma once

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <random>
#include <sstream>
#include <string>
#include <vector>

#include "cuda/attention_case_testing.h"
#include "cuda/device_tensor.h"
#include "msa/rules.h"
#include "problem_fixture.h"

namespace msa {
namespace testing {

struct Result {
  HostTensor out, lse;
};

// Runs the CUDA forward (topk empty = dense) with poisoned outputs and returns them on the host.
inline Result run_cuda(TestProblem& p, std::vector<int32_t>* topk, int max_seqlen_q = 0) {
  const int64_t tq = p.total_q();
  Result r{HostTensor(p.dtype, {tq, p.cfg.num_q_heads, p.cfg.head_dim}),
           HostTensor(DType::f32, {tq, p.cfg.num_q_heads})};
  r.out.poison();
  r.lse.poison();
  HostTensor topk_h(DType::i32, {p.cfg.num_kv_heads, tq, p.cfg.topk});
  if (topk)
    for (size_t i = 0; i < topk->size(); ++i) topk_h.set(int64_t(i), (*topk)[i]);
  DeviceTensor dq(p.q), dk(p.k), dv(p.v), dout(r.out), dlse(r.lse), dtopk(topk_h), dcq(p.cu_q), dck(p.cu_k);
  Varlen vl;
  vl.cu_seqlens_q = dcq.view();
  vl.cu_seqlens_k = dck.view();
  vl.max_seqlen_q = max_seqlen_q;
  if (topk)
    sparse_attention_forward(p.cfg, vl, dq.view(), dk.view(), dv.view(), dtopk.view(), dout.view(), dlse.view());
  else
    dense_attention_forward(p.cfg, vl, dq.view(), dk.view(), dv.view(), dout.view(), dlse.view());
  EXPECT_EQ(cudaDeviceSynchronize(), cudaSuccess);
  dout.download();
  dlse.download();
  return r;
}

// Where `got` first leaves `ref` by more than 1e-2 of ref's largest magnitude (or is not finite),
// as a readable index into a [tokens, heads, inner] tensor (inner = 1 for lse).
inline std::string first_mismatch(const std::vector<double>& got, const std::vector<double>& ref, int64_t heads,
                           int64_t inner) {
  double scale = 0;
  for (double r : ref)
    if (std::isfinite(r)) scale = std::max(scale, std::fabs(r));
  const double tol = 1e-2 * (scale > 0 ? scale : 1.0);
  int64_t bad = 0, first = -1;
  double max_err = 0;
  for (size_t i = 0; i < ref.size(); ++i) {
    const double err = std::fabs(got[i] - ref[i]);
    const bool ok = std::isfinite(got[i]) ? err <= tol : got[i] == ref[i];
    if (std::isfinite(err)) max_err = std::max(max_err, err);
    if (!ok && bad++ == 0) first = int64_t(i);
  }
  std::ostringstream s;
  s << bad << " of " << ref.size() << " elements off by more than " << tol << " (max abs err " << max_err << ")";
  if (first >= 0) {
    const int64_t token = first / (heads * inner), head = first / inner % heads, d = first % inner;
    s << "; first at token " << token << " head " << head;
    if (inner > 1) s << " d " << d;
    s << ": got " << got[first] << " expected " << ref[first];
  }
  return s.str();
}

// out and lse within 1e-2 relative error of the float64 oracle; a failure says where (first_mismatch).
inline void expect_matches_oracle(TestProblem& p, const std::vector<int32_t>* topk, const Result& r) {
  std::vector<double> out_ref, lse_ref;
  reference::attention_forward(p.cfg, p.lens, p.q.to_double(), p.k.to_double(), p.v.to_double(),
                               topk ? topk->data() : nullptr, out_ref, lse_ref);
  const std::vector<double> out = r.out.to_double(), lse = r.lse.to_double();
  const int64_t hq = p.cfg.num_q_heads;
  const char* what = topk ? "sparse" : "dense";
  EXPECT_LT(relative_error(out, out_ref), 1e-2)
      << what << " out: " << first_mismatch(out, out_ref, hq, p.cfg.head_dim);
  EXPECT_LT(relative_error(lse, lse_ref), 1e-2) << what << " lse: " << first_mismatch(lse, lse_ref, hq, 1);
}

inline void check_case(const Case& c, uint64_t seed) {
  const Config cfg = attention_config(c.hq, c.hkv, c.d, c.block, c.k);
  TestProblem p(cfg, c.lq, c.lk, c.dtype, seed);
  std::mt19937_64 rng(seed * 7 + 1);
  std::vector<int32_t> topk = random_topk(cfg, p.lens, rng);
  Result sparse = run_cuda(p, &topk);
  expect_matches_oracle(p, &topk, sparse);
  Result dense = run_cuda(p, nullptr);
  expect_matches_oracle(p, nullptr, dense);
}

}  // namespace testing
}  // namespace msa
