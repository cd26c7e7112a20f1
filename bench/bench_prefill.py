#!/usr/bin/env python3
"""Prefill benchmark: MSA (index top-k + sparse forward) against dense and block-sparse baselines.

One sequence (batch 1), bf16, B=128, k=16, contexts 8K..256K, configs Hq=64/Hkv=4/D=128 and
Hq=16/Hkv=1/D=128. Method, FLOP counts and every baseline are described in docs/benchmarks.md.
Needs a CUDA GPU, torch and the msa extension on PYTHONPATH (scripts/device_run.sh sets it).

    python3 bench/bench_prefill.py --quick                  # 8K and 32K
    python3 bench/bench_prefill.py --out bench/results/     # full run, file named after device+commit
"""
from __future__ import annotations

import argparse
import inspect
import math
import os
import sys
import time
import traceback

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common as C  # noqa: E402

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

BLOCK = 128          # B: key/value block, and the query-block granularity of the Flex mask
TOPK = 16            # k: blocks per (query, group), local block included
INDEX_DIM = 128      # Di
UNION_TILE = 64      # query tile over which the union of selected blocks is reported
CONFIGS = {
    "hq64_hkv4_d128": dict(hq=64, hkv=4, d=128),
    "hq16_hkv1_d128": dict(hq=16, hkv=1, d=128),
}
FULL_CONTEXTS = [8192, 32768, 65536, 131072, 262144]
QUICK_CONTEXTS = [8192, 32768]
MSA_METHODS = ["msa_index_topk", "msa_sparse_forward", "msa_total"]
DENSE_METHODS = ["cudnn_dense", "fa2_dense"]
DEVICE = "cuda"      # the tests of this script swap in "cpu"
ALL_METHODS = MSA_METHODS + DENSE_METHODS + ["torch_topk", "flex_block_sparse"]


def parse_contexts(text: str):
    out = []
    for tok in text.split(","):
        tok = tok.strip().lower()
        if not tok:
            continue
        mult = 1024 if tok.endswith("k") else 1
        out.append(int(tok.rstrip("k")) * mult)
    return out


def build_parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="contexts 8K and 32K only, fewer iterations")
    p.add_argument("--contexts", type=parse_contexts, default=None,
                   help="comma list, e.g. 8k,32k,131072 (overrides --quick's list)")
    p.add_argument("--configs", default=",".join(CONFIGS), help="comma list of " + ", ".join(CONFIGS))
    p.add_argument("--out", default=None,
                   help="JSON path, or a directory (ends in / or exists) for the default name "
                        "prefill_<device>_<commit8>[_quick].json; default bench/results/")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--iters", type=int, default=None, help="timed calls per method (default 20, quick 10)")
    p.add_argument("--target-s", type=float, default=1.5,
                   help="cap on one method's timed loop; long calls get fewer iterations, at least 3")
    p.add_argument("--time-budget", type=float, default=None,
                   help="seconds for the whole run; work past it is recorded as skipped")
    p.add_argument("--skip", default="", help="comma list of methods to leave out: " + ", ".join(ALL_METHODS))
    p.add_argument("--iid-context", type=int, default=32768,
                   help="context of the worst-case run with i.i.d. index queries (0: none)")
    p.add_argument("--qi-noise", type=float, default=0.1,
                   help="noise on the smooth index queries, relative to their unit-scale signal")
    p.add_argument("--qi-period", type=int, default=512,
                   help="spacing in tokens of the random anchors the smooth index queries interpolate")
    p.add_argument("--check-queries", type=int, default=8,
                   help="queries per case checked against a torch fp32 reference (0: no check)")
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--resume", action="store_true",
                   help="keep the rows of an existing --out file (same device and commit) and run "
                        "only the missing ones")
    return p


# ---- problem sizes and FLOP counts --------------------------------------------------------------
def sparse_visible_keys(L: int) -> int:
    """Visible keys summed over queries when every query selects min(l+1, k) blocks (SPEC): the
    non-local blocks are fully visible (they precede the local block l) and the local block
    contributes its causal prefix p - l*B + 1. Independent of which blocks were chosen."""
    total = 0
    nblocks = (L + BLOCK - 1) // BLOCK
    for l in range(nblocks):
        rows = min(BLOCK, L - l * BLOCK)
        total += rows * min(l, TOPK - 1) * BLOCK + rows * (rows + 1) // 2
    return total


def sparse_flops(L: int, hq: int, d: int) -> float:
    return 4.0 * d * hq * sparse_visible_keys(L)


def dense_flops(L: int, hq: int, d: int) -> float:
    return 4.0 * d * hq * L * (L + 1) / 2


# ---- inputs -------------------------------------------------------------------------------------
def make_inputs(L, hq, hkv, d, index_mode, gen, args):
    """Random normal main-branch inputs. Index inputs: keys carry a per-block direction (tokens of one
    block are about one topic) and queries either drift smoothly with position (neighbours share
    blocks: 'smooth') or are i.i.d. ('iid', the worst case for block reuse)."""
    import torch
    dev, bf16 = DEVICE, torch.bfloat16
    q = torch.randn(L, hq, d, device=dev, dtype=bf16, generator=gen)
    k = torch.randn(L, hkv, d, device=dev, dtype=bf16, generator=gen)
    v = torch.randn(L, hkv, d, device=dev, dtype=bf16, generator=gen)
    nb = (L + BLOCK - 1) // BLOCK
    topic = torch.randn(nb, INDEX_DIM, device=dev, generator=gen)
    ki = torch.randn(L, INDEX_DIM, device=dev, generator=gen)
    ki += topic.repeat_interleave(BLOCK, dim=0)[:L]
    ki = ki.to(bf16)
    if index_mode == "iid":
        qi = torch.randn(L, hkv, INDEX_DIM, device=dev, dtype=bf16, generator=gen)
    else:
        period = max(1, args.qi_period)
        na = L // period + 2
        anchors = torch.randn(na, hkv, INDEX_DIM, device=dev, generator=gen)
        pos = torch.arange(L, device=dev, dtype=torch.float32) / period
        i0 = pos.floor().long()
        w = (pos - i0)[:, None, None]
        smooth = anchors[i0] * (1 - w) + anchors[i0 + 1] * w
        smooth = smooth / smooth.norm(dim=-1, keepdim=True).clamp_min(1e-6) * math.sqrt(INDEX_DIM)
        noise = torch.randn(L, hkv, INDEX_DIM, device=dev, generator=gen)
        qi = (smooth + args.qi_noise * noise).to(bf16)
        del anchors, smooth, noise, pos, i0, w
    return dict(q=q, k=k, v=v, qi=qi, ki=ki)


def union_blocks_per_tile(topk, L, tile):
    """Mean number of distinct blocks selected by the queries of a `tile`-query tile, per group."""
    import torch
    hkv, _, kk = topk.shape
    nb = (L + BLOCK - 1) // BLOCK
    ntile = (L + tile - 1) // tile
    pad = ntile * tile - L
    t = topk.long()
    t = torch.where(t < 0, torch.full_like(t, nb), t)          # -1 -> a dummy column
    if pad:
        t = torch.cat([t, torch.full((hkv, pad, kk), nb, dtype=t.dtype, device=t.device)], dim=1)
    t = t.reshape(hkv, ntile, tile * kk)
    mark = torch.zeros(hkv, ntile, nb + 1, dtype=torch.bool, device=t.device)
    mark.scatter_(2, t, True)
    return mark[:, :, :nb], float(mark[:, :, :nb].sum(-1).float().mean().item())


# ---- msa ----------------------------------------------------------------------------------------
def make_msa_config(msa, hq, hkv, d):
    kw = dict(num_q_heads=hq, num_kv_heads=hkv, head_dim=d, index_head_dim=INDEX_DIM,
              block_size=BLOCK, topk=TOPK, scale=0.0, index_scale=0.0)
    try:
        return msa.Config(**kw)
    except TypeError:
        cfg = msa.Config()
        for name, val in kw.items():
            setattr(cfg, name, val)
        return cfg


class MsaCase:
    """Preallocated outputs and workspaces, so the timed calls do no allocation. Subclasses name the
    ops they need workspaces for in OPS (bench_training.TrainCase adds the backward ops)."""

    OPS = ("index_topk", "sparse_forward")

    def __init__(self, msa, cfg, x, L, hq, hkv):
        import torch
        self.msa, self.cfg, self.x, self.L = msa, cfg, x, L
        dev = DEVICE
        self.cu = torch.tensor([0, L], dtype=torch.int32, device=dev)
        self.topk = torch.full((hkv, L, TOPK), -1, dtype=torch.int32, device=dev)
        self.out = torch.empty_like(x["q"])
        self.lse = torch.empty(L, hq, dtype=torch.float32, device=dev)
        self.stream = torch.cuda.current_stream().cuda_stream if DEVICE == "cuda" else 0
        self.ws = {}
        self.notes = []
        for op in self.OPS if msa is not None else ():
            try:
                try:
                    nbytes = msa.workspace_bytes(op, cfg, self.cu, self.cu, L, L, max_seqlen_q=L,
                                                 max_seqlen_k=L, dtype=str(x["q"].dtype)[6:])
                except TypeError:  # an extension without the dtype argument
                    nbytes = msa.workspace_bytes(op, cfg, self.cu, self.cu, L, L)
                nbytes = int(nbytes)
                self.ws[op] = torch.empty(max(1, nbytes), dtype=torch.uint8, device=dev)
            except Exception as e:  # an internal allocation still works; note why
                self.ws[op] = None
                self.notes.append(f"workspace_bytes({op}) failed: {C.short_error(e)}")

    def common(self, op):
        return dict(max_seqlen_q=self.L, max_seqlen_k=self.L, stream=self.stream, workspace=self.ws[op])

    def index_topk(self):
        x = self.x
        self.msa.index_topk(self.cfg, x["qi"], x["ki"], self.cu, self.cu, self.topk,
                            **self.common("index_topk"))

    def forward(self):
        x = self.x
        self.msa.sparse_attention_forward(self.cfg, x["q"], x["k"], x["v"], self.topk, self.cu, self.cu,
                                          self.out, self.lse, **self.common("sparse_forward"))

    def total(self):
        self.index_topk()
        self.forward()


def check_msa(case, hq, hkv, d, nq, gen_seed):
    """Spot check of a few queries against torch fp32: selection (each chosen block within tolerance
    of the k-1-th best, local block last) and the main-branch output/lse over the chosen blocks."""
    import torch
    L, x = case.L, case.x
    g = torch.Generator().manual_seed(gen_seed)
    picks = sorted(set([L - 1, min(L - 1, TOPK * BLOCK + 5)] +
                       torch.randint(0, L, (max(0, nq - 2),), generator=g).tolist()))
    iscale, scale = INDEX_DIM ** -0.5, d ** -0.5
    G = hq // hkv
    worst_gap, sel_ok, err_num, err_den, lse_err = 0.0, True, 0.0, 0.0, 0.0
    topk = case.topk.cpu()
    for p in picks:
        l = p // BLOCK
        for grp in range(hkv):
            s = iscale * (x["ki"][: p + 1].float() @ x["qi"][p, grp].float())
            padded = torch.full(((l + 1) * BLOCK,), float("-inf"), device=s.device)
            padded[: p + 1] = s
            bs = padded.view(l + 1, BLOCK).max(dim=1).values.cpu()
            row = topk[grp, p].tolist()
            n = min(l, TOPK - 1)
            chosen = [b for b in row if b >= 0]
            if (len(chosen) != n + 1 or row[n] != l or len(set(chosen)) != len(chosen)
                    or any(b > l for b in chosen) or any(b != -1 for b in row[n + 1:])):
                sel_ok = False
                continue
            if n > 0:
                kth = torch.topk(bs[:l], n).values[-1].item()
                gap = kth - min(bs[b].item() for b in chosen[:n])
                worst_gap = max(worst_gap, gap)
                if gap > 2e-2:
                    sel_ok = False
            keys = torch.cat([torch.arange(b * BLOCK, min((b + 1) * BLOCK, p + 1)) for b in chosen])
            kk = x["k"][keys.to(x["k"].device), grp].float()
            vv = x["v"][keys.to(x["v"].device), grp].float()
            qq = x["q"][p, grp * G:(grp + 1) * G].float()
            logits = scale * qq @ kk.T
            ref = torch.softmax(logits, dim=-1) @ vv
            ref_lse = torch.logsumexp(logits, dim=-1)
            got = case.out[p, grp * G:(grp + 1) * G].float()
            err_num += (got - ref).pow(2).sum().item()
            err_den += ref.pow(2).sum().item()
            lse_err = max(lse_err, (case.lse[p, grp * G:(grp + 1) * G] - ref_lse).abs().max().item())
    rel = math.sqrt(err_num / err_den) if err_den > 0 else float("nan")
    ok = sel_ok and rel < 2e-2 and lse_err < 2e-2 and not math.isnan(rel)
    return {"ok": bool(ok), "queries": len(picks), "selection_ok": bool(sel_ok),
            "max_score_gap": worst_gap, "out_rel_err": rel, "lse_max_abs_err": lse_err}


# ---- baselines ----------------------------------------------------------------------------------
def bhld(t):
    """[L, H, D] -> [1, H, L, D] view (no copy): the layout SDPA and Flex take."""
    return t.unsqueeze(0).transpose(1, 2)


def sdpa_calls(backend_name, sets, hq, hkv):
    """Returns (calls, gqa_mode, note). Tries native GQA (enable_gqa=True) first, then K/V expanded
    to Hq heads with repeat_interleave (memory of the expansion is allocated outside the timing)."""
    import torch
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel
    backend = getattr(SDPBackend, backend_name)
    G = hq // hkv

    def make(gqa_native):
        calls = []
        for x in sets:
            q4 = bhld(x["q"])
            if gqa_native:
                k4, v4 = bhld(x["k"]), bhld(x["v"])
            else:
                k4 = bhld(x["k"].repeat_interleave(G, dim=1))
                v4 = bhld(x["v"].repeat_interleave(G, dim=1))

            def call(q4=q4, k4=k4, v4=v4):
                with sdpa_kernel([backend]):
                    return F.scaled_dot_product_attention(q4, k4, v4, is_causal=True,
                                                          enable_gqa=gqa_native)
            calls.append(call)
        return calls

    return C.first_gqa_variant(make, G, torch.cuda.synchronize, torch.cuda.empty_cache)


_FLEX = None


def flex_fn():
    global _FLEX
    if _FLEX is None:
        import torch
        from torch.nn.attention.flex_attention import flex_attention
        try:
            torch._dynamo.config.cache_size_limit = max(64, torch._dynamo.config.cache_size_limit)
            if hasattr(torch._dynamo.config, "recompile_limit"):
                torch._dynamo.config.recompile_limit = max(64, torch._dynamo.config.recompile_limit)
        except Exception:
            pass
        _FLEX = torch.compile(flex_attention, dynamic=False)
    return _FLEX


def causal_mask_mod(b, h, q_idx, kv_idx):
    """Module-level on purpose: a new function object per mask would make torch.compile recompile."""
    return q_idx >= kv_idx


def flex_block_mask(topk, L, hq, hkv):
    """BlockMask at 128x128 granularity from OUR selection: query block Q (queries Q*128..Q*128+127)
    of group g sees the union over its queries of the blocks they selected; blocks of the union
    before Q are full blocks, block Q itself is causal (mask_mod q >= kv). Each query head uses its
    group's mask. Returns the mask and the keys it makes visible (summed over heads and queries)."""
    import torch
    from torch.nn.attention.flex_attention import BlockMask
    nb = (L + BLOCK - 1) // BLOCK
    mark, _ = union_blocks_per_tile(topk, L, BLOCK)               # [hkv, nQ, nKV] bool
    diag = torch.eye(nb, dtype=torch.bool, device=topk.device)[None]
    full = mark & ~diag                                            # strictly-before blocks only
    full_num = full.sum(-1, dtype=torch.int32)                     # [hkv, nQ]
    full_idx = torch.argsort((~full).to(torch.int8), dim=-1, stable=True).to(torch.int32)
    part_num = torch.ones(hkv, nb, dtype=torch.int32, device=topk.device)
    part_idx = torch.arange(nb, dtype=torch.int32, device=topk.device)[None, :, None].expand(hkv, nb, nb)
    G = hq // hkv

    def per_head(t):  # [hkv, ...] -> [1, hq, ...], head h uses group h // G
        return t.repeat_interleave(G, dim=0).unsqueeze(0).contiguous()

    kwargs = dict(BLOCK_SIZE=BLOCK, mask_mod=causal_mask_mod)
    params = inspect.signature(BlockMask.from_kv_blocks).parameters
    if "compute_q_blocks" in params:
        kwargs["compute_q_blocks"] = False                          # forward only
    if "seq_lengths" in params:
        kwargs["seq_lengths"] = (L, L)
    bm = BlockMask.from_kv_blocks(per_head(part_num), per_head(part_idx.contiguous()),
                                  per_head(full_num), per_head(full_idx), **kwargs)
    # Keys computed: full blocks B*B each, plus the causal diagonal, for every head of the group.
    rows_last = L - (nb - 1) * BLOCK
    diag_keys = (nb - 1) * BLOCK * (BLOCK + 1) // 2 + rows_last * (rows_last + 1) // 2
    keys = G * (int(full_num.sum().item()) * BLOCK * BLOCK + hkv * diag_keys)
    return bm, keys


def topk_scores(L, hkv, gen):
    """Random block scores [Hkv*L, nblocks] fp32, -inf for blocks after each query's local block."""
    import torch
    nb = (L + BLOCK - 1) // BLOCK
    s = torch.randn(hkv * L, nb, device=DEVICE, generator=gen)
    local = (torch.arange(hkv * L, device=DEVICE) % L) // BLOCK
    s.masked_fill_(torch.arange(nb, device=DEVICE)[None, :] > local[:, None], float("-inf"))
    return s


# ---- the run ------------------------------------------------------------------------------------
class ContextLost(RuntimeError):
    """A kernel fault poisoned the CUDA context: nothing more can run in this process."""


def flash_impl(torch):
    try:
        import torch.nn.attention as A
        impl = A.current_flash_attention_impl() if hasattr(A, "current_flash_attention_impl") else None
        if impl:
            return impl
        tag = A._get_flash_version() if hasattr(A, "_get_flash_version") else "?"
        return f"FA2 (built into torch, tag {tag})"
    except Exception as e:
        return f"unknown ({C.short_error(e, 80)})"


def cudnn_version(torch):
    try:
        return torch.backends.cudnn.version()
    except Exception as e:
        return f"unknown ({C.short_error(e, 80)})"


class Run:
    def __init__(self, args):
        import torch
        self.args = args
        self.torch = torch
        self.budget = C.Budget(args.time_budget)
        self.skip = {s.strip() for s in args.skip.split(",") if s.strip()}
        unknown = self.skip - set(ALL_METHODS)
        if unknown:
            raise SystemExit(f"--skip: unknown methods {sorted(unknown)}")
        self.iters = args.iters or (10 if args.quick else 20)
        self.contexts = args.contexts or (QUICK_CONTEXTS if args.quick else FULL_CONTEXTS)
        self.configs = [c.strip() for c in args.configs.split(",") if c.strip()]
        for c in self.configs:
            if c not in CONFIGS:
                raise SystemExit(f"--configs: unknown {c}; known: {', '.join(CONFIGS)}")
        self.device = torch.cuda.get_device_name()
        self.commit = C.git_commit(REPO_ROOT)
        self.l2 = C.l2_bytes()
        self.out_path = self.resolve_out()
        self.rows = []
        self.cases = {}
        self.msa = None
        self.msa_error = None
        try:
            import msa
            self.msa = msa
            if hasattr(msa, "cuda_available") and not msa.cuda_available():
                self.msa_error = "msa.cuda_available() is False (extension built without CUDA?)"
        except Exception as e:
            self.msa_error = f"import msa failed: {C.short_error(e)}"
        self.doc = {
            "benchmark": "prefill",
            "commit": self.commit,
            "device": self.device,
            "torch": torch.__version__,
            "cuda": torch.version.cuda,
            "cudnn": cudnn_version(torch),
            "timestamp": C.utc_timestamp(),
            "config": {
                "dtype": "bfloat16", "batch": 1, "block_size": BLOCK, "topk": TOPK,
                "index_head_dim": INDEX_DIM, "union_tile": UNION_TILE,
                "configs": {c: CONFIGS[c] for c in self.configs}, "contexts": self.contexts,
                "quick": bool(args.quick), "warmup": args.warmup, "iters": self.iters,
                "target_s": args.target_s, "iid_context": args.iid_context,
                "qi_noise": args.qi_noise, "qi_period": args.qi_period, "seed": args.seed,
                "l2_bytes": self.l2, "time_budget_s": args.time_budget,
                "msa_module": getattr(self.msa, "__file__", None), "msa_error": self.msa_error,
                "flash_attention_impl": flash_impl(torch),
                "env": {k: v for k, v in sorted(os.environ.items()) if k.startswith("MSA_")},
            },
            "rows": self.rows,
            "cases": [],
        }
        self.done = set()
        if args.resume:
            self.load_previous()

    def load_previous(self):
        import json
        if not os.path.exists(self.out_path):
            return
        try:
            with open(self.out_path) as f:
                old = json.load(f)
        except (OSError, ValueError) as e:
            print(f"--resume: cannot read {self.out_path}: {e}; starting afresh", flush=True)
            return
        if old.get("device") != self.device or old.get("commit") != self.commit:
            print("--resume: previous file is from another device or commit; starting afresh", flush=True)
            return
        self.rows.extend(old.get("rows", []))
        for rec in old.get("cases", []):
            self.cases[(rec["config"], rec["context"], rec["inputs"])] = rec
        self.done = {(r["config"], r["context"], r["inputs"], r["method"]) for r in self.rows}
        self.doc["resumed_from"] = {"timestamp": old.get("timestamp"), "rows": len(self.rows),
                                    "context_lost": old.get("context_lost")}
        print(f"--resume: kept {len(self.rows)} rows of {self.out_path}", flush=True)

    def ensure_alive(self):
        torch = self.torch
        try:
            torch.cuda.synchronize()
            t = torch.ones(1, device=DEVICE)
            t += 1
            float(t.item())
        except Exception as e:
            raise ContextLost(C.short_error(e))

    # -- bookkeeping --
    def resolve_out(self):
        name = f"prefill_{C.slug(self.device)}_{self.commit[:8]}{'_quick' if self.args.quick else ''}.json"
        out = self.args.out or os.path.join(REPO_ROOT, "bench", "results") + os.sep
        if out.endswith(os.sep) or os.path.isdir(out):
            return os.path.join(out, name)
        return out

    def save(self):
        self.doc["cases"] = list(self.cases.values())
        C.write_json_atomic(self.out_path, self.doc)

    def add(self, cfg_name, L, inputs, method, **fields):
        row = dict(config=cfg_name, context=L, inputs=inputs, method=method, **fields)
        self.rows.append(row)
        msg = row.get("error") or (f"{row['ms_median']:.3f} ms" if "ms_median" in row else "")
        print(f"[{cfg_name} L={L} {inputs}] {method}: {msg}", flush=True)
        self.save()
        return row

    def case(self, cfg_name, L, inputs):
        key = (cfg_name, L, inputs)
        if key not in self.cases:
            self.cases[key] = {"config": cfg_name, "context": L, "inputs": inputs}
        return self.cases[key]

    def measure(self, cfg_name, L, inputs, method, calls, flops=None, **extra):
        if self.budget.exhausted(reserve=5):
            return self.add(cfg_name, L, inputs, method, error="skipped: time budget", **extra)
        torch = self.torch
        try:
            t0 = time.perf_counter()
            res = C.cuda_time(calls, warmup=self.args.warmup, iters=self.iters,
                              target_s=self.args.target_s)
            res["wall_s"] = round(time.perf_counter() - t0, 3)
            if flops is not None:
                res["flops"] = flops
                res["tflops"] = C.tflops(flops, res["ms_median"])
            return self.add(cfg_name, L, inputs, method, **res, **extra)
        except Exception as e:
            row = self.add(cfg_name, L, inputs, method, error=C.short_error(e), **extra)
            self.ensure_alive()
            torch.cuda.empty_cache()
            return row

    def fits(self, L, hq, hkv, d):
        """256K only where memory allows: inputs of one set plus the largest baseline transient."""
        torch = self.torch
        free, _ = torch.cuda.mem_get_info()
        nb = (L + BLOCK - 1) // BLOCK
        inputs = 2 * L * hq * d * 2 + 2 * L * hkv * d * 2 + L * (hkv + 1) * INDEX_DIM * 2 + L * hq * 4
        transient = max(3 * L * hq * d * 2,                       # expanded K, V and SDPA's output
                        2 * hkv * L * nb * 4,                     # torch.topk scores (+ temporaries)
                        8 * hq * nb * nb + 3 * L * hq * d * 2)    # Flex mask indices and copies
        need = inputs + transient + hkv * L * TOPK * 4
        return need < 0.85 * free, need, free

    # -- one (config, context, inputs) case --
    def make_sets(self, L, hq, hkv, d, inputs):
        torch = self.torch
        gen = torch.Generator(device=DEVICE)
        gen.manual_seed(self.args.seed + L + 7 * hq + (1 if inputs == "iid" else 0))
        first = make_inputs(L, hq, hkv, d, inputs, gen, self.args)
        nsets = C.rotation_sets(C.tensor_bytes(*first.values()), self.l2)
        return [first] + [make_inputs(L, hq, hkv, d, inputs, gen, self.args) for _ in range(nsets - 1)]

    def run_case(self, cfg_name, L, inputs, methods):
        torch = self.torch
        methods = [m for m in methods if (cfg_name, L, inputs, m) not in self.done]
        if not methods:
            return
        p = CONFIGS[cfg_name]
        hq, hkv, d = p["hq"], p["hkv"], p["d"]
        ok, need, free = self.fits(L, hq, hkv, d)
        if not ok:
            for m in methods:
                self.add(cfg_name, L, inputs, m,
                         error=f"skipped: needs ~{need / 2**30:.1f} GiB, {free / 2**30:.1f} GiB free")
            return
        sets = self.make_sets(L, hq, hkv, d, inputs)
        rec = self.case(cfg_name, L, inputs)
        rec["input_sets"] = len(sets)
        msa_cases = []
        if self.msa is not None and self.msa_error is None:
            try:
                mcfg = make_msa_config(self.msa, hq, hkv, d)
                msa_cases = [MsaCase(self.msa, mcfg, x, L, hq, hkv) for x in sets]
                for mc in msa_cases:
                    mc.total()
                torch.cuda.synchronize()
            except Exception as e:
                err = C.short_error(e)
                msa_cases = []
                for m in methods:
                    if m in MSA_METHODS or m == "flex_block_sparse":
                        self.add(cfg_name, L, inputs, m, error=f"msa failed: {err}")
                self.ensure_alive()
                torch.cuda.empty_cache()
        elif any(m in MSA_METHODS or m == "flex_block_sparse" for m in methods):
            for m in methods:
                if m in MSA_METHODS or m == "flex_block_sparse":
                    self.add(cfg_name, L, inputs, m, error=self.msa_error or "msa unavailable")

        sflops = sparse_flops(L, hq, d)
        dflops = dense_flops(L, hq, d)
        if msa_cases:
            mc0 = msa_cases[0]
            stats = {}
            try:
                _, u64 = union_blocks_per_tile(mc0.topk, L, UNION_TILE)
                _, u128 = union_blocks_per_tile(mc0.topk, L, BLOCK)
                valid = (mc0.topk >= 0).sum(-1).float().mean().item()
                stats = {"union_blocks_per_64q_tile": u64, "union_blocks_per_128q_tile": u128,
                         "selected_blocks_per_query": valid}
            except Exception as e:
                stats = {"stats_error": C.short_error(e)}
            rec.update(stats)
            if self.args.check_queries > 0 and "check" not in rec:
                try:
                    rec["check"] = check_msa(mc0, hq, hkv, d, self.args.check_queries, self.args.seed)
                except Exception as e:
                    rec["check"] = {"ok": False, "error": C.short_error(e)}
            if mc0.notes:
                rec["notes"] = mc0.notes
            if "msa_index_topk" in methods:
                self.measure(cfg_name, L, inputs, "msa_index_topk", [m.index_topk for m in msa_cases],
                             **stats)
            if "msa_sparse_forward" in methods:
                self.measure(cfg_name, L, inputs, "msa_sparse_forward", [m.forward for m in msa_cases],
                             flops=sflops)
            if "msa_total" in methods:
                self.measure(cfg_name, L, inputs, "msa_total", [m.total for m in msa_cases],
                             flops=sflops, flops_note="main branch only")

        for method, backend in (("cudnn_dense", "CUDNN_ATTENTION"), ("fa2_dense", "FLASH_ATTENTION")):
            if method not in methods:
                continue
            if self.budget.exhausted(reserve=5):
                self.add(cfg_name, L, inputs, method, error="skipped: time budget")
                continue
            try:
                calls, mode, note = sdpa_calls(backend, sets, hq, hkv)
            except Exception as e:
                self.add(cfg_name, L, inputs, method, error=C.short_error(e))
                self.ensure_alive()
                torch.cuda.empty_cache()
                continue
            extra = {"gqa": mode}
            if note:
                extra["note"] = note
            self.measure(cfg_name, L, inputs, method, calls, flops=dflops, **extra)
            del calls
            torch.cuda.empty_cache()

        if "torch_topk" in methods and not self.budget.exhausted(reserve=5):
            try:
                gen = torch.Generator(device=DEVICE)
                gen.manual_seed(self.args.seed + 99)
                nb = (L + BLOCK - 1) // BLOCK
                first = topk_scores(L, hkv, gen)
                nsets = C.rotation_sets(C.tensor_bytes(first), self.l2)
                scores = [first] + [topk_scores(L, hkv, gen) for _ in range(nsets - 1)]
                self.measure(cfg_name, L, inputs, "torch_topk",
                             [lambda s=s: torch.topk(s, TOPK, dim=-1) for s in scores],
                             shape=[hkv * L, nb])
                del scores, first
                torch.cuda.empty_cache()
            except Exception as e:
                self.add(cfg_name, L, inputs, "torch_topk", error=C.short_error(e))
                self.ensure_alive()
                torch.cuda.empty_cache()
        elif "torch_topk" in methods:
            self.add(cfg_name, L, inputs, "torch_topk", error="skipped: time budget")

        if "flex_block_sparse" in methods and msa_cases:
            if self.budget.exhausted(reserve=30):
                self.add(cfg_name, L, inputs, "flex_block_sparse", error="skipped: time budget")
            else:
                try:
                    flex = flex_fn()
                    calls, keys = [], None
                    for mc in msa_cases:
                        bm, keys = flex_block_mask(mc.topk, L, hq, hkv)
                        q4 = bhld(mc.x["q"]).contiguous()
                        k4 = bhld(mc.x["k"]).contiguous()
                        v4 = bhld(mc.x["v"]).contiguous()
                        calls.append(lambda q4=q4, k4=k4, v4=v4, bm=bm:
                                     flex(q4, k4, v4, block_mask=bm, enable_gqa=(hq != hkv)))
                    t0 = time.perf_counter()
                    calls[0]()
                    torch.cuda.synchronize()
                    compile_s = round(time.perf_counter() - t0, 2)
                    self.measure(cfg_name, L, inputs, "flex_block_sparse", calls, flops=4.0 * d * keys,
                                 first_call_s=compile_s, mask="union_per_128q_block",
                                 flops_note="keys the block mask makes visible")
                    del calls
                except Exception as e:
                    traceback.print_exc()
                    self.add(cfg_name, L, inputs, "flex_block_sparse", error=C.short_error(e))
                    self.ensure_alive()
                torch.cuda.empty_cache()

        self.summarize_case(cfg_name, L, inputs)
        del sets, msa_cases
        torch.cuda.empty_cache()

    def summarize_case(self, cfg_name, L, inputs):
        rec = self.case(cfg_name, L, inputs)
        ms = {r["method"]: r["ms_median"] for r in self.rows
              if r["config"] == cfg_name and r["context"] == L and r["inputs"] == inputs and "ms_median" in r}
        dense = {m: ms[m] for m in DENSE_METHODS if m in ms}
        if dense:
            best = min(dense, key=dense.get)
            rec["best_dense"], rec["best_dense_ms"] = best, dense[best]
            for m in ("msa_total", "msa_sparse_forward", "flex_block_sparse"):
                if m in ms:
                    rec[f"speedup_{m}_vs_best_dense"] = dense[best] / ms[m]
        self.save()

    def main(self):
        torch = self.torch
        print(f"device={self.device} torch={torch.__version__} commit={self.commit} L2={self.l2} "
              f"out={self.out_path}", flush=True)
        if self.msa_error:
            print(f"WARNING: {self.msa_error}", flush=True)
        core = [m for m in MSA_METHODS + DENSE_METHODS + ["torch_topk"] if m not in self.skip]
        flex = [] if "flex_block_sparse" in self.skip else ["flex_block_sparse"]
        # Pass 1: MSA and dense for every case (the headline); pass 2: Flex (compiles per shape);
        # pass 3: the i.i.d. worst case. A time budget cuts the later passes first.
        plan = [(c, L, "smooth", core) for c in self.configs for L in self.contexts]
        plan += [(c, L, "smooth", flex) for c in self.configs for L in self.contexts if flex]
        if self.args.iid_context:
            iid = [m for m in MSA_METHODS + flex if m not in self.skip]
            plan += [(c, self.args.iid_context, "iid", iid) for c in self.configs]
        rc = 0
        for cfg_name, L, inputs, methods in plan:
            if not methods:
                continue
            try:
                try:
                    self.run_case(cfg_name, L, inputs, methods)
                except ContextLost:
                    raise
                except Exception as e:  # a failure outside one method: record it, go on
                    traceback.print_exc()
                    for m in methods:
                        if (cfg_name, L, inputs, m) not in self.done and not any(
                                (r["config"], r["context"], r["inputs"], r["method"]) ==
                                (cfg_name, L, inputs, m) for r in self.rows):
                            self.add(cfg_name, L, inputs, m, error=f"case failed: {C.short_error(e)}")
                    self.ensure_alive()
                    torch.cuda.empty_cache()
            except ContextLost as e:
                self.doc["context_lost"] = f"{cfg_name} L={L} {inputs}: {e}"
                print(f"CUDA context lost at {cfg_name} L={L} {inputs}: {e}\n"
                      "rerun with --resume --skip msa_index_topk,msa_sparse_forward,msa_total,"
                      "flex_block_sparse for the remaining baselines", flush=True)
                rc = 3
                break
        self.doc["wall_s"] = round(time.perf_counter() - self.budget.t0, 1)
        self.save()
        self.print_summary()
        return rc

    def print_summary(self):
        print(f"\n== bench summary ({self.device}, commit {self.commit[:12]}) -> {self.out_path}")
        headers = ["config", "L", "in", "idx", "fwd", "total", "cudnn", "fa2", "flex", "topk",
                   "x_dense", "u64", "check"]
        table = []
        keys = sorted(self.cases, key=lambda k: (k[0], k[2] != "smooth", k[1]))
        for key in keys:
            rec = self.cases[key]
            cfg_name, L, inputs = key
            ms = {}
            for r in self.rows:
                if (r["config"], r["context"], r["inputs"]) == key:
                    ms[r["method"]] = C.fmt_ms(r["ms_median"]) if "ms_median" in r else "err"
            sp = rec.get("speedup_msa_total_vs_best_dense")
            chk = rec.get("check", {})
            table.append([cfg_name, f"{L // 1024}K", inputs] +
                         [ms.get(m, "-") for m in ("msa_index_topk", "msa_sparse_forward", "msa_total",
                                                   "cudnn_dense", "fa2_dense", "flex_block_sparse",
                                                   "torch_topk")] +
                         [f"{sp:.2f}" if sp else "-",
                          f"{rec['union_blocks_per_64q_tile']:.1f}" if "union_blocks_per_64q_tile" in rec else "-",
                          ("ok" if chk.get("ok") else "FAIL") if chk else "-"])
        C.print_table(headers, table)
        print("(ms medians; x_dense = best dense / msa_total; u64 = mean blocks in the union of a "
              "64-query tile; errors are in the JSON)")


def main(argv=None):
    args = build_parser().parse_args(argv)
    import torch
    if not torch.cuda.is_available():
        print("bench_prefill: no CUDA device visible to torch", file=sys.stderr)
        return 2
    return Run(args).main()


if __name__ == "__main__":
    sys.exit(main())
