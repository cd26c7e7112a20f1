#!/usr/bin/env python3
"""Decode benchmark: one decode step of the paged serving API (msa.paged, include/msa/paged.h) against
dense decode over a contiguous cache of the same lengths with PyTorch SDPA, and against msa's own
paged dense mode.

One layer of Hq=64 / Hkv=4 / D=Di=128, B=128, k=16; batch 1, 8, 32, 128; context 8K, 32K, 128K
(combinations that do not fit in GPU memory are recorded as skipped); q_len 1 and 4 per request;
bf16 and FP8 E4M3 paged caches (shuffled page tables), K / V pages token-major ([pages, B, Hkv, D] in
memory) and head-major ([pages, Hkv, B, D], passed through msa.paged.head_major). Per case: index time and attention time
(kernel durations from the torch profiler), the total paged_run time (CUDA events, median), the
bytes each kernel actually reads and its GB/s, the speedup over SDPA dense decode, and the device
copy bandwidth (torch copy of a 1 GiB tensor) measured in the same run.

    python3 bench/bench_decode.py                       # full run on the GPU, JSON to $BENCH_DIR
    python3 bench/bench_decode.py --quick               # batch 1, 32; 8K and 32K
    python3 bench/bench_decode.py --smoke               # tiny, on the CPU (tests the script)
    python3 bench/bench_decode.py --quick --methods msa_sparse,sdpa_dense
    python3 bench/bench_decode.py --batches 32 --contexts 128k --q-lens 1 --kv-layouts head_major

Within a case msa_paged_dense runs last, so a fault in it cannot lose the SDPA baseline of the same
case. A CUDA fault (a sticky error: the context is lost) ends the run: the JSON of what was measured
is written (with "fatal") and the script exits with status 3.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time
import traceback

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common as C  # noqa: E402

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

FULL = dict(hq=64, hkv=4, d=128, di=128, block=128, topk=16,
            batches=[1, 8, 32, 128], contexts=[8192, 32768, 131072], q_lens=[1, 4])
QUICK = dict(FULL, batches=[1, 32], contexts=[8192, 32768])
SMOKE = dict(hq=8, hkv=2, d=64, di=32, block=16, topk=4, batches=[1, 3], contexts=[256, 700],
             q_lens=[1, 4])
CACHES = ["bf16", "fp8"]
# Cache kinds beyond CACHES: the same caches with attention variants forced by their environment
# variables (set around that kind's calls only): FP8 caches in either FP8 mode (plain "fp8" takes the
# library's default for the query tile).
KIND_ENV = {"fp8_registers": [("MSA_PAGED_ATTENTION_FP8", "registers")],
            "fp8_widened": [("MSA_PAGED_ATTENTION_FP8", "widened")]}
ALL_CACHES = CACHES + list(KIND_ENV)


@contextlib.contextmanager
def scoped_env(var, value):
    """var=value inside the block (the library reads it at each launch); its previous value after.
    value None: leave var as it is."""
    if value is None:
        yield
        return
    before = os.environ.get(var)
    os.environ[var] = value
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(var, None)
        else:
            os.environ[var] = before


def cache_kind_env(cache_kind):
    """The variables of a forced variant (KIND_ENV) set while that kind's calls run."""
    stack = contextlib.ExitStack()
    for var, value in KIND_ENV.get(cache_kind, []):
        stack.enter_context(scoped_env(var, value))
    return stack
KV_LAYOUTS = ["token_major", "head_major"]
# Substrings of the kernels' names: index_scores_kernel / index_scores_stream_kernel,
# attention_kernel (FFMA) / attention_mma_kernel.
INDEX_KERNELS = ("cumulative_kv_kernel", "index_scores_", "select_topk_")  # select_topk_: both select kernels
ATTENTION_KERNELS = ("attention_kernel", "attention_mma_kernel", "merge_kernel")
METHODS = ("msa_sparse", "sdpa_dense", "flashinfer_dense", "msa_paged_dense")  # the order within a case
# FlashInfer's tensor-core backends, each timed (the faster is the baseline): fa2 (its FlashAttention-2
# style kernels) and fa3 (Hopper wgmma). scripts/setup_flashinfer.sh builds both ahead of time.
FLASHINFER_BACKENDS = ("fa2", "fa3")
FAULT_EXIT = 3
# Sticky CUDA errors: after one every later CUDA call fails, so the run cannot go on.
FAULT_MARKERS = ("illegal memory access", "illegal instruction", "misaligned address",
                 "unspecified launch failure", "device-side assert", "launch timed out",
                 "uncorrectable ECC", "cudaErrorIllegalAddress", "cudaErrorLaunchFailure")


class CudaFault(RuntimeError):
    """The CUDA context is lost: the run stops, keeping what it measured."""


def parse_methods(text):
    out = [m.strip() for m in text.split(",") if m.strip()]
    bad = [m for m in out if m not in METHODS]
    if bad or not out:
        raise argparse.ArgumentTypeError(f"unknown method(s) {bad or text!r}; choose from {','.join(METHODS)}")
    return out


def parse_ints(text):
    out = []
    for tok in text.split(","):
        tok = tok.strip().lower()
        if tok:
            out.append(int(tok.rstrip("k")) * (1024 if tok.endswith("k") else 1))
    return out


def build_parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU: checks the script")
    p.add_argument("--quick", action="store_true", help="batch 1 and 32, contexts 8K and 32K")
    p.add_argument("--batches", type=parse_ints, default=None)
    p.add_argument("--contexts", type=parse_ints, default=None)
    p.add_argument("--q-lens", type=parse_ints, default=None)
    p.add_argument("--caches", default=",".join(CACHES), help="comma list of " + ", ".join(ALL_CACHES))
    p.add_argument("--kv-layouts", default=",".join(KV_LAYOUTS),
                   help="comma list of token_major ([pages, B, Hkv, D] in memory), head_major ([pages, Hkv, "
                        "B, D]); msa_sparse runs each, the dense methods token-major")
    p.add_argument("--methods", type=parse_methods, default=list(METHODS),
                   help="comma list of " + ", ".join(METHODS) + " (default all; msa_paged_dense "
                        "runs last within each case, bf16 caches only)")
    p.add_argument("--out", default=None, help="JSON file or folder (default $BENCH_DIR, else bench/results/)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--target-s", type=float, default=1.0)
    p.add_argument("--time-budget", type=float, default=None, help="seconds for the whole run")
    p.add_argument("--mem-fraction", type=float, default=0.85, help="of free GPU memory a case may use")
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--num-workers", type=int, default=0,
                   help="PagedOptions.num_workers of every msa plan (SMs the schedule fills; 0 = all): more "
                        "workers, more attention key splits")
    p.add_argument("--compare-pdl", action="store_true",
                   help="also time msa calls with MSA_PAGED_PDL=0 (ms_median_no_pdl, ms_graph_no_pdl)")
    return p


class Run:
    def __init__(self, args):
        import torch
        import msa
        import msa.paged
        self.torch, self.msa, self.args = torch, msa, args
        self.shape = dict(SMOKE if args.smoke else (QUICK if args.quick else FULL))
        for key in ("batches", "contexts", "q_lens"):
            v = getattr(args, key)
            if v:
                self.shape[key] = v
        self.caches = [c.strip() for c in args.caches.split(",") if c.strip()]
        bad = [c for c in self.caches if c not in ALL_CACHES]
        if bad:
            raise SystemExit(f"bench_decode: unknown --caches {bad}; choose from {','.join(ALL_CACHES)}")
        self.layouts = [x.strip() for x in args.kv_layouts.split(",") if x.strip()]
        bad = [x for x in self.layouts if x not in KV_LAYOUTS]
        if bad or not self.layouts:
            raise SystemExit(f"bench_decode: unknown --kv-layouts {bad or args.kv_layouts!r}; choose from "
                             f"{','.join(KV_LAYOUTS)}")
        self.methods = list(args.methods)
        self.dev = "cpu" if args.smoke else "cuda"
        self.budget = C.Budget(args.time_budget)
        self.device = "cpu" if args.smoke else torch.cuda.get_device_name()
        self.commit = C.git_commit(REPO_ROOT)
        self.l2 = 0 if args.smoke else C.l2_bytes()
        self.cfg = msa.Config(num_q_heads=self.shape["hq"], num_kv_heads=self.shape["hkv"],
                              head_dim=self.shape["d"], index_head_dim=self.shape["di"],
                              block_size=self.shape["block"], topk=self.shape["topk"])
        self.rows = []
        self.out_path = self.resolve_out()
        self.doc = {
            "benchmark": "decode", "commit": self.commit, "device": self.device,
            "torch": torch.__version__, "cuda": getattr(torch.version, "cuda", None),
            "timestamp": C.utc_timestamp(),
            "config": dict(self.shape, caches=self.caches, kv_layouts=self.layouts, methods=self.methods,
                           warmup=args.warmup, iters=args.iters, num_workers=args.num_workers,
                           smoke=bool(args.smoke), l2_bytes=self.l2,
                           msa_module=getattr(msa, "__file__", None),
                           # kernel choices (MSA_PAGED_ATTENTION_KERNEL, MSA_PAGED_INDEX_KERNEL, ...)
                           env={k: v for k, v in sorted(os.environ.items()) if k.startswith("MSA_")},
                           sdpa_note="dense baseline: SDPA over contiguous K/V [batch, Hkv, ctx, D] "
                                     "bf16 (enable_gqa), every key visible to every new token"),
            "copy_bandwidth": None, "rows": self.rows,
        }

    def resolve_out(self):
        name = (f"decode_{C.slug(self.device)}_{self.commit[:8]}"
                f"{'_smoke' if self.args.smoke else '_quick' if self.args.quick else ''}.json")
        out = self.args.out or os.environ.get("BENCH_DIR") or os.path.join(REPO_ROOT, "bench", "results")
        if out.endswith(os.sep) or os.path.isdir(out) or not out.endswith(".json"):
            return os.path.join(out, name)
        return out

    def save(self):
        C.write_json_atomic(self.out_path, self.doc)

    def add(self, **row):
        self.rows.append(row)
        msg = row.get("error") or row.get("skipped") or (
            f"{row['ms_median']:.3f} ms" if row.get("ms_median") is not None else "")
        print(f"[{row['method']} {row.get('cache', '')} {row.get('kv_layout', '')} b={row['batch']} L={row['context']} "
              f"q={row['q_len']}] {msg}", flush=True)
        self.save()

    # ---- CUDA faults ------------------------------------------------------------------------
    def raise_if_fault(self, e):
        """Turns `e` into CudaFault when the CUDA context is lost (a sticky error: the message says
        so, or a device synchronisation now fails too); other errors leave the run going."""
        if isinstance(e, CudaFault):
            raise e
        if any(m in str(e) for m in FAULT_MARKERS):
            raise CudaFault(C.short_error(e)) from e
        if self.dev != "cuda":
            return
        try:
            self.torch.cuda.synchronize()
        except Exception as e2:  # noqa: BLE001
            raise CudaFault(C.short_error(e2)) from e

    def free(self):
        if self.dev != "cuda":
            return
        try:
            self.torch.cuda.empty_cache()
        except Exception as e:  # noqa: BLE001
            self.raise_if_fault(e)
            raise

    # ---- timing helpers ---------------------------------------------------------------------
    def sync(self):
        if self.dev == "cuda":
            self.torch.cuda.synchronize()

    def time_calls(self, calls):
        kw = dict(warmup=self.args.warmup, iters=self.args.iters, target_s=self.args.target_s)
        if self.dev == "cuda":
            return C.cuda_time(calls, **kw)
        return C.host_time(calls, **kw)

    def kernel_ms(self, call, reps=5):
        """Mean per-call device time of the index and attention kernels (torch profiler). Launched
        without PDL: a kernel launched early under PDL waits for its predecessor inside its own span
        (griddepcontrol.wait), which would count the predecessor's time twice."""
        if self.dev != "cuda":
            return None, None, {}
        from torch.profiler import ProfilerActivity, profile
        with scoped_env("MSA_PAGED_PDL", "0"), profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(reps):
                call()
            self.sync()
        idx = att = 0.0
        per_kernel = {}  # short kernel name -> mean ms a call: where the attention time goes (merge)
        for e in prof.events():
            if e.device_type is None or "CUDA" not in str(e.device_type):
                continue  # host-side events (the launches)
            dt = e.time_range.elapsed_us()  # a kernel's own duration
            kind = next((k for k in INDEX_KERNELS + ATTENTION_KERNELS if k in e.name), None)
            if kind is None:
                continue
            if kind in INDEX_KERNELS:
                idx += dt
            else:
                att += dt
            per_kernel[kind] = per_kernel.get(kind, 0.0) + dt / reps / 1e3
        return idx / reps / 1e3, att / reps / 1e3, per_kernel  # us -> ms

    def copy_bandwidth(self):
        torch = self.torch
        n = (1 << 30) if self.dev == "cuda" else (1 << 24)
        x = torch.empty(n, dtype=torch.uint8, device=self.dev)
        y = torch.empty_like(x)
        t = self.time_calls([lambda: y.copy_(x)])
        gbs = 2 * n / (t["ms_median"] * 1e-3) / 1e9
        del x, y
        return dict(bytes=n, ms_median=t["ms_median"], gb_per_s=gbs, note="read + write bytes / time")

    # ---- one case ---------------------------------------------------------------------------
    def make_step(self, batch, ctx, q_len, cache_kind, gen, layout="token_major"):
        torch, msa = self.torch, self.msa
        s = self.shape
        B, hkv, d, di = s["block"], s["hkv"], s["d"], s["di"]
        pages_per = (ctx + B - 1) // B
        num_pages = batch * pages_per
        perm = torch.randperm(num_pages, generator=gen).to(torch.int32)
        page_table = perm.view(batch, pages_per).to(self.dev)
        kv = torch.full((batch,), ctx, dtype=torch.int32)
        ql = torch.full((batch,), q_len, dtype=torch.int32)
        cu_q = torch.zeros(batch + 1, dtype=torch.int32)
        cu_q[1:] = torch.cumsum(ql, 0)
        bf = torch.bfloat16
        dgen = self.dgen

        def rnd(*shape):
            return torch.randn(*shape, generator=dgen, dtype=bf, device=self.dev)

        def kv_pages(dtype):  # [num_pages, B, Hkv, D], stored in `layout`
            if layout == "head_major":
                return msa.paged.head_major(torch.empty(num_pages, hkv, B, d, dtype=dtype, device=self.dev))
            return torch.empty(num_pages, B, hkv, d, dtype=dtype, device=self.dev)

        if not cache_kind.startswith("fp8"):  # bf16 and its variants
            k, v = kv_pages(bf), kv_pages(bf)
            k.copy_(rnd(num_pages, B, hkv, d))
            v.copy_(rnd(num_pages, B, hkv, d))
            cache = msa.paged.Cache(k, v, rnd(num_pages, B, di))
        else:  # FP8 E4M3 bytes with per-(page, head) amax / 448 scales, made a slice at a time
            f8, u8 = torch.float8_e4m3fn, torch.uint8
            k8, v8 = kv_pages(u8), kv_pages(u8)
            ki8 = torch.empty(num_pages, B, di, dtype=u8, device=self.dev)
            ks = torch.empty(num_pages, hkv, dtype=torch.float32, device=self.dev)
            vs = torch.empty_like(ks)
            kis = torch.empty(num_pages, dtype=torch.float32, device=self.dev)
            step_pages = 4096
            for p0 in range(0, num_pages, step_pages):
                n = min(step_pages, num_pages - p0)
                for dst, sc in ((k8, ks), (v8, vs)):
                    x = rnd(n, B, hkv, d).float()
                    a = x.abs().amax(dim=(1, 3)).clamp_min(1e-12) / 448.0
                    sc[p0:p0 + n] = a
                    dst[p0:p0 + n] = (x / a[:, None, :, None]).to(f8).view(u8)
                x = rnd(n, B, di).float()
                a = x.abs().amax(dim=(1, 2)).clamp_min(1e-12) / 448.0
                kis[p0:p0 + n] = a
                ki8[p0:p0 + n] = (x / a[:, None, None]).to(f8).view(u8)
                del x
            cache = msa.paged.Cache(k8, v8, ki8, ks, vs, kis)
        tq = batch * q_len
        step = dict(
            batch=msa.paged.Batch(cu_q.to(self.dev), kv.to(self.dev), page_table),
            cache=cache, q_lens=ql, kv_lens=kv,
            q=rnd(tq, s["hq"], d), qi=rnd(tq, hkv, di),
            out=torch.empty(tq, s["hq"], d, dtype=bf, device=self.dev),
            lse=torch.empty(tq, s["hq"], dtype=torch.float32, device=self.dev),
            topk=torch.empty(hkv, tq, s["topk"], dtype=torch.int32, device=self.dev),
        )
        return step

    def msa_call(self, st, dense):
        msa, torch = self.msa, self.torch
        plan = msa.paged.plan(self.cfg, st["q_lens"], st["kv_lens"], dtype="bfloat16", device=self.dev,
                              dense=dense, num_workers=self.args.num_workers)
        ws = torch.empty(plan.workspace_bytes, dtype=torch.uint8, device=self.dev)
        qi = None if dense else st["qi"]
        topk = None if dense else st["topk"]

        def call():  # on torch's current stream, so that torch.cuda.graph can capture it
            msa.paged.run(plan, st["batch"], st["q"], qi, st["cache"], st["out"], st["lse"], topk, ws)
        return call

    def graph_time(self, calls):
        """{"ms_graph": median of CUDA-graph replays} of `calls`, or {"graph_error": ...}; {} on the CPU."""
        if self.dev != "cuda":
            return {}
        try:
            t = self.time_calls(C.cuda_graph_replays(calls))
            return {"ms_graph": t["ms_median"]}
        except Exception as e:  # noqa: BLE001
            self.raise_if_fault(e)
            return {"graph_error": C.short_error(e)}

    def bytes_read(self, st, batch, ctx, q_len, cache_kind, dense):
        """Bytes the kernels read: index = the ki pages up to each query tile's last candidate
        block (+ score rows written and read); attention = K and V rows of the blocks each
        (request, group) tile reads (the union of its queries' selections; dense: all blocks)."""
        s = self.shape
        B, hkv, d, di = s["block"], s["hkv"], s["d"], s["di"]
        e = 1 if cache_kind.startswith("fp8") else 2
        nblk = (ctx + B - 1) // B
        local = (ctx - 1) // B  # candidates of the last query
        index = 0 if dense else batch * local * B * di * e + 2 * 4 * batch * q_len * hkv * nblk
        if dense:
            blocks = batch * hkv * nblk
        else:
            topk = st["topk"].cpu().view(hkv, batch, q_len, s["topk"])
            blocks = 0
            for r in range(batch):
                for g in range(hkv):
                    ids = topk[g, r].flatten()
                    blocks += int(ids[ids >= 0].unique().numel())
        attention = blocks * B * d * 2 * e
        return index, attention, blocks

    def cache_bytes(self, batch, ctx, cache_kind="bf16"):
        s = self.shape
        tokens = batch * ((ctx + s["block"] - 1) // s["block"]) * s["block"]
        return tokens * (2 * s["hkv"] * s["d"] + s["di"]) * (1 if cache_kind.startswith("fp8") else 2)

    def fits(self, batch, ctx, q_len):
        """The bf16 paged cache (the largest thing alive at once; the SDPA K/V come after it is freed)."""
        if self.dev != "cuda":
            return True
        free, _ = self.torch.cuda.mem_get_info()
        return self.cache_bytes(batch, ctx) * 1.1 + (1 << 30) < self.args.mem_fraction * free

    def run_case(self, batch, ctx, q_len, gen):
        s = self.shape
        base = dict(batch=batch, context=ctx, q_len=q_len)
        if not self.fits(batch, ctx, q_len):
            for m in self.methods:
                self.add(method=m, **base, skipped="does not fit in GPU memory")
            return
        totals = {}  # (method, cache label) -> the timing of that msa call (ms_median, ms_graph)
        if "msa_sparse" in self.methods:
            for cache_kind in self.caches:
                for layout in self.layouts:
                    self.run_msa(batch, ctx, q_len, gen, cache_kind, False, totals, layout)
        sdpa_row = self.run_sdpa(batch, ctx, q_len, totals) if "sdpa_dense" in self.methods else None
        if "flashinfer_dense" in self.methods and self.dev == "cuda":
            self.run_flashinfer(batch, ctx, q_len, totals, sdpa_row)
        # Last: a fault here cannot lose this case's rows above (they are saved already).
        if "msa_paged_dense" in self.methods and "bf16" in self.caches:
            ms = self.run_msa(batch, ctx, q_len, gen, "bf16", True, totals)
            if ms and sdpa_row is not None:
                sdpa_row["speedup_msa_paged_dense_bf16"] = sdpa_row["ms_median"] / ms
                self.save()

    def run_msa(self, batch, ctx, q_len, gen, cache_kind, dense, totals, layout="token_major"):
        """msa.paged.run on fresh paged caches of one kind and K / V layout; returns the median ms or None.
        KIND_ENV's kinds: those attention variants forced for these calls only."""
        with cache_kind_env(cache_kind):
            return self.run_msa_calls(batch, ctx, q_len, gen, cache_kind, dense, totals, layout)

    def run_msa_calls(self, batch, ctx, q_len, gen, cache_kind, dense, totals, layout):
        method = "msa_paged_dense" if dense else "msa_sparse"
        base = dict(batch=batch, context=ctx, q_len=q_len, kv_layout=layout)
        if self.budget.exhausted(10):
            self.add(method=method, cache=cache_kind, **base, skipped="time budget")
            return None
        ms = None
        steps = calls = call = st = None
        try:
            # Caches below ~3x L2 would stay cached between timed calls: rotate among copies.
            sets = C.rotation_sets(self.cache_bytes(batch, ctx, cache_kind), self.l2) if self.l2 else 1
            steps = [self.make_step(batch, ctx, q_len, cache_kind, gen, layout) for _ in range(sets)]
            st = steps[0]
            calls = [self.msa_call(x, dense) for x in steps]
            call = calls[0]
            t = self.time_calls(calls)
            t.update(self.graph_time(calls))
            if self.args.compare_pdl and self.dev == "cuda":
                # The same calls with the kernel chain launched in plain stream order (no PDL).
                with scoped_env("MSA_PAGED_PDL", "0"):
                    t0 = self.time_calls(calls)
                    g0 = self.graph_time(calls)
                t.update(ms_median_no_pdl=t0["ms_median"], ms_graph_no_pdl=g0.get("ms_graph"))
            idx_ms, att_ms, kernels_ms = self.kernel_ms(call)
            ib, ab, blocks = self.bytes_read(st, batch, ctx, q_len, cache_kind, dense)
            row = dict(method=method, cache=cache_kind, **base, **t, num_workers=self.args.num_workers,
                       index_ms=idx_ms, attention_ms=att_ms, kernels_ms=kernels_ms,
                       index_bytes=ib, attention_bytes=ab, attention_blocks=blocks,
                       index_gb_per_s=ib / (idx_ms * 1e-3) / 1e9 if idx_ms else None,
                       attention_gb_per_s=ab / (att_ms * 1e-3) / 1e9 if att_ms else None,
                       total_gb_per_s=(ib + ab) / (t["ms_median"] * 1e-3) / 1e9)
            totals[(method, cache_kind + ("" if layout == "token_major" else "_" + layout))] = t
            ms = t["ms_median"]
            self.add(**row)
        except Exception as e:  # noqa: BLE001
            traceback.print_exc()
            self.add(method=method, cache=cache_kind, **base, error=C.short_error(e))
            self.raise_if_fault(e)
        steps = calls = call = st = None
        self.free()
        return ms

    def run_sdpa(self, batch, ctx, q_len, totals):
        """Dense baseline: SDPA over a contiguous bf16 cache of the same lengths; returns its row."""
        torch, s = self.torch, self.shape
        base = dict(batch=batch, context=ctx, q_len=q_len)
        row = None
        try:
            bf = torch.bfloat16
            hq, hkv, d = s["hq"], s["hkv"], s["d"]
            sets = C.rotation_sets(self.cache_bytes(batch, ctx), self.l2) if self.l2 else 1
            qkv = [(torch.randn(batch, hq, q_len, d, device=self.dev, dtype=bf),
                    torch.randn(batch, hkv, ctx, d, device=self.dev, dtype=bf),
                    torch.randn(batch, hkv, ctx, d, device=self.dev, dtype=bf)) for _ in range(sets)]
            sdpa = torch.nn.functional.scaled_dot_product_attention

            def make(native):
                if native:
                    return [lambda q=q, k=k, v=v: sdpa(q, k, v, enable_gqa=True) for q, k, v in qkv]
                ex = [(q, k.repeat_interleave(hq // hkv, dim=1), v.repeat_interleave(hq // hkv, dim=1))
                      for q, k, v in qkv[:1]]
                return [lambda q=q, k=k, v=v: sdpa(q, k, v) for q, k, v in ex]
            calls, mode, note = C.first_gqa_variant(make, hq // hkv, self.sync,
                                                    torch.cuda.empty_cache if self.dev == "cuda" else (lambda: None))
            t = self.time_calls(calls)
            t.update(self.graph_time(calls))
            dense_bytes = 2 * batch * hkv * ctx * d * 2
            row = dict(method="sdpa_dense", cache="bf16", **base, **t, gqa_mode=mode, note=note,
                       attention_bytes=dense_bytes,
                       total_gb_per_s=dense_bytes / (t["ms_median"] * 1e-3) / 1e9)
            for (m, ck), mt in totals.items():
                row[f"speedup_{m}_{ck}"] = t["ms_median"] / mt["ms_median"]
                if t.get("ms_graph") and mt.get("ms_graph"):
                    row[f"speedup_graph_{m}_{ck}"] = t["ms_graph"] / mt["ms_graph"]
            self.add(**row)
            del qkv, calls
        except Exception as e:  # noqa: BLE001
            traceback.print_exc()
            row = None
            self.add(method="sdpa_dense", cache="bf16", **base, error=C.short_error(e))
            self.raise_if_fault(e)
        self.free()
        return row

    def run_flashinfer(self, batch, ctx, q_len, totals, sdpa_row):
        """Dense baseline: FlashInfer's paged decode (q_len 1: BatchDecode on tensor cores, needed for
        GQA groups above 8; q_len > 1: BatchPrefill, causal, i.e. the same suffix rule) over a bf16
        head-major ("HND") cache with pages of B tokens and a shuffled page table; one row per
        backend. Checked once against SDPA on request 0 (relative error in the row)."""
        torch, s = self.torch, self.shape
        base = dict(batch=batch, context=ctx, q_len=q_len)
        try:
            import flashinfer
        except Exception as e:  # noqa: BLE001
            if not getattr(self, "_fi_missing_noted", False):
                print(f"bench_decode: FlashInfer baseline skipped ({C.short_error(e)}); "
                      "scripts/setup_flashinfer.sh prepares it", flush=True)
                self._fi_missing_noted = True
            self.add(method="flashinfer_dense", cache="bf16", **base, skipped=f"flashinfer: {C.short_error(e)}")
            return
        bf, dev = torch.bfloat16, self.dev
        hq, hkv, d, B = s["hq"], s["hkv"], s["d"], s["block"]
        pages_per = (ctx + B - 1) // B
        num_pages = batch * pages_per
        try:
            sets = C.rotation_sets(self.cache_bytes(batch, ctx), self.l2) if self.l2 else 1
            kv = [(torch.randn(num_pages, hkv, B, d, dtype=bf, device=dev),
                   torch.randn(num_pages, hkv, B, d, dtype=bf, device=dev)) for _ in range(sets)]
            perm = torch.randperm(num_pages, device=dev).to(torch.int32)
            kv_indptr = (torch.arange(batch + 1, device=dev, dtype=torch.int32) * pages_per)
            last = torch.full((batch,), ctx - (pages_per - 1) * B, dtype=torch.int32, device=dev)
            qo_indptr = torch.arange(batch + 1, device=dev, dtype=torch.int32) * q_len
            q = torch.randn(batch * q_len, hq, d, dtype=bf, device=dev)
            ws = torch.empty(256 << 20, dtype=torch.uint8, device=dev)
        except Exception as e:  # noqa: BLE001
            self.add(method="flashinfer_dense", cache="bf16", **base, error=C.short_error(e))
            self.raise_if_fault(e)
            self.free()
            return
        best = None
        for backend in FLASHINFER_BACKENDS:
            try:
                if q_len == 1:
                    w = flashinfer.BatchDecodeWithPagedKVCacheWrapper(ws, "HND", use_tensor_cores=True,
                                                                      backend=backend)
                    w.plan(kv_indptr, perm, last, hq, hkv, d, B, q_data_type=bf, kv_data_type=bf)
                else:
                    w = flashinfer.BatchPrefillWithPagedKVCacheWrapper(ws, "HND", backend=backend)
                    w.plan(qo_indptr, kv_indptr, perm, last, hq, hkv, d, B, causal=True,
                           q_data_type=bf, kv_data_type=bf)
                out = w.run(q, kv[0])
                err = self.flashinfer_check(out, q, kv[0], perm[:pages_per], ctx, q_len)
                calls = [lambda k=k, v=v, w=w: w.run(q, (k, v)) for k, v in kv]
                t = self.time_calls(calls)
                dense_bytes = 2 * batch * hkv * ctx * d * 2
                row = dict(method="flashinfer_dense", backend=backend, cache="bf16", kv_layout="head_major",
                           **base, **t, flashinfer=flashinfer.__version__, check_rel_err=err,
                           attention_bytes=dense_bytes,
                           total_gb_per_s=dense_bytes / (t["ms_median"] * 1e-3) / 1e9)
                for (m, ck), mt in totals.items():
                    row[f"speedup_{m}_{ck}"] = t["ms_median"] / mt["ms_median"]
                self.add(**row)
                if err > 2e-2:
                    print(f"bench_decode: FlashInfer {backend} differs from SDPA (rel err {err:.3g})", flush=True)
                elif best is None or t["ms_median"] < best["ms_median"]:
                    best = row
            except Exception as e:  # noqa: BLE001
                traceback.print_exc()
                self.add(method="flashinfer_dense", backend=backend, cache="bf16", **base, error=C.short_error(e))
                self.raise_if_fault(e)
        if best is not None and sdpa_row is not None:
            sdpa_row["flashinfer_best_ms"] = best["ms_median"]
            sdpa_row["flashinfer_best_backend"] = best["backend"]
            self.save()
        kv = q = ws = None
        self.free()

    def flashinfer_check(self, out, q, kv, pages, ctx, q_len):
        """Relative error of FlashInfer's output for request 0 (its pages: `pages`, `ctx` tokens)
        against SDPA in f32 over those pages gathered."""
        torch = self.torch
        pages = pages.long()
        k = kv[0][pages].permute(1, 0, 2, 3).reshape(1, kv[0].shape[1], -1, kv[0].shape[3])[:, :, :ctx]
        v = kv[1][pages].permute(1, 0, 2, 3).reshape(1, kv[1].shape[1], -1, kv[1].shape[3])[:, :, :ctx]
        q0 = q[:q_len].permute(1, 0, 2).unsqueeze(0)  # [1, Hq, q_len, D]
        # The new tokens are the last q_len positions: query i sees keys 0 .. ctx - q_len + i.
        pos_q = torch.arange(ctx - q_len, ctx, device=q.device)[:, None]
        mask = torch.arange(ctx, device=q.device)[None, :] <= pos_q
        ref = torch.nn.functional.scaled_dot_product_attention(q0.float(), k.float(), v.float(), attn_mask=mask,
                                                               enable_gqa=True)
        got = out[:q_len].permute(1, 0, 2).unsqueeze(0).float()
        return float((got - ref).norm() / ref.norm())

    def main(self):
        torch = self.torch
        print(f"device={self.device} torch={torch.__version__} commit={self.commit} out={self.out_path}",
              flush=True)
        status = 0
        try:
            self.run_all()
        except CudaFault as e:
            # Every later CUDA call would fail too: keep what was measured and stop.
            self.doc["fatal"] = f"CUDA fault, run stopped: {e}"
            print(f"\nbench_decode: {self.doc['fatal']}", file=sys.stderr, flush=True)
            status = FAULT_EXIT
        self.doc["wall_s"] = round(time.perf_counter() - self.budget.t0, 1)
        self.save()
        self.print_summary()
        return status

    def run_all(self):
        torch = self.torch
        try:
            self.doc["copy_bandwidth"] = self.copy_bandwidth()
            print(f"device copy bandwidth: {self.doc['copy_bandwidth']['gb_per_s']:.0f} GB/s", flush=True)
        except Exception as e:  # noqa: BLE001
            self.doc["copy_bandwidth"] = dict(error=C.short_error(e))
            self.raise_if_fault(e)
        gen = torch.Generator().manual_seed(self.args.seed)
        self.dgen = torch.Generator(device=self.dev).manual_seed(self.args.seed + 1)
        for ctx in self.shape["contexts"]:
            for batch in self.shape["batches"]:
                for q_len in self.shape["q_lens"]:
                    if self.budget.exhausted(10):
                        self.add(method=self.methods[0], batch=batch, context=ctx, q_len=q_len,
                                 skipped="time budget")
                        continue
                    self.run_case(batch, ctx, q_len, gen)

    def print_summary(self):
        print(f"\n== decode summary ({self.device}, commit {self.commit[:12]}) -> {self.out_path}")
        bw = (self.doc.get("copy_bandwidth") or {}).get("gb_per_s")
        headers = ["b", "L", "q", "cache", "layout", "idx_ms", "attn_ms", "total_ms", "graph_ms", "graph_nopdl", "idx_GB/s",
                   "attn_GB/s", "pdense_ms", "sdpa_ms", "sdpa_graph", "fi_ms", "x_sdpa", "x_fastest"]
        by = {}
        for r in self.rows:
            by.setdefault((r["batch"], r["context"], r["q_len"]), []).append(r)
        table = []
        for (b, L, q), rows in sorted(by.items(), key=lambda kv: (kv[0][1], kv[0][0], kv[0][2])):
            sd = next((r for r in rows if r["method"] == "sdpa_dense" and "ms_median" in r), None)
            pd = next((r for r in rows if r["method"] == "msa_paged_dense" and "ms_median" in r), None)
            fi = [r["ms_median"] for r in rows if r["method"] == "flashinfer_dense" and r.get("ms_median")
                  and (r.get("check_rel_err") or 0) <= 2e-2]
            fi_ms = min(fi) if fi else None
            fastest = min([x for x in (fi_ms, sd.get("ms_median") if sd else None) if x], default=None)
            for ck, lay in [(c, x) for c in self.caches for x in self.layouts]:
                sp = next((r for r in rows if r["method"] == "msa_sparse" and r.get("cache") == ck
                           and r.get("kv_layout", "token_major") == lay), None)
                if sp is None:
                    if (ck, lay) != (self.caches[0], self.layouts[0]) or not (pd or sd):
                        continue
                    sp = {"ms_median": None}  # --methods without msa_sparse

                def f(x, fmt="{:.3f}"):
                    return fmt.format(x) if isinstance(x, (int, float)) else "-"
                table.append([str(b), f"{L // 1024}K" if L >= 1024 else str(L), str(q), ck, lay,
                              f(sp.get("index_ms")), f(sp.get("attention_ms")),
                              f(sp.get("ms_median")) if "ms_median" in sp else (sp.get("error") or sp.get("skipped") or "-")[:20],
                              f(sp.get("ms_graph")), f(sp.get("ms_graph_no_pdl")),
                              f(sp.get("index_gb_per_s"), "{:.0f}"), f(sp.get("attention_gb_per_s"), "{:.0f}"),
                              f(pd.get("ms_median")) if pd else "-", f(sd.get("ms_median")) if sd else "-",
                              f(sd.get("ms_graph")) if sd else "-", f(fi_ms),
                              f(sd["ms_median"] / sp["ms_median"], "{:.2f}") if sd and sp.get("ms_median") else "-",
                              f(fastest / sp["ms_median"], "{:.2f}") if fastest and sp.get("ms_median") else "-"])
        C.print_table(headers, table)
        print(f"(device copy bandwidth {bw:.0f} GB/s; GB/s = bytes the kernel reads / its time; graph = CUDA-graph "
              "replays; x_sdpa = SDPA dense ms / msa sparse total ms; x_fastest = the faster of SDPA and "
              "FlashInfer (fi) / msa)" if bw else "")


def main(argv=None):
    args = build_parser().parse_args(argv)
    import torch
    if not args.smoke and not torch.cuda.is_available():
        print("bench_decode: no CUDA device visible to torch (use --smoke for the CPU)", file=sys.stderr)
        return 2
    return Run(args).main()


if __name__ == "__main__":
    sys.exit(main())
