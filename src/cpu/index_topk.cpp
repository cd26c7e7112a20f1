// CPU index branch (SPEC.md "Index branch"): block scores by max-pooled index scores, top-k block ids
// with the local block forced, and optionally the selected LSE.
//
// Engine: one work item is a tile of consecutive queries of one sequence times a range of groups
// (rows = query x group). For each tile the key range 0..p_max is streamed once in chunks of kKeyChunk
// keys, shared by every row: the chunk is converted to the accumulator type and transposed once, scored
// against the packed query panel by a register-blocked micro-kernel, then max-pooled per block on the
// fly (with a per-block sum of exp relative to the block max, so the selected LSE needs no second pass
// over keys). Finally each row selects its k-1 best earlier blocks by partial selection. Nothing larger
// than a tile x chunk of scores, or a tile x blocks table of pooled scores, is ever held.
//
// bf16 on a CPU with AMX (amx.h): ki is packed once per call into the tile layout, each tile's query
// rows are kept as bf16, and a chunk's scores come from the tile unit; pooling and selection are the
// same code as for every other dtype.
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <optional>
#include <type_traits>
#include <vector>

#include "core/backend.h"
#include "cpu/cpu_ops.h"
#include "cpu/amx.h"
#include "cpu/element.h"
#include "cpu/index_simd.h"
#include "cpu/index_workspace.h"
#include "msa/error.h"
#include "msa/rules.h"

namespace msa {
namespace detail {
namespace cpu {

namespace {

constexpr int kTileRows = 96;   // (query, group) rows sharing one pass over the keys
// On the tile unit a chunk of keys costs about as much to bring in from L3 as 96 rows take to score
// it: larger tiles (measured at 32K / 64K keys: 96 rows 182 / 667 ms, 384 rows 165 / 575 ms).
constexpr int kAmxTileRows = 384;
constexpr int kKeyChunk = 64;   // keys scored per step; a multiple of every kNR
static_assert(kKeyChunk == amx::kPackKeys, "an AMX chunk is one packed run of keys");
constexpr int kAmxPanel = 32;   // rows of the AMX score kernel's panels

// How a tile's scores are made: f32 micro-kernels (every dtype), or on the tile unit (bf16): row-major
// against ki packed once per call (then the shared pooling), or key-major straight from ki's rows and
// max-pooled at once (no selected LSE asked, blocks a multiple of the 64-key chunk).
enum class Scoring { rows_f32, amx_rows, amx_key_major };

Scoring scoring_of(const Problem& p, bool want_lse) {
  if (p.dtype != DType::bf16 || !amx::usable()) return Scoring::rows_f32;
  return !want_lse && p.cfg.block_size % kKeyChunk == 0 ? Scoring::amx_key_major : Scoring::amx_rows;
}

// Queries per tile: about kTileRows (kAmxTileRows) rows with every group of a query in the tile.
int tile_queries(int num_groups, bool amx_tiles) {
  return std::max(1, (amx_tiles ? kAmxTileRows : kTileRows) / num_groups);
}

struct IndexLayout {
  int64_t rows = 0, rows_padded = 0, blocks = 0;
  std::size_t qpanel = 0, keys_t = 0, scores = 0, block_max = 0, block_sum = 0, position = 0,
              candidates = 0, qtiles = 0, qpacked = 0, staged = 0, run_max = 0;
  std::size_t per_thread = 0;
  std::size_t packed_keys = 0;  // shared, after the per-thread regions: ki in score tiles (amx_rows)

  IndexLayout(const Problem& p, std::size_t acc_bytes, Scoring scoring) {
    const int hkv = p.cfg.num_kv_heads, di = p.cfg.index_head_dim;
    const bool amx_tiles = scoring != Scoring::rows_f32;
    rows = int64_t(tile_queries(hkv, amx_tiles)) * hkv;
    // Key-major tiles pack their rows as score tiles, which come in runs of 64.
    const int64_t pad = scoring == Scoring::amx_key_major ? amx::kPackKeys
                        : amx_tiles                       ? kAmxPanel
                                                          : simd::kMR;
    rows_padded = (rows + pad - 1) / pad * pad;
    blocks = std::max<int64_t>(1, rules::num_blocks(p.varlen.max_seqlen_k, p.cfg.block_size));
    ScratchPlan plan;
    auto add_acc = [&](int64_t n) {
      const std::size_t at = align_up(plan.bytes);
      plan.bytes = align_up(at + std::size_t(n) * acc_bytes);
      return at;
    };
    qpanel = add_acc(rows_padded * di);
    keys_t = add_acc(int64_t(di) * kKeyChunk);
    scores = add_acc(std::max<int64_t>(rows_padded * kKeyChunk, 32 * 32));  // key-major: 32 x 32
    block_max = add_acc(rows * blocks);
    block_sum = add_acc(rows * blocks);
    position = plan.add<int64_t>(rows_padded);
    candidates = plan.add<int32_t>(blocks);
    if (amx_tiles) qtiles = plan.add<uint16_t>(rows_padded * amx::packed_dim(di));
    if (scoring == Scoring::amx_rows)
      packed_keys = std::size_t(amx::packed_head_elems(amx::packed_keys_bound(p), di)) * 2;
    if (scoring == Scoring::amx_key_major) {
      qpacked = plan.add<uint16_t>(rows_padded * amx::packed_dim(di));
      staged = plan.add<uint16_t>(int64_t(amx::kPackKeys) * amx::packed_dim(di));
      run_max = plan.add<float>(rows_padded);
    }
    per_thread = align_up(plan.bytes);
  }
};

// Packs each sequence's index keys into score tiles, one 64-key run per task; returns where each
// sequence's run starts (in keys).
std::vector<int64_t> pack_index_keys(const Problem& p, const TensorView& ki, uint16_t* packed,
                                     int threads) {
  const int di = p.cfg.index_head_dim;
  const amx::PackedRuns runs(p);
#pragma omp parallel for num_threads(threads) schedule(static)
  for (int64_t r = 0; r < runs.count(); ++r) {
    const amx::PackedRuns::Run run = runs.run(p, r);
    const int64_t row = sequence_span(p.varlen, run.seq).k_begin + run.first;
    amx::pack_score_tiles(row2<const uint16_t>(ki, row), ki.stride[0], run.len, di,
                          packed + r * amx::kPackKeys * amx::packed_dim(di));
  }
  return runs.seq_begin;
}

// The key-major chunk loop of one tile (Scoring::amx_key_major): block_max[r * ld + j] for every row
// and every block up to the last row's, from bf16 query rows `qtiles` (rows_padded x packed_dim(di)).
void pool_key_major(const Problem& p, const TensorView& ki, const SequenceSpan& s, int64_t rows,
                    int64_t rows_padded, const uint16_t* qtiles, int64_t* position, uint16_t* qpacked,
                    uint16_t* staged, float* scores, float* run_max, float* block_max, int64_t ld) {
  const int di = p.cfg.index_head_dim, dk = amx::packed_dim(di), B = p.cfg.block_size;
  const float iscale = float(p.cfg.index_softmax_scale());
  amx::pack_key_major_rows(qtiles, rows, di, position, qpacked);
  std::fill(run_max, run_max + rows_padded, -INFINITY);
  const int64_t p_max = position[rows - 1];
  for (int64_t c0 = 0; c0 <= p_max; c0 += kKeyChunk) {
    const int nk = int(std::min<int64_t>(kKeyChunk, p_max + 1 - c0));
    // In place unless a tile would read past the row or past the sequence.
    int64_t stride = ki.stride[0];
    const uint16_t* keys = amx::key_chunk(row2<const uint16_t>(ki, s.k_begin + c0), &stride, nk, di,
                                          di == dk && c0 + kKeyChunk <= s.k_len, staged);
    amx::index_chunk_max_key_major(keys, stride, di, nk, c0, qpacked, rows, position, scores,
                                   run_max);
    if ((c0 + kKeyChunk) % B == 0 || c0 + kKeyChunk > p_max) {
      const int64_t j = rules::block_of(c0, B);
      // iscale > 0 and rounding is monotone: the max of the scaled scores is the scaled max.
      for (int64_t r = 0; r < rows; ++r) block_max[r * ld + j] = run_max[r] * iscale;
      std::fill(run_max, run_max + rows_padded, -INFINITY);
    }
  }
}

struct TileItem {
  int seq;
  int64_t q_first, q_count;  // queries of the sequence (local indices)
  int g_first, g_count;
  double work;
};

template <class T>
void index_topk_impl(const Problem& p, const TensorView& qi, const TensorView& ki,
                     const TensorView& topk, const TensorView& selected_lse, float temperature,
                     const Context& ctx) {
  using A = acc_t<T>;
  constexpr int NR = simd::kNR<A>;
  static_assert(kKeyChunk % NR == 0, "key chunk must hold whole micro-tiles");

  const int hkv = p.cfg.num_kv_heads, di = p.cfg.index_head_dim, B = p.cfg.block_size;
  const int K = p.cfg.topk;
  const A iscale = A(p.cfg.index_softmax_scale());
  const A inv_t = A(1) / A(temperature);
  const bool want_lse = selected_lse.defined();
  const int threads = thread_count(ctx.num_threads);

  // Work list: tiles of queries x groups, heaviest (longest key range) first for dynamic scheduling.
  const Scoring scoring = scoring_of(p, want_lse);
  const bool use_tiles = scoring != Scoring::rows_f32;
  const int tq = tile_queries(hkv, use_tiles);
  std::vector<TileItem> items;
  int64_t tiles = 0;
  for (int b = 0; b < p.batch; ++b) tiles += (sequence_span(p.varlen, b).q_len + tq - 1) / tq;
  const int group_split =
      tiles >= threads ? 1 : std::min<int>(hkv, int((threads + tiles - 1) / std::max<int64_t>(tiles, 1)));
  const int gchunk = (hkv + group_split - 1) / group_split;
  for (int b = 0; b < p.batch; ++b) {
    const SequenceSpan s = sequence_span(p.varlen, b);
    for (int64_t q0 = 0; q0 < s.q_len; q0 += tq)
      for (int g0 = 0; g0 < hkv; g0 += gchunk) {
        TileItem it{b, q0, std::min<int64_t>(tq, s.q_len - q0), g0, std::min(gchunk, hkv - g0), 0};
        it.work = double(s.query_position(q0 + it.q_count - 1) + 1) * double(it.q_count * it.g_count);
        items.push_back(it);
      }
  }
  std::stable_sort(items.begin(), items.end(),
                   [](const TileItem& a, const TileItem& b) { return a.work > b.work; });

  const IndexLayout lay(p, sizeof(A), scoring);
  Scratch scratch(ctx.workspace, scratch_total(lay.per_thread, threads, lay.packed_keys));
  uint16_t* packed = scratch.at<uint16_t>(align_up(lay.per_thread) * std::size_t(threads));
  const std::vector<int64_t> packed_begin = scoring == Scoring::amx_rows
                                                ? pack_index_keys(p, ki, packed, threads)
                                                : std::vector<int64_t>();
  const int dk = amx::packed_dim(di);

#pragma omp parallel num_threads(threads)
  {
    std::optional<amx::ThreadTiles> tile_unit;
    if (use_tiles) tile_unit.emplace();
    unsigned char* mine = scratch.base() + std::size_t(omp_get_thread_num()) * align_up(lay.per_thread);
    A* qpanel = reinterpret_cast<A*>(mine + lay.qpanel);
    A* keys_t = reinterpret_cast<A*>(mine + lay.keys_t);
    A* scores = reinterpret_cast<A*>(mine + lay.scores);
    A* block_max = reinterpret_cast<A*>(mine + lay.block_max);
    A* block_sum = reinterpret_cast<A*>(mine + lay.block_sum);
    int64_t* position = reinterpret_cast<int64_t*>(mine + lay.position);
    int32_t* cand = reinterpret_cast<int32_t*>(mine + lay.candidates);
    uint16_t* qtiles = reinterpret_cast<uint16_t*>(mine + lay.qtiles);
    uint16_t* qpacked = reinterpret_cast<uint16_t*>(mine + lay.qpacked);
    uint16_t* staged = reinterpret_cast<uint16_t*>(mine + lay.staged);
    float* run_max = reinterpret_cast<float*>(mine + lay.run_max);
    const int64_t nblk_cap = lay.blocks;

#pragma omp for schedule(dynamic, 1)
    for (int64_t w = 0; w < int64_t(items.size()); ++w) {
      const TileItem& it = items[size_t(w)];
      const SequenceSpan s = sequence_span(p.varlen, it.seq);
      const int ng = it.g_count;
      const int64_t rows = it.q_count * ng;
      const int64_t panels = (rows + simd::kMR - 1) / simd::kMR;

      // Pack the tile's index queries: bf16 rows for the tile unit (scaled after the product), else
      // pre-scaled by iscale as panels [d][kMR].
      for (int64_t r = 0; use_tiles && r < lay.rows_padded; ++r) {
        uint16_t* dst = qtiles + r * dk;
        const T* src = r < rows ? row3<const T>(qi, s.q_begin + it.q_first + r / ng, it.g_first + r % ng)
                                : nullptr;
        for (int d = 0; d < dk; ++d) dst[d] = src && d < di ? reinterpret_cast<const uint16_t*>(src)[d] : 0;
      }
      for (int64_t r = 0; !use_tiles && r < panels * simd::kMR; ++r) {
        A* dst = qpanel + (r / simd::kMR) * di * simd::kMR + r % simd::kMR;
        if (r < rows) {
          const int64_t qrow = s.q_begin + it.q_first + r / ng;
          const T* src = row3<const T>(qi, qrow, it.g_first + r % ng);
          for (int d = 0; d < di; ++d) dst[d * simd::kMR] = A(to_float(src[d])) * iscale;
        } else {
          for (int d = 0; d < di; ++d) dst[d * simd::kMR] = A(0);
        }
      }
      for (int64_t r = 0; r < rows; ++r) position[r] = s.query_position(it.q_first + r / ng);
      const int64_t p_max = position[rows - 1];
      const int64_t nblk = rules::local_block(p_max, B) + 1;
      for (int64_t r = 0; r < rows; ++r) {
        std::fill(block_max + r * nblk_cap, block_max + r * nblk_cap + nblk, A(-INFINITY));
        std::fill(block_sum + r * nblk_cap, block_sum + r * nblk_cap + nblk, A(0));
      }

      if constexpr (std::is_same_v<A, float>)
        if (scoring == Scoring::amx_key_major)
          pool_key_major(p, ki, s, rows, lay.rows_padded, qtiles, position, qpacked, staged, scores,
                         run_max, block_max, nblk_cap);
      for (int64_t c0 = 0; scoring != Scoring::amx_key_major && c0 <= p_max; c0 += kKeyChunk) {
        const int nk = int(std::min<int64_t>(kKeyChunk, p_max + 1 - c0));
        if constexpr (std::is_same_v<A, float>) if (use_tiles) {
          // Panels of 32 rows whose last row cannot see c0 are skipped; the rest get raw products,
          // scaled here so pooling sees the same scores as on the other path.
          const int64_t amx_panels = lay.rows_padded / kAmxPanel;
          int64_t first = 0;
          while (position[std::min(rows - 1, first * kAmxPanel + kAmxPanel - 1)] < c0) ++first;
          const uint16_t* chunk_keys = packed + (packed_begin[size_t(it.seq)] + c0) * dk;
          amx::index_chunk_scores(qtiles, di, first, amx_panels, chunk_keys, scores, kKeyChunk);
          for (int64_t r = first * kAmxPanel; r < rows; ++r)
            for (int t = 0; t < nk; ++t) scores[r * kKeyChunk + t] *= iscale;
        }
        if (!use_tiles) {
          const int ncols = (nk + NR - 1) / NR * NR;
          // Keys of the chunk, converted once and transposed to [d][key]; zero columns pad the tail.
          for (int t = 0; t < nk; ++t) {
            const T* src = row2<const T>(ki, s.k_begin + c0 + t);
            for (int d = 0; d < di; ++d) keys_t[d * kKeyChunk + t] = A(to_float(src[d]));
          }
          for (int d = 0; d < di && nk < ncols; ++d)
            std::fill(keys_t + d * kKeyChunk + nk, keys_t + d * kKeyChunk + ncols, A(0));

          // Rows are ordered by position: panels whose last row cannot see c0 are skipped. A column
          // strip of keys (di x kNR) stays in L1 while the query panels stream past it.
          int64_t first_panel = 0;
          while (position[std::min(rows - 1, first_panel * simd::kMR + simd::kMR - 1)] < c0) ++first_panel;
          for (int n0 = 0; n0 < ncols; n0 += NR)
            for (int64_t pn = first_panel; pn < panels; ++pn)
              simd::score_micro_kernel<A>(qpanel + pn * di * simd::kMR, keys_t + n0, kKeyChunk, di,
                                          scores + pn * simd::kMR * kKeyChunk + n0, kKeyChunk);
        }

        // Max-pool (and sum-exp) each row's visible keys of the chunk into their blocks.
        for (int64_t r = 0; r < rows; ++r) {
          const int64_t end = std::min<int64_t>(c0 + nk, position[r] + 1);
          const A* srow = scores + r * kKeyChunk;
          for (int64_t t = c0; t < end;) {
            const int64_t j = rules::block_of(t, B);
            const int64_t seg_end = std::min(end, rules::block_begin(j + 1, B));
            const A* seg = srow + (t - c0);
            const int n = int(seg_end - t);
            A& bm = block_max[r * nblk_cap + j];
            const A m_new = std::max(bm, simd::segment_max<A>(seg, n));
            if (want_lse) {
              A& bs = block_sum[r * nblk_cap + j];
              bs = bs * std::exp((bm - m_new) * inv_t) + simd::segment_sum_exp<A>(seg, n, m_new, inv_t);
            }
            bm = m_new;
            t = seg_end;
          }
        }
      }

      // Selection per row: the local block in slot n, the n best earlier blocks before it.
      for (int64_t r = 0; r < rows; ++r) {
        const int64_t qrow = s.q_begin + it.q_first + r / ng;
        const int g = it.g_first + int(r % ng);
        const int64_t local = rules::local_block(position[r], B);
        const int n = rules::num_nonlocal_selected(local, K);
        A* bm = block_max + r * nblk_cap;
        // A NaN score has no rank; treat it as the lowest so the ordering stays strict and weak.
        for (int64_t j = 0; j < local; ++j)
          if (std::isnan(bm[j])) bm[j] = A(-INFINITY);
        for (int64_t j = 0; j < local; ++j) cand[j] = int32_t(j);
        auto before = [bm](int32_t a, int32_t b) { return rules::ranks_before(bm[a], a, bm[b], b); };
        if (n < local) std::nth_element(cand, cand + n, cand + local, before);
        std::sort(cand, cand + n, before);
        int32_t* out = row3<int32_t>(topk, g, qrow);
        for (int i = 0; i < n; ++i) out[i] = cand[i];
        out[n] = int32_t(local);
        for (int i = n + 1; i < K; ++i) out[i] = rules::kUnusedSlot;

        if (want_lse) {
          A m = bm[local];
          for (int i = 0; i < n; ++i) m = std::max(m, bm[cand[i]]);
          const A* bs = block_sum + r * nblk_cap;
          A sum = bs[local] * std::exp((bm[local] - m) * inv_t);
          for (int i = 0; i < n; ++i) sum += bs[cand[i]] * std::exp((bm[cand[i]] - m) * inv_t);
          row2<A>(selected_lse, g)[qrow] = m * inv_t + std::log(sum);
        }
      }
    }
  }
}

}  // namespace

std::size_t index_topk_workspace_bytes(const Problem& p, int num_threads) {
  // Sized for the larger of the two AMX layouts: the selected LSE is not known here.
  const IndexLayout lay(p, acc_bytes_of(p.dtype), scoring_of(p, true));
  const IndexLayout key_major(p, acc_bytes_of(p.dtype), scoring_of(p, false));
  return std::max(scratch_total(lay.per_thread, thread_count(num_threads), lay.packed_keys),
                  scratch_total(key_major.per_thread, thread_count(num_threads), key_major.packed_keys));
}

void index_topk(const Problem& p, const TensorView& qi, const TensorView& ki,
                const TensorView& topk, const TensorView& selected_lse, float temperature,
                const Context& ctx) {
  if (p.total_q == 0) return;
  MSA_CPU_DISPATCH_FLOAT(p.dtype, [&] {
    index_topk_impl<scalar_t>(p, qi, ki, topk, selected_lse, temperature, ctx);
  });
}

}  // namespace cpu
}  // namespace detail
}  // namespace msa
