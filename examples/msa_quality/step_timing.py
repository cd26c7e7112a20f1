"""Wall clock of one training step per attention mode and length, measured alone on the device.

    python3 examples/msa_quality/step_timing.py [--out /tmp/msa_quality] [--device cuda] \
        [--lengths 4096,8192,16384,32768] [--modes dense,warmup,sparse] [--steps 8]

The training logs time every step too, but device_study.sh trains the regimes side by side on one
GPU, so those times include the other runs' work. This program times the same step (train.losses,
backward, clipping, AdamW) of a freshly initialised model of the study's configuration
(OUT/train_args.json, else train.py's defaults) with nothing else running: warm-up steps first, then the median of --steps.
A step costs the same whatever the weights are (the selection is always k blocks), so random weights
give the trained models' cost. Writes OUT/eval/step_timing.json.
"""

import argparse
import json
import os
import statistics
import sys
import time
from argparse import Namespace
from dataclasses import asdict

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import data  # noqa: E402
import train  # noqa: E402
from model import Decoder, ModelConfig  # noqa: E402


def profile_step(step, device: str, top: int):
    """Runs one step under torch.profiler and prints the operators and kernels that take the time."""
    from torch.profiler import ProfilerActivity, profile
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.startswith("cuda") else [])
    with profile(activities=acts) as prof:
        step()
    key = "self_cuda_time_total" if device.startswith("cuda") else "self_cpu_time_total"
    print(prof.key_averages().table(sort_by=key, row_limit=top, max_name_column_width=60), flush=True)


def time_mode(cfg: ModelConfig, mode: str, length: int, targs, args) -> float:
    torch.manual_seed(0)
    model = Decoder(cfg, mode).to(args.device)
    opt = train.make_optimizer(model, targs)
    def step(i):
        # The training step's token count at this length: batch * max_len // length sequences.
        batch = data.make_batch(targs.seed, i, [length], targs.batch * targs.max_len // length,
                                targs.inline_per_1k)
        train.sync(args.device)
        t0 = time.perf_counter()
        with train.autocast(args.device, targs.dtype):
            total, *_ = train.losses(model, batch, args.device, targs.answer_weight)
        opt.zero_grad(set_to_none=True)
        total.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), targs.clip)
        opt.step()
        train.sync(args.device)
        return time.perf_counter() - t0

    times = [step(i) for i in range(args.warmup + args.steps)][args.warmup:]
    if args.profile:
        print(f"[profile] {mode} L={length}")
        profile_step(lambda: step(0), args.device, args.profile)
    return statistics.median(times)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--out", default=os.environ.get("MSA_QUALITY_RUNS", "/tmp/msa_quality"))
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--lengths", default=None, help="default: the training lengths")
    ap.add_argument("--modes", default="dense,warmup,sparse")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--sparse-kernels", default=None,
                    help="sparse forward kernels to time (MSA_ATTENTION_KERNEL): 'default' is the "
                         "library's choice, 'gathered' the opt-in key-major forward (CUDA only; "
                         "default: both on CUDA)")
    ap.add_argument("--commit", default=None, help="the commit timed, recorded in the JSON")
    ap.add_argument("--profile", type=int, default=0, metavar="N",
                    help="also profile one step per (mode, length) and print its top N operators")
    args = ap.parse_args(argv)
    if args.sparse_kernels is None:
        args.sparse_kernels = "default,gathered" if args.device.startswith("cuda") else "default"
    saved_path = os.path.join(args.out, "train_args.json")
    if os.path.exists(saved_path):
        with open(saved_path) as f:
            saved = json.load(f)
    else:  # no study run there: train.py's defaults (the study preset)
        t = train.finish_args(train.build_parser().parse_args(["--device", args.device]))
        saved = {**vars(t), "model": asdict(train.model_config(t))}
    cfg = ModelConfig(**saved["model"])
    lengths = train.parse_lengths(args.lengths or saved["seq_len"])
    targs = Namespace(**{k: saved[k] for k in ("seed", "batch", "dtype", "answer_weight", "clip", "lr",
                                               "weight_decay", "inline_per_1k")}, max_len=max(train.parse_lengths(
                                                   saved["seq_len"])))
    if targs.dtype is None:
        targs.dtype = "bfloat16" if torch.device(args.device).type == "cuda" else "float32"
    res = dict(device_name=train.device_name(args.device), tokens_per_step=targs.batch * targs.max_len,
               steps=args.steps, commit=args.commit, ms={})
    runs = []
    for mode in args.modes.split(","):
        kernels = args.sparse_kernels.split(",") if mode == "sparse" else ["default"]
        runs += [(mode, k) for k in kernels]
    user_choice = os.environ.get("MSA_ATTENTION_KERNEL")
    for mode, kernel in runs:
        name = mode if kernel == "default" else f"{mode} ({kernel} forward)"
        if kernel != "default":  # "default": the caller's environment, restored after each run
            os.environ["MSA_ATTENTION_KERNEL"] = kernel  # read by the CUDA backend at every call
        for L in lengths:
            ms = 1e3 * time_mode(cfg, mode, L, targs, args)
            res["ms"].setdefault(name, {})[str(L)] = ms
            print(f"[timing] {name:7s} L={L:6d} {ms:8.1f} ms/step", flush=True)
        if user_choice is None:
            os.environ.pop("MSA_ATTENTION_KERNEL", None)
        else:
            os.environ["MSA_ATTENTION_KERNEL"] = user_choice
    os.makedirs(os.path.join(args.out, "eval"), exist_ok=True)
    with open(os.path.join(args.out, "eval", "step_timing.json"), "w") as f:
        json.dump(res, f, indent=2)


if __name__ == "__main__":
    main()
