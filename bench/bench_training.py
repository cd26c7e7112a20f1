#!/usr/bin/env python3
"""Training-step benchmark: one MSA attention training step (index top-k, sparse forward, sparse
backward, KL alignment) against cuDNN and FlashAttention-2 dense causal forward+backward.

One sequence (batch 1), bf16, B=128, k=16, Di=128, contexts 32K and 128K, configs Hq=64/Hkv=4/D=128
and Hq=16/Hkv=1/D=128 (issue 4). Method, FLOP counts and targets: docs/benchmarks.md ("Training
step"). Inputs, configs and FLOP counts come from bench_prefill.py; timing from common.py.

    python3 bench/bench_training.py                          # 32K and 128K, both configs
    python3 bench/bench_training.py --contexts 32k --configs hq64_hkv4_d128
    python3 bench/bench_training.py --cpu --contexts 1k --out /tmp/t.json   # CPU test of every path
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import time
import traceback

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_prefill as P  # noqa: E402
import common as C  # noqa: E402

REPO_ROOT = P.REPO_ROOT
DEFAULT_CONTEXTS = [32768, 131072]
BWD_FLOP_FACTOR = 2.5   # FlashAttention convention: backward = 2.5x the forward's FLOPs
TARGET_SPEEDUP_128K = 8.0
TARGET_BWD_FWD_RATIO = 0.6
MSA_SPARSE = ["msa_index_topk", "msa_sparse_forward", "msa_sparse_backward", "msa_kl_sparse",
              "msa_step"]
DENSE = ["cudnn_dense_fwd_bwd", "fa2_dense_fwd_bwd"]
AUTOGRAD = ["msa_autograd_step"]
WARMUP = ["msa_dense_forward", "msa_dense_backward", "msa_kl_dense"]
ALL_METHODS = MSA_SPARSE + DENSE + AUTOGRAD + WARMUP
SDPA_BACKENDS = {"cudnn_dense_fwd_bwd": "CUDNN_ATTENTION", "fa2_dense_fwd_bwd": "FLASH_ATTENTION"}
OPS = ("index_topk", "sparse_forward", "sparse_backward", "kl_alignment", "dense_forward",
       "dense_backward")


def build_parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--contexts", type=P.parse_contexts, default=DEFAULT_CONTEXTS,
                   help="comma list, e.g. 32k,128k (default)")
    p.add_argument("--configs", default=",".join(P.CONFIGS), help="comma list of " + ", ".join(P.CONFIGS))
    p.add_argument("--out", default=None,
                   help="JSON path, or a directory (ends in / or exists) for the default name "
                        "training_<device>_<commit8>.json; default bench/results/")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--iters", type=int, default=10, help="timed calls per method (at most)")
    p.add_argument("--target-s", type=float, default=1.5,
                   help="cap on one method's timed loop; long calls get fewer iterations, at least 3")
    p.add_argument("--time-budget", type=float, default=None,
                   help="seconds for the whole run; work past it is recorded as skipped")
    p.add_argument("--skip", default="", help="comma list of methods to leave out: " + ", ".join(ALL_METHODS))
    p.add_argument("--deterministic", action="store_true",
                   help="ask the MSA backward for bitwise-reproducible reductions")
    p.add_argument("--qi-noise", type=float, default=0.1, help="as in bench_prefill.py")
    p.add_argument("--qi-period", type=int, default=512, help="as in bench_prefill.py")
    p.add_argument("--check-queries", type=int, default=8,
                   help="queries whose out/lse/dq are checked against torch fp32 (0: no check)")
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--cpu", action="store_true",
                   help="test mode: run every path on the CPU backend (tiny contexts; wall-clock "
                        "timing; SDPA's MATH backend stands in for cuDNN and FA2). Not a measurement.")
    return p


# ---- FLOP counts --------------------------------------------------------------------------------
def flops_of(method, L, hq, d):
    """Main-branch FLOPs (docs/benchmarks.md): forward 4*D per visible key per query head, backward
    2.5x forward. The index branch and the KL are not counted."""
    s, dn = P.sparse_flops(L, hq, d), P.dense_flops(L, hq, d)
    return {"msa_sparse_forward": s, "msa_sparse_backward": BWD_FLOP_FACTOR * s,
            "msa_step": (1 + BWD_FLOP_FACTOR) * s, "msa_autograd_step": (1 + BWD_FLOP_FACTOR) * s,
            "msa_dense_forward": dn, "msa_dense_backward": BWD_FLOP_FACTOR * dn,
            "cudnn_dense_fwd_bwd": (1 + BWD_FLOP_FACTOR) * dn,
            "fa2_dense_fwd_bwd": (1 + BWD_FLOP_FACTOR) * dn}.get(method)


# ---- msa through the low-level API ----------------------------------------------------------------
class TrainCase(P.MsaCase):
    """bench_prefill.MsaCase (inputs, top-k, outputs, workspaces, index_topk, forward) plus the
    preallocated gradients and dense outputs of the training ops, so the timed calls allocate
    nothing. Exposes .L .x .topk .out .lse for bench_prefill.check_msa."""

    OPS = OPS

    def __init__(self, msa, cfg, x, L, hq, hkv, deterministic, gen):
        import torch
        super().__init__(msa, cfg, x, L, hq, hkv)
        dev = P.DEVICE
        self.det = deterministic
        self.out_dense = torch.empty_like(x["q"])
        self.lse_dense = torch.empty(L, hq, dtype=torch.float32, device=dev)
        # dout ~ N(0, 1): a gradient of unit scale, like the other inputs (its size does not matter
        # to the kernels' speed, only that it is not zero).
        self.dout = torch.randn(x["q"].shape, device=dev, dtype=x["q"].dtype, generator=gen)
        self.dq, self.dk, self.dv = (torch.empty_like(x[n]) for n in ("q", "k", "v"))
        self.dqi, self.dki = torch.empty_like(x["qi"]), torch.empty_like(x["ki"])
        self.loss = torch.empty(1, dtype=torch.float32, device=dev)

    def backward(self):
        x = self.x
        self.msa.sparse_attention_backward(self.cfg, x["q"], x["k"], x["v"], self.topk, self.out,
                                           self.lse, self.dout, self.cu, self.cu, self.dq, self.dk,
                                           self.dv, deterministic=self.det,
                                           **self.common("sparse_backward"))

    def kl(self, dense=False):
        x = self.x
        lse = self.lse_dense if dense else self.lse
        self.msa.kl_alignment(self.cfg, x["q"], x["k"], lse, x["qi"], x["ki"],
                              None if dense else self.topk, self.cu, self.cu, 1.0, self.loss,
                              self.dqi, self.dki, **self.common("kl_alignment"))

    def step(self):
        self.index_topk()
        self.forward()
        self.backward()
        self.kl()

    def dense_forward(self):
        x = self.x
        self.msa.dense_attention_forward(self.cfg, x["q"], x["k"], x["v"], self.cu, self.cu,
                                         self.out_dense, self.lse_dense, **self.common("dense_forward"))

    def dense_backward(self):
        x = self.x
        self.msa.dense_attention_backward(self.cfg, x["q"], x["k"], x["v"], self.out_dense,
                                          self.lse_dense, self.dout, self.cu, self.cu, self.dq,
                                          self.dk, self.dv, deterministic=self.det,
                                          **self.common("dense_backward"))

    def kl_dense(self):
        self.kl(dense=True)


def check_dq(case, hq, hkv, d, nq, seed):
    """dq of a few queries against torch fp32 over the selected keys (dq of one query needs only
    that query's row: dq = scale * sum_t P_t (dP_t - delta) k_t, delta = <dout, out>). dk/dv sum over
    all queries; the GPU tests check them against the oracle."""
    import torch
    L, x, G, scale = case.L, case.x, hq // hkv, d ** -0.5
    g = torch.Generator().manual_seed(seed + 1)
    picks = sorted(set([L - 1] + torch.randint(0, L, (max(0, nq - 1),), generator=g).tolist()))
    topk = case.topk.cpu()
    num = den = 0.0
    for p in picks:
        for grp in range(hkv):
            chosen = [b for b in topk[grp, p].tolist() if b >= 0]
            keys = torch.cat([torch.arange(b * P.BLOCK, min((b + 1) * P.BLOCK, p + 1)) for b in chosen])
            keys = keys.to(x["k"].device)
            kk, vv = x["k"][keys, grp].float(), x["v"][keys, grp].float()
            hs = slice(grp * G, (grp + 1) * G)
            qq = x["q"][p, hs].float().requires_grad_()
            o = torch.softmax(scale * qq @ kk.T, dim=-1) @ vv
            (ref,) = torch.autograd.grad(o, qq, case.dout[p, hs].float())
            got = case.dq[p, hs].float()
            num += (got - ref).pow(2).sum().item()
            den += ref.pow(2).sum().item()
    rel = math.sqrt(num / den) if den > 0 else float("nan")
    return {"ok": bool(rel < 2e-2), "queries": len(picks), "dq_rel_err": rel}


# ---- dense baselines and the autograd path -------------------------------------------------------
def sdpa_train_calls(method, cases, hq, hkv):
    """fwd+bwd calls of torch SDPA (autograd; torch.autograd.grad, so no .grad accumulation).
    Returns (calls, gqa_mode, note). Native GQA (enable_gqa=True) first; if the backend refuses it,
    K/V are expanded to Hq heads inside the call, so the backward also pays the reduction back to
    Hkv heads (what a framework without native GQA pays)."""
    import torch
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel
    backend = getattr(SDPBackend, "MATH" if P.DEVICE == "cpu" else SDPA_BACKENDS[method])
    G = hq // hkv

    def make(native):
        calls = []
        for mc in cases:
            q4, k4, v4 = (P.bhld(mc.x[n]).detach().requires_grad_() for n in ("q", "k", "v"))
            do4 = P.bhld(mc.dout)

            def call(q4=q4, k4=k4, v4=v4, do4=do4):
                with sdpa_kernel([backend]):
                    kk, vv = (k4, v4) if native or G == 1 else (k4.repeat_interleave(G, dim=1),
                                                                v4.repeat_interleave(G, dim=1))
                    o = F.scaled_dot_product_attention(q4, kk, vv, is_causal=True,
                                                       enable_gqa=native and G > 1)
                    return torch.autograd.grad(o, (q4, k4, v4), do4)
            calls.append(call)
        return calls

    return C.first_gqa_variant(make, G, sync, empty_cache)


def autograd_calls(cases, hq, hkv, d):
    """msa.torch.msa_attention (mode sparse, kl_coeff 1) on requires_grad tensors, then
    torch.autograd.grad of (out, kl): the same work as msa_step plus the custom-op dispatch,
    workspace queries and allocations of the PyTorch path."""
    import torch
    import msa.torch as mt
    calls = []
    for mc in cases:
        leaves = [mc.x[n].detach().requires_grad_() for n in ("q", "k", "v", "qi", "ki")]
        cfg = mt.config_args(mc.cfg)
        one = torch.ones((), dtype=torch.float32, device=P.DEVICE)

        def call(leaves=leaves, mc=mc, cfg=cfg, one=one):
            q, k, v, qi, ki = leaves
            out, kl = mt.msa_attention(q, k, v, qi, ki, mc.cu, mc.cu, mc.L, mc.L, cfg,
                                       mode="sparse", kl_coeff=1.0)
            return torch.autograd.grad((out, kl), leaves, (mc.dout, one))
        calls.append(call)
    return calls


# ---- device helpers (CUDA, or the CPU test mode) --------------------------------------------------
def sync():
    import torch
    if P.DEVICE == "cuda":
        torch.cuda.synchronize()


def empty_cache():
    import torch
    if P.DEVICE == "cuda":
        torch.cuda.empty_cache()


# ---- the run ------------------------------------------------------------------------------------
class Run:
    def __init__(self, args):
        import torch
        self.args, self.torch = args, torch
        self.budget = C.Budget(args.time_budget)
        self.skip = {s.strip() for s in args.skip.split(",") if s.strip()}
        if self.skip - set(ALL_METHODS):
            raise SystemExit(f"--skip: unknown methods {sorted(self.skip - set(ALL_METHODS))}")
        self.configs = [c.strip() for c in args.configs.split(",") if c.strip()]
        for c in self.configs:
            if c not in P.CONFIGS:
                raise SystemExit(f"--configs: unknown {c}; known: {', '.join(P.CONFIGS)}")
        self.cpu = P.DEVICE == "cpu"
        self.device = "cpu-test" if self.cpu else torch.cuda.get_device_name()
        self.timer = C.host_time if self.cpu else C.cuda_time
        self.commit = C.git_commit(REPO_ROOT)
        self.l2 = 50 * 2**20 if self.cpu else C.l2_bytes()
        self.out_path = self.resolve_out()
        self.rows, self.cases = [], {}
        self.msa, self.msa_error = None, None
        try:
            import msa
            self.msa = msa
            if not self.cpu and not msa.cuda_available():
                self.msa_error = "msa.cuda_available() is False (extension built without CUDA?)"
        except Exception as e:
            self.msa_error = f"import msa failed: {C.short_error(e)}"
        self.doc = {
            "benchmark": "training",
            "commit": self.commit,
            "device": self.device,
            "torch": torch.__version__,
            "cuda": torch.version.cuda,
            "cudnn": P.cudnn_version(torch),
            "timestamp": C.utc_timestamp(),
            "config": {
                "dtype": "bfloat16", "batch": 1, "block_size": P.BLOCK, "topk": P.TOPK,
                "index_head_dim": P.INDEX_DIM, "configs": {c: P.CONFIGS[c] for c in self.configs},
                "contexts": args.contexts, "warmup": args.warmup, "iters": args.iters,
                "target_s": args.target_s, "qi_noise": args.qi_noise, "qi_period": args.qi_period,
                "seed": args.seed, "deterministic_backward": bool(args.deterministic),
                "kl_coeff": 1.0, "bwd_flop_factor": BWD_FLOP_FACTOR,
                "flops_note": "main branch: forward 4*D per visible key per query head, backward "
                              "2.5x forward (FlashAttention convention); index branch and KL not counted",
                "targets": {"speedup_msa_step_vs_best_dense_at_128k": TARGET_SPEEDUP_128K,
                            "sparse_bwd_over_fwd_tflops": TARGET_BWD_FWD_RATIO},
                "l2_bytes": self.l2, "time_budget_s": args.time_budget, "cpu_test": self.cpu,
                "msa_module": getattr(self.msa, "__file__", None), "msa_error": self.msa_error,
                "flash_attention_impl": P.flash_impl(torch),
                "env": {k: v for k, v in sorted(os.environ.items()) if k.startswith("MSA_")},
            },
            "rows": self.rows,
            "cases": [],
        }

    def resolve_out(self):
        name = f"training_{C.slug(self.device)}_{self.commit[:8]}.json"
        out = self.args.out or os.path.join(REPO_ROOT, "bench", "results") + os.sep
        return os.path.join(out, name) if out.endswith(os.sep) or os.path.isdir(out) else out

    def save(self):
        self.doc["cases"] = list(self.cases.values())
        C.write_json_atomic(self.out_path, self.doc)

    def case(self, cfg_name, L):
        return self.cases.setdefault((cfg_name, L), {"config": cfg_name, "context": L, "inputs": "smooth"})

    def add(self, cfg_name, L, method, **fields):
        row = dict(config=cfg_name, context=L, inputs="smooth", method=method, **fields)
        self.rows.append(row)
        msg = row.get("error") or (f"{row['ms_median']:.3f} ms" if "ms_median" in row else "")
        print(f"[{cfg_name} L={L}] {method}: {msg}", flush=True)
        self.save()
        return row

    def ensure_alive(self):
        if self.cpu:
            return
        try:
            self.torch.cuda.synchronize()
            t = self.torch.ones(1, device="cuda")
            float((t + 1).item())
        except Exception as e:
            raise P.ContextLost(C.short_error(e))

    def measure(self, cfg_name, L, method, calls, hq, d, **extra):
        left = self.budget.left() - 5
        if left <= 0:
            return self.add(cfg_name, L, method, error="skipped: time budget", **extra)
        try:
            t0 = time.perf_counter()
            res = self.timer(calls, warmup=self.args.warmup, iters=self.args.iters,
                             target_s=self.args.target_s,
                             max_total_s=None if math.isinf(left) else left)
            res["wall_s"] = round(time.perf_counter() - t0, 3)
            flops = flops_of(method, L, hq, d)
            if flops is not None:
                res["flops"], res["tflops"] = flops, C.tflops(flops, res["ms_median"])
            return self.add(cfg_name, L, method, **res, **extra)
        except C.OverBudget as e:
            return self.add(cfg_name, L, method, error=f"skipped: time budget ({e})", **extra)
        except Exception as e:
            traceback.print_exc()
            row = self.add(cfg_name, L, method, error=C.short_error(e), **extra)
            self.ensure_alive()
            empty_cache()
            return row

    def make_cases(self, cfg_name, L):
        import torch
        p = P.CONFIGS[cfg_name]
        hq, hkv, d = p["hq"], p["hkv"], p["d"]
        gen = torch.Generator(device=P.DEVICE)
        gen.manual_seed(self.args.seed + L + 7 * hq)
        first = P.make_inputs(L, hq, hkv, d, "smooth", gen, self.args)
        nsets = C.rotation_sets(C.tensor_bytes(*first.values()), self.l2)
        sets = [first] + [P.make_inputs(L, hq, hkv, d, "smooth", gen, self.args) for _ in range(nsets - 1)]
        mcfg = None if self.msa_error else P.make_msa_config(self.msa, hq, hkv, d)
        msa = None if self.msa_error else self.msa   # the dense baselines still run without msa
        return [TrainCase(msa, mcfg, x, L, hq, hkv, self.args.deterministic, gen) for x in sets]

    def run_case(self, cfg_name, L, methods):
        p = P.CONFIGS[cfg_name]
        hq, hkv, d = p["hq"], p["hkv"], p["d"]
        rec = self.case(cfg_name, L)
        if self.budget.exhausted(reserve=5):   # no inputs, step or check for a case that cannot run
            for m in methods:
                self.add(cfg_name, L, m, error="skipped: time budget")
            return
        msa_methods = [m for m in methods if m not in DENSE]
        try:
            cases = self.make_cases(cfg_name, L)
        except Exception as e:
            traceback.print_exc()
            for m in methods:
                self.add(cfg_name, L, m, error=f"inputs failed: {C.short_error(e)}")
            self.ensure_alive()
            return
        rec["input_sets"] = len(cases)
        if msa_methods and self.msa_error:
            for m in msa_methods:
                self.add(cfg_name, L, m, error=self.msa_error)
            msa_methods = []
        if any(m in MSA_SPARSE + AUTOGRAD for m in msa_methods):
            try:
                for mc in cases:   # the first step also fills topk, out and lse for the checks
                    mc.step()
                sync()
            except Exception as e:
                traceback.print_exc()
                for m in msa_methods:
                    if m in MSA_SPARSE + AUTOGRAD:
                        self.add(cfg_name, L, m, error=f"msa step failed: {C.short_error(e)}")
                msa_methods = [m for m in msa_methods if m in WARMUP]
                self.ensure_alive()
            else:
                self.sparse_stats(rec, cases[0], hq, hkv, d)
        mc_calls = {"msa_index_topk": "index_topk", "msa_sparse_forward": "forward",
                    "msa_sparse_backward": "backward", "msa_kl_sparse": "kl", "msa_step": "step",
                    "msa_dense_forward": "dense_forward", "msa_dense_backward": "dense_backward",
                    "msa_kl_dense": "kl_dense"}
        if "msa_dense_backward" in msa_methods or "msa_kl_dense" in msa_methods:
            try:  # the dense backward and dense KL read the dense forward's out and lse
                for mc in cases:
                    mc.dense_forward()
                sync()
            except Exception as e:
                traceback.print_exc()
                self.add(cfg_name, L, "msa_dense_forward", error=f"msa dense forward failed: "
                                                               f"{C.short_error(e)}")
                msa_methods = [m for m in msa_methods if m not in WARMUP]
                self.ensure_alive()
        for m in msa_methods:
            if m in mc_calls:
                self.measure(cfg_name, L, m, [getattr(mc, mc_calls[m]) for mc in cases], hq, d)
            elif m == "msa_autograd_step":
                try:
                    calls = autograd_calls(cases, hq, hkv, d)
                except Exception as e:
                    self.add(cfg_name, L, m, error=C.short_error(e))
                    continue
                self.measure(cfg_name, L, m, calls, hq, d, note="msa.torch.msa_attention + "
                             "torch.autograd.grad; same work as msa_step")
                del calls
        for m in methods:
            if m not in DENSE:
                continue
            if self.budget.exhausted(reserve=5):
                self.add(cfg_name, L, m, error="skipped: time budget")
                continue
            try:
                calls, mode, note = sdpa_train_calls(m, cases, hq, hkv)
            except Exception as e:
                self.add(cfg_name, L, m, error=C.short_error(e))
                self.ensure_alive()
                empty_cache()
                continue
            extra = {"gqa": mode}
            if self.cpu:
                extra["backend"] = "MATH (cpu test)"
            if note:
                extra["note"] = note
            self.measure(cfg_name, L, m, calls, hq, d, **extra)
            del calls
            empty_cache()
        del cases
        empty_cache()
        self.summarize_case(cfg_name, L)

    def sparse_stats(self, rec, mc, hq, hkv, d):
        if mc.notes:
            rec["notes"] = mc.notes
        try:
            _, u64 = P.union_blocks_per_tile(mc.topk, mc.L, P.UNION_TILE)
            rec["union_blocks_per_64q_tile"] = u64
            rec["selected_blocks_per_query"] = float((mc.topk >= 0).sum(-1).float().mean().item())
            rec["kl_loss"] = float(mc.loss.item())
        except Exception as e:
            rec["stats_error"] = C.short_error(e)
        if self.args.check_queries > 0 and "check" not in rec:
            try:
                chk = P.check_msa(mc, hq, hkv, d, self.args.check_queries, self.args.seed)
                chk.update(check_dq(mc, hq, hkv, d, self.args.check_queries, self.args.seed))
                loss = rec.get("kl_loss")
                chk["kl_finite_nonneg"] = loss is not None and math.isfinite(loss) and loss >= -1e-6
                chk["ok"] = bool(chk["ok"] and chk["dq_rel_err"] < 2e-2 and chk["kl_finite_nonneg"])
                rec["check"] = chk
            except Exception as e:
                rec["check"] = {"ok": False, "error": C.short_error(e)}

    def summarize_case(self, cfg_name, L):
        rec = self.case(cfg_name, L)
        rows = {r["method"]: r for r in self.rows
                if (r["config"], r["context"]) == (cfg_name, L) and r.get("ms_median") is not None}
        ms = {m: r["ms_median"] for m, r in rows.items()}
        fwd, bwd = rows.get("msa_sparse_forward"), rows.get("msa_sparse_backward")
        if fwd and bwd:
            rec["sparse_fwd_tflops"], rec["sparse_bwd_tflops"] = fwd["tflops"], bwd["tflops"]
            rec["sparse_bwd_over_fwd_tflops"] = bwd["tflops"] / fwd["tflops"]
            rec["meets_bwd_ratio_target"] = rec["sparse_bwd_over_fwd_tflops"] >= TARGET_BWD_FWD_RATIO
        dense = {m: ms[m] for m in DENSE if m in ms}
        if dense:
            best = min(dense, key=dense.get)
            rec["best_dense"], rec["best_dense_ms"] = best, dense[best]
            if "msa_step" in ms:
                rec["speedup_msa_step_vs_best_dense"] = dense[best] / ms["msa_step"]
                if L >= 131072:
                    rec["meets_speedup_target"] = (rec["speedup_msa_step_vs_best_dense"] >=
                                                   TARGET_SPEEDUP_128K)
        if "msa_step" in ms and "msa_autograd_step" in ms:
            rec["autograd_overhead_ms"] = ms["msa_autograd_step"] - ms["msa_step"]
        parts = ("msa_dense_forward", "msa_dense_backward", "msa_kl_dense")
        if all(m in ms for m in parts):  # not timed as one call: seconds-long at 128K
            rec["msa_warmup_step_ms_sum"] = sum(ms[m] for m in parts)
        self.save()

    def main(self):
        print(f"device={self.device} torch={self.torch.__version__} commit={self.commit} "
              f"out={self.out_path}", flush=True)
        if self.msa_error:
            print(f"WARNING: {self.msa_error}", flush=True)
        first = [m for m in MSA_SPARSE + DENSE + AUTOGRAD if m not in self.skip]
        warm = [m for m in WARMUP if m not in self.skip]
        # Pass 1 is the headline (sparse step vs dense fwd+bwd); pass 2 the dense-warmup ops, seconds
        # per call at 128K: a time budget cuts those first.
        plan = [(c, L, first) for c in self.configs for L in self.args.contexts]
        plan += [(c, L, warm) for c in self.configs for L in self.args.contexts]
        rc = 0
        for cfg_name, L, methods in plan:
            if not methods:
                continue
            try:
                self.run_case(cfg_name, L, methods)
            except P.ContextLost as e:
                self.doc["context_lost"] = f"{cfg_name} L={L}: {e}"
                print(f"CUDA context lost at {cfg_name} L={L}: {e}; rerun the rest with --skip",
                      flush=True)
                rc = 3
                break
            except Exception as e:  # outside one method: record, go on
                traceback.print_exc()
                for m in methods:
                    self.add(cfg_name, L, m, error=f"case failed: {C.short_error(e)}")
                self.ensure_alive()
        self.doc["wall_s"] = round(time.perf_counter() - self.budget.t0, 1)
        self.save()
        self.print_summary()
        return rc

    def print_summary(self):
        print(f"\n== training summary ({self.device}, commit {self.commit[:12]}) -> {self.out_path}")
        cols = [("msa_index_topk", "idx"), ("msa_sparse_forward", "fwd"), ("msa_sparse_backward", "bwd"),
                ("msa_kl_sparse", "kl"), ("msa_step", "step"), ("msa_autograd_step", "autograd"),
                ("cudnn_dense_fwd_bwd", "cudnn"), ("fa2_dense_fwd_bwd", "fa2"),
                ("msa_dense_forward", "d_fwd"), ("msa_dense_backward", "d_bwd"), ("msa_kl_dense", "d_kl")]
        table = []
        for (cfg_name, L), rec in sorted(self.cases.items()):
            ms = {}
            for r in self.rows:
                if (r["config"], r["context"]) == (cfg_name, L):
                    ms[r["method"]] = (C.fmt_ms(r["ms_median"]) if "ms_median" in r else
                                       "skip" if r.get("error", "").startswith("skipped") else "err")
            sp, ratio = rec.get("speedup_msa_step_vs_best_dense"), rec.get("sparse_bwd_over_fwd_tflops")
            chk = rec.get("check", {})
            table.append([cfg_name, f"{L // 1024}K" if L >= 1024 else str(L)] +
                         [ms.get(m, "-") for m, _ in cols] +
                         [f"{sp:.2f}" if sp else "-", f"{ratio:.2f}" if ratio else "-",
                          ("ok" if chk.get("ok") else "FAIL") if chk else "-"])
        C.print_table(["config", "L"] + [h for _, h in cols] + ["x_dense", "bwd/fwd", "check"], table)
        print(f"(ms medians; x_dense = best dense fwd+bwd / msa step (target >= {TARGET_SPEEDUP_128K:g} "
              f"at 128K); bwd/fwd = sparse bwd TFLOP/s / fwd TFLOP/s (target >= {TARGET_BWD_FWD_RATIO}); "
              "errors are in the JSON)")


def main(argv=None):
    args = build_parser().parse_args(argv)
    import torch
    if args.cpu:
        P.DEVICE = "cpu"
    elif not torch.cuda.is_available():
        print("bench_training: no CUDA device visible to torch (--cpu tests the paths on the CPU)",
              file=sys.stderr)
        return 2
    return Run(args).main()


if __name__ == "__main__":
    sys.exit(main())
