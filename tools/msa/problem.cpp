#include "problem.h"

#include <cmath>
#include <fstream>
#include <stdexcept>

#include "npy.h"

namespace msa {
namespace tool {

namespace {

uint64_t splitmix64(uint64_t x) {
  x += 0x9e3779b97f4a7c15ULL;
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ULL;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebULL;
  return x ^ (x >> 31);
}

bool file_exists(const std::string& path) { return std::ifstream(path).good(); }

}  // namespace

void fill_normal(HostTensor& t, uint64_t seed, uint64_t stream) {
  const uint64_t key = splitmix64(seed ^ splitmix64(stream + 1));
  const int64_t n = t.numel();
  const double two_pi = 6.283185307179586;
  // Box-Muller on pairs: both halves of a pair come from one 64-bit hash of the pair's index.
#pragma omp parallel for schedule(static)
  for (int64_t pair = 0; pair < (n + 1) / 2; ++pair) {
    const uint64_t h = splitmix64(key ^ uint64_t(pair));
    const double u1 = (double((h >> 32) & 0xffffffffu) + 1.0) / 4294967297.0;  // (0, 1)
    const double u2 = double(h & 0xffffffffu) / 4294967296.0;                  // [0, 1)
    const double r = std::sqrt(-2.0 * std::log(u1));
    t.set(2 * pair, r * std::cos(two_pi * u2));
    if (2 * pair + 1 < n) t.set(2 * pair + 1, r * std::sin(two_pi * u2));
  }
}

RunProblem make_random_problem(const RunOptions& o) {
  RunProblem p;
  p.cfg.num_q_heads = o.heads_q;
  p.cfg.num_kv_heads = o.heads_kv;
  p.cfg.head_dim = o.head_dim;
  p.cfg.index_head_dim = o.index_head_dim;
  p.cfg.block_size = o.block_size;
  p.cfg.topk = o.topk;
  p.dtype = o.dtype;
  p.cu_q = prefix_sums(std::vector<int32_t>(size_t(o.batch), o.q_len));
  p.cu_k = prefix_sums(std::vector<int32_t>(size_t(o.batch), o.seqlen));
  const int64_t tq = p.cu_q.back(), tk = p.cu_k.back();
  p.q = HostTensor(o.dtype, {tq, o.heads_q, o.head_dim});
  p.k = HostTensor(o.dtype, {tk, o.heads_kv, o.head_dim});
  p.v = HostTensor(o.dtype, {tk, o.heads_kv, o.head_dim});
  p.qi = HostTensor(o.dtype, {tq, o.heads_kv, o.index_head_dim});
  p.ki = HostTensor(o.dtype, {tk, o.index_head_dim});
  fill_normal(p.q, o.seed, 0);
  fill_normal(p.k, o.seed, 1);
  fill_normal(p.v, o.seed, 2);
  fill_normal(p.qi, o.seed, 3);
  fill_normal(p.ki, o.seed, 4);
  return p;
}

RunProblem load_problem(const RunOptions& o) {
  const std::string dir = o.inputs_dir + "/";
  auto load = [&](const char* name, size_t ndim) {
    HostTensor t = read_npy(dir + name + ".npy");
    if (t.shape().size() != ndim)
      throw std::runtime_error(dir + name + ".npy: expected " + std::to_string(ndim) +
                               " dimensions");
    if (t.dtype() == DType::i32) throw std::runtime_error(dir + name + ".npy: must be floating");
    return t.dtype() == o.dtype ? t : convert(t, o.dtype);
  };
  RunProblem p;
  p.dtype = o.dtype;
  p.q = load("q", 3);
  p.k = load("k", 3);
  p.v = load("v", 3);
  p.qi = load("qi", 3);
  p.ki = load("ki", 2);
  p.cfg.num_q_heads = int(p.q.shape()[1]);
  p.cfg.head_dim = int(p.q.shape()[2]);
  p.cfg.num_kv_heads = int(p.k.shape()[1]);
  p.cfg.index_head_dim = int(p.ki.shape()[1]);
  p.cfg.block_size = o.block_size;
  p.cfg.topk = o.topk;
  const int64_t tq = p.q.shape()[0], tk = p.k.shape()[0];
  auto load_cu = [&](const char* name, int64_t total) {
    const std::string path = dir + name + ".npy";
    if (!file_exists(path)) return std::vector<int32_t>{0, int32_t(total)};
    HostTensor t = read_npy(path);
    if (t.dtype() != DType::i32 || t.shape().size() != 1)
      throw std::runtime_error(path + ": must be a 1-d int32 array");
    std::vector<int32_t> cu(size_t(t.numel()));
    for (int64_t i = 0; i < t.numel(); ++i) cu[size_t(i)] = int32_t(t.get(i));
    return cu;
  };
  p.cu_q = load_cu("cu_seqlens_q", tq);
  p.cu_k = load_cu("cu_seqlens_k", tk);
  if (p.cu_q.empty() || p.cu_k.empty())
    throw std::runtime_error(dir + "cu_seqlens_q/k.npy must not be empty");
  return p;
}

}  // namespace tool
}  // namespace msa
