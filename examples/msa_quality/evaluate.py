"""Evaluates the checkpoints of train.py: retrieval accuracy per length, needle by depth, index
recall, wall clock per generated token. Writes OUT/eval/<regime>.json.

- retrieval: held-out sequences (data.make_eval_batch, seed --eval-seed) at each --lengths; a query
  counts as answered when both value tokens are the argmax (teacher forced).
- needle: one queried record at depth d in --depths (fraction of the filler), at each
  --needle-lengths.
- index recall (MSA models): for each layer, query and GQA group, the model's own dense attention
  (softmax of the main branch's q.k, averaged over the group's query heads: the KL teacher) summed per
  key block; `coverage` = mass on the blocks the library's index_topk selected, `oracle` = mass on
  the best k blocks, `recall` = coverage / oracle. Only queries that see more than k blocks count (the
  others select everything). Dense attention is materialized: keep --recall-lengths small.
- decode: prefill a prompt of each --decode-lengths through the KV cache (model.extend), then time
  --gen-tokens greedy decode steps one by one (median per token).
Models run in their final mode: dense for "dense", sparse for "pt" / "cpt".
"""

import argparse
import json
import math
import os
import statistics
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import data  # noqa: E402
from model import KVCache, extend, load_checkpoint, project  # noqa: E402
from train import REGIMES, autocast, parse_lengths, sync  # noqa: E402
import msa.torch as mt  # noqa: E402


def chunks(n: int, length: int, max_tokens: int):
    per = max(1, max_tokens // length)
    for s in range(0, n, per):
        yield min(per, n - s)


@torch.no_grad()
def answer_stats(model, batch, args):
    dev = args.device
    tokens = torch.from_numpy(batch.tokens).to(dev)
    cu = torch.from_numpy(batch.cu_seqlens).to(dev)
    with autocast(dev, args.dtype):
        logits, _ = model(tokens, cu, batch.max_seqlen)
    pos = torch.from_numpy(batch.answer_pos - 1).to(dev)
    target = torch.from_numpy(batch.answer_tok).to(dev)
    tok_ok = logits[pos].argmax(-1) == target
    ok = tok_ok.view(-1, data.VALUE_LEN).all(-1)  # every token of each answer
    nll = torch.nn.functional.cross_entropy(logits[pos], target, reduction="sum")
    return ok.sum().item(), ok.numel(), nll.item(), tok_ok.sum().item()


def retrieval(model, args, lengths, n, depth=None):
    res = {}
    for L in lengths:
        hits = total = tok_hits = 0
        nll = 0.0
        for i, m in enumerate(chunks(n, L, args.eval_tokens)):
            b = data.make_eval_batch(args.eval_seed + i, L, m, needle_depth=depth)
            h, t, s, th = answer_stats(model, b, args)
            hits, total, nll, tok_hits = hits + h, total + t, nll + s, tok_hits + th
        # token_accuracy: each value token on its own (chance 1 / NUM_VALUE_TOKENS).
        n_tok = data.VALUE_LEN * total
        res[str(L)] = dict(accuracy=hits / total, token_accuracy=tok_hits / n_tok, queries=total,
                           answer_nll=nll / n_tok)
    return res


@torch.no_grad()
def index_recall(model, args):
    """Per layer: mean coverage, oracle mass and recall over the eligible (query, group) pairs."""
    out = {}
    for L in parse_lengths(args.recall_lengths):
        b = data.make_eval_batch(args.eval_seed + 7, L, 1)
        dev = args.device
        tokens = torch.from_numpy(b.tokens).to(dev)
        cu = torch.from_numpy(b.cu_seqlens).to(dev)
        captured = []
        hooks = [blk.attn.register_forward_pre_hook(
            lambda mod, a, i=i: captured.append((i, a[0].detach(), a[3]))) for i, blk in
            enumerate(model.blocks)]
        with autocast(dev, args.dtype):
            model(tokens, cu, b.max_seqlen)
        for h in hooks:
            h.remove()
        layers = []
        for i, hidden, positions in captured:
            attn = model.blocks[i].attn
            with autocast(dev, args.dtype):
                q, k, _, qi, ki = project(attn, hidden, positions)
            topk, _ = mt.index_topk(qi, ki, cu, cu, attn._cfg_args, L, L)
            layers.append(_coverage(q, k, topk, attn))
        out[str(L)] = dict(layers=layers, mean_recall=float(np.mean([x["recall"] for x in layers])),
                           mean_coverage=float(np.mean([x["coverage"] for x in layers])))
    return out


def _coverage(q, k, topk, attn):
    T, hq, d = q.shape
    hkv, B, kk = attn.num_kv_heads, attn.cfg.block_size, attn.cfg.topk
    scale = attn._cfg_args[1][0] or 1.0 / math.sqrt(d)
    qf = q.float().transpose(0, 1)                                       # [Hq, T, D]
    kf = k.float().repeat_interleave(hq // hkv, dim=1).transpose(0, 1)   # head h uses group h // G
    s = torch.matmul(qf, kf.transpose(1, 2)) * scale
    causal = torch.ones(T, T, dtype=torch.bool, device=q.device).tril()
    p = s.masked_fill(~causal, float("-inf")).softmax(-1)
    p = p.view(hkv, hq // hkv, T, T).mean(1)                             # [Hkv, T, T]
    nb = (T + B - 1) // B
    p = torch.nn.functional.pad(p, (0, nb * B - T)).view(hkv, T, nb, B).sum(-1)
    sel = torch.zeros(hkv, T, nb + 1, dtype=torch.bool, device=q.device)
    idx = topk.long().clone()
    idx[idx < 0] = nb                                                    # unused slots: a spare column
    sel.scatter_(2, idx, True)
    cover = (p * sel[..., :nb]).sum(-1)
    oracle = p.topk(min(kk, nb), dim=-1).values.sum(-1)
    eligible = torch.arange(T, device=q.device) // B + 1 > kk            # more visible blocks than k
    if not bool(eligible.any()):
        return dict(coverage=1.0, oracle=1.0, recall=1.0, queries=0)
    c, o = cover[:, eligible], oracle[:, eligible]
    return dict(coverage=c.mean().item(), oracle=o.mean().item(), recall=(c / o).mean().item(),
                queries=int(eligible.sum().item()) * hkv)


@torch.no_grad()
def decode_timing(model, args):
    res = {}
    dev = args.device
    for L in parse_lengths(args.decode_lengths):
        ex = data.make_example(np.random.default_rng([args.eval_seed, L, 99]), L, n_queries=1)
        prompt = torch.from_numpy(ex.tokens[: int(ex.answer_pos[0])]).to(dev)  # up to the question's key
        cache_dtype = torch.bfloat16 if args.dtype == "bfloat16" else torch.float32
        cache = KVCache(model, prompt.shape[0] + args.gen_tokens, dev, cache_dtype)
        with autocast(dev, args.dtype):
            sync(dev)
            t0 = time.perf_counter()
            logits = extend(model, prompt, cache)
            sync(dev)
            prefill = time.perf_counter() - t0
            tok = logits[-1].argmax().view(1)
            times = []
            for _ in range(args.gen_tokens):
                sync(dev)
                t0 = time.perf_counter()
                tok = extend(model, tok, cache)[-1].argmax().view(1)
                sync(dev)
                times.append(time.perf_counter() - t0)
        res[str(L)] = dict(prefill_s=prefill, per_token_s=statistics.median(times[1:] or times),
                           tokens=len(times))
    return res


def evaluate_regime(regime, args):
    ckpt = os.path.join(args.out, regime, "final")
    model, meta, _ = load_checkpoint(ckpt, args.device)
    model.eval()
    for blk in model.blocks:
        blk.attn.kl_coeff = 0.0  # no KL work at evaluation
    model.set_mode("dense" if regime == "dense" else "sparse")
    t0 = time.perf_counter()
    res = dict(regime=regime, mode=model.mode, step=meta.get("step"), config={
        k: meta[k] for k in ("d_model", "n_layers", "n_q_heads", "n_kv_heads", "head_dim",
                             "index_head_dim", "block_size", "topk", "kl_coeff")})
    res["retrieval"] = retrieval(model, args, parse_lengths(args.lengths), args.n_eval)
    res["needle"] = {str(d): retrieval(model, args, parse_lengths(args.needle_lengths),
                                       args.n_needle, depth=d)
                     for d in [float(x) for x in args.depths.split(",")]}
    if regime != "dense":
        res["index_recall"] = index_recall(model, args)
    res["decode"] = decode_timing(model, args)
    res["eval_wall_s"] = time.perf_counter() - t0
    os.makedirs(os.path.join(args.out, "eval"), exist_ok=True)
    with open(os.path.join(args.out, "eval", f"{regime}.json"), "w") as f:
        json.dump(res, f, indent=2)
    acc = {L: round(r["accuracy"], 3) for L, r in res["retrieval"].items()}
    print(f"[eval {regime}] retrieval {acc} ({res['eval_wall_s']:.0f} s)", flush=True)
    return res


def build_parser():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--out", default=os.environ.get("MSA_QUALITY_RUNS", "/tmp/msa_quality"))
    ap.add_argument("--regime", default="all", choices=REGIMES + ("all",))
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default=None, choices=["float32", "bfloat16"])
    ap.add_argument("--lengths", default="4096,8192,16384,32768")
    ap.add_argument("--n-eval", type=int, default=64, help="sequences per length")
    ap.add_argument("--needle-lengths", default="4096,16384")
    ap.add_argument("--depths", default="0,0.1,0.2,0.3,0.4,0.5,0.6,0.7,0.8,0.9,1")
    ap.add_argument("--n-needle", type=int, default=16, help="sequences per (depth, length)")
    ap.add_argument("--recall-lengths", default="4096")
    ap.add_argument("--decode-lengths", default="4096,32768")
    ap.add_argument("--gen-tokens", type=int, default=32)
    ap.add_argument("--eval-tokens", type=int, default=65536, help="tokens per forward")
    ap.add_argument("--eval-seed", type=int, default=1000)
    return ap


def finish_args(args):
    if args.dtype is None:
        args.dtype = "bfloat16" if torch.device(args.device).type == "cuda" else "float32"
    return args


def main(argv=None):
    args = finish_args(build_parser().parse_args(argv))
    for r in (REGIMES if args.regime == "all" else (args.regime,)):
        if os.path.exists(os.path.join(args.out, r, "final", "model.pt")):
            evaluate_regime(r, args)
        else:
            print(f"[eval {r}] no checkpoint under {args.out}/{r}/final, skipped")


if __name__ == "__main__":
    main()
