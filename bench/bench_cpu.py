#!/usr/bin/env python3
"""CPU prefill benchmark: MSA (index top-k + sparse forward) on the CPU backend against the fastest
dense attention PyTorch runs on the same CPU.

One sequence (batch 1), bf16, B=128, k=16, Di=128, configs Hq=8/Hkv=2/D=128 (the `msa run` CPU
default) and Hq=16/Hkv=1/D=128, contexts 4K..64K, inputs made exactly as bench_prefill.py makes them
(smooth index queries; one i.i.d. case). In the same process and on the same inputs it times:

  msa_index_topk, msa_sparse_forward, msa_total   the CPU backend (AMX where the CPU has it)
  msa_total_no_amx                                 the same with MSA_CPU_AMX=0 (the AVX2/AVX-512 path)
  msa_dense_forward                                the library's own dense causal forward
  sdpa_dense                                       torch SDPA, causal, GQA (its CPU flash kernel)
  torch_topk                                       torch.topk over random block scores of the same shape

Then one decode step (q_len 1, bf16 paged caches with shuffled page tables, batch 1 and 8, contexts 16K
and 64K): msa_paged_decode (`msa.paged.run`: index over every cached block, attention over the 16
selected pages), msa_paged_dense_decode (the same call in dense mode), both again on the same pages
head-major ([pages, Hkv, B, D] in memory: the *_head_major methods), msa_paged_decode_fp8 (FP8 E4M3
caches of the same tokens, one amax / 448 scale each), and sdpa_decode (torch SDPA over
contiguous K/V of the same tokens, GQA: what a dense engine reads).

Wall-clock medians (perf_counter) after a warm-up, inputs rotated over two sets. Writes
bench/results/cpu_prefill_<cpu>_<commit8>.json; bench/make_report.py turns it into the README's
CPU table and bench/results/cpu_speedup_vs_context.png. Needs torch and the msa extension on
PYTHONPATH (scripts/bench_cpu.sh builds the extension and runs this).
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_prefill as P  # noqa: E402
import common as C  # noqa: E402

CONFIGS = {
    "hq8_hkv2_d128": dict(hq=8, hkv=2, d=128),
    "hq16_hkv1_d128": dict(hq=16, hkv=1, d=128),
}
CONTEXTS = [4096, 8192, 16384, 32768, 65536]
DECODE_ITERS = 40  # a decode step takes milliseconds: more calls for a stable median
METHODS = ["msa_index_topk", "msa_sparse_forward", "msa_total", "msa_total_no_amx",
           "msa_dense_forward", "sdpa_dense", "torch_topk"]


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_flags() -> set:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def build_parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--contexts", type=P.parse_contexts, default=CONTEXTS)
    p.add_argument("--configs", default=",".join(CONFIGS))
    p.add_argument("--threads", type=int, default=0, help="threads for msa and torch (0: every core)")
    p.add_argument("--iters", type=int, default=5, help="timed calls per method (at least 3)")
    p.add_argument("--target-s", type=float, default=6.0, help="cap on one method's timed loop")
    p.add_argument("--no-amx-max-context", type=int, default=16384,
                   help="longest context at which msa_total_no_amx is timed (it is slow)")
    p.add_argument("--iid-context", type=int, default=16384, help="context of the i.i.d. case (0: none)")
    p.add_argument("--qi-noise", type=float, default=0.1)
    p.add_argument("--qi-period", type=int, default=512)
    p.add_argument("--check-queries", type=int, default=8)
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--decode-batches", default="1,8", help="decode batches (empty: no decode rows)")
    p.add_argument("--decode-contexts", type=P.parse_contexts, default=[16384, 65536])
    p.add_argument("--out", default=None, help="JSON path (default bench/results/cpu_prefill_<cpu>_<commit8>.json)")
    return p


class Amx:
    """MSA_CPU_AMX pinned for a block of calls (read by the library on every call)."""

    def __init__(self, value):
        self.value, self.prev = value, None

    def __enter__(self):
        self.prev = os.environ.get("MSA_CPU_AMX")
        os.environ["MSA_CPU_AMX"] = self.value

    def __exit__(self, *exc):
        if self.prev is None:
            os.environ.pop("MSA_CPU_AMX", None)
        else:
            os.environ["MSA_CPU_AMX"] = self.prev


def fp8_scale(x) -> float:
    """One E4M3 scale for a whole cache: its amax / 448 (the calibrated per-tensor policy)."""
    return max(float(x.float().abs().max()), 1e-12) / 448.0


def decode_case(msa, torch, F, record, shape, cfg_name, batch, L, seed):
    """One decode step of `batch` requests of L cached tokens (the new one included), q_len 1."""
    import msa.paged as mp
    hq, hkv, d = shape["hq"], shape["hkv"], shape["d"]
    pages = (L + P.BLOCK - 1) // P.BLOCK
    cfg = P.make_msa_config(msa, hq, hkv, d)
    gen = torch.Generator().manual_seed(seed + batch * 7 + L)
    steps = []
    for _ in range(2):  # two caches, alternated
        k = torch.randn(batch * pages, P.BLOCK, hkv, d, generator=gen).bfloat16()
        v = torch.randn(batch * pages, P.BLOCK, hkv, d, generator=gen).bfloat16()
        ki = torch.randn(batch * pages, P.BLOCK, P.INDEX_DIM, generator=gen).bfloat16()
        table = torch.randperm(batch * pages, generator=gen).int().view(batch, pages)
        q = torch.randn(batch, hq, d, generator=gen).bfloat16()
        qi = torch.randn(batch, hkv, P.INDEX_DIM, generator=gen).bfloat16()
        # The dense baseline's contiguous K/V: the same tokens in order, [batch, Hkv, L, D].
        rows = table.flatten().long()
        kd = k[rows].view(batch, pages * P.BLOCK, hkv, d)[:, :L].transpose(1, 2).contiguous()
        vd = v[rows].view(batch, pages * P.BLOCK, hkv, d)[:, :L].transpose(1, 2).contiguous()
        # The same pages head-major ([pages, Hkv, B, D] in memory), passed through msa.paged.head_major.
        kh, vh = (mp.head_major(x.transpose(1, 2).contiguous()) for x in (k, v))
        # And as FP8 E4M3 caches (float8_e4m3fn) with one scale per cache: amax / 448.
        sk, sv, ski = fp8_scale(k), fp8_scale(v), fp8_scale(ki)
        f8 = [(x.float() / sc).to(torch.float8_e4m3fn) for x, sc in ((k, sk), (v, sv), (ki, ski))]
        ks = torch.full((batch * pages, hkv), sk)
        vs = torch.full((batch * pages, hkv), sv)
        kis = torch.full((batch * pages,), ski)
        steps.append(dict(cache=mp.Cache(k, v, ki), cache_head_major=mp.Cache(kh, vh, ki),
                          cache_fp8=mp.Cache(*f8, ks, vs, kis), table=table, q=q, qi=qi, kd=kd, vd=vd))
    cu = torch.arange(batch + 1, dtype=torch.int32)
    lens = torch.full((batch,), L, dtype=torch.int32)
    out = torch.empty(batch, hq, d, dtype=torch.bfloat16)
    lse = torch.empty(batch, hq)
    topk = torch.empty(hkv, batch, P.TOPK, dtype=torch.int32)
    times = {}
    for method, dense, pages in (("msa_paged_decode", False, "cache"), ("msa_paged_dense_decode", True, "cache"),
                                 ("msa_paged_decode_head_major", False, "cache_head_major"),
                                 ("msa_paged_dense_decode_head_major", True, "cache_head_major"),
                                 ("msa_paged_decode_fp8", False, "cache_fp8")):
        plan = mp.plan(cfg, [1] * batch, [L] * batch, dense=dense)
        ws = torch.empty(max(1, plan.workspace_bytes), dtype=torch.uint8)

        def call(x, plan=plan, ws=ws, pages=pages):
            return lambda: mp.run(plan, mp.Batch(cu, lens, x["table"]), x["q"], x["qi"], x[pages], out,
                                  lse, topk, ws)
        times[method] = record(cfg_name, L, "decode", method, [call(x) for x in steps], iters=DECODE_ITERS,
                               batch=batch)

    def sdpa(x):
        q4 = x["q"].view(batch, hq, 1, d)
        return lambda: F.scaled_dot_product_attention(q4, x["kd"], x["vd"], enable_gqa=True)
    times["sdpa_decode"] = record(cfg_name, L, "decode", "sdpa_decode", [sdpa(x) for x in steps],
                                  iters=DECODE_ITERS, batch=batch)
    msa_ms, dense_ms = times["msa_paged_decode"], times["sdpa_decode"]
    if not (msa_ms and dense_ms):
        return []
    return [f"{cfg_name} decode batch {batch} {L // 1024}K: MSA {msa_ms:.2f} ms vs SDPA dense "
            f"{dense_ms:.2f} ms = {dense_ms / msa_ms:.2f}x"]


def main(argv=None):
    args = build_parser().parse_args(argv)
    import torch
    import torch.nn.functional as F
    import msa

    P.DEVICE = "cpu"
    if args.threads:
        torch.set_num_threads(args.threads)
    threads = torch.get_num_threads()
    commit = os.environ.get("MSA_COMMIT") or C.git_commit(P.REPO_ROOT)
    flags = cpu_flags()
    device = f"{cpu_name()}, {threads} threads"
    doc = {
        "benchmark": "cpu_prefill", "device": device, "commit": commit, "timestamp": C.utc_timestamp(),
        "cpu": {"model": cpu_name(), "threads": threads, "amx_bf16": "amx_bf16" in flags,
                "avx512_bf16": "avx512_bf16" in flags},
        "torch": torch.__version__, "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "config": {"configs": {n: CONFIGS[n] for n in args.configs.split(",")}, "block": P.BLOCK,
                   "topk": P.TOPK, "index_dim": P.INDEX_DIM, "dtype": "bf16", "batch": 1,
                   "iters": args.iters, "timing": "wall clock (perf_counter), median, 2 input sets"},
        "rows": [], "cases": [],
    }
    out = args.out or os.path.join(P.REPO_ROOT, "bench", "results",
                                   f"cpu_prefill_{C.slug(cpu_name())}_{commit[:8]}.json")
    summary = []

    def record(cfg_name, L, inputs, method, fn, flops=None, iters=None, **extra):
        row = {"config": cfg_name, "context": L, "inputs": inputs, "method": method, **extra}
        try:
            res = C.host_time(fn, warmup=1, iters=iters or args.iters, min_iters=3, target_s=args.target_s)
            row.update(res)
            if flops:
                row["tflops"] = C.tflops(flops, res["ms_median"])
        except Exception as e:  # record, never stop the run
            row["error"] = C.short_error(e)
        doc["rows"].append(row)
        C.write_json_atomic(out, doc)
        ms = row.get("ms_median")
        print(f"  {cfg_name} {L:>6} {inputs:<6} {method:<22} {extra.get('batch', '')!s:>3} "
              f"{'ERROR ' + row['error'] if ms is None else f'{ms:10.2f} ms'}", flush=True)
        return ms

    cases = [(n, L, "smooth") for n in args.configs.split(",") for L in args.contexts]
    if args.iid_context:
        cases += [(n, args.iid_context, "iid") for n in args.configs.split(",")]
    for cfg_name, L, inputs in cases:
        shape = CONFIGS[cfg_name]
        hq, hkv, d = shape["hq"], shape["hkv"], shape["d"]
        gen = torch.Generator().manual_seed(args.seed + L)
        sets = [P.make_inputs(L, hq, hkv, d, inputs, gen, args) for _ in range(2)]
        cfg = P.make_msa_config(msa, hq, hkv, d)
        msa_cases = [P.MsaCase(msa, cfg, x, L, hq, hkv) for x in sets]
        sparse_flops = P.sparse_flops(L, hq, d)
        record(cfg_name, L, inputs, "msa_index_topk", [c.index_topk for c in msa_cases])
        record(cfg_name, L, inputs, "msa_sparse_forward", [c.forward for c in msa_cases], sparse_flops)
        total = record(cfg_name, L, inputs, "msa_total", [c.total for c in msa_cases], sparse_flops)
        check = P.check_msa(msa_cases[0], hq, hkv, d, args.check_queries, args.seed) if args.check_queries else {}
        doc["cases"].append({"config": cfg_name, "context": L, "inputs": inputs, "check": check})
        if L <= args.no_amx_max_context:
            with Amx("0"):  # workspaces follow the path: sized again without AMX
                plain = [P.MsaCase(msa, cfg, x, L, hq, hkv) for x in sets]
                record(cfg_name, L, inputs, "msa_total_no_amx", [c.total for c in plain], sparse_flops)
            del plain
        dense = None
        if inputs == "smooth":
            cu = msa_cases[0].cu
            dense_ws = int(msa.workspace_bytes("dense_forward", cfg, cu, cu, L, L, max_seqlen_q=L,
                                               max_seqlen_k=L, dtype="bfloat16"))
            ws = torch.empty(max(1, dense_ws), dtype=torch.uint8)

            def dense_call(c):
                x = c.x
                return lambda: msa.dense_attention_forward(cfg, x["q"], x["k"], x["v"], c.cu, c.cu, c.out,
                                                           c.lse, max_seqlen_q=L, max_seqlen_k=L,
                                                           workspace=ws)
            record(cfg_name, L, inputs, "msa_dense_forward", [dense_call(c) for c in msa_cases],
                   P.dense_flops(L, hq, d))

            def sdpa_call(x):
                q4, k4, v4 = P.bhld(x["q"]), P.bhld(x["k"]), P.bhld(x["v"])
                return lambda: F.scaled_dot_product_attention(q4, k4, v4, is_causal=True, enable_gqa=True)
            dense = record(cfg_name, L, inputs, "sdpa_dense", [sdpa_call(x) for x in sets],
                           P.dense_flops(L, hq, d))
            scores = P.topk_scores(L, hkv, gen)
            record(cfg_name, L, inputs, "torch_topk", [lambda: torch.topk(scores, P.TOPK - 1, dim=-1)])
        del sets, msa_cases
        if total and dense:
            summary.append(f"{cfg_name} {L // 1024}K: MSA {total:.1f} ms vs SDPA dense {dense:.1f} ms "
                           f"= {dense / total:.2f}x")
    batches = [int(b) for b in args.decode_batches.split(",") if b.strip()]
    for cfg_name in args.configs.split(","):
        for batch in batches:
            for L in args.decode_contexts:
                summary += decode_case(msa, torch, F, record, CONFIGS[cfg_name], cfg_name, batch, L,
                                       args.seed)
    print("\n".join(["", f"{device}, torch {torch.__version__}, commit {commit[:8]}"] + summary))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
