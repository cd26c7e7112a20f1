// Key -> query lists for the key-major backward kernels (attention dK/dV, KL dki): for each (group,
// key block), the queries (sequence-local index) whose topk row selected that block, ascending and
// without repeats, each with the slot of its topk row that holds the block (the first one: a
// duplicated id counts once). Built on the device with no host round trip: one entry per (group,
// query, valid slot), a stable CUB radix sort of (entry, slot) pairs, a unique-by-entry pass that
// keeps the first slot, and each list's range.
//
// The kernels walk a list in gathered tiles (GatheredTiles): 64 / G queries at a time, each query's
// G heads consecutive rows of the matrix unit, so every row of a tile selected the tile's block.
// Query tiles of consecutive queries (the forward's tiles) would leave most rows masked when G is
// small and neighbouring queries select different blocks.
#pragma once

#include <cuda_runtime.h>

#include <cub/device/device_radix_sort.cuh>
#include <cub/device/device_select.cuh>

#include <algorithm>
#include <cstddef>
#include <cstdint>

#include "core/backend.h"
#include "cuda/attention_forward_kernel.cuh"  // kAttnRows
#include "cuda/cuda_check.cuh"
#include "cuda/key_splits.h"
#include "cuda/sequence_of_row.cuh"
#include "cuda/workspace.cuh"
#include "msa/error.h"
#include "msa/rules.h"

namespace msa {
namespace detail {
namespace cuda {

// Global id of block j of a sequence whose keys start at packed row k_begin: k_begin / B + b + j is
// unique across the batch (sequence b has at most floor((k_begin + Lk) / B) - floor(k_begin / B) + 1
// blocks) and below total_k / B + batch + 1.
__host__ __device__ __forceinline__ int64_t global_block(int64_t k_begin, int b, int64_t j, int B) {
  return k_begin / B + b + j;
}

// The lists as the kernels read them: sorted unique entries (list id << 32 | query), each entry's
// slot and, per list id = g * num_list_blocks + global block, the range [begin, end) of its entries.
struct KeyQueryLists {
  const unsigned long long* entries = nullptr;
  const int* slots = nullptr;
  const int* begin = nullptr;
  const int* end = nullptr;
  int64_t num_list_blocks = 0;

  __device__ __forceinline__ int64_t list_id(int g, int64_t k_begin, int b, int64_t block, int B) const {
    return int64_t(g) * num_list_blocks + global_block(k_begin, b, block, B);
  }
};

// Rows of a gathered tile of `tile_rows` rows (64 but in the wide KL kernel): up to tile_rows / G
// queries of a list (G <= tile_rows), or one query's heads tile_rows at a time (G > tile_rows). Row r
// of tile u is head head(u, r) of the query at entry first_entry(u) + entry(r).
struct GatheredTiles {
  int G, tile_rows, rows_per_query, queries_per_tile, tiles_per_query;
  int row_shift;  // log2(rows_per_query) when a power of two, else -1
  __host__ __device__ explicit GatheredTiles(int group_size, int rows = kAttnRows)
      : G(group_size),
        tile_rows(rows),
        rows_per_query(group_size < rows ? group_size : rows),
        queries_per_tile(rows / rows_per_query),
        tiles_per_query((group_size + rows - 1) / rows),
        row_shift(-1) {
    if ((rows_per_query & (rows_per_query - 1)) == 0)
      for (row_shift = 0; (1 << row_shift) < rows_per_query; ++row_shift) {
      }
  }
  // The loaders call these per row and per tile: powers of two and one tile per query (every
  // benchmarked layout) avoid the 32-bit divisions and the 64-bit ones (a subroutine call each).
  __host__ __device__ int64_t tiles(int64_t entries) const {
    return (entries + queries_per_tile - 1) / queries_per_tile * tiles_per_query;
  }
  __host__ __device__ int64_t first_entry(int64_t u) const {
    return (tiles_per_query == 1 ? u : u / tiles_per_query) * queries_per_tile;
  }
  // Entry offset of row r within its tile; -1 for the rows past the tile's whole queries.
  __host__ __device__ int entry(int r) const {
    if (r >= queries_per_tile * rows_per_query) return -1;
    return row_shift >= 0 ? r >> row_shift : r / rows_per_query;
  }
  // Head within the group (>= G: a padding row of a query's last tile).
  __host__ __device__ int head(int64_t u, int r) const {
    const int in_query = row_shift >= 0 ? r & (rows_per_query - 1) : r % rows_per_query;
    return tiles_per_query == 1 ? in_query : int(u % tiles_per_query) * tile_rows + in_query;
  }
};

// The queries a CTA owning keys [ks, ks + 64) of group g visits, ascending, in gathered tiles: dense
// (no lists), every query at a position >= ks; sparse, those that selected the keys' block. With
// splits > 1 the CTA takes share `split` of them (a block every query chose is a long list).
struct GatheredWalk {
  GatheredTiles tiles;
  const unsigned long long* entries;  // nullptr: dense
  const int* slots;
  int64_t begin = 0, count = 0, tile_count = 0;

  __device__ GatheredWalk(const KeyQueryLists& lists, bool dense, int G, int g, int b, int64_t k_begin,
                          int64_t ks, int64_t lq, int64_t lk, int B, int splits, int split,
                          int tile_rows = kAttnRows)
      : tiles(G, tile_rows), entries(dense ? nullptr : lists.entries), slots(lists.slots) {
    if (dense) {
      begin = ks - (lk - lq) > 0 ? ks - (lk - lq) : 0;
      count = lq > begin ? lq - begin : 0;
    } else {
      const int64_t list = lists.list_id(g, k_begin, b, rules::block_of(ks, B), B);
      begin = lists.begin[list];
      count = lists.end[list] - begin;
    }
    key_split_share(begin, count, splits, split, tiles.queries_per_tile);
    tile_count = tiles.tiles(count);
  }
  __device__ int64_t num_tiles() const { return tile_count; }
  // Queries of tile u (the last tile of a list may hold fewer).
  __device__ int queries_in(int64_t u) const {
    const int64_t left = count - tiles.first_entry(u);
    return int(left < tiles.queries_per_tile ? left : tiles.queries_per_tile);
  }
  // Query j of tile u (sequence-local), -1 past the list.
  __device__ int64_t query(int64_t u, int j) const {
    const int64_t e = tiles.first_entry(u) + j;
    if (j < 0 || j >= tiles.queries_per_tile || e >= count) return -1;
    return entries ? int64_t(entries[begin + e] & 0xffffffffull) : begin + e;
  }
  // Slot of query j of tile u (sparse, a query of the list).
  __device__ int slot(int64_t u, int j) const { return slots[begin + tiles.first_entry(u) + j]; }
  // Row r of tile u: its query (-1: a padding row) and its head within the group.
  __device__ int64_t row_query(int64_t u, int r, int& head) const {
    head = tiles.head(u, r);
    return head < tiles.G ? query(u, tiles.entry(r)) : -1;
  }
};

// The one rule of every key-major kernel for a listed query's keys: the last offset in [ks, ks + keys)
// that query i (sequence-local; < 0: a padding row) may see, -1 for none. Every listed query selected
// the keys' block, so only the causal limit remains.
__host__ __device__ __forceinline__ int gathered_limit(int64_t lq, int64_t lk, int64_t i, int64_t ks, int keys) {
  if (i < 0) return -1;
  const int64_t pos = rules::query_position(lq, lk, i);
  if (!rules::causally_visible(ks, pos)) return -1;
  return pos - ks < keys ? int(pos - ks) : keys - 1;
}

// The queries (and slots) of gathered tiles staged in shared memory one tile before their loads are
// issued, so that issuing a tile's copies waits on no global read: each thread below the tile's
// query count fetches one entry into registers a whole tile ahead (fetch), and writes it to one of
// two buffers (store) between the barriers of the tile loop.
struct GatheredQueryStage {
  int* query;  // [2][64]: -1 past the list
  int* slot;   // [2][64]: slot of the query's topk row holding the block (sparse)
  int next_query = -1, next_slot = -1;

  __device__ GatheredQueryStage(int* smem) : query(smem), slot(smem + 2 * kAttnRows) {}
  static constexpr std::size_t kBytes = 4 * kAttnRows * sizeof(int);

  __device__ void fetch(const GatheredWalk& w, int64_t u) {
    next_query = -1, next_slot = -1;
    const int j = int(threadIdx.x);
    if (u >= w.num_tiles() || j >= w.tiles.queries_per_tile) return;
    const int64_t e = w.tiles.first_entry(u) + j;
    if (e >= w.count) return;
    if (w.entries) {
      next_query = int(w.entries[w.begin + e] & 0xffffffffull);
      next_slot = w.slots[w.begin + e];
    } else {
      next_query = int(w.begin + e);
    }
  }
  __device__ void store(int buf) const {
    if (int(threadIdx.x) < kAttnRows) {
      query[buf * kAttnRows + threadIdx.x] = next_query;
      slot[buf * kAttnRows + threadIdx.x] = next_slot;
    }
  }
  // Row r of a tile staged in `buf` (tile index u): query (-1: padding) and head within the group.
  __device__ int row_query(const GatheredTiles& t, int buf, int64_t u, int r, int& head) const {
    head = t.head(u, r);
    const int j = t.entry(r);
    return (j < 0 || head >= t.G) ? -1 : query[buf * kAttnRows + j];
  }
};

// Where the entries kernel reads the selections.
struct KeyQueryListSource {
  const int32_t* topk;
  const int32_t* cu_q;
  const int32_t* cu_k;
  int64_t topk_s0, topk_s1;
  int topk_k, block_size;
  int64_t num_list_blocks;
};

// One entry per (group, query row, slot) with its slot; invalid ids (outside [0, local block]) give
// the sentinel.
static __global__ void key_query_list_entries_kernel(const KeyQueryListSource s, int batch, int64_t total_q,
                                                     int num_kv_heads, unsigned long long* entries, int* slots) {
  const int64_t n = int64_t(num_kv_heads) * total_q * s.topk_k;
  for (int64_t e = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; e < n; e += int64_t(gridDim.x) * blockDim.x) {
    const int slot = int(e % s.topk_k);
    const int64_t row = (e / s.topk_k) % total_q;
    const int g = int(e / (int64_t(s.topk_k) * total_q));
    entries[e] = ~0ull;
    slots[e] = slot;
    const int b = sequence_of_row(s.cu_q, batch, row);
    const int64_t q_begin = s.cu_q[b], lq = s.cu_q[b + 1] - q_begin;
    const int64_t k_begin = s.cu_k[b], lk = s.cu_k[b + 1] - k_begin;
    const int64_t i = row - q_begin;
    const int id = s.topk[int64_t(g) * s.topk_s0 + row * s.topk_s1 + slot];
    if (id < 0 || id > rules::local_block(rules::query_position(lq, lk, i), s.block_size)) continue;
    const unsigned long long list =
        static_cast<unsigned long long>(g) * s.num_list_blocks + global_block(k_begin, b, id, s.block_size);
    entries[e] = (list << 32) | static_cast<unsigned long long>(i);
  }
}

// Range of each list in the sorted, deduplicated entries (lists absent from it keep [0, 0)).
static __global__ void key_query_list_ranges_kernel(const unsigned long long* keys, const int* num_keys, int* begin,
                                                    int* end) {
  const int n = *num_keys;
  for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += gridDim.x * blockDim.x) {
    const unsigned long long list = keys[i] >> 32;
    if (list == 0xffffffffull) continue;  // the unused-entry sentinel
    if (i == 0 || (keys[i - 1] >> 32) != list) begin[list] = i;
    if (i == n - 1 || (keys[i + 1] >> 32) != list) end[list] = i + 1;
  }
}

// Workspace of the lists: entries and slots twice each (unsorted, sorted), the unique count, CUB's
// temporary storage and the two range arrays. `what` names the caller in errors.
class KeyQueryListPlan {
 public:
  KeyQueryListPlan(const Problem& p, const char* what)
      : num_entries_(int64_t(p.cfg.num_kv_heads) * p.total_q * p.cfg.topk),
        num_list_blocks_(p.total_k / p.cfg.block_size + p.batch + 1),
        num_lists_(std::size_t(p.cfg.num_kv_heads) * std::size_t(num_list_blocks_)) {
    MSA_CHECK_ARG(num_entries_ < (int64_t(1) << 31), "topk",
                  std::string("too many (group, query, slot) entries for the CUDA ") + what);
    MSA_CHECK_ARG(uint64_t(num_lists_) < 0xffffffffull, "k", std::string("too many key blocks for the CUDA ") + what);
    std::size_t sort_bytes = 0, unique_bytes = 0;
    const int n = int(num_entries_);
    using u64 = unsigned long long;
    MSA_CUDA_CHECK(cub::DeviceRadixSort::SortPairs(nullptr, sort_bytes, static_cast<const u64*>(nullptr),
                                                   static_cast<u64*>(nullptr), static_cast<const int*>(nullptr),
                                                   static_cast<int*>(nullptr), n));
    MSA_CUDA_CHECK(cub::DeviceSelect::UniqueByKey(nullptr, unique_bytes, static_cast<const u64*>(nullptr),
                                                  static_cast<const int*>(nullptr), static_cast<u64*>(nullptr),
                                                  static_cast<int*>(nullptr), static_cast<int*>(nullptr), n));
    cub_bytes_ = std::max(sort_bytes, unique_bytes);
  }
  std::size_t bytes() const {
    return 2 * align_up(std::size_t(num_entries_) * sizeof(unsigned long long)) +
           2 * align_up(std::size_t(num_entries_) * sizeof(int)) + align_up(sizeof(int)) + align_up(cub_bytes_) +
           2 * align_up(num_lists_ * sizeof(int));
  }

  // Builds the lists of topk (strides s0: group, s1: query row) into workspace taken from `arena`.
  KeyQueryLists build(const Problem& p, const int32_t* topk, int64_t topk_s0, int64_t topk_s1, ScratchArena& arena,
                      cudaStream_t stream) const {
    using u64 = unsigned long long;
    u64* entries = arena.take<u64>(std::size_t(num_entries_));
    u64* sorted = arena.take<u64>(std::size_t(num_entries_));
    int* slots = arena.take<int>(std::size_t(num_entries_));
    int* sorted_slots = arena.take<int>(std::size_t(num_entries_));
    int* num_unique = arena.take<int>(1);
    void* cub_tmp = arena.take<unsigned char>(cub_bytes_);
    int* begin = arena.take<int>(num_lists_);
    int* end = arena.take<int>(num_lists_);
    MSA_CUDA_CHECK(cudaMemsetAsync(begin, 0, num_lists_ * sizeof(int), stream));
    MSA_CUDA_CHECK(cudaMemsetAsync(end, 0, num_lists_ * sizeof(int), stream));
    const int n = int(num_entries_);
    if (n > 0) {
      const KeyQueryListSource src{topk,
                                   p.varlen.cu_seqlens_q.ptr<int32_t>(),
                                   p.varlen.cu_seqlens_k.ptr<int32_t>(),
                                   topk_s0,
                                   topk_s1,
                                   p.cfg.topk,
                                   p.cfg.block_size,
                                   num_list_blocks_};
      const unsigned grid = unsigned(std::max<int64_t>(1, std::min<int64_t>((num_entries_ + 255) / 256, 65535)));
      key_query_list_entries_kernel<<<grid, 256, 0, stream>>>(src, p.batch, p.total_q, p.cfg.num_kv_heads, entries,
                                                              slots);
      MSA_CUDA_CHECK_LAUNCH();
      std::size_t tmp = cub_bytes_;
      // Only the bits a list id can use: the all-ones sentinel still sorts last.
      int end_bit = 33;
      while (end_bit < 64 && (uint64_t(1) << (end_bit - 32)) <= uint64_t(num_lists_)) ++end_bit;
      // Radix sort is stable: equal entries keep slot order, and the unique pass keeps the first.
      MSA_CUDA_CHECK(
          cub::DeviceRadixSort::SortPairs(cub_tmp, tmp, entries, sorted, slots, sorted_slots, n, 0, end_bit, stream));
      tmp = cub_bytes_;
      MSA_CUDA_CHECK(cub::DeviceSelect::UniqueByKey(cub_tmp, tmp, sorted, sorted_slots, entries, slots, num_unique, n,
                                                    stream));
      key_query_list_ranges_kernel<<<grid, 256, 0, stream>>>(entries, num_unique, begin, end);
      MSA_CUDA_CHECK_LAUNCH();
    }
    KeyQueryLists lists;
    lists.entries = entries;
    lists.slots = slots;
    lists.begin = begin;
    lists.end = end;
    lists.num_list_blocks = num_list_blocks_;
    return lists;
  }

 private:
  int64_t num_entries_;
  int64_t num_list_blocks_;
  std::size_t num_lists_;
  std::size_t cub_bytes_ = 0;
};

}  // namespace cuda
}  // namespace detail
}  // namespace msa
