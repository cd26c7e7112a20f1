"""Where one MSA attention layer's training step spends its GPU time, kernel by kernel.

    python3 bench/profile_layer.py [--seq 32768] [--hq 8] [--hkv 2] [--d 64] [--di 64] \
        [--block 64] [--topk 16] [--steps 3]

Runs msa.torch.msa_attention (mode sparse: index top-k, sparse forward, backward, KL) on one packed
sequence of random bf16 inputs under torch.profiler and prints each CUDA kernel's time per step.
--index iid: random index queries, iid selections, the worst case for tiles of consecutive queries;
--index smooth: index keys with a per-block topic and index queries drifting with position, as
bench_prefill.py / bench_training.py make them (neighbours share blocks). The kernel-choice
variables (MSA_ATTENTION_KERNEL, MSA_ATTENTION_DQ, MSA_ATTENTION_DKDV, MSA_KL_KERNEL) apply as usual.
"""
import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "python"))
import msa  # noqa: E402
import msa.torch as mt  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    for name, default in (("seq", 32768), ("hq", 8), ("hkv", 2), ("d", 64), ("di", 64), ("block", 64),
                          ("topk", 16), ("steps", 3)):
        ap.add_argument(f"--{name}", type=int, default=default)
    ap.add_argument("--index", choices=("iid", "smooth"), default="iid")
    ap.add_argument("--cpu-top", type=int, default=0, metavar="N",
                    help="also print the N operators with the most host (CPU) time per step")
    a = ap.parse_args()
    dev = "cuda"
    cfg = msa.Config(num_q_heads=a.hq, num_kv_heads=a.hkv, head_dim=a.d, index_head_dim=a.di,
                     block_size=a.block, topk=a.topk)
    g = torch.Generator(device=dev).manual_seed(0)
    def rnd(*shape):
        return torch.randn(*shape, device=dev, dtype=torch.bfloat16, generator=g).requires_grad_()
    q, k, v = rnd(a.seq, a.hq, a.d), rnd(a.seq, a.hkv, a.d), rnd(a.seq, a.hkv, a.d)
    qi, ki = rnd(a.seq, a.hkv, a.di), rnd(a.seq, a.di)
    if a.index == "smooth":  # bench_prefill.make_inputs' 'smooth' mode (period 512, noise 0.1)
        with torch.no_grad():
            nb = (a.seq + a.block - 1) // a.block
            topic = torch.randn(nb, a.di, device=dev, generator=g)
            ki.add_(topic.repeat_interleave(a.block, dim=0)[:a.seq].to(ki.dtype))
            period = 512
            anchors = torch.randn(a.seq // period + 2, a.hkv, a.di, device=dev, generator=g)
            pos = torch.arange(a.seq, device=dev, dtype=torch.float32) / period
            i0 = pos.floor().long()
            w = (pos - i0)[:, None, None]
            smooth = anchors[i0] * (1 - w) + anchors[i0 + 1] * w
            smooth = smooth / smooth.norm(dim=-1, keepdim=True).clamp_min(1e-6) * a.di ** 0.5
            qi.copy_(smooth + 0.1 * torch.randn(a.seq, a.hkv, a.di, device=dev, generator=g))
    cu = torch.tensor([0, a.seq], device=dev, dtype=torch.int32)

    def step():
        out, kl = mt.msa_attention(q, k, v, qi, ki, cu, cu, a.seq, a.seq, cfg, mode="sparse", kl_coeff=1.0)
        (out.float().square().mean() + kl).backward()

    step()
    torch.cuda.synchronize()
    from torch.profiler import ProfilerActivity, profile
    acts = [ProfilerActivity.CUDA] + ([ProfilerActivity.CPU] if a.cpu_top else [])
    with profile(activities=acts) as prof:
        for _ in range(a.steps):
            step()
        torch.cuda.synchronize()
    rows = []
    for e in prof.key_averages():
        t = getattr(e, "self_device_time_total", None) or getattr(e, "self_cuda_time_total", 0)
        if t > 0 and e.key.startswith(("void msa", "msa::detail")):
            rows.append((t / 1000.0 / a.steps, e.count // a.steps, e.key))
    rows.sort(reverse=True)
    total = sum(r[0] for r in rows)
    print(f"seq {a.seq} Hq {a.hq} Hkv {a.hkv} D {a.d} Di {a.di} B {a.block} k {a.topk}: "
          f"msa kernels {total:.3f} ms per step")
    for ms, n, name in rows:
        print(f"  {ms:8.3f} ms  x{n:<3d} {name[:110]}")
    if a.cpu_top:
        cpu = sorted(((e.self_cpu_time_total / 1000.0 / a.steps, e.count // a.steps, e.key)
                      for e in prof.key_averages() if e.self_cpu_time_total > 0), reverse=True)
        print(f"host time per step: {sum(c[0] for c in cpu):.3f} ms; most:")
        for ms, n, name in cpu[:a.cpu_top]:
            print(f"  {ms:8.3f} ms  x{n:<3d} {name[:110]}")


if __name__ == "__main__":
    main()
