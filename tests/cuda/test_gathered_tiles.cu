// The gathered-tile arithmetic of the key-major kernels (GatheredTiles, key_query_lists.cuh): its
// shift-and-mask and one-tile-per-query fast paths against the plain divisions they replace, for
// every group size from 1 to 130 and the 64-row (attention, narrow KL) and 256-row (wide KL) tiles.
// And gathered_limit, the key-major kernels' per-query key limit, against a key-by-key scan of the
// causal rule. Host only: runs without a GPU.
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

TEST(GatheredTiles, LimitIsTheLastCausallyVisibleKey) {
  namespace rules = msa::rules;
  for (int keys : {64, 128})
    for (int64_t lq : {1, 5, 130})
      for (int64_t lk : {lq, lq + 70, lq + 300})
        for (int64_t i = -1; i < lq; ++i)
          for (int64_t ks = 0; ks < lk; ks += 64) {
            int want = -1;
            for (int o = 0; o < keys && i >= 0; ++o)
              if (rules::causally_visible(ks + o, rules::query_position(lq, lk, i))) want = o;
            ASSERT_EQ(detail::cuda::gathered_limit(lq, lk, i, ks, keys), want)
                << "lq " << lq << " lk " << lk << " i " << i << " ks " << ks << " keys " << keys;
          }
}

}  // namespace
}  // namespace msa
