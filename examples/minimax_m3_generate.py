"""Generate with a small random MiniMax-M3 text model whose attention runs on msa.

    PYTHONPATH=$PWD/python:$PWD/build-py/python python3 examples/minimax_m3_generate.py [--device cuda]
        [--dtype bfloat16] [--prompt-len 300] [--new-tokens 20] [--msa-indexer]

Needs torch and transformers >= 5.17 (model type minimax_m3_vl). `import msa.hf` registers the
attention implementation "msa"; the model's indexer picks the blocks (or, with --msa-indexer, the
library's index top-k), the library runs the block-sparse attention on the sparse layers and dense
causal attention on the full-attention layers. The script also runs the model's own eager path
and reports whether the greedy tokens agree and how far the prefill logits are apart.
"""

import argparse
import time

import torch
from transformers.models.minimax_m3_vl.configuration_minimax_m3_vl import MiniMaxM3VLTextConfig
from transformers.models.minimax_m3_vl.modeling_minimax_m3_vl import MiniMaxM3VLForCausalLM

import msa.hf


def small_config(block_size: int, topk: int) -> MiniMaxM3VLTextConfig:
    # The production layout scaled down: GQA (here 8 query heads over 2 KV heads, one index head per
    # KV head), per-head norms, partial rotary (half the channels), sparse and full attention layers.
    return MiniMaxM3VLTextConfig(
        vocab_size=512, hidden_size=128, intermediate_size=64, num_hidden_layers=4,
        num_attention_heads=8, num_key_value_heads=2, head_dim=64, num_local_experts=4,
        num_experts_per_tok=2, dense_intermediate_size=128, shared_intermediate_size=64,
        index_n_heads=2, index_head_dim=64, index_block_size=block_size, index_topk_blocks=topk,
        layer_types=["minimax_m3_sparse", "full_attention", "minimax_m3_sparse", "minimax_m3_sparse"],
        mlp_layer_types=["dense", "sparse", "dense", "sparse"],
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5},
        bos_token_id=1, eos_token_id=None, pad_token_id=0)


def build(config, attn: str, dtype, device, seed: int):
    torch.manual_seed(seed)
    model = MiniMaxM3VLForCausalLM._from_config(config, attn_implementation=attn)
    with torch.no_grad():  # random norm weights, so that the random model is not trivially flat
        for p in model.parameters():
            if p.ndim == 1:
                p.normal_(0.0, 0.3)
    return model.to(device=device, dtype=dtype).eval()


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--prompt-len", type=int, default=300)
    ap.add_argument("--new-tokens", type=int, default=20)
    ap.add_argument("--block-size", type=int, default=16)
    ap.add_argument("--topk", type=int, default=4)
    ap.add_argument("--msa-indexer", action="store_true", help="select with msa.index_topk too")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    dtype = getattr(torch, args.dtype)
    config = small_config(args.block_size, args.topk)
    prompt = torch.randint(3, config.vocab_size, (1, args.prompt_len),
                           generator=torch.Generator().manual_seed(args.seed)).to(args.device)

    results = {}
    for attn in ("eager", msa.hf.ATTN_IMPLEMENTATION):
        model = build(config, attn, dtype, args.device, args.seed)
        if attn != "eager" and args.msa_indexer:
            print(f"msa indexer on {msa.hf.use_msa_indexer(model)} layers")
        with torch.no_grad():
            logits = model(prompt).logits.float()
            start = time.perf_counter()
            tokens = model.generate(prompt, max_new_tokens=args.new_tokens, do_sample=False)
            seconds = time.perf_counter() - start
        results[attn] = (logits, tokens[0, args.prompt_len:])
        print(f"{attn:5s}: {seconds:.2f} s, tokens {tokens[0, args.prompt_len:].tolist()}")

    (ref_logits, ref_tokens), (logits, tokens) = results["eager"], results["msa"]
    err = float((logits - ref_logits).norm() / ref_logits.norm())
    blocks = -(-args.prompt_len // args.block_size)
    print(f"prompt {args.prompt_len} tokens = {blocks} blocks of {args.block_size}, "
          f"each query reads at most {args.topk}")
    print(f"prefill logits relative difference msa vs eager: {err:.2e}")
    print("greedy tokens agree" if torch.equal(tokens, ref_tokens) else
          "greedy tokens differ (expected only for near-ties in reduced precision)")


if __name__ == "__main__":
    main()
