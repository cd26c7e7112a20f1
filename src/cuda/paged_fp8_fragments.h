// Where the decode attention's FP8 register path (paged_attention_mma.cuh, MmaMode::fp8_registers)
// finds its mma.sync m16n8k16 operands in raw E4M3 tiles, so that each 32-bit shared-memory word
// feeds two B-fragment registers (K) or four n-tiles (V) with no 16-bit copy of the tile:
//  - raw tiles hold kMmaKeys rows of D codes, swizzled by 16-byte chunk (chunk ^ 128-byte line), which
//    keeps the word reads below free of bank conflicts;
//  - S = Q K^T: the contraction over D is order-free, so mma k 2t, 2t+1 / 2t+8, 2t+9 of k-step kk are
//    D 16 kk + 4t + 0, 1 / + 2, 3 for Q (A) and K (B) alike: lane (g, t) reads one word of key g;
//  - O += P V: keys keep their order (P comes from S), D is permuted instead: column g of n-tile j is
//    d = 32 (j / 4) + 4 g + j % 4, so the word of 4 codes at 32 (j / 4) + 4 g serves n-tiles 4 (j / 4) ..
//    + 3, and O's accumulator columns go back to d through the same map.
// Host and device: tests/cuda/test_paged_fp8_fragments.cpp checks the maps with an emulated mma.
#pragma once

#include "msa/rules.h"  // MSA_HOST_DEVICE

namespace msa {
namespace detail {
namespace cuda {
namespace paged {

// Byte offset of code `byte` of row `key` in a raw tile of D-byte rows. The 16-byte chunks of each
// 128-byte line are XOR-permuted by a function of the line. D = 128 (a key a line): line & 7. D = 64
// (two keys a line): a map of line & 3 whose low two bits differ between 4 consecutive lines (the K
// reads: keys g of one instruction share lines by pairs) and whose high two bits do too (the V reads:
// keys 2t, one a line).
template <int D>
MSA_HOST_DEVICE int fp8_tile_offset(int key, int byte) {
  static_assert(D == 64 || D == 128, "the paged attention's head dims");
  const int chunk = key * (D / 16) + (byte >> 4);
  const int line = chunk >> 3;
  const int x = D == 128 ? (line & 7) : ((line & 3) ^ ((line & 3) << 1));
  return ((chunk & ~7) | ((chunk ^ x) & 7)) * 16 + (byte & 15);
}

// First D index of the 4 codes (one word) lane t reads for k-step kk of S = Q K^T; codes 0, 1 are mma
// k 2t, 2t + 1 and codes 2, 3 are mma k 2t + 8, 2t + 9. Q's A fragment takes the same D indices.
MSA_HOST_DEVICE int fp8_k_column(int kk, int t) { return 16 * kk + 4 * t; }

// D index of column g of n-tile j of O += P V (the n-tiles of 8 columns, D / 8 of them).
MSA_HOST_DEVICE int fp8_v_column(int j, int g) { return 32 * (j >> 2) + 4 * g + (j & 3); }

}  // namespace paged
}  // namespace cuda
}  // namespace detail
}  // namespace msa
