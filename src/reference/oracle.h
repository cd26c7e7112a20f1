// The float64 oracle: SPEC.md's definitions written as plainly as possible, dense and slow, used by
// the tests and by `msa run` to check sampled rows. All arrays are contiguous float64 (int32 for ids)
// in the layouts of include/msa/ops.h.
#pragma once

#include <cstdint>
#include <vector>

#include "msa/config.h"

namespace msa {
namespace reference {

struct Lengths {
  std::vector<int32_t> cu_q, cu_k;  // batch + 1 prefix sums
  int batch() const { return int(cu_q.size()) - 1; }
  int64_t total_q() const { return cu_q.back(); }
  int64_t total_k() const { return cu_k.back(); }
};

// Where packed query row `row` lives: its sequence, its absolute position and its key range.
struct QueryRow {
  int seq = 0;
  int64_t position = 0;  // absolute position p within the sequence
  int64_t k_begin = 0;   // first packed key row of the sequence
};
QueryRow locate_query(const Lengths& lens, int64_t row);

// Index branch for one (query row, group): block scores S(0..l) (max-pooled, causal), the top-k row
// (non-local ids ordered by rank, then the local block, then -1) and the selected LSE / T.
struct IndexRow {
  std::vector<double> block_scores;
  std::vector<int32_t> topk;
  double selected_lse = 0;
};
IndexRow index_row(const Config& cfg, const Lengths& lens, const double* qi, const double* ki,
                   int64_t row, int group, double temperature = 1.0);

// Whole index branch: topk [Hkv, total_q, k], selected_lse [Hkv, total_q].
void index_topk(const Config& cfg, const Lengths& lens, const std::vector<double>& qi,
                const std::vector<double>& ki, std::vector<int32_t>& topk,
                std::vector<double>& selected_lse, double temperature = 1.0);

// Keys (packed rows) a (query row, group) attends to: every visible key whose block is selected, or
// every visible key when topk is null (dense).
std::vector<int64_t> visible_keys(const Config& cfg, const Lengths& lens, const int32_t* topk,
                                  int64_t row, int group);

// Main branch for one (query row, head): out[D] and lse.
void attention_row(const Config& cfg, const Lengths& lens, const double* q, const double* k,
                   const double* v, const int32_t* topk, int64_t row, int head, double* out,
                   double* lse);

void attention_forward(const Config& cfg, const Lengths& lens, const std::vector<double>& q,
                       const std::vector<double>& k, const std::vector<double>& v,
                       const int32_t* topk, std::vector<double>& out, std::vector<double>& lse);

void attention_backward(const Config& cfg, const Lengths& lens, const std::vector<double>& q,
                        const std::vector<double>& k, const std::vector<double>& v,
                        const int32_t* topk, const std::vector<double>& dout,
                        std::vector<double>& dq, std::vector<double>& dk, std::vector<double>& dv);

// KL(P || Q) averaged over (query, group), times coeff; gradients for qi and ki.
double kl_alignment(const Config& cfg, const Lengths& lens, const std::vector<double>& q,
                    const std::vector<double>& k, const std::vector<double>& qi,
                    const std::vector<double>& ki, const int32_t* topk, double coeff,
                    std::vector<double>& dqi, std::vector<double>& dki);

}  // namespace reference
}  // namespace msa
