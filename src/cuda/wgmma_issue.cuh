// Issuing wgmma products as one committed batch, without waiting (the caller waits with
// warpgroup_wait where its pipeline allows): shared by the attention kernels and the index stage 1.
#pragma once

#include <cute/tensor.hpp>

namespace msa {
namespace detail {
namespace cuda {
namespace wgmma {

// Issues S = Q K^T over the whole head dim (no wait): `q` is the (MMA, M, D/16) fragment of Q
// (registers or shared-memory descriptors), `k` the (MMA, 1, D/16) descriptor slice of a K slot;
// `s` is overwritten.
template <class Mma, class TQ, class TK, class TS>
__device__ __forceinline__ void issue_s(Mma& mma, TQ& q, const TK& k, TS& s) {
  using namespace cute;
  warpgroup_fence_operand(s);
  warpgroup_arrive();
  mma.accumulate_ = GMMA::ScaleOut::Zero;
#pragma unroll
  for (int kb = 0; kb < size<2>(q); ++kb) {
    cute::gemm(mma, q(_, _, kb), k(_, _, kb), s);
    mma.accumulate_ = GMMA::ScaleOut::One;
  }
  warpgroup_commit_batch();
}

// Issues O += P V (no wait): `p` the (MMA, 1, kKeys/16) register fragment of P, `v` a V slot's
// descriptor slice.
template <class Mma, class TP, class TV, class TO>
__device__ __forceinline__ void issue_o(Mma& mma, TP& p, const TV& v, TO& o) {
  using namespace cute;
  warpgroup_fence_operand(o);
  warpgroup_arrive();
  mma.accumulate_ = GMMA::ScaleOut::One;
#pragma unroll
  for (int kb = 0; kb < size<2>(p); ++kb) cute::gemm(mma, p(_, _, kb), v(_, _, kb), o);
  warpgroup_commit_batch();
}

}  // namespace wgmma
}  // namespace cuda
}  // namespace detail
}  // namespace msa
