"""Answers a retrieval prompt with a trained checkpoint (GPU or CPU).

    python3 examples/msa_quality/demo.py --ckpt /tmp/msa_quality/pt/final [--length 8192] \
        [--depth 0.3] [--mode sparse|dense] [--device cuda]

Builds a held-out needle prompt (data.make_example: records in filler, the question
`QUERY k` at the end), prefills it through the KV cache and greedily generates the value
token(s), then prints the record, the expected and the generated answer.
"""

import argparse
import os
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import data  # noqa: E402
from model import KVCache, extend, load_checkpoint  # noqa: E402
from train import autocast, sync  # noqa: E402


def answer(model, prompt: np.ndarray, device: str, dtype: str, n: int = data.VALUE_LEN):
    cache = KVCache(model, len(prompt) + n, device,
                    torch.bfloat16 if dtype == "bfloat16" else torch.float32)
    out = []
    with torch.no_grad(), autocast(device, dtype):
        logits = extend(model, torch.from_numpy(prompt).to(device), cache)
        for _ in range(n):
            tok = logits[-1].argmax().view(1)
            out.append(int(tok))
            logits = extend(model, tok, cache)
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--ckpt", required=True, help="a checkpoint directory (config.json, model.pt)")
    ap.add_argument("--length", type=int, default=8192)
    ap.add_argument("--depth", type=float, default=0.3, help="where the asked record sits (0..1)")
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--mode", default=None, choices=["dense", "sparse"],
                    help="attention mode (default: sparse for MSA checkpoints, dense for dense)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default=None, choices=["float32", "bfloat16"])
    args = ap.parse_args(argv)
    dtype = args.dtype or ("bfloat16" if args.device.startswith("cuda") else "float32")
    model, meta, _ = load_checkpoint(args.ckpt, args.device)
    model.eval()
    mode = args.mode or ("dense" if meta.get("regime") == "dense" else "sparse")
    model.set_mode(mode)
    ex = data.make_example(np.random.default_rng(args.seed), args.length, needle_depth=args.depth)
    prompt = ex.tokens[: int(ex.answer_pos[0])]
    rec = ex.tokens[int(ex.record_pos[0]): int(ex.record_pos[0]) + data.record_len()]
    sync(args.device)
    t0 = time.perf_counter()
    got = answer(model, prompt, args.device, dtype)
    sync(args.device)
    want = ex.answer_tok[: data.VALUE_LEN].tolist()
    print(f"checkpoint {args.ckpt} ({meta.get('regime')}, step {meta.get('step')}), mode {mode}")
    print(f"prompt: {len(prompt)} tokens; record at position {int(ex.record_pos[0])} "
          f"(depth {args.depth}): {rec.tolist()}  [REC k v END]")
    print(f"question: {prompt[-2:].tolist()}  [QUERY k]")
    print(f"expected {want}, generated {got}: {'CORRECT' if got == want else 'wrong'} "
          f"({time.perf_counter() - t0:.2f} s)")
    return got == want


if __name__ == "__main__":
    main()
