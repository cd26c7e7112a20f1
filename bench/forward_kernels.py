"""The attention forward's kernels side by side (MSA_ATTENTION_KERNEL), on the prefill benchmark's
inputs and selections: sparse (over index_topk's selection) and dense causal, per kernel, with the
largest output difference to the first kernel's. One JSON of rows.

    python3 bench/forward_kernels.py --kernels tma,mma --contexts 32k,128k --configs hq64_hkv4_d128
"""
from __future__ import annotations

import argparse
import os
import re
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_prefill as P  # noqa: E402
import common as C  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--kernels", default="tma,mma")
    ap.add_argument("--contexts", default="32k,128k")
    ap.add_argument("--configs", default="hq64_hkv4_d128")
    ap.add_argument("--dense-contexts", default="32k", help="contexts that also time dense causal")
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--modes", default="sparse,shared,dense", help="which of sparse, shared, dense to time")
    ap.add_argument("--out", default="forward_kernels.json")
    ap.add_argument("--qi-period", type=int, default=512)
    ap.add_argument("--qi-noise", type=float, default=0.1)
    ap.add_argument("--shared-tile", type=int, default=0,
                    help="also time selections shared by each run of N queries (N divides the block size): "
                         "every query takes the first one's row, so a tile's union is 16 blocks")
    args = ap.parse_args()
    import torch
    import msa
    kernels = args.kernels.split(",")
    dense_ls = set(P.parse_contexts(args.dense_contexts)) if args.dense_contexts else set()
    rows = []
    result = dict(benchmark="forward_kernels", commit=C.git_commit(P.REPO_ROOT),
                  device=torch.cuda.get_device_name(), rows=rows)
    for cname in args.configs.split(","):
        hq, hkv, d = (int(v) for v in re.fullmatch(r"hq(\d+)_hkv(\d+)_d(\d+)", cname).groups())
        for L in P.parse_contexts(args.contexts):
            os.environ.pop("MSA_ATTENTION_KERNEL", None)
            gen = torch.Generator(device="cuda").manual_seed(1)
            x = P.make_inputs(L, hq, hkv, d, "smooth", gen, args)
            cfg = P.make_msa_config(msa, hq, hkv, d)
            case = P.MsaCase(msa, cfg, x, L, hq, hkv)
            case.index_topk()
            torch.cuda.synchronize()
            wanted = args.modes.split(",")
            modes = [m for m in ("sparse", "shared", "dense") if m in wanted and
                     (m != "shared" or args.shared_tile) and (m != "dense" or L in dense_ls)]
            for mode in modes:
                ref = None
                for spec in kernels:
                    # "name" or "name:VAR=VAL:VAR=VAL": MSA_ATTENTION_KERNEL=name plus those variables
                    kern, *assigns = spec.split(":")
                    for k_, v_ in (a.split("=", 1) for a in assigns):
                        os.environ[k_] = v_
                    os.environ["MSA_ATTENTION_KERNEL"] = kern
                    if mode != "dense":  # each kernel has its own workspace needs
                        need = int(msa.workspace_bytes("sparse_forward", case.cfg, case.cu, case.cu, L, L,
                                                       max_seqlen_q=L, max_seqlen_k=L, dtype="bfloat16"))
                        ws = case.ws.get("sparse_forward")
                        if ws is None or ws.numel() < need:
                            case.ws["sparse_forward"] = torch.empty(max(1, need), dtype=torch.uint8, device="cuda")
                    if mode == "shared" and ref is None:
                        n = args.shared_tile
                        idx = torch.arange(L, device=case.topk.device) // n * n
                        case.topk.copy_(case.topk[:, idx].clone())
                    if mode in ("sparse", "shared"):
                        call = case.forward
                        flops = P.sparse_flops(L, hq, d)
                    else:
                        def call(case=case):
                            case.msa.dense_attention_forward(case.cfg, x["q"], x["k"], x["v"], case.cu, case.cu,
                                                             case.out, case.lse, max_seqlen_q=L, max_seqlen_k=L,
                                                             stream=case.stream)
                        flops = P.dense_flops(L, hq, d)
                    case.out.fill_(float("nan"))
                    stats = C.cuda_time([call], warmup=2, iters=args.iters, target_s=1.5)
                    out = case.out.float()
                    diff = None
                    if ref is None:
                        ref = out.clone()
                    else:
                        diff = float(((out - ref).norm() / ref.norm()).item())
                    row = dict(config=cname, context=L, mode=mode, kernel=spec, flops=flops,
                               tflops=C.tflops(flops, stats["ms_median"]), finite=bool(torch.isfinite(out).all()),
                               rel_diff_to_first=diff, **stats)
                    rows.append(row)
                    for k_ in (a.split("=", 1)[0] for a in assigns):
                        os.environ.pop(k_, None)
                    print(f"{cname} L={L} {mode:6s} {spec:8s} {stats['ms_median']:9.3f} ms "
                          f"{row['tflops']:6.1f} TFLOP/s finite={row['finite']} diff={diff}", flush=True)
                    C.write_json_atomic(args.out, result)
            del case, x
            torch.cuda.empty_cache()
    os.environ.pop("MSA_ATTENTION_KERNEL", None)


if __name__ == "__main__":
    main()
