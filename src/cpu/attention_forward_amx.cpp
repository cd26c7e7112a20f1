// CPU main-branch forward on AMX (bf16 inputs, block sizes a multiple of 32): the same tiles, plans
// and outputs as attention_forward.cpp, with both products on the tile unit.
//
// The K and V runs some query reads are packed once per call (amx.h: score tiles for S = Q K^T,
// value tiles for O += P V). A work item keeps its queries as bf16 rows; for each block of its plan
// the rows of the queries that chose the block (in place when those queries are consecutive, else
// gathered) are multiplied by the block's key tiles, only as far as the last participant sees. The
// online softmax runs on 16-lane AVX-512 rows in f32 and writes P as bf16 (the tile unit's A
// operand); the block's P V accumulates into the f32 O rows on the tile unit where they need no
// rescale, else it lands in a scratch tile and is added after the rescale.
#include <omp.h>

#include <algorithm>
#include <cstring>
#include <limits>
#include <optional>
#include <vector>

#include "core/backend.h"
#include "cpu/amx.h"
#include "cpu/attention_amx.h"
#include "cpu/attention_tile.h"
#include "cpu/cpu_ops.h"
#include "cpu/element.h"
#include "msa/rules.h"

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include "cpu/amx_tiles.h"
#define MSA_CPU_AMX_KERNELS 1
#endif

namespace msa {
namespace detail {
namespace cpu {

namespace {

using attn::Carver;
using attn::Geometry;

constexpr int kPad = 32;       // extra rows under every row buffer: a row tile may start at any row
constexpr int kPairRows = 32;  // rows of a pair of row tiles
constexpr float kRescaleLog2 = 8;  // a row's max moves only when a block's exceeds it by this

struct AmxScratch {
  uint16_t *q, *gathered, *p;
  float *s, *pv, *o, *m, *l, *alpha;
  int32_t* rows;
  int64_t* pos;
  attn::TilePlan plan;

  AmxScratch(Carver& c, const Geometry& geo) {
    const int64_t dk = amx::packed_dim(geo.D), rows_cap = geo.rows + kPad;
    q = c.take<uint16_t>(rows_cap * dk);
    gathered = c.take<uint16_t>(rows_cap * dk);
    p = c.take<uint16_t>(int64_t(kPairRows) * geo.B);  // one pair of row tiles at a time
    s = c.take<float>(int64_t(kPairRows) * geo.B);
    pv = c.take<float>(int64_t(kPairRows) * dk);
    o = c.take<float>(int64_t(geo.rows) * dk);
    m = c.take<float>(geo.rows);
    l = c.take<float>(geo.rows);
    alpha = c.take<float>(rows_cap);
    rows = c.take<int32_t>(rows_cap);
    pos = c.take<int64_t>(geo.tile_q);
    plan = attn::take_plan(c, geo);
  }
};

// K and V packed per group in the runs of `runs`; groups are group_stride keys apart.
struct PackedKv {
  uint16_t *k = nullptr, *v = nullptr;
  int64_t group_stride = 0;  // keys
  amx::PackedRuns runs;
};

std::size_t packed_bytes(const Problem& p) {
  return std::size_t(amx::packed_head_elems(amx::packed_keys_bound(p), p.cfg.head_dim)) *
         std::size_t(p.cfg.num_kv_heads) * sizeof(uint16_t);
}

// Which 64-key runs of each (group, sequence) some query reads: the runs under the blocks of its
// top-k row (sparse), or every run up to its position (dense). Decode and chunked prefill read few
// blocks of a long prefix, so only those are packed.
std::vector<uint8_t> needed_runs(const Problem& p, const TensorView& topk,
                                 const amx::PackedRuns& packed) {
  const int64_t runs = packed.count();
  const int B = p.cfg.block_size, K = p.cfg.topk;
  std::vector<uint8_t> needed(size_t(p.cfg.num_kv_heads * runs), 0);
  for (int b = 0; b < p.batch; ++b) {
    const SequenceSpan s = sequence_span(p.varlen, b);
    if (s.q_len == 0) continue;
    const int64_t first = packed.seq_begin[size_t(b)] / amx::kPackKeys;
    auto mark = [&](int g, int64_t key_begin, int64_t key_end) {
      for (int64_t r = key_begin / amx::kPackKeys; r * amx::kPackKeys < key_end; ++r)
        needed[size_t(g * runs + first + r)] = 1;
    };
    for (int g = 0; g < p.cfg.num_kv_heads; ++g) {
      if (!topk.defined()) {
        mark(g, 0, s.query_position(s.q_len - 1) + 1);
        continue;
      }
      for (int64_t i = 0; i < s.q_len; ++i) {
        const int32_t* ids = row3<const int32_t>(topk, g, s.q_begin + i);
        for (int slot = 0; slot < K; ++slot)
          if (ids[slot] != rules::kUnusedSlot)
            mark(g, rules::block_begin(int64_t(ids[slot]), B),
                 std::min<int64_t>(s.k_len, rules::block_begin(int64_t(ids[slot]) + 1, B)));
      }
    }
  }
  return needed;
}

PackedKv pack_kv(const Problem& p, const TensorView& k, const TensorView& v, const TensorView& topk,
                 unsigned char* base, int threads) {
  PackedKv kv{reinterpret_cast<uint16_t*>(base),
              reinterpret_cast<uint16_t*>(base + attn::Scratch::align(packed_bytes(p))),
              amx::packed_keys_bound(p), amx::PackedRuns(p)};
  const int64_t runs = kv.runs.count();
  const std::vector<uint8_t> needed = needed_runs(p, topk, kv.runs);
  const int D = p.cfg.head_dim, dk = amx::packed_dim(D);
#pragma omp parallel for collapse(2) num_threads(threads) schedule(static)
  for (int g = 0; g < p.cfg.num_kv_heads; ++g)
    for (int64_t r = 0; r < runs; ++r) {
      if (!needed[size_t(g * runs + r)]) continue;
      const amx::PackedRuns::Run run = kv.runs.run(p, r);
      const int64_t row = sequence_span(p.varlen, run.seq).k_begin + run.first;
      const int64_t dst = (g * kv.group_stride + r * amx::kPackKeys) * dk;
      amx::pack_score_tiles(row3<const uint16_t>(k, row, g), k.stride[0], run.len, D, kv.k + dst);
      amx::pack_value_tiles(row3<const uint16_t>(v, row, g), v.stride[0], run.len, D, kv.v + dst);
    }
  return kv;
}

#if defined(MSA_CPU_AMX_KERNELS)

// C = A B (Accumulate: C += A B) over row tiles [0, nt) in pairs (a last single tile alone), for
// `pairs` column pairs.
template <bool Accumulate = false>
MSA_AMX_TARGET inline void product_rows(int nt, const uint16_t* a, int64_t lda_elems,
                                        const uint16_t* b, int64_t b_col_pair, int64_t b_pair,
                                        int64_t b_step, int ksteps, int pairs, float* c,
                                        int64_t ldc) {
  for (int rt = 0; rt < nt; rt += 2)
    for (int cp = 0; cp < pairs; ++cp) {
      const uint16_t* at = a + rt * 16 * lda_elems;
      const uint16_t* bt = b + cp * b_col_pair;
      float* ct = c + rt * 16 * ldc + cp * 32;
      if (rt + 1 < nt)
        amx::product<2, Accumulate>(at, lda_elems * 2, 64, bt, b_pair, b_step, ksteps, ct, ldc);
      else
        amx::product<1, Accumulate>(at, lda_elems * 2, 64, bt, b_pair, b_step, ksteps, ct, ldc);
    }
}

MSA_AMX_TARGET void run_tile_amx(const Problem& p, const Geometry& geo, const attn::TileItem& it,
                                 const TensorView& q, const TensorView& topk, const PackedKv& kv,
                                 AmxScratch& w) {
  const int G = geo.G, D = geo.D, B = geo.B, dk = amx::packed_dim(D);
  const SequenceSpan s = sequence_span(p.varlen, it.seq);
  const float qk_scale = float(double(p.cfg.softmax_scale()) * attn::kLog2e);
  const int used_rows = it.nq * G;

  for (int qi = 0; qi < it.nq; ++qi) {
    w.pos[qi] = s.query_position(it.q0 + qi);
    for (int h = 0; h < G; ++h) {
      const int r = qi * G + h;
      std::memcpy(w.q + int64_t(r) * dk,
                  row3<const uint16_t>(q, s.q_begin + it.q0 + qi, it.group * G + h), size_t(D) * 2);
      std::memset(w.q + int64_t(r) * dk + D, 0, size_t(dk - D) * 2);
      std::memset(w.o + int64_t(r) * dk, 0, size_t(dk) * 4);
      w.m[r] = -std::numeric_limits<float>::infinity();
      w.l[r] = 0;
    }
  }
  std::memset(w.q + int64_t(used_rows) * dk, 0, size_t(kPad) * dk * 2);

  attn::plan_tile(geo, s, it, topk, w.plan);
  const int64_t kv_base = (it.group * kv.group_stride + kv.runs.seq_begin[size_t(it.seq)]) * dk;
  for (int bi = 0; bi < w.plan.nblocks; ++bi) {
    const int64_t j = w.plan.block[bi];
    const int32_t* parts = w.plan.query + w.plan.offset[bi];
    const int nparts = w.plan.offset[bi + 1] - w.plan.offset[bi];
    const int nr = nparts * G, nt = (nr + 15) / 16;
    // Participants ascend, so the last one sees the most keys: compute only that far.
    const int max_vis = attn::visible_in_block(geo, j, w.pos[parts[nparts - 1]]);
    const int pairs = (max_vis + 31) / 32;

    const uint16_t* a = w.q + int64_t(parts[0]) * G * dk;
    const bool in_place = parts[nparts - 1] - parts[0] == nparts - 1;
    if (!in_place) {
      for (int pi = 0; pi < nparts; ++pi)
        std::memcpy(w.gathered + int64_t(pi) * G * dk, w.q + int64_t(parts[pi]) * G * dk,
                    size_t(G) * dk * 2);
      a = w.gathered;
    }
    for (int i = 0; i < nr; ++i) w.rows[i] = parts[i / G] * G + i % G;

    // A pair of row tiles at a time, so its S, P and P V stay in L1 between the steps.
    const uint16_t* keys = kv.k + kv_base + int64_t(j) * B * dk;
    const uint16_t* values = kv.v + kv_base + int64_t(j) * B * dk;
    for (int rt = 0; rt < nt; rt += 2) {
      const int pair_tiles = std::min(2, nt - rt), r0 = rt * 16, r1 = std::min(nr, r0 + 32);
      // S = Q K^T: key tile pairs of 32 keys, dk / 32 reduction steps of one 1 KB tile each.
      product_rows(pair_tiles, a + int64_t(r0) * dk, dk, keys, int64_t(32) * dk,
                   int64_t(16) * dk * 2, 1024, dk / 32, pairs, w.s, B);

      // Online softmax in the log2 domain; P as bf16 for the tile unit. A row keeps the max it
      // exponentiates against until a block's max exceeds it by kRescaleLog2 (P then stays below
      // 2^kRescaleLog2): out = O / l and lse = m + log2 l hold for any such m, and most blocks need
      // no rescale of O, so their P V can accumulate straight into it.
      bool rescaled = false;
      for (int i = r0; i < r1; ++i) {
        const int r = w.rows[i];
        const int vis = attn::visible_in_block(geo, j, w.pos[r / G]);
        float* srow = w.s + int64_t(i - r0) * B;
        __m512 mx = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
        for (int c = 0; c < pairs * 32; c += 16) {
          const __mmask16 live = c >= vis        ? 0
                                 : vis - c >= 16 ? 0xffff
                                                 : __mmask16((1u << (vis - c)) - 1);
          const __m512 x =
              _mm512_mask_mul_ps(_mm512_set1_ps(-std::numeric_limits<float>::infinity()), live,
                                 _mm512_loadu_ps(srow + c), _mm512_set1_ps(qk_scale));
          _mm512_storeu_ps(srow + c, x);
          mx = _mm512_max_ps(mx, x);
        }
        const float block_max = _mm512_reduce_max_ps(mx);
        const float m_new = block_max > w.m[r] + kRescaleLog2 ? block_max : w.m[r];
        const __m512 shift = _mm512_set1_ps(m_new);
        __m512 sum = _mm512_setzero_ps();
        uint16_t* prow = w.p + int64_t(i - r0) * B;
        for (int c = 0; c < pairs * 32; c += 16) {
          const __m512 e = amx::exp2_16(_mm512_sub_ps(_mm512_loadu_ps(srow + c), shift));
          sum = _mm512_add_ps(sum, e);
          _mm256_storeu_si256(reinterpret_cast<__m256i*>(prow + c), amx::to_bf16(e));
        }
        const float alpha = std::exp2(w.m[r] - m_new);  // 0 on the row's first block (m = -inf)
        w.l[r] = w.l[r] * alpha + _mm512_reduce_add_ps(sum);
        w.m[r] = m_new;
        w.alpha[i] = alpha;
        rescaled |= alpha != 1.f;
      }

      // Whole tiles of consecutive O rows with no rescale: P V accumulates into O on the tile unit.
      if (!rescaled && in_place && r1 - r0 == pair_tiles * 16) {
        product_rows<true>(pair_tiles, w.p, B, values, 2 * 512, 1024, int64_t(dk / 16) * 1024, pairs,
                           dk / 32, w.o + (int64_t(parts[0]) * G + r0) * dk, dk);
        continue;
      }

      // PV = P V: 32 keys per reduction step, column pairs of 32 dims; then O = alpha O + PV.
      product_rows(pair_tiles, w.p, B, values, 2 * 512, 1024, int64_t(dk / 16) * 1024, pairs,
                   dk / 32, w.pv, dk);
      for (int i = r0; i < r1; ++i) {
        float* orow = w.o + int64_t(w.rows[i]) * dk;
        const float* pvrow = w.pv + int64_t(i - r0) * dk;
        const __m512 al = _mm512_set1_ps(w.alpha[i]);
        for (int c = 0; c < dk; c += 16)
          _mm512_storeu_ps(
              orow + c, _mm512_fmadd_ps(_mm512_loadu_ps(orow + c), al, _mm512_loadu_ps(pvrow + c)));
      }
    }
  }
}

#else

void run_tile_amx(const Problem&, const Geometry&, const attn::TileItem&, const TensorView&,
                  const TensorView&, const PackedKv&, AmxScratch&) {}

#endif

std::size_t per_thread_bytes(const Geometry& geo) { return attn::carved_bytes<AmxScratch>(geo); }

}  // namespace

bool attention_forward_uses_amx(const Problem& p) {
  return p.dtype == DType::bf16 && p.cfg.block_size % 32 == 0 && amx::usable();
}

double attention_forward_amx_occupancy(const Problem& p, const TensorView& topk) {
  const Geometry geo(p, !topk.defined(), 1);
  if (geo.dense) return geo.rows;
  int64_t picks = 0, pairs = 0, tile = 0;
  std::vector<int64_t> seen(size_t(geo.max_blocks), -1);  // last tile that counted the block
  for (const attn::TileItem& it : attn::make_items(p, geo)) {
    const SequenceSpan s = sequence_span(p.varlen, it.seq);
    attn::for_each_selected(geo, s, it, topk, [&](int, int32_t j) {
      ++picks;
      if (seen[size_t(j)] != tile) {
        seen[size_t(j)] = tile;
        ++pairs;
      }
    });
    ++tile;
  }
  return pairs ? double(picks) * geo.G / double(pairs) : 0;
}

std::size_t attention_forward_amx_workspace_bytes(const Problem& p, int threads) {
  return attn::workspace_for_either_plan(p, [&](auto, const Geometry& geo) {
    return per_thread_bytes(geo) * threads + 2 * attn::Scratch::align(packed_bytes(p)) +
           attn::Scratch::kAlign;
  });
}

void attention_forward_amx(const Problem& p, const TensorView& q, const TensorView& k,
                           const TensorView& v, const TensorView& topk, const TensorView& out,
                           const TensorView& lse, const Context& ctx) {
  const Geometry geo(p, !topk.defined(), 1);
  if (topk.defined()) attn::validate_topk(p, topk);
  const std::vector<attn::TileItem> items = attn::make_items(p, geo);
  const int threads = thread_count(ctx.num_threads);
  const std::size_t per_thread = per_thread_bytes(geo);
  attn::Scratch scratch(ctx.workspace, attention_forward_amx_workspace_bytes(p, threads));
  const PackedKv kv = pack_kv(p, k, v, topk, scratch.base() + per_thread * threads, threads);
  const int64_t dk = amx::packed_dim(geo.D);

#pragma omp parallel num_threads(threads)
  {
    amx::ThreadTiles tile_unit;
    Carver c(scratch.base() + per_thread * omp_get_thread_num());
    AmxScratch w(c, geo);
#pragma omp for schedule(dynamic, 1)
    for (int64_t i = 0; i < int64_t(items.size()); ++i) {
      run_tile_amx(p, geo, items[size_t(i)], q, topk, kv, w);
      attn::store_tile_outputs<bf16, float>(geo, sequence_span(p.varlen, items[size_t(i)].seq),
                                            items[size_t(i)], w.o, dk, w.m, w.l, out, lse);
    }
  }
}

}  // namespace cpu
}  // namespace detail
}  // namespace msa
