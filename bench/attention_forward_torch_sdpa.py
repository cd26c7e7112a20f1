"""Dense causal attention through torch SDPA (cuDNN backend), the baseline for
bench/attention_forward_cuda_bench.cu: Hq=64, Hkv=4, D=128, bf16, one sequence; median of cudaEvent
timings; TFLOP/s counts 4*D FLOPs per visible key per query head."""
import sys

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel


def median_ms(fn, reps=10):
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    ts = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        ts.append(a.elapsed_time(b))
    return sorted(ts)[len(ts) // 2]


def main():
    hq, hkv, d = 64, 4, 128
    for L in [int(x) for x in sys.argv[1:]] or [32768, 131072]:
        q = torch.randn(1, hq, L, d, device="cuda", dtype=torch.bfloat16)
        k = torch.randn(1, hkv, L, d, device="cuda", dtype=torch.bfloat16)
        v = torch.randn(1, hkv, L, d, device="cuda", dtype=torch.bfloat16)
        flops = L * (L + 1) / 2 * hq * 4 * d
        with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
            try:
                fn = lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
                fn()
                label = "cudnn-gqa"
            except Exception:  # cuDNN without GQA support: expand K/V to every query head
                ke, ve = k.repeat_interleave(hq // hkv, 1), v.repeat_interleave(hq // hkv, 1)
                fn = lambda: torch.nn.functional.scaled_dot_product_attention(q, ke, ve, is_causal=True)
                label = "cudnn-expanded"
            ms = median_ms(fn)
        print(f"{L:<8d} {'torch-' + label:<22s} {ms:10.3f} {flops / (ms * 1e-3) / 1e12:10.1f}")


if __name__ == "__main__":
    main()
