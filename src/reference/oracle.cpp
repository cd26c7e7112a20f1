#include "reference/oracle.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <numeric>

#include "msa/rules.h"

namespace msa {
namespace reference {

namespace {

constexpr double kNegInf = -std::numeric_limits<double>::infinity();

double dot(const double* a, const double* b, int n) {
  double s = 0;
  for (int i = 0; i < n; ++i) s += a[i] * b[i];
  return s;
}

double logsumexp(const std::vector<double>& x) {
  double m = kNegInf;
  for (double v : x) m = std::max(m, v);
  if (m == kNegInf) return kNegInf;
  double s = 0;
  for (double v : x) s += std::exp(v - m);
  return m + std::log(s);
}

}  // namespace

QueryRow locate_query(const Lengths& lens, int64_t row) {
  QueryRow r;
  r.seq = int(std::upper_bound(lens.cu_q.begin(), lens.cu_q.end(), int32_t(row)) - lens.cu_q.begin()) - 1;
  // Skip empty sequences that share the same start.
  while (lens.cu_q[r.seq + 1] <= row) ++r.seq;
  const int64_t lq = lens.cu_q[r.seq + 1] - lens.cu_q[r.seq];
  const int64_t lk = lens.cu_k[r.seq + 1] - lens.cu_k[r.seq];
  r.position = rules::query_position(lq, lk, row - lens.cu_q[r.seq]);
  r.k_begin = lens.cu_k[r.seq];
  return r;
}

IndexRow index_row(const Config& cfg, const Lengths& lens, const double* qi, const double* ki,
                   int64_t row, int group, double temperature) {
  const QueryRow qr = locate_query(lens, row);
  const int B = cfg.block_size, Di = cfg.index_head_dim;
  const double iscale = cfg.index_softmax_scale();
  const double* qrow = qi + (row * cfg.num_kv_heads + group) * Di;
  const int64_t local = rules::local_block(qr.position, B);

  IndexRow r;
  r.block_scores.assign(local + 1, kNegInf);
  std::vector<double> token_scores(qr.position + 1);
  for (int64_t t = 0; t <= qr.position; ++t) {
    token_scores[t] = iscale * dot(qrow, ki + (qr.k_begin + t) * Di, Di);
    double& s = r.block_scores[rules::block_of(t, B)];
    s = std::max(s, token_scores[t]);
  }
  std::vector<int64_t> candidates(local);
  std::iota(candidates.begin(), candidates.end(), 0);
  std::sort(candidates.begin(), candidates.end(), [&](int64_t a, int64_t b) {
    return rules::ranks_before(r.block_scores[a], a, r.block_scores[b], b);
  });
  const int n = rules::num_nonlocal_selected(local, cfg.topk);
  r.topk.assign(cfg.topk, rules::kUnusedSlot);
  for (int i = 0; i < n; ++i) r.topk[i] = int32_t(candidates[i]);
  r.topk[rules::local_slot(local, cfg.topk)] = int32_t(local);

  std::vector<double> selected;
  for (int i = 0; i <= n; ++i) {
    const int64_t j = r.topk[i];
    for (int64_t t = rules::block_begin(j, B); t < rules::visible_block_end(j, B, qr.position); ++t)
      selected.push_back(token_scores[t] / temperature);
  }
  r.selected_lse = logsumexp(selected);
  return r;
}

void index_topk(const Config& cfg, const Lengths& lens, const std::vector<double>& qi,
                const std::vector<double>& ki, std::vector<int32_t>& topk,
                std::vector<double>& selected_lse, double temperature) {
  const int64_t tq = lens.total_q();
  const int H = cfg.num_kv_heads, K = cfg.topk;
  topk.assign(size_t(H) * tq * K, rules::kUnusedSlot);
  selected_lse.assign(size_t(H) * tq, 0.0);
  for (int g = 0; g < H; ++g)
    for (int64_t row = 0; row < tq; ++row) {
      IndexRow r = index_row(cfg, lens, qi.data(), ki.data(), row, g, temperature);
      std::copy(r.topk.begin(), r.topk.end(), topk.begin() + (size_t(g) * tq + row) * K);
      selected_lse[size_t(g) * tq + row] = r.selected_lse;
    }
}

std::vector<int64_t> visible_keys(const Config& cfg, const Lengths& lens, const int32_t* topk,
                                  int64_t row, int group) {
  const QueryRow qr = locate_query(lens, row);
  std::vector<int64_t> keys;
  if (!topk) {
    for (int64_t t = 0; t <= qr.position; ++t) keys.push_back(qr.k_begin + t);
    return keys;
  }
  const int B = cfg.block_size;
  const int32_t* ids = topk + (int64_t(group) * lens.total_q() + row) * cfg.topk;
  std::vector<int32_t> blocks;
  for (int s = 0; s < cfg.topk; ++s)
    if (ids[s] != rules::kUnusedSlot) blocks.push_back(ids[s]);
  std::sort(blocks.begin(), blocks.end());
  blocks.erase(std::unique(blocks.begin(), blocks.end()), blocks.end());
  for (int32_t j : blocks)
    for (int64_t t = rules::block_begin(j, B); t < rules::visible_block_end(j, B, qr.position); ++t)
      keys.push_back(qr.k_begin + t);
  return keys;
}

void attention_row(const Config& cfg, const Lengths& lens, const double* q, const double* k,
                   const double* v, const int32_t* topk, int64_t row, int head, double* out,
                   double* lse) {
  const int D = cfg.head_dim, Hkv = cfg.num_kv_heads;
  const int g = rules::group_of_head(head, cfg.group_size());
  const double scale = cfg.softmax_scale();
  const double* qrow = q + (row * cfg.num_q_heads + head) * D;
  const std::vector<int64_t> keys = visible_keys(cfg, lens, topk, row, g);
  std::vector<double> s(keys.size());
  for (size_t i = 0; i < keys.size(); ++i) s[i] = scale * dot(qrow, k + (keys[i] * Hkv + g) * D, D);
  const double l = logsumexp(s);
  std::fill(out, out + D, 0.0);
  for (size_t i = 0; i < keys.size(); ++i) {
    const double pr = std::exp(s[i] - l);
    const double* vrow = v + (keys[i] * Hkv + g) * D;
    for (int d = 0; d < D; ++d) out[d] += pr * vrow[d];
  }
  *lse = l;
}

void attention_forward(const Config& cfg, const Lengths& lens, const std::vector<double>& q,
                       const std::vector<double>& k, const std::vector<double>& v,
                       const int32_t* topk, std::vector<double>& out, std::vector<double>& lse) {
  const int64_t tq = lens.total_q();
  const int Hq = cfg.num_q_heads, D = cfg.head_dim;
  out.assign(size_t(tq) * Hq * D, 0.0);
  lse.assign(size_t(tq) * Hq, 0.0);
  for (int64_t row = 0; row < tq; ++row)
    for (int h = 0; h < Hq; ++h)
      attention_row(cfg, lens, q.data(), k.data(), v.data(), topk, row, h,
                    out.data() + (row * Hq + h) * D, lse.data() + row * Hq + h);
}

void attention_backward(const Config& cfg, const Lengths& lens, const std::vector<double>& q,
                        const std::vector<double>& k, const std::vector<double>& v,
                        const int32_t* topk, const std::vector<double>& dout,
                        std::vector<double>& dq, std::vector<double>& dk, std::vector<double>& dv) {
  const int64_t tq = lens.total_q();
  const int Hq = cfg.num_q_heads, Hkv = cfg.num_kv_heads, D = cfg.head_dim;
  const double scale = cfg.softmax_scale();
  dq.assign(q.size(), 0.0);
  dk.assign(k.size(), 0.0);
  dv.assign(v.size(), 0.0);
  std::vector<double> o(D);
  for (int64_t row = 0; row < tq; ++row)
    for (int h = 0; h < Hq; ++h) {
      const int g = rules::group_of_head(h, cfg.group_size());
      double l;
      attention_row(cfg, lens, q.data(), k.data(), v.data(), topk, row, h, o.data(), &l);
      const double* qrow = q.data() + (row * Hq + h) * D;
      const double* dorow = dout.data() + (row * Hq + h) * D;
      const double delta = dot(dorow, o.data(), D);
      for (int64_t t : visible_keys(cfg, lens, topk, row, g)) {
        const double* krow = k.data() + (t * Hkv + g) * D;
        const double* vrow = v.data() + (t * Hkv + g) * D;
        const double pr = std::exp(scale * dot(qrow, krow, D) - l);
        const double ds = pr * (dot(dorow, vrow, D) - delta);
        for (int d = 0; d < D; ++d) {
          dv[(t * Hkv + g) * D + d] += pr * dorow[d];
          dq[(row * Hq + h) * D + d] += scale * ds * krow[d];
          dk[(t * Hkv + g) * D + d] += scale * ds * qrow[d];
        }
      }
    }
}

double kl_alignment(const Config& cfg, const Lengths& lens, const std::vector<double>& q,
                    const std::vector<double>& k, const std::vector<double>& qi,
                    const std::vector<double>& ki, const int32_t* topk, double coeff,
                    std::vector<double>& dqi, std::vector<double>& dki) {
  const int64_t tq = lens.total_q();
  const int Hq = cfg.num_q_heads, Hkv = cfg.num_kv_heads, D = cfg.head_dim;
  const int Di = cfg.index_head_dim, G = cfg.group_size();
  const double scale = cfg.softmax_scale(), iscale = cfg.index_softmax_scale();
  const double norm = coeff / double(Hkv * tq);
  dqi.assign(qi.size(), 0.0);
  dki.assign(ki.size(), 0.0);
  double loss = 0;
  for (int64_t row = 0; row < tq; ++row)
    for (int g = 0; g < Hkv; ++g) {
      const std::vector<int64_t> keys = visible_keys(cfg, lens, topk, row, g);
      const size_t n = keys.size();
      // Teacher: main-branch probabilities over these keys, averaged over the group's heads.
      std::vector<double> P(n, 0.0);
      for (int h = g * G; h < (g + 1) * G; ++h) {
        const double* qrow = q.data() + (row * Hq + h) * D;
        std::vector<double> s(n);
        for (size_t i = 0; i < n; ++i) s[i] = scale * dot(qrow, k.data() + (keys[i] * Hkv + g) * D, D);
        const double l = logsumexp(s);
        for (size_t i = 0; i < n; ++i) P[i] += std::exp(s[i] - l) / G;
      }
      // Student: softmax of the index scores over the same keys.
      const double* qirow = qi.data() + (row * Hkv + g) * Di;
      std::vector<double> s(n);
      for (size_t i = 0; i < n; ++i) s[i] = iscale * dot(qirow, ki.data() + keys[i] * Di, Di);
      const double l = logsumexp(s);
      for (size_t i = 0; i < n; ++i) {
        const double logQ = s[i] - l;
        if (P[i] > 0) loss += P[i] * (std::log(P[i]) - logQ);
        const double grad = norm * (std::exp(logQ) - P[i]);
        const double* kirow = ki.data() + keys[i] * Di;
        for (int d = 0; d < Di; ++d) {
          dqi[(row * Hkv + g) * Di + d] += grad * iscale * kirow[d];
          dki[keys[i] * Di + d] += grad * iscale * qirow[d];
        }
      }
    }
  return loss * norm;
}

}  // namespace reference
}  // namespace msa
