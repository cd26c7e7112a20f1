"""MiniMax-M3 in Hugging Face transformers: msa as the attention backend vs the model's own paths.

    python3 bench/bench_hf.py --out $BENCH_DIR/                 # H100/H200: 32K and 128K, bf16
    python3 bench/bench_hf.py --smoke --out /tmp/hf_smoke.json   # tiny model on the CPU (tests the script)

The model: transformers' MiniMaxM3VLForCausalLM (5.17, `minimax_m3_vl`), random weights, 2 layers,
both sparse ("minimax_m3_sparse"), with the production attention widths (the config defaults of
MiniMaxM3VLTextConfig: hidden 6144, 64 query heads over 4 KV heads of 128, 4 index heads of 128,
rotary on 64 channels, index blocks of 128, top-16 blocks, one local block). Shrunk so that the
weights fit and the time is attention's: the MoE (4 experts, 2 per token, expert and shared
intermediate 512 instead of 128 experts, 4 per token, 3072) and the vocabulary (32768 instead of
200064; only the last position's logits are computed, `logits_to_keep=1`).

Methods, all on the same model (the implementation is switched between runs):
  msa+idx  attn_implementation="msa" and msa.hf.use_msa_indexer: the library's index top-k and
           sparse attention; no [queries x keys] tensor anywhere
  msa      attn_implementation="msa" with the model's own PyTorch indexer (fp32 [Hidx, q, keys]
           scores)
  sdpa     the model's default path: indexer, dense [b, Hq, q, keys] block mask, torch SDPA
  eager    the same mask with eager attention ([b, Hq, q, keys] probabilities)
Phases per context L: "prefill" (one forward over L tokens, fresh cache), "prefill-chunked" (L
tokens in chunks of --chunk over a growing cache: what the default path can still do when a
whole prefill does not fit), "decode" (one token after an L-token cache, median over
--decode-steps steps; the cache is cropped back to L after every step so each step sees L).
An out-of-memory failure is recorded as status "oom" (the finding), never as a time.
CUDA events around each call, warm-up first, medians; bf16 on CUDA.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO_ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)
import common as C  # noqa: E402

METHODS = ("msa+idx", "msa", "sdpa", "eager")
REAL = dict(vocab_size=32768, hidden_size=6144, num_attention_heads=64, num_key_value_heads=4,
            head_dim=128, index_n_heads=4, index_head_dim=128, index_block_size=128,
            index_topk_blocks=16, index_local_blocks=1, num_local_experts=4, num_experts_per_tok=2,
            intermediate_size=512, shared_intermediate_size=512, dense_intermediate_size=1024)
SMOKE = dict(vocab_size=512, hidden_size=128, num_attention_heads=8, num_key_value_heads=2,
             head_dim=64, index_n_heads=2, index_head_dim=64, index_block_size=16,
             index_topk_blocks=4, index_local_blocks=1, num_local_experts=4, num_experts_per_tok=2,
             intermediate_size=64, shared_intermediate_size=64, dense_intermediate_size=128)
SHRUNK = ("num_local_experts 128 -> 4, num_experts_per_tok 4 -> 2, intermediate_size and "
          "shared_intermediate_size 3072 -> 512, vocab_size 200064 -> 32768, 60 -> 2 layers "
          "(both sparse); attention and indexer widths are the defaults of MiniMaxM3VLTextConfig")


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="tiny model on the CPU (tests this script)")
    p.add_argument("--contexts", default=None, help="comma list (default 32768,131072; smoke 128,256)")
    p.add_argument("--methods", default=",".join(METHODS), help="comma list of " + ", ".join(METHODS))
    p.add_argument("--chunk", type=int, default=None,
                   help="chunk of the chunked prefill (default 1024; smoke 64); 0 = no chunked phase")
    p.add_argument("--chunked-max", type=int, default=32768,
                   help="longest context given the chunked prefill (it is slow for the default path)")
    p.add_argument("--decode-steps", type=int, default=8)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--iters", type=int, default=3, help="timed prefills per method")
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--out", default=None, help="file, or directory ending in / (default $BENCH_DIR/)")
    p.add_argument("--time-budget", type=float, default=None, help="seconds; later work is skipped")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


class Bench:
    def __init__(self, args):
        import torch
        from transformers.models.minimax_m3_vl.configuration_minimax_m3_vl import MiniMaxM3VLTextConfig
        from transformers.models.minimax_m3_vl.modeling_minimax_m3_vl import MiniMaxM3VLForCausalLM
        import msa
        import msa.hf

        self.torch, self.msa, self.args = torch, msa, args
        self.cpu = args.smoke
        if not self.cpu and not (torch.cuda.is_available() and msa.cuda_available()):
            raise SystemExit("needs a GPU and a CUDA build of msa (or --smoke for the CPU)")
        self.dev = "cpu" if self.cpu else "cuda"
        self.dtype = torch.bfloat16
        self.timer = C.host_time if self.cpu else C.cuda_time
        self.budget = C.Budget(args.time_budget)
        self.methods = [m.strip() for m in args.methods.split(",") if m.strip()]
        if set(self.methods) - set(METHODS):
            raise SystemExit(f"--methods: unknown {sorted(set(self.methods) - set(METHODS))}")
        default_ctx = "128,256" if self.cpu else "32768,131072"
        self.contexts = [int(c) for c in (args.contexts or default_ctx).split(",") if c.strip()]
        self.chunk = args.chunk if args.chunk is not None else (64 if self.cpu else 1024)
        widths = SMOKE if self.cpu else REAL
        self.config = MiniMaxM3VLTextConfig(
            **widths, num_hidden_layers=args.layers, layer_types=["minimax_m3_sparse"] * args.layers,
            mlp_layer_types=["sparse"] * args.layers,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5},
            bos_token_id=1, eos_token_id=None, pad_token_id=0)
        torch.manual_seed(args.seed)
        with torch.device(self.dev):
            self.model = MiniMaxM3VLForCausalLM._from_config(
                self.config, attn_implementation=msa.hf.ATTN_IMPLEMENTATION, dtype=self.dtype).eval()
        self.device = "cpu-test" if self.cpu else torch.cuda.get_device_name()
        self.commit = C.git_commit(REPO_ROOT)
        self.out_path = self.resolve_out()
        self.rows = []
        self.doc = {
            "benchmark": "hf", "commit": self.commit, "device": self.device,
            "torch": torch.__version__, "cuda": torch.version.cuda,
            "transformers": __import__("transformers").__version__, "timestamp": C.utc_timestamp(),
            "config": {"model": "MiniMaxM3VLForCausalLM", "dtype": "bfloat16", "batch": 1,
                       "text_config": {k: v for k, v in widths.items()}, "layers": args.layers,
                       "layer_types": "all minimax_m3_sparse", "shrunk": SHRUNK,
                       "contexts": self.contexts, "methods": self.methods, "chunk": self.chunk,
                       "chunked_max": args.chunked_max, "decode_steps": args.decode_steps,
                       "warmup": args.warmup, "iters": args.iters, "smoke": self.cpu,
                       "msa_module": getattr(msa, "__file__", None),
                       "env": {k: v for k, v in sorted(os.environ.items()) if k.startswith("MSA_")}},
            "rows": self.rows,
        }

    def resolve_out(self):
        name = f"hf_{C.slug(self.device)}_{self.commit[:8]}.json"
        out = self.args.out or (os.environ.get("BENCH_DIR") or os.path.join(REPO_ROOT, "bench", "results")) + os.sep
        return os.path.join(out, name) if out.endswith(os.sep) or os.path.isdir(out) else out

    # ---- switching the implementation --------------------------------------------------------
    def use(self, method):
        import msa.hf
        attn = "msa" if method.startswith("msa") else method
        self.model.config._attn_implementation = attn
        for m in self.model.modules():  # undo a previous use_msa_indexer
            if type(m).__name__ == "MiniMaxM3VLIndexer" and "forward" in m.__dict__:
                del m.forward
        if method == "msa+idx":
            msa.hf.use_msa_indexer(self.model)

    # ---- calls -------------------------------------------------------------------------------
    def new_cache(self):
        from transformers.cache_utils import DynamicCache
        return DynamicCache(config=self.config)

    def prefill(self, ids, chunk=0, cache=None):
        cache = cache if cache is not None else self.new_cache()
        step = chunk or ids.shape[1]
        with self.torch.no_grad():
            for s in range(0, ids.shape[1], step):
                self.model(ids[:, s: s + step], past_key_values=cache, logits_to_keep=1)
        return cache

    def sync(self):
        if not self.cpu:
            self.torch.cuda.synchronize()

    def peak_gib(self):
        return None if self.cpu else self.torch.cuda.max_memory_allocated() / 2**30

    def reset_peak(self):
        if not self.cpu:
            self.torch.cuda.empty_cache()
            self.torch.cuda.reset_peak_memory_stats()

    def record(self, L, method, phase, **fields):
        row = {"context": L, "method": method, "phase": phase, **fields}
        self.rows.append(row)
        C.write_json_atomic(self.out_path, self.doc)
        ms = row.get("ms")
        print(f"  {phase:16s} L={L:7d} {method:8s} {row['status']:7s} "
              f"{C.fmt_ms(ms) + ' ms' if ms is not None else row.get('error', '')[:120]}", flush=True)

    def guarded(self, L, method, phase, fn):
        """Runs fn() -> dict of fields; OOM and other errors become rows, never a crash."""
        if self.budget.exhausted():
            return self.record(L, method, phase, status="skipped", error="time budget")
        self.reset_peak()
        try:
            fields = fn()
            self.record(L, method, phase, status="ok", peak_gib=self.peak_gib(), **fields)
        except self.torch.cuda.OutOfMemoryError as e:
            self.record(L, method, phase, status="oom", peak_gib=self.peak_gib(), error=C.short_error(e))
        except C.OverBudget as e:
            self.record(L, method, phase, status="skipped", error=C.short_error(e))
        except Exception as e:  # noqa: BLE001 - recorded, the other methods still run
            self.record(L, method, phase, status="error", error=C.short_error(e))
        finally:
            self.sync()
            self.reset_peak()

    def timed(self, calls, iters, warmup):
        left = self.budget.left()
        res = self.timer(calls, warmup=warmup, iters=iters, min_iters=1,
                         max_total_s=None if left == float("inf") else max(left - 5, 1))
        return {"ms": res["ms_median"], "stats": res}

    # ---- phases ------------------------------------------------------------------------------
    def run_context(self, L):
        torch, a = self.torch, self.args
        g = torch.Generator().manual_seed(a.seed + L)
        ids = torch.randint(3, self.config.vocab_size, (1, L + a.decode_steps + 1), generator=g).to(self.dev)
        prompt = ids[:, :L]
        for method in self.methods:
            self.use(method)
            self.guarded(L, method, "prefill",
                         lambda: self.timed([lambda: self.prefill(prompt)], a.iters, a.warmup))
        if self.chunk and L <= a.chunked_max and self.chunk < L:
            for method in self.methods:
                self.use(method)
                self.guarded(L, method, f"prefill-chunked",
                             lambda: {**self.timed([lambda: self.prefill(prompt, self.chunk)], 1, 0),
                                      "chunk": self.chunk})
        # One L-token cache (built by the first method that can) shared by every method's decode.
        cache = None
        for method in self.methods:
            self.use(method)
            try:
                cache = self.prefill(prompt, chunk=0 if method.startswith("msa") else self.chunk)
                break
            except torch.cuda.OutOfMemoryError:
                cache = None
                self.reset_peak()
        if cache is None:
            for method in self.methods:
                self.record(L, method, "decode", status="skipped", error="no method could build the cache")
            return
        for method in self.methods:
            self.use(method)
            self.guarded(L, method, "decode", lambda: self.decode(ids, L, cache))
        del cache

    def decode(self, ids, L, cache):
        steps = self.args.decode_steps

        def one(t):
            with self.torch.no_grad():
                self.model(ids[:, L + t: L + t + 1], past_key_values=cache, logits_to_keep=1)
            cache.crop(L - cache.get_seq_length())  # negative: drop the new token

        one(0)  # warm-up
        calls = [lambda t=t: one(t) for t in range(steps)]
        return {**self.timed(calls, steps, 0), "steps": steps}

    def main(self):
        print(f"== hf bench: {self.device}, commit {self.commit[:12]}, methods {self.methods}, "
              f"contexts {self.contexts}, out={self.out_path}", flush=True)
        for L in self.contexts:
            self.run_context(L)
        self.summary()
        return 0

    def summary(self):
        print(f"\n== hf summary ({self.device}, commit {self.commit[:12]}) -> {self.out_path}")
        phases = ["prefill", "prefill-chunked", "decode"]
        headers = ["context", "phase"] + self.methods
        rows = []
        for L in self.contexts:
            for ph in phases:
                cells = {r["method"]: r for r in self.rows if r["context"] == L and r["phase"] == ph}
                if not cells:
                    continue
                rows.append([str(L), ph] + [C.fmt_ms(cells[m]["ms"]) if cells.get(m, {}).get("status") == "ok"
                                            else cells.get(m, {}).get("status", "-") for m in self.methods])
        C.print_table(headers, rows)


def main(argv=None):
    return Bench(parse_args(argv)).main()


if __name__ == "__main__":
    sys.exit(main())
