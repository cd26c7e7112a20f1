// How many CTAs share one key tile in the key-major backward kernels (attention dK/dV, KL dki), and
// which part of the tile's list each takes. CUDA sources only (host and device).
#pragma once

#include <cstddef>
#include <cstdint>

namespace msa {
namespace detail {
namespace cuda {

// CTAs that share one key tile's query list in the key-major backward kernels (attention dK/dV,
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

// Split `split` of `splits`' share of a key tile's list [begin, begin + count): equal shares in list
// order, each a multiple of `granule` entries (the entries of one gathered tile) but the last ones,
// which may be short or empty. Narrows begin and count in place.
__host__ __device__ inline void key_split_share(int64_t& begin, int64_t& count, int splits, int split,
                                                int granule = 1) {
  if (splits <= 1) return;
  const int64_t per = ((count + splits - 1) / splits + granule - 1) / granule * granule;
  const int64_t u0 = per * split < count ? per * split : count;
  count = (u0 + per < count ? u0 + per : count) - u0;
  begin += u0;
}

}  // namespace cuda
}  // namespace detail
}  // namespace msa
