#include "run_command.h"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <functional>
#include <iostream>
#include <string>

#include "buffers.h"
#include "check.h"
#include "json.h"
#include "launch.h"
#include "msa/error.h"
#include "msa/info.h"
#include "msa/ops.h"
#include "npy.h"
#include "options.h"
#include "problem.h"
#include "progress.h"

namespace msa {
namespace tool {

namespace {

// A stage's mean time, or why it did not run.
struct Stage {
  bool ran = false;
  double ms = 0;
  std::string skipped;
};

Device choose_device(const RunOptions& o) {
  if (o.backend == Backend::cpu) return Device::cpu();
  if (o.backend == Backend::cuda) {
    if (!built_with_cuda())
      throw UsageError("--backend cuda: this build has no CUDA backend (configure with nvcc present)");
    if (!cuda_available()) throw UsageError("--backend cuda: no CUDA device found");
    return Device::cuda(0);
  }
  return cuda_available() ? Device::cuda(0) : Device::cpu();
}

void print_stage(const char* name, const Stage& s) {
  if (s.ran)
    std::printf("  %-22s %12.2f ms\n", name, s.ms);
  else
    std::printf("  %-22s %15s  (%s)\n", name, "-", s.skipped.c_str());
  std::fflush(stdout);
}

JsonObject stage_json(const Stage& s) {
  JsonObject j;
  j.boolean("ran", s.ran);
  if (s.ran) j.number("ms", s.ms);
  else j.string("skipped", s.skipped);
  return j;
}

// Counts elements that are NaN or infinite (a backward pass must produce none on random inputs).
int64_t count_non_finite(const HostTensor& t) {
  int64_t bad = 0;
#pragma omp parallel for reduction(+ : bad)
  for (int64_t i = 0; i < t.numel(); ++i) bad += std::isfinite(t.get(i)) ? 0 : 1;
  return bad;
}

const char* dtype_flag(DType d) { return d == DType::f32 ? "f32" : d == DType::f16 ? "f16" : "bf16"; }

}  // namespace

int run_command(int argc, char** argv) {
  const RunOptions o = parse_run_options(argc, argv);
  const Device device = choose_device(o);
  const bool gpu = device.type == DeviceType::cuda;
  const int repeat = o.repeat ? o.repeat : (gpu ? 3 : 1);
  const int warmup = gpu ? 1 : 0;

  RunProblem p = o.inputs_dir.empty() ? make_random_problem(o) : load_problem(o);
  const Config& cfg = p.cfg;
  const int64_t tq = p.total_q(), tk = p.total_k();
  const int Hq = cfg.num_q_heads, Hkv = cfg.num_kv_heads, D = cfg.head_dim, K = cfg.topk;

  std::printf("msa run: %s, dtype %s, backend %s\n", describe_device(device, o.threads).c_str(),
              dtype_flag(p.dtype), gpu ? "cuda" : "cpu");
  std::printf("  batch %d, keys %lld, queries %lld (%s), Hq %d, Hkv %d, D %d, Di %d, B %d, topk %d\n",
              p.batch(), (long long)tk, (long long)tq, tq == tk ? "prefill" : "suffix of the keys",
              Hq, Hkv, D, cfg.index_head_dim, cfg.block_size, K);
  std::printf("  inputs: %s; times are %s\n",
              o.inputs_dir.empty() ? ("random normal, seed " + std::to_string(o.seed)).c_str()
                                   : ("loaded from " + o.inputs_dir).c_str(),
              gpu ? ("means of " + std::to_string(repeat) + " runs after a warm-up (cudaEvents)").c_str()
                  : (repeat == 1 ? std::string("one run each (wall clock)")
                                 : "means of " + std::to_string(repeat) + " runs (wall clock)").c_str());
  std::fflush(stdout);

  // Inputs and outputs on the device of the backend.
  Buffer q(std::move(p.q), device), k(std::move(p.k), device), v(std::move(p.v), device),
      qi(std::move(p.qi), device), ki(std::move(p.ki), device);
  auto topk = make_buffer(DType::i32, {Hkv, tq, K}, device);
  auto out = make_buffer(p.dtype, {tq, Hq, D}, device);
  auto lse = make_buffer(DType::f32, {tq, Hq}, device);
  for (Buffer* b : {topk.get(), out.get(), lse.get()}) b->poison();

  // On the CPU about 16 chunks per stage: enough for a progress line, few enough to cost nothing.
  const Launcher launch(p, device, std::max<int64_t>(256, (tq + 15) / 16));
  Context ctx;
  ctx.num_threads = o.threads;

  // Runs `op` over the launcher's chunks, with a progress line, and times the whole stage. Progress
  // counts the keys each chunk's queries see (all visible keys, or at most k*B with `sparse`).
  auto run_stage = [&](const char* name, bool sparse, const std::function<void(const Call&)>& op) {
    const double cap = sparse ? double(K) * cfg.block_size : 1e300;
    auto work = [&](const Call& c) {
      return double(c.nq) * std::min(cap, double(c.nk) - double(c.nq) / 2);
    };
    double all = 0;
    for (const Call& c : launch.chunks()) all += work(c);
    Progress progress(name);
    Stage s;
    s.ms = time_ms(device, warmup, repeat, [&] {
      double done = 0;
      for (const Call& c : launch.chunks()) {
        op(c);
        done += work(c);
        progress.set_fraction(done / all);
      }
    });
    s.ran = true;
    return s;
  };
  auto run_whole = [&](const char* name, const std::function<void(const Call&)>& op) {
    Progress progress(name);
    Stage s;
    try {
      s.ms = time_ms(device, warmup, repeat, [&] { op(launch.whole()); });
      s.ran = true;
    } catch (const NotSupportedError& e) {
      s.skipped = e.what();
    }
    return s;
  };

  // ---- MSA forward -------------------------------------------------------------------------
  std::printf("MSA forward\n");
  std::fflush(stdout);
  const Stage index = run_stage("index top-k", false, [&](const Call& c) {
    index_topk(cfg, c.varlen, slice(qi.view(), 0, c.q0, c.nq), slice(ki.view(), 0, c.k0, c.nk),
               slice(topk->view(), 1, c.q0, c.nq), TensorView{}, 1.f, ctx);
  });
  print_stage("index top-k", index);
  const Stage main_branch = run_stage("sparse attention", true, [&](const Call& c) {
    sparse_attention_forward(cfg, c.varlen, slice(q.view(), 0, c.q0, c.nq),
                             slice(k.view(), 0, c.k0, c.nk), slice(v.view(), 0, c.k0, c.nk),
                             slice(topk->view(), 1, c.q0, c.nq), slice(out->view(), 0, c.q0, c.nq),
                             slice(lse->view(), 0, c.q0, c.nq), ctx);
  });
  print_stage("main branch (sparse)", main_branch);
  Stage total;
  total.ran = true;
  total.ms = index.ms + main_branch.ms;
  print_stage("total", total);

  // ---- dense baseline ----------------------------------------------------------------------
  BufferPtr dense_out, dense_lse;
  Stage dense;
  double speedup = 0;
  if (o.dense) {
    dense_out = make_buffer(p.dtype, {tq, Hq, D}, device);
    dense_lse = make_buffer(DType::f32, {tq, Hq}, device);
    dense_out->poison();
    dense_lse->poison();
    std::printf("Dense causal attention (the library's, same backend)\n");
    std::fflush(stdout);
    dense = run_stage("dense attention", false, [&](const Call& c) {
      dense_attention_forward(cfg, c.varlen, slice(q.view(), 0, c.q0, c.nq),
                              slice(k.view(), 0, c.k0, c.nk), slice(v.view(), 0, c.k0, c.nk),
                              slice(dense_out->view(), 0, c.q0, c.nq),
                              slice(dense_lse->view(), 0, c.q0, c.nq), ctx);
    });
    print_stage("forward", dense);
    speedup = dense.ms / total.ms;
    std::printf("  speedup (dense / MSA)  %11.2fx\n", speedup);
  } else {
    dense.skipped = "--no-dense";
  }

  // ---- training passes ---------------------------------------------------------------------
  Stage backward, kl, dense_backward;
  int64_t non_finite = 0;
  double kl_loss = NAN;
  if (o.backward) {
    std::printf("Training passes (one call each over the whole batch)\n");
    std::fflush(stdout);
    HostTensor dout_host(p.dtype, {tq, Hq, D});
    fill_normal(dout_host, o.seed, 5);
    Buffer dout(std::move(dout_host), device);
    auto dq = make_buffer(p.dtype, {tq, Hq, D}, device);
    auto dk = make_buffer(p.dtype, {tk, Hkv, D}, device);
    auto dv = make_buffer(p.dtype, {tk, Hkv, D}, device);
    auto loss = make_buffer(DType::f32, {1}, device);
    auto dqi = make_buffer(p.dtype, {tq, Hkv, cfg.index_head_dim}, device);
    auto dki = make_buffer(p.dtype, {tk, cfg.index_head_dim}, device);
    for (Buffer* b : {dq.get(), dk.get(), dv.get(), loss.get(), dqi.get(), dki.get()}) b->poison();
    backward = run_whole("sparse backward", [&](const Call& c) {
      sparse_attention_backward(cfg, c.varlen, q.view(), k.view(), v.view(), topk->view(),
                                out->view(), lse->view(), dout.view(), dq->view(), dk->view(),
                                dv->view(), ctx);
    });
    print_stage("sparse backward", backward);
    kl = run_whole("KL alignment", [&](const Call& c) {
      kl_alignment(cfg, c.varlen, q.view(), k.view(), lse->view(), qi.view(), ki.view(),
                   topk->view(), 1.f, loss->view(), dqi->view(), dki->view(), ctx);
    });
    print_stage("KL alignment", kl);
    synchronize(device);
    if (backward.ran)
      for (Buffer* b : {dq.get(), dk.get(), dv.get()}) {
        b->download();
        non_finite += count_non_finite(b->host());
      }
    if (kl.ran) {
      for (Buffer* b : {loss.get(), dqi.get(), dki.get()}) {
        b->download();
        non_finite += count_non_finite(b->host());
      }
      kl_loss = loss->host().get(0);
      std::printf("  KL loss %.6g\n", kl_loss);
    }
    if (o.dense && dense.ran) {
      dense_backward = run_whole("dense backward", [&](const Call& c) {
        dense_attention_backward(cfg, c.varlen, q.view(), k.view(), v.view(), dense_out->view(),
                                 dense_lse->view(), dout.view(), dq->view(), dk->view(), dv->view(),
                                 ctx);
      });
      print_stage("dense backward", dense_backward);
      if (backward.ran && dense_backward.ran)
        std::printf("  speedup (dense / MSA backward)  %4.2fx\n", dense_backward.ms / backward.ms);
    }
    std::printf("  gradients: %lld non-finite values\n", (long long)non_finite);
  }

  // ---- check against the float64 oracle ----------------------------------------------------
  synchronize(device);
  for (Buffer* b : {topk.get(), out.get(), lse.get()}) b->download();
  if (dense.ran) {
    dense_out->download();
    dense_lse->download();
  }
  // The checks read the inputs through the host copies, which the buffers kept.
  p.q = std::move(q.host());
  p.k = std::move(k.host());
  p.v = std::move(v.host());
  p.qi = std::move(qi.host());
  p.ki = std::move(ki.host());
  bool passed = non_finite == 0;
  CheckResult check;
  const bool checked = o.check_rows > 0;
  if (checked) {
    const std::vector<int64_t> rows = sample_rows(p, o.check_rows, o.seed);
    std::string row_list;
    for (int64_t r : rows) row_list += (row_list.empty() ? "" : ", ") + std::to_string(r);
    std::printf("Check against the float64 oracle (query rows %s)\n", row_list.c_str());
    std::fflush(stdout);
    check = check_rows(p, rows, topk->host(), out->host(), lse->host(),
                       dense.ran ? &dense_out->host() : nullptr,
                       dense.ran ? &dense_lse->host() : nullptr);
    std::printf("  selection       %d/%d (row, group) sets equal to the oracle's, %d near-tie swaps, "
                "%d wrong\n",
                check.selection_identical, check.selection_pairs, check.selection_near_tie,
                check.selection_wrong);
    if (!check.first_problem.empty()) std::printf("    first: %s\n", check.first_problem.c_str());
    std::printf("  sparse          max rel err out %.3g, lse %.3g\n", check.sparse_out_error,
                check.sparse_lse_error);
    if (check.dense_checked)
      std::printf("  dense           max rel err out %.3g, lse %.3g\n", check.dense_out_error,
                  check.dense_lse_error);
    passed = passed && check.passed();
    std::printf("  %s (tolerance %.0e)\n", check.passed() ? "PASS" : "FAIL", check.tolerance);
  }
  if (non_finite) std::printf("FAIL: the gradients hold non-finite values\n");

  if (!o.save_dir.empty()) {
    std::filesystem::create_directories(o.save_dir);
    const std::string d = o.save_dir + "/";
    HostTensor cu_q(DType::i32, {int64_t(p.cu_q.size())}), cu_k(DType::i32, {int64_t(p.cu_k.size())});
    for (size_t i = 0; i < p.cu_q.size(); ++i) {
      cu_q.set(int64_t(i), p.cu_q[i]);
      cu_k.set(int64_t(i), p.cu_k[i]);
    }
    write_npy(d + "cu_seqlens_q.npy", cu_q);
    write_npy(d + "cu_seqlens_k.npy", cu_k);
    for (auto& [name, t] : std::initializer_list<std::pair<const char*, const HostTensor*>>{
             {"q", &p.q}, {"k", &p.k}, {"v", &p.v}, {"qi", &p.qi}, {"ki", &p.ki},
             {"topk", &topk->host()}, {"out", &out->host()}, {"lse", &lse->host()}})
      write_npy(d + name + ".npy", *t);
    if (dense.ran) {
      write_npy(d + "dense_out.npy", dense_out->host());
      write_npy(d + "dense_lse.npy", dense_lse->host());
    }
    std::printf("Saved inputs and outputs to %s\n", o.save_dir.c_str());
  }

  if (!o.json_path.empty()) {
    JsonObject problem;
    problem.integer("batch", p.batch()).integer("total_q", tq).integer("total_k", tk)
        .integer("num_q_heads", Hq).integer("num_kv_heads", Hkv).integer("head_dim", D)
        .integer("index_head_dim", cfg.index_head_dim).integer("block_size", cfg.block_size)
        .integer("topk", K).string("dtype", dtype_flag(p.dtype))
        .string("inputs", o.inputs_dir.empty() ? "random" : o.inputs_dir)
        .integer("seed", (long long)o.seed);
    JsonObject times;
    times.object("index_topk", stage_json(index)).object("sparse_forward", stage_json(main_branch))
        .object("msa_forward_total", stage_json(total)).object("dense_forward", stage_json(dense));
    if (o.backward)
      times.object("sparse_backward", stage_json(backward)).object("kl_alignment", stage_json(kl))
          .object("dense_backward", stage_json(dense_backward));
    JsonObject j;
    j.string("tool", "msa run").string("backend", gpu ? "cuda" : "cpu")
        .string("device", describe_device(device, o.threads)).integer("repeat", repeat)
        .integer("warmup", warmup).object("problem", problem).object("times", times);
    if (dense.ran) j.number("speedup_forward", speedup);
    if (o.backward) j.number("kl_loss", kl_loss).integer("non_finite_gradients", non_finite);
    if (checked) {
      JsonObject c;
      std::string rows;
      for (int64_t r : check.rows) rows += (rows.empty() ? "" : ", ") + std::to_string(r);
      c.raw("rows", "[" + rows + "]").number("tolerance", check.tolerance)
          .integer("selection_pairs", check.selection_pairs)
          .integer("selection_identical", check.selection_identical)
          .integer("selection_near_tie", check.selection_near_tie)
          .integer("selection_wrong", check.selection_wrong)
          .number("sparse_out_rel_err", check.sparse_out_error)
          .number("sparse_lse_rel_err", check.sparse_lse_error);
      if (check.dense_checked)
        c.number("dense_out_rel_err", check.dense_out_error)
            .number("dense_lse_rel_err", check.dense_lse_error);
      c.boolean("passed", check.passed());
      j.object("check", c);
    }
    j.boolean("passed", passed);
    std::ofstream f(o.json_path);
    f << j.str() << "\n";
    if (!f) throw std::runtime_error("cannot write " + o.json_path);
  }
  return passed ? 0 : 1;
}

}  // namespace tool
}  // namespace msa
