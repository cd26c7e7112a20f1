"""A small GQA decoder whose attention is msa.torch.MSAAttention (mode dense / warmup / sparse).

Block: x += Attn(RMSNorm(x)); x += SwiGLU(RMSNorm(x)). Partial RoPE (the first rotary_dim
channels, GPT-NeoX half split) through MSAAttention's rotary hook on the main branch and on the
first index_rotary_dim channels of the index branch; RMSNorm on qi/ki (index_norm).

Loss (train.py): cross entropy + answer_weight * answer cross entropy + sum over layers of the
layers' KL terms. Each layer returns kl_coeff * mean KL(dense attention || index distribution)
(msa.torch.msa_attention): "warmup" over all visible tokens, "sparse" over the selected ones. The
index projections read detached hidden states and the top-k selection is integer, so the KL is the
*only* gradient that reaches W_qi / W_ki and it reaches nothing else: kl_coeff scales only the
index branch's gradient (with Adam nearly a no-op), it never trades against the LM loss.

Checkpoint format (a directory): config.json (ModelConfig fields + "mode", "regime", "step") and
model.pt = torch.save({"model": state_dict, "optimizer": state_dict or None, "step": int}).
"""

import json
import os
from dataclasses import asdict, dataclass, fields
from typing import List, Optional, Tuple

import torch
from torch import Tensor, nn
import torch.nn.functional as F

from msa.torch import (MSAAttention, RMSNorm, RotaryEmbedding, convert_gqa_to_msa, msa_attention,
                       positions_from_cu_seqlens)


@dataclass
class ModelConfig:
    vocab_size: int = 512
    d_model: int = 512
    n_layers: int = 6
    n_q_heads: int = 8
    n_kv_heads: int = 2
    head_dim: int = 64
    index_head_dim: int = 64
    block_size: int = 64
    topk: int = 16
    mlp_hidden: int = 1408
    rope_base: float = 10000.0
    # Partial rotary (as MiniMax-M3's main branch: half the channels): the channels left unrotated
    # match content at any distance. With rotary on all 64 channels (base 1e4) the dense model found
    # 58% of the records at 32K and MSA-CPT's index none further back than ~8K (README, "Task design").
    rotary_dim: int = 32
    index_rotary_dim: int = 32

    def __post_init__(self):
        for name, dim, head in (("rotary_dim", self.rotary_dim, self.head_dim),
                                ("index_rotary_dim", self.index_rotary_dim, self.index_head_dim)):
            if not (0 < dim <= head and dim % 2 == 0):
                raise ValueError(f"{name} must be even and in (0, {head}], got {dim}")
    kl_coeff: float = 1.0
    index_norm: bool = True


class SwiGLU(nn.Module):
    def __init__(self, d: int, hidden: int):
        super().__init__()
        self.gate = nn.Linear(d, hidden, bias=False)
        self.up = nn.Linear(d, hidden, bias=False)
        self.down = nn.Linear(hidden, d, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.down(F.silu(self.gate(x)) * self.up(x))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, mode: str):
        super().__init__()
        self.attn_norm = RMSNorm(cfg.d_model)
        self.attn = MSAAttention(cfg.d_model, cfg.n_q_heads, cfg.n_kv_heads, cfg.head_dim,
                                 cfg.index_head_dim, cfg.block_size, cfg.topk, mode=mode,
                                 kl_coeff=cfg.kl_coeff, index_norm=cfg.index_norm,
                                 rotary=RotaryEmbedding(cfg.rotary_dim, cfg.rope_base),
                                 index_rotary=RotaryEmbedding(cfg.index_rotary_dim, cfg.rope_base))
        self.mlp_norm = RMSNorm(cfg.d_model)
        self.mlp = SwiGLU(cfg.d_model, cfg.mlp_hidden)


class Decoder(nn.Module):
    def __init__(self, cfg: ModelConfig, mode: str = "dense"):
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.blocks = nn.ModuleList([Block(cfg, mode) for _ in range(cfg.n_layers)])
        self.norm = RMSNorm(cfg.d_model)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        # Unit-scale embeddings: at std 0.02 a token's identity is small next to the first blocks'
        # outputs, and the dense model did not learn to match keys (README, "Task design").
        nn.init.normal_(self.embed.weight, std=1.0)

    @property
    def mode(self) -> str:
        return self.blocks[0].attn.mode

    def set_mode(self, mode: str):
        for b in self.blocks:
            b.attn.mode = mode

    def forward(self, tokens: Tensor, cu_seqlens: Tensor, max_seqlen: int) -> Tuple[Tensor, Tensor]:
        """tokens [T] packed -> (logits [T, V] float32, kl summed over layers)."""
        x = self.embed(tokens)
        positions = positions_from_cu_seqlens(cu_seqlens, tokens.shape[0])
        kl = x.new_zeros((), dtype=torch.float32)
        for b in self.blocks:
            a, k = b.attn(b.attn_norm(x), cu_seqlens, max_seqlen, positions)
            x = x + a
            x = x + b.mlp(b.mlp_norm(x))
            kl = kl + k.float()
        return self.lm_head(self.norm(x)).float(), kl

    def convert_to_msa(self, mode: str = "warmup"):
        """MSA-CPT: each dense attention becomes convert_gqa_to_msa(attention): the very q/k/v/o
        Linear modules are kept, W_qi / W_ki are fresh (std d_model^-0.5)."""
        c = self.cfg
        for b in self.blocks:
            b.attn = convert_gqa_to_msa(
                b.attn, index_head_dim=c.index_head_dim, block_size=c.block_size, topk=c.topk,
                num_q_heads=c.n_q_heads, num_kv_heads=c.n_kv_heads, head_dim=c.head_dim, mode=mode,
                kl_coeff=c.kl_coeff, index_norm=c.index_norm,
                rotary=RotaryEmbedding(c.rotary_dim, c.rope_base),
                index_rotary=RotaryEmbedding(c.index_rotary_dim, c.rope_base))


# ---- the attention layer's inputs (KV cache decode, index recall) ---------------------------

def project(attn: MSAAttention, hidden: Tensor, positions: Tensor):
    """(q, k, v, qi, ki) of an MSAAttention on normed hidden states, as its forward builds them."""
    T = hidden.shape[0]
    q = attn.q_proj(hidden).view(T, attn.num_q_heads, attn.head_dim)
    k = attn.k_proj(hidden).view(T, attn.num_kv_heads, attn.head_dim)
    v = attn.v_proj(hidden).view(T, attn.num_kv_heads, attn.head_dim)
    if attn.q_norm is not None:
        q, k = attn.q_norm(q), attn.k_norm(k)
    if attn.rotary is not None:
        q, k = attn.rotary(q, k, positions)
    qi, ki = attn.index_branch(hidden, positions)
    return q, k, v, qi, ki


class KVCache:
    """Per layer k, v [max_len, Hkv, D] and ki [max_len, Di]; one sequence."""

    def __init__(self, model: Decoder, max_len: int, device, dtype):
        c = model.cfg
        mk = lambda *s: torch.zeros(max_len, *s, device=device, dtype=dtype)
        self.k = [mk(c.n_kv_heads, c.head_dim) for _ in range(c.n_layers)]
        self.v = [mk(c.n_kv_heads, c.head_dim) for _ in range(c.n_layers)]
        self.ki = [mk(c.index_head_dim) for _ in range(c.n_layers)]
        self.length = 0


@torch.no_grad()
def extend(model: Decoder, tokens: Tensor, cache: KVCache) -> Tensor:
    """Runs `tokens` (one sequence's next tokens: the prompt, or one token when decoding) against
    the cache, appends their k / v / ki, returns the logits of the new tokens [n, V].
    The new tokens are the causal suffix of the cached keys (the ops' chunked-prefill rule)."""
    n, start = tokens.shape[0], cache.length
    end = start + n
    dev = tokens.device
    positions = torch.arange(start, end, device=dev)
    cu_q = torch.tensor([0, n], dtype=torch.int32, device=dev)
    cu_k = torch.tensor([0, end], dtype=torch.int32, device=dev)
    x = model.embed(tokens)
    for i, b in enumerate(model.blocks):
        attn = b.attn
        q, k, v, qi, ki = project(attn, b.attn_norm(x), positions)
        cache.k[i][start:end], cache.v[i][start:end], cache.ki[i][start:end] = k, v, ki
        out, _ = msa_attention(q, cache.k[i][:end], cache.v[i][:end], qi, cache.ki[i][:end],
                               cu_q, cu_k, n, end, attn._cfg_args, attn.mode, 0.0)
        x = x + attn.o_proj(out.reshape(n, -1))
        x = x + b.mlp(b.mlp_norm(x))
    cache.length = end
    return model.lm_head(model.norm(x)).float()


# ---- checkpoints ------------------------------------------------------------------------------

def save_checkpoint(path: str, model: Decoder, optimizer=None, step: int = 0, **meta):
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump({**asdict(model.cfg), "mode": model.mode, "step": step, **meta}, f, indent=2)
    # Written under a temporary name and renamed: a concurrent reader (MSA-CPT waiting for the dense
    # run's checkpoint) or a resume after a kill never sees half a file.
    tmp = os.path.join(path, "model.pt.tmp")
    torch.save({"model": model.state_dict(),
                "optimizer": optimizer.state_dict() if optimizer is not None else None,
                "step": step}, tmp)
    os.replace(tmp, os.path.join(path, "model.pt"))


def load_checkpoint(path: str, device="cpu") -> Tuple[Decoder, dict, dict]:
    """(model, config.json as a dict, the torch.save payload)."""
    with open(os.path.join(path, "config.json")) as f:
        meta = json.load(f)
    cfg = ModelConfig(**{f.name: meta[f.name] for f in fields(ModelConfig) if f.name in meta})
    model = Decoder(cfg, meta.get("mode", "dense"))
    payload = torch.load(os.path.join(path, "model.pt"), map_location=device, weights_only=True)
    model.load_state_dict(payload["model"])
    return model.to(device), meta, payload
