"""Trains the three regimes of the quality study on the same data, tokens and steps.

    dense  GQA, dense attention (MSAAttention mode "dense"), steps 0..S-1; also saves its
           checkpoint at step --cpt-start (model + optimizer) for MSA-CPT.
    pt     MSA from scratch: mode "warmup" (dense main branch, index trained by KL) for
           --pt-warmup steps, then "sparse" (index top-k + block-sparse attention + KL on the
           selected tokens) to step S.
    cpt    the dense checkpoint of step --cpt-start, converted with convert_gqa_to_msa (fresh
           W_qi / W_ki), "warmup" for --cpt-warmup steps, then "sparse" to step S; the optimizer
           state and the data stream continue where the dense run was.

Batch `s` is data.make_batch(seed, s, ...) in every regime. Logs JSON lines to
OUT/<regime>/train.jsonl; checkpoints (model.py's format) to OUT/<regime>/final and
OUT/dense/step<cpt_start>; every --save-every steps OUT/<regime>/last, from which a stopped run
resumes (rerun the same command).

    python3 examples/msa_quality/train.py --regime all --steps 2400 --seq-len 4096,8192,16384,32768 --batch 1 \
        --device cuda --out /tmp/msa_quality
"""

import argparse
import json
import math
import os
import platform
import sys
import time
from dataclasses import asdict, fields

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import data  # noqa: E402
from model import Decoder, ModelConfig, load_checkpoint, save_checkpoint  # noqa: E402

REGIMES = ("dense", "pt", "cpt")

PRESETS = {
    # The GPU study: CUDA kernels take bf16, head_dim 64/128, block_size a multiple of 64.
    "study": dict(d_model=512, n_layers=6, n_q_heads=8, n_kv_heads=2, head_dim=64,
                  index_head_dim=64, block_size=64, topk=16, mlp_hidden=1408),
    # CPU smoke test: small enough for seconds per step, blocks small enough that top-k routes.
    "tiny": dict(d_model=64, n_layers=2, n_q_heads=8, n_kv_heads=2, head_dim=16,
                 index_head_dim=16, block_size=16, topk=4, mlp_hidden=128, rotary_dim=8,
                 index_rotary_dim=8),
}


def add_model_args(ap):
    ap.add_argument("--preset", default="study", choices=sorted(PRESETS))
    for f in fields(ModelConfig):
        if f.name != "vocab_size":
            ap.add_argument("--" + f.name.replace("_", "-"), type=type(f.default), default=None)


def model_config(args) -> ModelConfig:
    kw = dict(PRESETS[args.preset])
    for f in fields(ModelConfig):
        v = getattr(args, f.name, None)
        if v is not None:
            kw[f.name] = v
    return ModelConfig(vocab_size=data.VOCAB_SIZE, **kw)


def parse_lengths(s: str):
    return [int(x) for x in str(s).split(",") if x]


def autocast(device: str, dtype: str):
    if dtype == "bfloat16":
        return torch.autocast(device_type=torch.device(device).type, dtype=torch.bfloat16)
    return torch.autocast(device_type=torch.device(device).type, enabled=False)


def losses(model, batch, device, answer_weight: float):
    """(total, lm, answer, kl, answer-accuracy) of one packed batch."""
    tokens = torch.from_numpy(batch.tokens).to(device)
    cu = torch.from_numpy(batch.cu_seqlens).to(device)
    logits, kl = model(tokens, cu, batch.max_seqlen)
    # Next-token targets; the last token of each sequence predicts nothing, and the positions that
    # predict an answer count in the answer loss only (an inline question's next token is BLANK).
    target = torch.roll(tokens, -1)
    valid = torch.ones_like(tokens, dtype=torch.bool)
    valid[cu[1:].long() - 1] = False
    pred_pos = torch.from_numpy(batch.answer_pos - 1).to(device)
    valid[pred_pos] = False
    lm = F.cross_entropy(logits[valid], target[valid])
    ans_logits, ans_target = logits[pred_pos], torch.from_numpy(batch.answer_tok).to(device)
    ans = F.cross_entropy(ans_logits, ans_target)
    acc = (ans_logits.argmax(-1) == ans_target).float().mean()
    return lm + answer_weight * ans + kl, lm, ans, kl, acc


def step_lengths(step: int, args):
    """(lengths, sequences at the longest) of training step `step`: the short curriculum lengths for
    the first --warm-steps, then the study lengths; always batch x max(--seq-len) tokens. A model
    trained on 4K-32K from the start did not learn to retrieve in 2000 steps; on 128-512 tokens it
    learns within 300-600 steps, on 512-2048 in 500-800 steps or not at all (README, "Task design").
    """
    lengths = parse_lengths(args.seq_len)
    now = parse_lengths(args.warm_lengths) if step < args.warm_steps else lengths
    return now, max(1, args.batch * max(lengths) // max(now))


def lr_at(step: int, args, group: int = 0) -> float:
    """Group 0 (main): linear warmup over 5% of the steps, cosine to 10%. Group 1 (index): constant
    --index-lr after the warmup, since MSA-CPT's fresh index projections start late in the main
    schedule (at 75% its lr is a quarter of the peak; the index then still lost records past ~8K)."""
    warm = max(1, int(0.05 * args.steps))
    if step < warm:
        return (args.lr if group == 0 else args.index_lr) * (step + 1) / warm
    if group == 1:
        return args.index_lr
    t = (step - warm) / max(1, args.steps - warm)
    return args.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t)))


def mode_at(regime: str, step: int, args) -> str:
    if regime == "dense":
        return "dense"
    if regime == "pt":
        return "warmup" if step < args.pt_warmup else "sparse"
    return "warmup" if step < args.cpt_start + args.cpt_warmup else "sparse"


INDEX_PARAMS = ("qi_proj", "ki_proj", "qi_norm", "ki_norm")


def make_optimizer(model, args):
    """AdamW with two groups, [main, index]: the index projections learn only from the KL and have
    their own learning rate (lr_at); a dense model has them too (unused), so its optimizer state
    loads into MSA-CPT's."""
    groups = ([], [])
    for name, p in model.named_parameters():
        groups[any(k in name for k in INDEX_PARAMS)].append(p)
    return torch.optim.AdamW([dict(params=groups[0]), dict(params=groups[1])], lr=args.lr,
                             betas=(0.9, 0.95), weight_decay=args.weight_decay)


def device_name(device: str) -> str:
    if torch.device(device).type == "cuda":
        return torch.cuda.get_device_name(torch.device(device))
    return f"CPU ({platform.machine()})"


def sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def train_regime(regime: str, args, cfg: ModelConfig):
    out = os.path.join(args.out, regime)
    os.makedirs(out, exist_ok=True)
    if os.path.exists(os.path.join(out, "final", "model.pt")) and not args.overwrite:
        print(f"[{regime}] final checkpoint exists, skipping (--overwrite retrains)")
        return
    lengths = parse_lengths(args.seq_len)
    torch.manual_seed(args.seed)
    start = 0
    if regime == "cpt":
        src = os.path.join(args.out, "dense", f"step{args.cpt_start}")
        model, meta, payload = load_checkpoint(src, args.device)
        model.convert_to_msa("warmup")
        opt = make_optimizer(model, args)
        opt.load_state_dict(payload["optimizer"])  # same parameter order; W_qi/W_ki start fresh
        start = payload["step"]
    else:
        model = Decoder(cfg, "dense" if regime == "dense" else "warmup").to(args.device)
        opt = make_optimizer(model, args)
    resume = os.path.join(out, "last")
    if os.path.exists(os.path.join(resume, "model.pt")) and not args.overwrite:
        model, _, payload = load_checkpoint(resume, args.device)  # a stopped run goes on
        opt = make_optimizer(model, args)
        opt.load_state_dict(payload["optimizer"])
        start = payload["step"]
    log_path = os.path.join(out, "train.jsonl")
    kept = []
    if start > 0 and os.path.exists(log_path):
        kept = [l for l in open(log_path) if json.loads(l)["step"] < start]
    log = open(log_path, "w")
    log.writelines(kept)
    meta = dict(regime=regime, train_args={k: v for k, v in vars(args).items()})
    n_params = sum(p.numel() for p in model.parameters())
    print(f"[{regime}] {n_params / 1e6:.2f}M parameters, steps {start}..{args.steps - 1}, "
          f"lengths {lengths}, {args.batch * max(lengths)} tokens/step, device {args.device}")
    for step in range(start, args.steps):
        if regime == "dense" and step == args.cpt_start and step > 0:
            save_checkpoint(os.path.join(out, f"step{step}"), model, opt, step, **meta)
        model.set_mode(mode_at(regime, step, args))
        for i, g in enumerate(opt.param_groups):
            g["lr"] = lr_at(step, args, i)
        batch = data.make_batch(args.seed, step, *step_lengths(step, args), args.inline_per_1k)
        sync(args.device)
        t0 = time.perf_counter()
        with autocast(args.device, args.dtype):
            total, lm, ans, kl, acc = losses(model, batch, args.device, args.answer_weight)
        opt.zero_grad(set_to_none=True)
        total.backward()
        gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip)
        opt.step()
        sync(args.device)
        dt = time.perf_counter() - t0
        rec = dict(regime=regime, step=step, mode=model.mode, seq_len=batch.max_seqlen,
                   tokens=int(batch.tokens.shape[0]), loss=total.item(), lm_loss=lm.item(),
                   answer_loss=ans.item(), kl=kl.item(), answer_acc=acc.item(),
                   grad_norm=float(gnorm), lr=lr_at(step, args), step_time_s=dt)
        log.write(json.dumps(rec) + "\n")
        log.flush()
        if args.save_every and (step + 1) % args.save_every == 0 and step + 1 < args.steps:
            save_checkpoint(resume, model, opt, step + 1, **meta)
        if step % args.log_every == 0 or step == args.steps - 1:
            print(f"[{regime}] step {step} {rec['mode']} L={rec['seq_len']} loss {rec['loss']:.3f} "
                  f"lm {rec['lm_loss']:.3f} ans {rec['answer_loss']:.3f} kl {rec['kl']:.4f} "
                  f"acc {rec['answer_acc']:.2f} {dt * 1e3:.0f} ms", flush=True)
    save_checkpoint(os.path.join(out, "final"), model, None, args.steps, **meta)
    log.close()


def build_parser():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--regime", default="all", choices=REGIMES + ("all",))
    ap.add_argument("--steps", type=int, default=2400)
    ap.add_argument("--seq-len", default="4096,8192,16384,32768",
                    help="training length, or a comma list cycled step by step")
    ap.add_argument("--batch", type=int, default=1,
                    help="sequences per step at the longest length (tokens/step = batch*max len)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default=None, choices=["float32", "bfloat16"],
                    help="autocast dtype (default bfloat16 on CUDA, float32 on CPU)")
    ap.add_argument("--out", default=os.environ.get("MSA_QUALITY_RUNS", "/tmp/msa_quality"))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--index-lr", type=float, default=1e-3,
                    help="learning rate of the index projections (constant after the warmup)")
    ap.add_argument("--weight-decay", type=float, default=0.1)
    ap.add_argument("--clip", type=float, default=1.0)
    ap.add_argument("--answer-weight", type=float, default=1.0,
                    help="weight of the answer tokens' cross entropy added to the LM loss")
    ap.add_argument("--warm-lengths", default="128,256,512",
                    help="sequence lengths (cycled) of the first --warm-steps steps: a curriculum")
    ap.add_argument("--warm-steps", type=int, default=None,
                    help="steps on --warm-lengths (default a third of --steps; 0 = none)")
    ap.add_argument("--inline-per-1k", type=float, default=32.0,
                    help="questions inside each training sequence per 1K tokens (data.py)")
    ap.add_argument("--pt-warmup", type=int, default=None, help="MSA-PT dense warmup steps "
                    "(default 10%% of --steps)")
    ap.add_argument("--cpt-start", type=int, default=None,
                    help="dense step converted for MSA-CPT (default 75%% of --steps)")
    ap.add_argument("--cpt-warmup", type=int, default=None,
                    help="MSA-CPT warmup steps after conversion (default 10%% of --steps)")
    ap.add_argument("--log-every", type=int, default=50)
    ap.add_argument("--save-every", type=int, default=100,
                    help="steps between resumable checkpoints (OUT/<regime>/last); 0 = none")
    ap.add_argument("--overwrite", action="store_true", help="retrain from step 0")
    add_model_args(ap)
    return ap


def finish_args(args):
    if args.dtype is None:
        args.dtype = "bfloat16" if torch.device(args.device).type == "cuda" else "float32"
    if args.pt_warmup is None:
        args.pt_warmup = max(1, args.steps // 10)
    if args.cpt_start is None:
        args.cpt_start = max(1, (3 * args.steps) // 4)
    if args.warm_steps is None:
        args.warm_steps = args.steps // 3
    if args.cpt_warmup is None:
        args.cpt_warmup = max(1, args.steps // 10)
    if not 0 < args.cpt_start < args.steps:
        raise SystemExit("--cpt-start must be inside (0, --steps)")
    return args


def main(argv=None):
    main_with(finish_args(build_parser().parse_args(argv)))


def main_with(args):
    cfg = model_config(args)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "train_args.json"), "w") as f:
        json.dump({**vars(args), "model": asdict(cfg), "device_name": device_name(args.device),
                   "torch_version": torch.__version__},
                  f, indent=2)
    regimes = REGIMES if args.regime == "all" else (args.regime,)
    for r in regimes:
        train_regime(r, args, cfg)


if __name__ == "__main__":
    main()
