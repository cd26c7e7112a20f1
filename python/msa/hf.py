"""msa as the attention backend of Hugging Face transformers' MiniMax-M3 (model type ``minimax_m3_vl``).

    import msa.hf                                   # registers attn_implementation "msa"
    model = MiniMaxM3VLForCausalLM._from_config(cfg, attn_implementation="msa")

transformers (>= 5.17) computes the MiniMax-M3 indexer in PyTorch and passes its selection to the
registered attention function as ``block_indices [batch, index_heads, q_len, k']`` (one index head per
KV head, left-packed block ids, ``-1`` padding, the local block first). This module turns that into
the library's ``topk [Hkv, total_q, k']`` (the same set per row, the local block moved to the last
valid slot, SPEC.md) and runs ``msa.torch``'s sparse attention (CPU and CUDA backends, autograd
included). Layers without an indexer ("full_attention") get ``block_indices=None`` and run the
library's dense causal attention. ``use_msa_indexer(model)`` optionally swaps each indexer's
PyTorch scoring for the library's index top-k (docs/hf.md).

Each batch row is one varlen sequence whose queries are the causal suffix of its keys: the query
at position ``p`` sees key slots ``0..p`` (the rule the model's indexer uses). Rows may have
different positions; right padding is accepted (padded query rows get unspecified outputs), left
padding raises ``msa.ArgumentError`` (the model's own indexer is not padding-invariant there).
"""

from typing import Optional, Tuple

import torch
from torch import Tensor

from . import torch as msa_torch
from ._errors import ArgumentError

__all__ = ["ATTN_IMPLEMENTATION", "msa_attention_forward", "register", "to_msa_topk",
           "use_msa_indexer"]

ATTN_IMPLEMENTATION = "msa"

# block_indices slot ranks for the reorder into the library's layout (SPEC.md, Index branch 5).
_NONLOCAL, _LOCAL, _UNUSED = 0, 1, 2


def _arg_error(argument: str, message: str) -> ArgumentError:
    return ArgumentError(f"msa.hf: argument '{argument}': {message}", argument)


def query_positions(position_ids: Optional[Tensor], batch: int, q_len: int, kv_len: int) -> Tensor:
    """[batch, q_len] int64 positions on the host; each row must be consecutive (a causal suffix)."""
    if position_ids is None:
        # What MiniMaxM3VLAttention itself assumes when it is given no position_ids.
        pos = torch.arange(kv_len - q_len, kv_len).expand(batch, q_len)
    else:
        pos = position_ids.detach().to("cpu", torch.int64)
        if pos.ndim == 1:
            pos = pos.unsqueeze(0)
        if pos.ndim != 2 or pos.shape[-1] != q_len or pos.shape[0] not in (1, batch):
            raise _arg_error("position_ids", f"must have shape [{batch} or 1, {q_len}], "
                             f"got {list(position_ids.shape)}")
        pos = pos.expand(batch, q_len)
    if q_len and bool((pos != pos[:, :1] + torch.arange(q_len)).any()):
        raise _arg_error("position_ids", "each row must be consecutive positions (the queries are "
                         "the causal suffix of the row's keys; packed sequences are not supported)")
    if q_len and (int(pos[:, 0].min()) < 0 or int(pos[:, -1].max()) >= kv_len):
        raise _arg_error("position_ids", f"positions must lie in 0..{kv_len - 1} (the key length)")
    return pos


def check_padding(attention_mask: Optional[Tensor]) -> None:
    """Accept no mask or a right-padded 2-D mask (the one MSA's registered mask function passes)."""
    if attention_mask is None:
        return
    if attention_mask.ndim != 2:
        raise _arg_error("attention_mask", "must be None or a 2-D [batch, keys] padding mask; "
                         "register the 'msa' mask function (msa.hf.register) rather than a 4-D mask")
    keep = attention_mask.detach().to("cpu", torch.bool)
    if bool((keep[:, 1:] & ~keep[:, :-1]).any()):
        raise _arg_error("attention_mask", "left padding (or a padded row that continues after its "
                         "padding) is not supported: MiniMax-M3 blocks are anchored to key slots, so "
                         "pad tokens before a sequence change its block selection; use right padding "
                         "or batch rows of equal length")


# What the CUDA attention kernels take (src/cuda/attention_host.cuh), checked here so that the error
# names the model's settings rather than the library's.
_CUDA_DTYPES = (torch.bfloat16, torch.float16)
_CUDA_HEAD_DIMS = (64, 128)
_CUDA_BLOCK_MULTIPLE = 64


def check_cuda_support(query: Tensor, block_size: int) -> None:
    """On CUDA: bfloat16/float16, head_dim 64 or 128, index_block_size a multiple of 64."""
    if query.device.type != "cuda":
        return
    if query.dtype not in _CUDA_DTYPES:
        raise _arg_error("query", f"the CUDA backend takes bfloat16 or float16, the model runs in "
                         f"{query.dtype}; load it with torch_dtype=torch.bfloat16 (or run on the CPU)")
    if query.shape[-1] not in _CUDA_HEAD_DIMS:
        raise _arg_error("head_dim", f"the CUDA backend supports head_dim 64 and 128, the model has "
                         f"{query.shape[-1]}")
    if block_size % _CUDA_BLOCK_MULTIPLE:
        raise _arg_error("index_block_size", f"the CUDA backend needs a multiple of "
                         f"{_CUDA_BLOCK_MULTIPLE}, the model has {block_size}")


def to_msa_topk(block_indices: Tensor, positions: Tensor, block_size: int) -> Tensor:
    """transformers' [batch, Hkv, q, k'] block ids -> the library's [Hkv, batch * q, k'] int32.

    Keeps every row's set; moves the local block (position // block_size) behind the other valid
    ids and the -1 slots to the end, the layout of SPEC.md (the attention ops accept any order).
    """
    b, h, q, k = block_indices.shape
    ids = block_indices.to(torch.int64)
    local = (positions.to(ids.device) // block_size).view(b, 1, q, 1)
    rank = torch.full_like(ids, _NONLOCAL)
    rank = rank.masked_fill(ids == local, _LOCAL).masked_fill(ids < 0, _UNUSED)
    order = torch.sort(rank, dim=-1, stable=True).indices
    ids = torch.gather(ids, -1, order)
    return ids.permute(1, 0, 2, 3).reshape(h, b * q, k).to(torch.int32).contiguous()


def _pack_keys(t: Tensor, key_lens) -> Tensor:
    """[batch, Hkv, slots, D] -> [sum(key_lens), Hkv, D]; a view (no copy) for one row."""
    if t.shape[0] == 1:
        return t[0, :, : key_lens[0]].transpose(0, 1)
    return torch.cat([t[i, :, :n].transpose(0, 1) for i, n in enumerate(key_lens)])


def msa_attention_forward(module, query: Tensor, key: Tensor, value: Tensor,
                          attention_mask: Optional[Tensor], scaling: Optional[float] = None,
                          dropout: float = 0.0, block_indices: Optional[Tensor] = None,
                          position_ids: Optional[Tensor] = None,
                          **kwargs) -> Tuple[Tensor, None]:
    """The AttentionInterface function: query [b, Hq, q, D], key/value [b, Hkv, slots, D] (the whole
    cache, slots >= every row's last position + 1), block_indices [b, Hkv, q, k'] or None (dense
    layer). Returns (out [b, q, Hq, D], None)."""
    if not getattr(module, "is_causal", True):
        raise _arg_error("module", f"{type(module).__name__} is not causal (the vision tower); give "
                         "msa to the text model only: attn_implementation={'text_config': 'msa', "
                         "'vision_config': 'sdpa'}")
    if dropout:
        raise _arg_error("dropout", f"attention dropout is not supported (got {dropout}); set "
                         "config.attention_dropout = 0 or call model.eval()")
    b, hq, q_len, d = query.shape
    hkv, slots = key.shape[1], key.shape[2]
    check_padding(attention_mask)
    check_cuda_support(query, module.config.index_block_size)
    pos = query_positions(position_ids, b, q_len, slots)
    key_lens = (pos[:, -1] + 1).tolist() if q_len else [0] * b
    cfg = module.config
    width = cfg.index_topk_blocks
    topk = None
    if block_indices is not None:
        if block_indices.ndim != 4 or tuple(block_indices.shape[:3]) != (b, hkv, q_len):
            raise _arg_error("block_indices", f"must have shape [{b}, {hkv} (= num_key_value_heads), "
                             f"{q_len}, k], got {list(block_indices.shape)}")
        width = block_indices.shape[-1]
        topk = to_msa_topk(block_indices, pos, cfg.index_block_size)
    msa_cfg = ([hq, hkv, d, cfg.index_head_dim, cfg.index_block_size, max(width, 1)],
               [float(scaling if scaling is not None else d ** -0.5), 0.0])

    device = query.device
    cu_q = torch.arange(0, (b + 1) * q_len, q_len, dtype=torch.int32).to(device)
    cu_k = torch.tensor([0] + key_lens, dtype=torch.int64).cumsum(0).to(torch.int32).to(device)
    q = query.transpose(1, 2).reshape(b * q_len, hq, d)
    k, v = _pack_keys(key, key_lens), _pack_keys(value, key_lens)
    max_k = max(key_lens) if key_lens else 0
    if topk is None:
        out, _ = msa_torch._dense_fwd(q, k, v, cu_q, cu_k, *msa_cfg, q_len, max_k)
    else:
        out, _ = msa_torch._sparse_fwd(q, k, v, topk, cu_q, cu_k, *msa_cfg, q_len, max_k)
    return out.view(b, q_len, hq, d), None


def register(name: str = ATTN_IMPLEMENTATION) -> str:
    """Registers the attention function and its mask function under `name`; returns `name`.

    The mask function is transformers' flash-attention one: None without padding, else the 2-D
    [batch, keys] padding mask (this module refuses left padding). Called on import."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, flash_attention_mask

    AttentionInterface.register(name, msa_attention_forward)
    AttentionMaskInterface.register(name, flash_attention_mask)
    return name


# ---- optional: the library's index top-k inside the model's indexer --------------------------

def _msa_indexer_forward(self, hidden_states, position_embeddings, past_key_values, position_ids):
    """MiniMaxM3VLIndexer.forward with the scoring and top-k done by msa.index_topk.

    Same projections, norms and rotary as the model; returns block ids in the model's format
    ([b, index_heads, q, min(topk_blocks, key_blocks)], -1 padded), the local block last."""
    from transformers.models.minimax_m3_vl.modeling_minimax_m3_vl import apply_rotary_pos_emb

    if self.local_blocks != 1:
        raise _arg_error("index_local_blocks", f"the library selects exactly one local block, "
                         f"got {self.local_blocks}")
    batch, q_len, _ = hidden_states.shape
    if q_len < self._msa_min_q_len:  # decode: the model's [q x keys] scores are small and faster
        return self._msa_model_forward(hidden_states, position_embeddings, past_key_values,
                                       position_ids)
    if hidden_states.device.type == "cuda" and hidden_states.dtype not in _CUDA_DTYPES:
        raise _arg_error("hidden_states", f"the CUDA index top-k takes bfloat16 or float16, the model "
                         f"runs in {hidden_states.dtype}; load it with torch_dtype=torch.bfloat16")
    idx_q = self.q_norm(self.q_proj(hidden_states).view(batch, q_len, -1, self.head_dim))
    idx_k = self.k_norm(self.k_proj(hidden_states).view(batch, q_len, 1, self.head_dim))
    cos, sin = position_embeddings
    idx_q, idx_k = apply_rotary_pos_emb(idx_q.transpose(1, 2), idx_k.transpose(1, 2),
                                        cos[..., : self.head_dim], sin[..., : self.head_dim])
    if past_key_values is not None:
        idx_k = past_key_values.layers[self.layer_idx].update_index(idx_k)
    slots = idx_k.shape[2]
    width = min(self.topk_blocks, -(-slots // self.block_size))
    pos = query_positions(position_ids, batch, q_len, slots)
    key_lens = (pos[:, -1] + 1).tolist()
    device = hidden_states.device
    cu_q = torch.arange(0, (batch + 1) * q_len, q_len, dtype=torch.int32).to(device)
    cu_k = torch.tensor([0] + key_lens, dtype=torch.int64).cumsum(0).to(torch.int32).to(device)
    qi = idx_q.transpose(1, 2).reshape(batch * q_len, self.num_heads, self.head_dim)
    ki = _pack_keys(idx_k, key_lens)[:, 0]
    cfg = ([self.num_heads, self.num_heads, self.head_dim, self.head_dim, self.block_size, width],
           [0.0, 0.0])
    topk, _ = msa_torch.index_topk(qi, ki, cu_q, cu_k, cfg, q_len, max(key_lens), with_lse=False)
    return topk.view(self.num_heads, batch, q_len, width).permute(1, 0, 2, 3).to(torch.int64)


# Below this many query tokens per call the model's own indexer stays in use: at decode its score
# tensor is one row per query, and it was faster than msa.index_topk on the H100 (bench_hf.py,
# a60573a, per-token decode of a real-width 2-layer model: 8.7 vs 13.5 ms at 32K, 11.4 vs 20.7 ms
# at 128K), which runs the prefill kernel and repacks the whole index-key cache every step.
MSA_INDEXER_MIN_Q_LEN = 17


def use_msa_indexer(model, min_q_len: int = MSA_INDEXER_MIN_Q_LEN) -> int:
    """Makes every MiniMax-M3 indexer in `model` select with msa.index_topk for calls of at least
    `min_q_len` query tokens (prefill, chunked prefill; 1 = every call), keeping the model's own
    indexer for shorter ones (decode, speculative steps); returns how many indexers it changed."""
    import types

    if min_q_len < 1:
        raise _arg_error("min_q_len", f"must be at least 1, got {min_q_len}")
    n = 0
    for m in model.modules():
        if type(m).__name__ == "MiniMaxM3VLIndexer":
            m.__dict__.pop("forward", None)  # a second call replaces the first one's choice
            m._msa_model_forward = m.forward
            m._msa_min_q_len = int(min_q_len)
            m.forward = types.MethodType(_msa_indexer_forward, m)
            n += 1
    return n


try:
    register()
except ImportError:  # transformers missing: the functions above still work on their own
    pass
