#!/usr/bin/env python3
"""One decode step per (cache kind, K/V page layout), for Nsight Compute: what limits the paged
attention kernel in each (DRAM bytes and throughput, L2 hit rate, shared-memory bank conflicts).

    ncu --csv -k regex:attention_mma_kernel --metrics ... python3 bench/ncu_decode.py
    MSA_ONLY=decode_ncu scripts/device_run.sh            # the same, with the metrics chosen there

Each case runs twice (a warm-up, then the profiled call), so ncu lists two launches per case, in the
order printed here. Same caches as bench_decode.py (shuffled page tables, random bf16 / FP8 data).
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_decode as BD  # noqa: E402


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--context", type=BD.parse_ints, default=[131072])
    p.add_argument("--q-len", type=int, default=1)
    p.add_argument("--caches", default="bf16,fp8_widened,fp8_registers")
    p.add_argument("--kv-layouts", default=",".join(BD.KV_LAYOUTS))
    args = p.parse_args(argv)
    import torch
    run = BD.Run(BD.build_parser().parse_args(["--caches", args.caches, "--kv-layouts", args.kv_layouts]))
    run.dgen = torch.Generator(device="cuda").manual_seed(1)
    gen = torch.Generator().manual_seed(0)
    ctx = args.context[0]
    for cache in run.caches:
        for layout in run.layouts:
            step = run.make_step(args.batch, ctx, args.q_len, cache, gen, layout)
            call = run.msa_call(step, False)
            with BD.cache_kind_env(cache):
                for _ in range(2):
                    call()
                    torch.cuda.synchronize()
            print(f"ncu_decode: batch {args.batch} context {ctx} q_len {args.q_len} {cache} {layout}: "
                  "two attention launches", flush=True)
            del step, call
            torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    sys.exit(main())
