// The FP8 register path's operand maps (cuda/paged_fp8_fragments.h) against plain products, with an
// emulated mma.sync m16n8k16 (each lane's registers placed where the PTX fragment layout puts them):
// S = Q K^T from Q's permuted A fragments and K words of the swizzled raw tile, O = P V from P's
// fragments and V words spread over four n-tiles, for D 64 and 128 and every warp key slice the
// kernel uses; the tile offsets are a bijection, a word's 4 codes are contiguous, and the word reads
// of one instruction hit 32 different banks. Host only: runs without a GPU.
#include <gtest/gtest.h>

#include <cmath>
#include <random>
#include <set>
#include <vector>

#include "cuda/paged_fp8_fragments.h"

namespace msa {
namespace {

using detail::cuda::paged::fp8_k_column;
using detail::cuda::paged::fp8_tile_offset;
using detail::cuda::paged::fp8_v_column;

constexpr int kKeys = 64;  // rows of a staged chunk (kMmaKeys)

// C[16][8] += A B for one m16n8k16, from the 32 lanes' fragments: a[lane][4][2], b[lane][2][2]
// (register, half). Lane (g, t) = (lane / 4, lane % 4) holds A[g][2t..], A[g + 8][2t..], A[g][2t + 8..],
// A[g + 8][2t + 8..] and B[2t..][g], B[2t + 8..][g].
void mma_16816(double (&c)[16][8], const double (&a)[32][4][2], const double (&b)[32][2][2]) {
  double A[16][16], B[16][8];
  for (int lane = 0; lane < 32; ++lane) {
    const int g = lane / 4, t = lane % 4;
    for (int e = 0; e < 2; ++e) {
      A[g][2 * t + e] = a[lane][0][e];
      A[g + 8][2 * t + e] = a[lane][1][e];
      A[g][2 * t + 8 + e] = a[lane][2][e];
      A[g + 8][2 * t + 8 + e] = a[lane][3][e];
      B[2 * t + e][g] = b[lane][0][e];
      B[2 * t + 8 + e][g] = b[lane][1][e];
    }
  }
  for (int r = 0; r < 16; ++r)
    for (int n = 0; n < 8; ++n)
      for (int k = 0; k < 16; ++k) c[r][n] += A[r][k] * B[k][n];
}

// The 32 lanes' word reads of one instruction: 32 different banks.
void expect_no_bank_conflict(const std::vector<int>& byte_offsets, const char* what) {
  std::set<int> banks;
  for (int off : byte_offsets) {
    ASSERT_EQ(off % 4, 0) << what;
    banks.insert((off / 4) % 32);
  }
  EXPECT_EQ(banks.size(), 32u) << what;
}

template <int D>
void check_maps() {
  SCOPED_TRACE("D " + std::to_string(D));
  std::mt19937 rng(D);
  std::uniform_real_distribution<double> u(-1, 1);
  // Tile offsets: a bijection on [0, kKeys * D), 16-byte chunks kept whole.
  std::vector<int> seen(kKeys * D, 0);
  for (int key = 0; key < kKeys; ++key)
    for (int d = 0; d < D; ++d) {
      const int off = fp8_tile_offset<D>(key, d);
      ASSERT_TRUE(off >= 0 && off < kKeys * D);
      ++seen[off];
      ASSERT_EQ(off - fp8_tile_offset<D>(key, d & ~15), d & 15);
    }
  for (int n : seen) ASSERT_EQ(n, 1);
  // The V column map: a bijection on [0, D).
  std::vector<int> cols(D, 0);
  for (int j = 0; j < D / 8; ++j)
    for (int g = 0; g < 8; ++g) ++cols[fp8_v_column(j, g)];
  for (int n : cols) ASSERT_EQ(n, 1);

  std::vector<double> Q(16 * D), K(kKeys * D), V(kKeys * D), P(16 * kKeys), tileK(kKeys * D), tileV(kKeys * D);
  for (double& x : Q) x = u(rng);
  for (double& x : P) x = u(rng);
  for (int key = 0; key < kKeys; ++key)
    for (int d = 0; d < D; ++d) {
      K[key * D + d] = u(rng);
      V[key * D + d] = u(rng);
      tileK[fp8_tile_offset<D>(key, d)] = K[key * D + d];
      tileV[fp8_tile_offset<D>(key, d)] = V[key * D + d];
    }

  for (int KS : {16, 32, 64})              // keys of a warp's slice (4, 2 or 1 slices of a chunk)
    for (int kbase = 0; kbase < kKeys; kbase += KS) {
      SCOPED_TRACE("slice of " + std::to_string(KS) + " keys at " + std::to_string(kbase));
      // S = Q K^T: per n-tile of 8 keys, k-steps over D.
      for (int nt = 0; nt < KS / 8; ++nt) {
        double c[16][8] = {};
        for (int kk = 0; kk < D / 16; ++kk) {
          double a[32][4][2], b[32][2][2];
          std::vector<int> reads;
          for (int lane = 0; lane < 32; ++lane) {
            const int g = lane / 4, t = lane % 4, col = fp8_k_column(kk, t);
            for (int e = 0; e < 2; ++e) {
              a[lane][0][e] = Q[g * D + col + e];
              a[lane][1][e] = Q[(g + 8) * D + col + e];
              a[lane][2][e] = Q[g * D + col + 2 + e];
              a[lane][3][e] = Q[(g + 8) * D + col + 2 + e];
            }
            const int off = fp8_tile_offset<D>(kbase + nt * 8 + g, col);  // one 32-bit word: codes off .. off + 3
            reads.push_back(off);
            b[lane][0][0] = tileK[off];
            b[lane][0][1] = tileK[off + 1];
            b[lane][1][0] = tileK[off + 2];
            b[lane][1][1] = tileK[off + 3];
          }
          expect_no_bank_conflict(reads, "K words");
          mma_16816(c, a, b);
        }
        for (int r = 0; r < 16; ++r)
          for (int n = 0; n < 8; ++n) {
            double want = 0;
            for (int d = 0; d < D; ++d) want += Q[r * D + d] * K[(kbase + nt * 8 + n) * D + d];
            ASSERT_NEAR(c[r][n], want, 1e-9) << "S row " << r << " key " << kbase + nt * 8 + n;
          }
      }
      // O = P V over the slice's keys, 16 a k-step; the words of keys 2t, 2t + 1, 2t + 8, 2t + 9.
      std::vector<double> O(16 * (D / 8) * 8, 0.0);  // [row][n-tile][column]
      for (int kk = 0; kk < KS / 16; ++kk) {
        const int k0 = kbase + 16 * kk;
        double a[32][4][2];
        for (int lane = 0; lane < 32; ++lane) {
          const int g = lane / 4, t = lane % 4;
          for (int e = 0; e < 2; ++e) {  // P in the S accumulators' order (pa[0..3] of the kernel)
            a[lane][0][e] = P[g * kKeys + k0 + 2 * t + e];
            a[lane][1][e] = P[(g + 8) * kKeys + k0 + 2 * t + e];
            a[lane][2][e] = P[g * kKeys + k0 + 8 + 2 * t + e];
            a[lane][3][e] = P[(g + 8) * kKeys + k0 + 8 + 2 * t + e];
          }
        }
        for (int m = 0; m < D / 32; ++m) {
          int off[32][4];  // per lane: the words of keys k0 + 2t, + 1, + 8, + 9
          for (int w = 0; w < 4; ++w) {
            std::vector<int> reads;
            for (int lane = 0; lane < 32; ++lane) {
              const int g = lane / 4, t = lane % 4;
              const int key = k0 + 2 * t + (w & 1) + (w >> 1) * 8;
              off[lane][w] = fp8_tile_offset<D>(key, fp8_v_column(4 * m, g));
              reads.push_back(off[lane][w]);
            }
            expect_no_bank_conflict(reads, "V words");
          }
          for (int i = 0; i < 4; ++i) {  // n-tile 4m + i takes code i of each word
            double b[32][2][2];
            for (int lane = 0; lane < 32; ++lane) {
              b[lane][0][0] = tileV[off[lane][0] + i];
              b[lane][0][1] = tileV[off[lane][1] + i];
              b[lane][1][0] = tileV[off[lane][2] + i];
              b[lane][1][1] = tileV[off[lane][3] + i];
            }
            double c[16][8] = {};
            mma_16816(c, a, b);
            for (int r = 0; r < 16; ++r)
              for (int n = 0; n < 8; ++n) O[(r * (D / 8) + 4 * m + i) * 8 + n] += c[r][n];
          }
        }
      }
      for (int r = 0; r < 16; ++r)
        for (int j = 0; j < D / 8; ++j)
          for (int n = 0; n < 8; ++n) {
            const int d = fp8_v_column(j, n);
            double want = 0;
            for (int key = kbase; key < kbase + KS; ++key) want += P[r * kKeys + key] * V[key * D + d];
            ASSERT_NEAR(O[(r * (D / 8) + j) * 8 + n], want, 1e-9) << "O row " << r << " column " << d;
          }
    }
}

TEST(PagedFp8Fragments, OperandMapsGiveTheProducts) {
  check_maps<64>();
  check_maps<128>();
}

}  // namespace
}  // namespace msa
