// Work decomposition shared by the CPU attention forward and backward.
//
// A work item is a tile of consecutive queries of one sequence and one GQA group; its rows are
// (query, head of the group), so each key/value row is loaded once for all G heads and all queries
// of the tile that see it. Every query contributes a list of key blocks - the valid ids of its top-k
// row, or all blocks 0..local for dense attention (the k = infinity case) - and the tile plan turns
// those lists into their union, each block with the queries that selected it. Dense and sparse thus
// run the same kernel; dense tiles simply have every query in (almost) every block, which makes the
// per-block work GEMM-like.
#pragma once

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <limits>
#include <memory>
#include <string>
#include <vector>

#include "core/problem.h"
#include "cpu/attention_simd.h"
#include "cpu/element.h"
#include "msa/error.h"
#include "msa/ops.h"
#include "msa/rules.h"

namespace msa {
namespace detail {
namespace cpu {
namespace attn {

constexpr int kTileRowsTarget = 128;  // (query, head) rows per tile

// The softmax runs on exp2: scores are pre-scaled by log2(e), and lse is turned back with ln(2).
constexpr double kLog2e = 1.4426950408889634;
constexpr double kLn2 = 0.6931471805599453;

struct Geometry {
  int B = 0, D = 0, Dp = 0, G = 0, Hkv = 0, K = 0;
  int tile_q = 0;     // queries per tile
  int rows = 0;       // tile_q * G
  int Bs = 0;         // B rounded up to kScorePad: stride of score rows
  int64_t max_blocks = 0;  // blocks of the longest sequence
  bool dense = true;

  Geometry(const Problem& p, bool is_dense, int col_step) {
    B = p.cfg.block_size;
    D = p.cfg.head_dim;
    Dp = int(round_up(D, col_step));
    G = p.cfg.group_size();
    Hkv = p.cfg.num_kv_heads;
    K = p.cfg.topk;
    tile_q = std::max(1, kTileRowsTarget / G);
    rows = tile_q * G;
    Bs = int(round_up(B, kScorePad));
    max_blocks = std::max<int64_t>(1, rules::num_blocks(p.varlen.max_seqlen_k, B));
    dense = is_dense;
  }
  // Upper bound of (block, query) pairs of one tile.
  int64_t max_pairs() const { return int64_t(tile_q) * (dense ? max_blocks : K); }
};

struct TileItem {
  int seq = 0;
  int64_t q0 = 0;  // first query of the tile, relative to its sequence
  int nq = 0;
  int group = 0;
};

// Tiles of every sequence and group, the latest queries (most keys) first for load balance.
inline std::vector<TileItem> make_items(const Problem& p, const Geometry& geo) {
  std::vector<TileItem> items;
  for (int b = p.batch - 1; b >= 0; --b) {
    const SequenceSpan s = sequence_span(p.varlen, b);
    for (int64_t q1 = s.q_len; q1 > 0; q1 -= geo.tile_q) {
      const int64_t q0 = std::max<int64_t>(0, q1 - geo.tile_q);
      for (int g = 0; g < geo.Hkv; ++g) items.push_back({b, q0, int(q1 - q0), g});
    }
  }
  return items;
}

// Rejects top-k rows a kernel cannot run: ids below -1, ids after the query's local block (not
// causally visible) and an id repeated within a row. -1 slots are skipped; a row need not contain
// its local block (the index branch always puts it there, the main branch takes any valid ids).
inline void validate_topk(const Problem& p, const TensorView& topk) {
  const int K = p.cfg.topk, B = p.cfg.block_size;
  for (int b = 0; b < p.batch; ++b) {
    const SequenceSpan s = sequence_span(p.varlen, b);
    for (int64_t i = 0; i < s.q_len; ++i) {
      const int64_t row = s.q_begin + i;
      const int64_t local = rules::local_block(s.query_position(i), B);
      for (int g = 0; g < p.cfg.num_kv_heads; ++g) {
        const int32_t* ids = row3<const int32_t>(topk, g, row);
        for (int slot = 0; slot < K; ++slot) {
          const int32_t id = ids[slot];
          if (id == rules::kUnusedSlot) continue;
          if (id >= 0 && id <= local && std::find(ids, ids + slot, id) == ids + slot) continue;
          const std::string what = "block id " + std::to_string(id) + " at [group " +
                                   std::to_string(g) + ", query row " + std::to_string(row) +
                                   ", slot " + std::to_string(slot) + "]";
          MSA_CHECK_ARG(id >= 0, "topk", what + " is negative and not the unused marker -1");
          MSA_CHECK_ARG(id <= local, "topk",
                        what + " is after the query's local block " + std::to_string(local) +
                            " (not causally visible)");
          throw ArgumentError("topk", what + " repeats an earlier slot of the row");
        }
      }
    }
  }
}

// The union of the tile's blocks, ascending, each with the tile queries that selected it (ascending).
struct TilePlan {
  int nblocks = 0;
  int32_t* block = nullptr;   // [max_blocks]
  int32_t* offset = nullptr;  // [max_blocks + 1] into query
  int32_t* query = nullptr;   // [max_pairs] tile query indices
  int32_t* count = nullptr;   // [max_blocks] scratch for the counting sort
};

// Calls visit(qi, block) for every block of every query of the tile: one list per query.
template <class Visit>
inline void for_each_selected(const Geometry& geo, const SequenceSpan& s, const TileItem& it,
                              const TensorView& topk, Visit visit) {
  for (int qi = 0; qi < it.nq; ++qi) {
    const int64_t pos = s.query_position(it.q0 + qi);
    if (geo.dense) {
      const int64_t local = rules::local_block(pos, geo.B);
      for (int64_t j = 0; j <= local; ++j) visit(qi, int32_t(j));
    } else {
      const int32_t* ids = row3<const int32_t>(topk, it.group, s.q_begin + it.q0 + qi);
      for (int slot = 0; slot < geo.K; ++slot)
        if (ids[slot] != rules::kUnusedSlot) visit(qi, ids[slot]);
    }
  }
}

inline void plan_tile(const Geometry& geo, const SequenceSpan& s, const TileItem& it,
                      const TensorView& topk, TilePlan& plan) {
  const int64_t nb = rules::num_blocks(s.k_len, geo.B);
  std::fill(plan.count, plan.count + nb, 0);
  for_each_selected(geo, s, it, topk, [&](int, int32_t j) { ++plan.count[j]; });
  int n = 0, total = 0;
  for (int64_t j = 0; j < nb; ++j) {
    if (!plan.count[j]) continue;
    plan.block[n] = int32_t(j);
    plan.offset[n] = total;
    total += plan.count[j];
    plan.count[j] = plan.offset[n];  // becomes the insertion cursor of block j
    ++n;
  }
  plan.offset[n] = total;
  plan.nblocks = n;
  for_each_selected(geo, s, it, topk, [&](int qi, int32_t j) { plan.query[plan.count[j]++] = qi; });
}

// Bump allocator over a caller's workspace or a buffer owned for the call.
class Scratch {
 public:
  Scratch(const Workspace& ws, std::size_t bytes) {
    if (ws.data) {
      base_ = static_cast<unsigned char*>(ws.data);
    } else {
      // Not zero-filled: a large buffer (the AMX forward's packed K/V) is only partly touched.
      owned_.reset(new unsigned char[bytes + kAlign]);
      base_ = owned_.get();
    }
    const auto addr = reinterpret_cast<std::uintptr_t>(base_);
    base_ += (kAlign - addr % kAlign) % kAlign;
  }
  unsigned char* base() const { return base_; }
  static constexpr std::size_t kAlign = 64;
  static std::size_t align(std::size_t n) { return (n + kAlign - 1) / kAlign * kAlign; }

 private:
  std::unique_ptr<unsigned char[]> owned_;
  unsigned char* base_ = nullptr;
};

// Sizes a region of typed arrays, then hands them out in the same order.
class Carver {
 public:
  explicit Carver(unsigned char* base = nullptr) : base_(base) {}
  template <class X>
  X* take(int64_t n) {
    X* p = reinterpret_cast<X*>(base_ ? base_ + used_ : nullptr);
    used_ += Scratch::align(std::size_t(n) * sizeof(X));
    return p;
  }
  std::size_t used() const { return used_; }

 private:
  unsigned char* base_;
  std::size_t used_ = 0;
};

// Bytes one thread's scratch S carves for `geo` (S(Carver&, const Geometry&) takes its arrays).
template <class S>
std::size_t carved_bytes(const Geometry& geo) {
  Carver c;
  S s(c, geo);
  return c.used();
}

// Workspace of an op that runs the dense or the sparse plan: bytes_of(A{}, geo) is its size for
// accumulator type A and one geometry. Either plan can be the larger (dense holds every block per
// query, sparse k blocks, and k may exceed the blocks of short sequences), so one size serves both.
template <class BytesOf>
std::size_t workspace_for_either_plan(const Problem& p, BytesOf bytes_of) {
  auto larger = [&](auto acc) {
    using A = decltype(acc);
    return std::max(bytes_of(acc, Geometry(p, true, column_step<A>())),
                    bytes_of(acc, Geometry(p, false, column_step<A>())));
  };
  return acc_bytes_of(p.dtype) == sizeof(double) ? larger(double{}) : larger(float{});
}

inline TilePlan take_plan(Carver& c, const Geometry& geo) {
  TilePlan plan;
  plan.block = c.take<int32_t>(geo.max_blocks);
  plan.offset = c.take<int32_t>(geo.max_blocks + 1);
  plan.query = c.take<int32_t>(geo.max_pairs());
  plan.count = c.take<int32_t>(geo.max_blocks);
  return plan;
}

// Rows of key/value block `j` (visible part: nkeys rows) as accumulator rows: in place when the
// storage already is the accumulator type with padded rows, else converted into `buf`.
template <class T, class A>
inline void block_rows(const Geometry& geo, const TensorView& t, const SequenceSpan& s, int group,
                       int64_t j, int nkeys, A* buf, const A** rows) {
  const int64_t first = s.k_begin + rules::block_begin(j, geo.B);
  for (int i = 0; i < nkeys; ++i) {
    const T* src = row3<const T>(t, first + i, group);
    if constexpr (std::is_same_v<T, A>) {
      if (geo.Dp == geo.D) {
        rows[i] = src;
        continue;
      }
    }
    A* dst = buf + int64_t(i) * geo.Dp;
    load_row<T, A>(src, geo.D, A(1), dst, geo.Dp);
    rows[i] = dst;
  }
}

// Writes a tile's outputs from its running softmax state: out = o / l and lse = ln(sum of exp) from
// the row max m (log2 domain, scores pre-scaled by log2 e) and the sum l; a row that saw no key (an
// empty top-k row) gets out = 0 and lse = -inf. Rows r = query * G + head; o rows are `ld` apart.
template <class T, class A>
inline void store_tile_outputs(const Geometry& geo, const SequenceSpan& s, const TileItem& it,
                               const A* o, int64_t ld, const A* m, const A* l, const TensorView& out,
                               const TensorView& lse) {
  constexpr A kNegInf = -std::numeric_limits<A>::infinity();
  for (int qi = 0; qi < it.nq; ++qi) {
    const int64_t row = s.q_begin + it.q0 + qi;
    A* lrow = row2<A>(lse, row);
    for (int h = 0; h < geo.G; ++h) {
      const int r = qi * geo.G + h;
      const int head = it.group * geo.G + h;
      const bool empty = l[r] == A(0);
      store_row<T, A>(o + int64_t(r) * ld, empty ? A(0) : A(1) / l[r], row3<T>(out, row, head), geo.D);
      lrow[head] = empty ? kNegInf : A((double(m[r]) + std::log2(double(l[r]))) * kLn2);
    }
  }
}

// Visible keys of block j for a query at position pos.
inline int visible_in_block(const Geometry& geo, int64_t j, int64_t pos) {
  return int(rules::visible_block_end(j, geo.B, pos) - rules::block_begin(j, geo.B));
}

}  // namespace attn
}  // namespace cpu
}  // namespace detail
}  // namespace msa
