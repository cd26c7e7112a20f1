// How many CTAs share one key tile in the key-major backward kernels (attention dK/dV, KL dki).
#pragma once

#include <cstddef>

namespace msa {
namespace detail {
namespace cuda {

// CTAs that share one key tile's query-tile list in the key-major backward kernels (attention dK/dV,
// KL dki): enough to cut the list of a block every query chose (block 0, the local blocks) into
// shares near the average list, within a bound on their f32 partials (bytes_per_split each, summed
// in split order afterwards: deterministic). A function of the problem alone, so the workspace size
// and the launch agree.
constexpr int kMaxKeySplits = 8;
constexpr std::size_t kKeySplitPartialBudget = std::size_t(256) << 20;
inline int key_splits_within(std::size_t bytes_per_split) {
  if (bytes_per_split == 0) return 1;
  const std::size_t fit = kKeySplitPartialBudget / bytes_per_split;
  return int(fit < 1 ? 1 : fit > std::size_t(kMaxKeySplits) ? std::size_t(kMaxKeySplits) : fit);
}

}  // namespace cuda
}  // namespace detail
}  // namespace msa
