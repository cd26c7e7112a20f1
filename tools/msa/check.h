// Checks sampled query rows of a run against the float64 oracle (src/reference/oracle.h): the
// selection as a set per (row, group) with a near-tie tolerance, and out / lse per (row, head) of the
// sparse main branch (for the selection the library made) and of the dense baseline.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "common/host_tensor.h"
#include "problem.h"

namespace msa {
namespace tool {

struct CheckResult {
  std::vector<int64_t> rows;
  double tolerance = 0;
  int selection_pairs = 0;      // (row, group) pairs checked
  int selection_identical = 0;  // same set as the oracle
  int selection_near_tie = 0;   // different set, every chosen block within tolerance of the k-1-th best
  int selection_wrong = 0;
  std::string first_problem;    // the first mismatch, for the report
  double sparse_out_error = 0, sparse_lse_error = 0;
  bool dense_checked = false;
  double dense_out_error = 0, dense_lse_error = 0;

  bool passed() const;
};

// Relative-error tolerance of a run in `dtype`: 1e-4 for f32 inputs, 1e-2 for bf16/f16.
double check_tolerance(DType dtype);

// Query rows to check: the first and last row of each sequence, a pair of rows on either side of a
// block edge, then seeded random rows, `count` in all (fewer when the problem has fewer rows).
std::vector<int64_t> sample_rows(const RunProblem& p, int count, uint64_t seed);

// dense_out / dense_lse may be null (no dense baseline ran).
CheckResult check_rows(const RunProblem& p, const std::vector<int64_t>& rows, const HostTensor& topk,
                       const HostTensor& out, const HostTensor& lse, const HostTensor* dense_out,
                       const HostTensor* dense_lse);

}  // namespace tool
}  // namespace msa
