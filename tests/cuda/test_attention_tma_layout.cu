// The TMA forward's shared-memory layouts (attention_forward_tma.cuh) against the bytes a TMA box
// with the 128-byte swizzle writes: box (d / 64) of stage s holds keys 0..kKeys-1 as 128-byte rows,
// 16-byte chunk c of row r at chunk c ^ (r % 8). The wgmma descriptors come from the same CuTe
// layouts, so this is the one place where the copy engine and the tensor cores must agree. Host only:
// runs without a GPU.
#include <gtest/gtest.h>

#include <cstddef>
#include <cstdint>

#include "cuda/attention_backward_dkdv_wgmma.cuh"
#include "cuda/attention_forward_tma.cuh"

namespace msa {
namespace {

using namespace cute;

std::ptrdiff_t tma_byte(int key, int d, int stage, int keys, int stage_bytes) {
  const int box = d / 64, chunk = (d % 64) / 8;
  return std::ptrdiff_t(stage) * stage_bytes + std::ptrdiff_t(box) * keys * 128 + key * 128 +
         ((chunk ^ (key % 8)) * 16) + (d % 8) * 2;
}

template <int D, int kKeys>
void check_layouts() {
  using E = cute::bfloat16_t;
  using Sm = detail::cuda::tma::TmaSmem<E, D, kKeys>;
  alignas(1024) static E buf[Sm::kStages * kKeys * D];
  auto sK = make_tensor(make_smem_ptr(buf), typename Sm::LayoutK{});
  auto sV = make_tensor(make_smem_ptr(buf), typename Sm::LayoutV{});
  int bad_k = 0, bad_v = 0;
  for (int s = 0; s < Sm::kStages; ++s)
    for (int key = 0; key < kKeys; ++key)
      for (int d = 0; d < D; ++d) {
        const std::ptrdiff_t want = tma_byte(key, d, s, kKeys, Sm::kStageBytes);
        const std::ptrdiff_t k = reinterpret_cast<char*>(&sK(key, d, s)) - reinterpret_cast<char*>(buf);
        const std::ptrdiff_t v = reinterpret_cast<char*>(&sV(d, key, s)) - reinterpret_cast<char*>(buf);
        if (k != want && bad_k++ < 4) ADD_FAILURE() << "K key " << key << " d " << d << " stage " << s << ": " << k << " != " << want;
        if (v != want && bad_v++ < 4) ADD_FAILURE() << "V key " << key << " d " << d << " stage " << s << ": " << v << " != " << want;
      }
  EXPECT_EQ(bad_k, 0);
  EXPECT_EQ(bad_v, 0);
}

// The wgmma dK/dV kernel's gathered row tiles (attention_backward_dkdv_wgmma.cuh): K-major (row, d,
// stage) and its MN-major (d, row, stage) view over the same bytes as a 64-row TMA stage would write.
template <int D, int kWarpgroups>
void check_dkdv_layouts() {
  using E = cute::bfloat16_t;
  using Sm = detail::cuda::DkdvWgmmaSmem<E, D, kWarpgroups>;
  constexpr int kTiles = Sm::kStages > kWarpgroups ? Sm::kStages : kWarpgroups;
  alignas(1024) static E buf[kTiles * 64 * D];
  auto sQ = make_tensor(make_smem_ptr(buf), typename Sm::LayoutRows{});
  auto sQmn = make_tensor(make_smem_ptr(buf), typename Sm::LayoutRowsMN{});
  auto sK = make_tensor(make_smem_ptr(buf), typename Sm::LayoutKV{});
  int bad = 0;
  for (int s = 0; s < kTiles; ++s)
    for (int r = 0; r < 64; ++r)
      for (int d = 0; d < D; ++d) {
        const std::ptrdiff_t want = tma_byte(r, d, s, 64, int(Sm::kTileBytes));
        const std::ptrdiff_t q =
            s < Sm::kStages ? reinterpret_cast<char*>(&sQ(r, d, s)) - reinterpret_cast<char*>(buf) : want;
        const std::ptrdiff_t mn =
            s < Sm::kStages ? reinterpret_cast<char*>(&sQmn(d, r, s)) - reinterpret_cast<char*>(buf) : want;
        const std::ptrdiff_t k =
            s < kWarpgroups ? reinterpret_cast<char*>(&sK(r, d, s)) - reinterpret_cast<char*>(buf) : want;
        if ((q != want || mn != want || k != want) && bad++ < 4)
          ADD_FAILURE() << "row " << r << " d " << d << " stage " << s << ": " << q << ", " << mn << ", " << k
                        << " != " << want;
      }
  EXPECT_EQ(bad, 0);
}

TEST(AttentionTmaLayout, DkdvRowsHeadDim128) {
  check_dkdv_layouts<128, 1>();
  check_dkdv_layouts<128, 2>();
}
TEST(AttentionTmaLayout, DkdvRowsHeadDim64) {
  check_dkdv_layouts<64, 1>();
  check_dkdv_layouts<64, 2>();
}

TEST(AttentionTmaLayout, HeadDim128Keys128) { check_layouts<128, 128>(); }
TEST(AttentionTmaLayout, HeadDim128Keys64) { check_layouts<128, 64>(); }
TEST(AttentionTmaLayout, HeadDim64Keys128) { check_layouts<64, 128>(); }
TEST(AttentionTmaLayout, HeadDim64Keys64) { check_layouts<64, 64>(); }

}  // namespace
}  // namespace msa
