#include "check.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <map>
#include <random>
#include <set>

#include "msa/rules.h"
#include "reference/oracle.h"

namespace msa {
namespace tool {

namespace {

constexpr double kInf = std::numeric_limits<double>::infinity();

// Packed rows [begin, begin + count) of a tensor whose rows hold `row_elems` elements, in float64.
std::vector<double> rows_as_double(const HostTensor& t, int64_t begin, int64_t count) {
  int64_t row_elems = 1;
  for (size_t d = 1; d < t.shape().size(); ++d) row_elems *= t.shape()[d];
  std::vector<double> out(size_t(count * row_elems));
#pragma omp parallel for schedule(static)
  for (int64_t i = 0; i < count * row_elems; ++i) out[size_t(i)] = t.get(begin * row_elems + i);
  return out;
}

// Error of a row's out (all heads) and lse values against the oracle's; NaN counts as infinite.
struct RowError {
  double num = 0, den = 0, lse = 0;
  double out() const { return std::isfinite(num) ? (den > 0 ? std::sqrt(num / den) : std::sqrt(num)) : kInf; }
};

RowError compare_attention(const Config& cfg, const reference::Lengths& mini, const double* q_row,
                           const double* k_seq, const double* v_seq, const int32_t* topk_mini,
                           const HostTensor& out, const HostTensor& lse, int64_t row) {
  const int Hq = cfg.num_q_heads, D = cfg.head_dim;
  std::vector<RowError> per_head(static_cast<size_t>(Hq));
#pragma omp parallel for schedule(dynamic)
  for (int h = 0; h < Hq; ++h) {
    std::vector<double> ref(static_cast<size_t>(D));
    double ref_lse = 0;
    reference::attention_row(cfg, mini, q_row, k_seq, v_seq, topk_mini, 0, h, ref.data(), &ref_lse);
    RowError& e = per_head[size_t(h)];
    for (int d = 0; d < D; ++d) {
      const double got = out.get((row * Hq + h) * D + d);
      e.num += std::isfinite(got) ? (got - ref[size_t(d)]) * (got - ref[size_t(d)]) : kInf;
      e.den += ref[size_t(d)] * ref[size_t(d)];
    }
    const double got_lse = lse.get(row * Hq + h);
    e.lse = std::isfinite(got_lse) ? std::abs(got_lse - ref_lse) / std::max(1.0, std::abs(ref_lse))
                                   : kInf;
  }
  RowError total;
  for (const RowError& e : per_head) {
    total.num += e.num;
    total.den += e.den;
    total.lse = std::max(total.lse, e.lse);
  }
  return total;
}

std::string row_name(int64_t row, int group) {
  return "row " + std::to_string(row) + " group " + std::to_string(group);
}

}  // namespace

bool CheckResult::passed() const {
  auto ok = [&](double e) { return e <= tolerance; };  // false for NaN
  return selection_wrong == 0 && ok(sparse_out_error) && ok(sparse_lse_error) &&
         (!dense_checked || (ok(dense_out_error) && ok(dense_lse_error)));
}

double check_tolerance(DType dtype) { return dtype == DType::f32 ? 1e-4 : 1e-2; }

std::vector<int64_t> sample_rows(const RunProblem& p, int count, uint64_t seed) {
  std::vector<int64_t> wanted;
  const int B = p.cfg.block_size;
  for (int b = 0; b < p.batch(); ++b) {
    const int64_t q0 = p.cu_q[b], lq = p.cu_q[b + 1] - p.cu_q[b], lk = p.cu_k[b + 1] - p.cu_k[b];
    if (lq == 0) continue;
    wanted.push_back(q0);
    wanted.push_back(q0 + lq - 1);
    if (b == 0) {
      // The first key of a block near the middle of the queries, and the last key before it.
      const int64_t edge = rules::block_begin(
          rules::block_of(rules::query_position(lq, lk, lq / 2), B), B);
      for (int64_t pos : {edge, edge - 1}) {
        const int64_t i = pos - (lk - lq);
        if (i >= 0 && i < lq) wanted.push_back(q0 + i);
      }
    }
  }
  std::vector<int64_t> rows;
  std::set<int64_t> seen;
  for (int64_t r : wanted)
    if (int(rows.size()) < count && seen.insert(r).second) rows.push_back(r);
  std::mt19937_64 rng(seed ^ 0x5eedc4ec4ULL);
  const int64_t total = p.total_q();
  while (int(rows.size()) < count && int64_t(rows.size()) < total) {
    const int64_t r = int64_t(rng() % uint64_t(total));
    if (seen.insert(r).second) rows.push_back(r);
  }
  std::sort(rows.begin(), rows.end());
  return rows;
}

CheckResult check_rows(const RunProblem& p, const std::vector<int64_t>& rows, const HostTensor& topk,
                       const HostTensor& out, const HostTensor& lse, const HostTensor* dense_out,
                       const HostTensor* dense_lse) {
  const Config& cfg = p.cfg;
  const int Hkv = cfg.num_kv_heads, K = cfg.topk, B = cfg.block_size;
  const int64_t tq = p.total_q();
  reference::Lengths lens{p.cu_q, p.cu_k};

  CheckResult r;
  r.rows = rows;
  r.tolerance = check_tolerance(p.dtype);
  r.dense_checked = dense_out && dense_lse;

  // Rows grouped by sequence, so that each sequence's keys are converted once.
  std::map<int, std::vector<int64_t>> by_sequence;
  for (int64_t row : rows) by_sequence[reference::locate_query(lens, row).seq].push_back(row);

  for (const auto& [seq, seq_rows] : by_sequence) {
    const int64_t k0 = p.cu_k[seq], lk = p.cu_k[seq + 1] - k0;
    const std::vector<double> k = rows_as_double(p.k, k0, lk);
    const std::vector<double> v = rows_as_double(p.v, k0, lk);
    const std::vector<double> ki = rows_as_double(p.ki, k0, lk);
    for (int64_t row : seq_rows) {
      // The row alone is an exact problem of its own: one query at position pos over keys 0..pos.
      const int64_t pos = reference::locate_query(lens, row).position;
      const reference::Lengths mini{{0, 1}, {0, int32_t(pos + 1)}};
      const std::vector<double> q = rows_as_double(p.q, row, 1);
      const std::vector<double> qi = rows_as_double(p.qi, row, 1);
      std::vector<int32_t> topk_mini(size_t(Hkv) * K);

      const int64_t local = rules::local_block(pos, B);
      const int n = rules::num_nonlocal_selected(local, K);
      for (int g = 0; g < Hkv; ++g) {
        std::vector<int32_t> got(static_cast<size_t>(K));
        for (int s = 0; s < K; ++s) got[size_t(s)] = int32_t(topk.get((g * tq + row) * K + s));
        std::copy(got.begin(), got.end(), topk_mini.begin() + g * K);
        const reference::IndexRow ref = reference::index_row(cfg, mini, qi.data(), ki.data(), 0, g);
        ++r.selection_pairs;

        std::string problem;
        if (got[size_t(n)] != local)
          problem = "local block " + std::to_string(local) + " not in slot " + std::to_string(n);
        for (int s = n + 1; s < K && problem.empty(); ++s)
          if (got[size_t(s)] != rules::kUnusedSlot) problem = "slot " + std::to_string(s) + " is not -1";
        std::vector<int32_t> chosen(got.begin(), got.begin() + n), expected(ref.topk.begin(), ref.topk.begin() + n);
        std::sort(chosen.begin(), chosen.end());
        std::sort(expected.begin(), expected.end());
        for (int s = 0; s < n && problem.empty(); ++s)
          if (chosen[size_t(s)] < 0 || chosen[size_t(s)] >= local || (s && chosen[size_t(s)] == chosen[size_t(s - 1)]))
            problem = "invalid or repeated block id " + std::to_string(chosen[size_t(s)]);
        if (problem.empty() && chosen == expected) {
          ++r.selection_identical;
        } else if (problem.empty()) {
          // A near-tie swap is allowed: every chosen block scores within tolerance of the weakest
          // block the oracle chose (the k-1-th best).
          const double weakest = ref.block_scores[size_t(ref.topk[size_t(n - 1)])];
          const double slack = r.tolerance * std::max(1.0, std::abs(weakest));
          for (int32_t j : chosen)
            if (ref.block_scores[size_t(j)] < weakest - slack)
              problem = "block " + std::to_string(j) + " scores " +
                        std::to_string(ref.block_scores[size_t(j)]) + ", below the k-1-th best " +
                        std::to_string(weakest);
          if (problem.empty()) ++r.selection_near_tie;
        }
        if (!problem.empty()) {
          ++r.selection_wrong;
          if (r.first_problem.empty()) r.first_problem = row_name(row, g) + ": " + problem;
        }
      }

      const RowError sparse =
          compare_attention(cfg, mini, q.data(), k.data(), v.data(), topk_mini.data(), out, lse, row);
      r.sparse_out_error = std::max(r.sparse_out_error, sparse.out());
      r.sparse_lse_error = std::max(r.sparse_lse_error, sparse.lse);
      if (r.dense_checked) {
        const RowError dense = compare_attention(cfg, mini, q.data(), k.data(), v.data(), nullptr,
                                                 *dense_out, *dense_lse, row);
        r.dense_out_error = std::max(r.dense_out_error, dense.out());
        r.dense_lse_error = std::max(r.dense_lse_error, dense.lse);
      }
    }
  }
  return r;
}

}  // namespace tool
}  // namespace msa

