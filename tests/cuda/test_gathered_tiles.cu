// The gathered-tile arithmetic of the key-major kernels (GatheredTiles, key_query_lists.cuh): its
// shift-and-mask and one-tile-per-query fast paths against the plain divisions they replace, for
// every group size from 1 to 130 and the 64-row (attention, narrow KL) and 256-row (wide KL) tiles.
// Host only: runs without a GPU.
#include <gtest/gtest.h>

#include <cstdint>

#include "cuda/key_query_lists.cuh"

namespace msa {
namespace {

TEST(GatheredTiles, FastPathsEqualTheDivisions) {
  for (int rows : {64, 256}) {
    for (int G = 1; G <= 130; ++G) {
      const detail::cuda::GatheredTiles t(G, rows);
      const int rpq = G < rows ? G : rows, qpt = rows / rpq, tpq = (G + rows - 1) / rows;
      ASSERT_EQ(t.rows_per_query, rpq);
      ASSERT_EQ(t.queries_per_tile, qpt);
      ASSERT_EQ(t.tiles_per_query, tpq);
      for (int64_t n : {0, 1, 5, 63, 64, 1000, 123457})
        ASSERT_EQ(t.tiles(n), (n + qpt - 1) / qpt * tpq) << "G " << G << " rows " << rows << " n " << n;
      for (int64_t u = 0; u < 7; ++u) {
        ASSERT_EQ(t.first_entry(u), u / tpq * qpt) << "G " << G << " rows " << rows << " u " << u;
        for (int r = 0; r < rows; ++r) {
          ASSERT_EQ(t.entry(r), r < qpt * rpq ? r / rpq : -1) << "G " << G << " rows " << rows << " r " << r;
          ASSERT_EQ(t.head(u, r), int(u % tpq) * rows + r % rpq) << "G " << G << " rows " << rows << " u " << u;
        }
      }
    }
  }
}

}  // namespace
}  // namespace msa
