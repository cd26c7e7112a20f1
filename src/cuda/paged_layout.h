// Launch geometry and workspace layout of the CUDA paged backend, derived from a plan's host fields
// only (no device state), so paged_plan sizes the workspace and paged_run launches with the same
// numbers. Plain C++: paged_plan.cpp includes it without CUDA. See docs/serving.md "CUDA backend".
//
// The grids cover every request x query tile x block chunk (index) or x group x key split
// (attention) up to the plan's maxima; each CTA reads its request's lengths from cu_seqlens_q /
// kv_lens on the device and exits when it has nothing to do. Nothing from the plan's work lists is
// needed on the device, so run() copies nothing and is graph capturable.
#pragma once

#include <algorithm>
#include <cstddef>
#include <cstdint>

#include "msa/paged.h"
#include "msa/rules.h"

namespace msa {
namespace detail {
namespace cuda {
namespace paged {

constexpr int kThreads = 128;        // threads of every paged kernel's CTA
constexpr int kMaxRows = 64;         // (query, head) rows of one CTA
constexpr int kMaxTileQueries = 32;  // queries of one attention tile (one bit each in a mask word)
constexpr int kMinIndexChunk = 4;    // fewest blocks one index CTA scores
constexpr int kMaxSplits = 64;
constexpr int kCtasPerWorker = 2;       // attention: CTAs per SM before key splits stop
// Index: small CTAs, many in flight hide load latency; several waves of them keep the last,
// partial wave short (at 1.5 waves the tail cost the H100 ~1/3 of the kernel).
constexpr int kIndexCtasPerWorker = 32;
constexpr std::size_t kAlign = 256;

inline std::size_t align_up(std::size_t n) { return (n + kAlign - 1) / kAlign * kAlign; }
inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

struct Layout {
  int workers = 132;
  int64_t max_blocks = 1;  // blocks of the longest request
  // Index: queries per tile (tile rows = queries x Hkv), blocks per CTA, grid.
  int index_tile_q = 1, index_tiles = 1;
  int64_t index_chunk = 1, index_chunks = 1;
  int64_t score_ld = 4;  // floats per (group, query) score row, a multiple of 4 (float4 loads)
  // Attention: queries per tile (tile rows = queries x G), tiles per request, key splits.
  int attn_tile_q = 1, attn_tiles = 1, splits = 1;
  int64_t max_union = 1;  // blocks an attention tile attends to at most
  // Workspace (bytes from the 256-aligned base): scores, then the splits' partials.
  std::size_t scores_offset = 0, partials_offset = 0, bytes = 0;
};

inline Layout layout_of(const PagedPlan& plan) {
  const Config& c = plan.cfg;
  const int B = c.block_size, hkv = c.num_kv_heads, G = c.group_size();
  Layout l;
  l.workers = plan.options.num_workers > 0 ? plan.options.num_workers : 132;
  l.max_blocks = std::max<int64_t>(1, rules::num_blocks(plan.max_kv_len, B));
  const int max_q = std::max(1, plan.max_q_len);

  l.index_tile_q = std::max(1, kMaxRows / std::max(1, hkv));
  l.index_tiles = int(ceil_div(max_q, l.index_tile_q));
  const int64_t visits = int64_t(plan.batch) * l.index_tiles * l.max_blocks;
  // A multiple of the CTA's warps: each warp scores whole blocks, so the warps of a CTA finish together.
  l.index_chunk = ceil_div(std::max<int64_t>(kMinIndexChunk, ceil_div(visits, int64_t(kIndexCtasPerWorker) * l.workers)),
                           kThreads / 32) * (kThreads / 32);
  l.index_chunks = ceil_div(l.max_blocks, l.index_chunk);
  l.score_ld = ceil_div(l.max_blocks, 4) * 4;

  l.attn_tile_q = std::max(1, std::min(kMaxTileQueries, kMaxRows / std::max(1, G)));
  l.attn_tiles = int(ceil_div(max_q, l.attn_tile_q));
  const int64_t units = int64_t(plan.batch) * l.attn_tiles * hkv;
  l.max_union =
      plan.options.dense ? l.max_blocks
                         : std::min<int64_t>(l.max_blocks, int64_t(std::min(max_q, l.attn_tile_q)) * c.topk);
  // Rounded down: one more split than fits puts a second, mostly empty wave behind the first
  // (batch 32 x Hkv 4 at 3 splits ran 1.45 waves on the H100).
  const int64_t want = std::max<int64_t>(1, int64_t(kCtasPerWorker) * l.workers / std::max<int64_t>(1, units));
  l.splits = int(std::max<int64_t>(1, std::min<int64_t>({want, l.max_union, kMaxSplits})));

  const int64_t tq = plan.total_q;
  l.scores_offset = 0;
  const std::size_t score_bytes =
      plan.options.dense ? 0 : sizeof(float) * std::size_t(hkv) * std::size_t(tq) * std::size_t(l.score_ld);
  l.partials_offset = l.scores_offset + align_up(score_bytes);
  // Split s of row (query, head): o [splits][tq][Hq][D], then m and l [splits][tq][Hq].
  const std::size_t partial_bytes =
      l.splits > 1 ? sizeof(float) * std::size_t(l.splits) * std::size_t(tq) * std::size_t(c.num_q_heads) *
                         std::size_t(c.head_dim + 2)
                   : 0;
  l.bytes = l.partials_offset + align_up(partial_bytes) + kAlign;  // + slack to align the caller's base
  return l;
}

}  // namespace paged
}  // namespace cuda
}  // namespace detail
}  // namespace msa
