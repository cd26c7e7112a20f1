// Host side of the TMA tile walk shared by the attention forward (attention_forward_tma.cuh) and
// the backward's dQ (attention_backward_dq_tma.cuh): where it applies, its workspace of union
// records, and the tile counts and union build that precede either kernel.
#pragma once

#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <string>

#include "core/backend.h"
#include "cuda/attention_forward_tma.cuh"
#include "cuda/attention_host.cuh"
#include "cuda/cuda_check.cuh"
#include "cuda/tensor_map.h"
#include "cuda/workspace.cuh"

namespace msa {
namespace detail {
namespace cuda {

// The wgmma kernels are built for sm_90a only.
inline bool is_sm90() {
  int dev = 0, major = 0, minor = 0;
  MSA_CUDA_CHECK(cudaGetDevice(&dev));
  MSA_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev));
  MSA_CUDA_CHECK(cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, dev));
  return major == 9 && minor == 0;
}

// The union capacity of the 128-row tiles (the same rule as every tile-union kernel) and, sparse,
// the workspace of one union record per tile.
struct TmaTileLayout {
  AttentionParams caps{};  // bitmap_words, union_cap
  int64_t records_per_group = 0;
  int record_bytes = 0;
  std::size_t bytes = 0;
  TmaTileLayout(const Problem& p, bool sparse) {
    if (!sparse) return;
    const int64_t max_k = p.varlen.max_seqlen_k > 0 ? p.varlen.max_seqlen_k : p.total_k;
    caps.group_size = p.cfg.group_size();
    set_union_capacity(caps, max_k, tma::kTileRows, p.cfg);
    records_per_group = tma::union_records_per_group(p.total_q, caps.group_size, int(p.batch));
    record_bytes = tma::union_record_bytes(caps.union_cap);
    bytes = align_up(std::size_t(p.cfg.num_kv_heads) * records_per_group * record_bytes);
  }
};

// Whether the TMA tiles apply: Q boxes of 64 rows need G to divide 64 or be a multiple of it; the
// tile arithmetic is 32-bit; the kernel's shared memory (`smem_bytes(record_bytes)`) must fit.
template <class SmemBytes>
bool tma_tiles_applicable(const Problem& p, bool sparse, SmemBytes smem_bytes) {
  const int64_t G = p.cfg.group_size();
  if (!(G <= 64 ? 64 % G == 0 : G % 64 == 0)) return false;
  const int64_t bound = int64_t(1) << 31;
  if (p.total_k >= bound || p.total_q * G >= bound ||
      (p.total_q * G / tma::kTileRows + 1) * p.cfg.num_kv_heads * p.batch >= bound)
    return false;
  int dev = 0, optin = 0;
  MSA_CUDA_CHECK(cudaGetDevice(&dev));
  MSA_CUDA_CHECK(cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev));
  return smem_bytes(TmaTileLayout(p, sparse).record_bytes) <= std::size_t(optin);
}

// A map of a [rows, heads, D] tensor of query rows (q, dout) in boxes of 64 tile rows: 64 / G queries
// of G heads, or 64 heads of one query.
inline bool encode_query_rows_map(CUtensorMap* map, const Problem& p, const TensorView& t) {
  const int box_heads = std::min(p.cfg.group_size(), 64);
  return encode_rows_map(map, t, tma::kBoxElems, box_heads, 64 / box_heads);
}

// Encodes the K, V and Q maps, sets the tile counts and the ping-pong switch (MSA_TMA_PINGPONG=0:
// off) and, sparse, builds every tile's union record into the workspace. False (nothing launched)
// when the driver cannot describe a tensor (not expected for rows that pass check_aligned_rows):
// the caller takes another kernel.
inline bool prepare_tma_tiles(const Problem& p, tma::TmaAttentionParams& tp, const TensorView& q,
                              const TensorView& k, const TensorView& v, int keys, int max_q,
                              const TmaTileLayout& lay, ScratchArena& arena, cudaStream_t stream) {
  if (!encode_rows_map(&tp.k_map, k, tma::kBoxElems, 1, keys) || !encode_rows_map(&tp.v_map, v, tma::kBoxElems, 1, keys) ||
      !encode_query_rows_map(&tp.q_map, p, q))
    return false;
  const char* pp = std::getenv("MSA_TMA_PINGPONG");
  tp.pingpong = pp == nullptr || std::string(pp) != "0";
  MSA_CHECK_ARG(p.batch <= 65535, "cu_seqlens_q", "the CUDA attention takes at most 65535 sequences");
  // 32-bit tile arithmetic (attention_forward_tma.cuh, Tile): tma_tiles_applicable bounded the counts.
  // (A caller's max_seqlen_q may exceed the longest sequence; total_q bounds it.)
  const int64_t rows = std::min<int64_t>(max_q, p.total_q) * tp.a.group_size;
  tp.tiles_x = int((rows + tma::kTileRows - 1) / tma::kTileRows);
  tp.num_kv_heads = p.cfg.num_kv_heads;
  tp.batch = int(p.batch);
  tp.num_tiles = tp.tiles_x * tp.num_kv_heads * tp.batch;
  if (tp.a.topk) {
    unsigned char* unions = arena.take<unsigned char>(lay.bytes);
    tp.unions = unions;
    tp.records_per_group = lay.records_per_group;
    tp.record_bytes = lay.record_bytes;
    const std::size_t union_smem = BlockUnionSmem<tma::kMaskWords>::bytes(tp.a.bitmap_words, tp.a.union_cap);
    allow_dynamic_smem(reinterpret_cast<const void*>(tma::tile_unions_kernel<tma::kMaskWords>), union_smem,
                       "attention (tile unions)");
    const dim3 grid(unsigned(tp.tiles_x), unsigned(tp.num_kv_heads), unsigned(tp.batch));
    tma::tile_unions_kernel<tma::kMaskWords><<<grid, 128, union_smem, stream>>>(tp.a, unions, lay.records_per_group,
                                                                                 lay.record_bytes);
    MSA_CUDA_CHECK_LAUNCH();
  }
  return true;
}

// One persistent CTA per SM, or fewer when there are fewer tiles.
inline unsigned tma_ctas(const tma::TmaAttentionParams& tp) {
  int dev = 0, sms = 0;
  MSA_CUDA_CHECK(cudaGetDevice(&dev));
  MSA_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev));
  return unsigned(std::min<int64_t>(tp.num_tiles, sms));
}

}  // namespace cuda
}  // namespace detail
}  // namespace msa
