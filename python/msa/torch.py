"""PyTorch integration of msa: torch.library custom ops, autograd, and an MSA attention layer.

Importing this module needs PyTorch (>= 2.4); ``import msa`` alone does not.

Custom ops (``torch.ops.msa.*``, each with a fake kernel so that torch.compile traces them and CUDA
graphs capture them; every call runs on the current CUDA stream):
    index_topk, sparse_attention_fwd, sparse_attention_bwd, dense_attention_fwd,
    dense_attention_bwd, kl_alignment
The attention forward ops have autograd (their backward ops); ``lse`` gets no gradient. The KL op's
gradient reaches only ``qi`` and ``ki``: the teacher (q, k, lse) is a constant (SPEC.md, Detach).

Mode "dense" may run its main branch through torch's scaled_dot_product_attention (cuDNN on
Hopper) where that is exactly the same computation: see ``dense_backend``.

Configs cross the op boundary as ``cfg: int[6] = [Hq, Hkv, D, Di, B, k]`` and
``scales: float[2] = [scale, index_scale]`` (custom-op schemas take no Python objects).
"""

import inspect
import math
import os
import struct
from typing import Callable, List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn
from torch.nn import functional as F
from torch.utils.dlpack import to_dlpack

from . import _C
from ._errors import ArgumentError

__all__ = [
    "MSAAttention",
    "RMSNorm",
    "RotaryEmbedding",
    "config_args",
    "convert_gqa_to_msa",
    "kl_alignment_loss",
    "msa_attention",
    "positions_from_cu_seqlens",
]

MODES = ("sparse", "dense", "warmup")
DENSE_BACKENDS = ("auto", "msa", "sdpa")

# Which kernel runs the main branch of mode "dense" (per call: msa_attention's / MSAAttention's
# `dense_backend`, None = this value). "auto": torch SDPA where it computes exactly our dense causal
# attention (CUDA, bf16/f16, every sequence with q_len == k_len and the same length) - cuDNN was 4x
# faster than our dense forward+backward (docs/python.md); "msa": always our kernels; "sdpa": SDPA
# wherever the layout allows it, any device and dtype (CPU tests use it). Mode "warmup" always uses
# our kernel: its KL needs the main branch's LSE, which no public SDPA API returns.
dense_backend = os.environ.get("MSA_DENSE_BACKEND", "auto")

# SDPA kernels tried first (set_priority); None leaves the choice to PyTorch's own order.
sdpa_priority = None
try:
    from torch.nn.attention import SDPBackend, sdpa_kernel
    if "set_priority" in inspect.signature(sdpa_kernel).parameters:
        sdpa_priority = [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION,
                         SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
except ImportError:  # torch < 2.3
    sdpa_kernel = None
_SDPA_GQA = tuple(int(x) for x in torch.__version__.split(".")[:2]) >= (2, 5)  # enable_gqa


# ---- plumbing --------------------------------------------------------------------------------

def config_args(cfg) -> Tuple[List[int], List[float]]:
    """(cfg ints, scales) of an msa.Config, the form the custom ops take."""
    if isinstance(cfg, (tuple, list)) and len(cfg) == 2:
        return list(cfg[0]), list(cfg[1])
    return ([cfg.num_q_heads, cfg.num_kv_heads, cfg.head_dim, cfg.index_head_dim, cfg.block_size,
             cfg.topk], [float(cfg.scale), float(cfg.index_scale)])


def _config(cfg: Sequence[int], scales: Sequence[float]) -> _C.Config:
    hq, hkv, d, di, b, k = cfg
    return _C.Config(num_q_heads=hq, num_kv_heads=hkv, head_dim=d, index_head_dim=di,
                     block_size=b, topk=k, scale=scales[0], index_scale=scales[1])


def _dl(t: Optional[Tensor]):
    # A DLPack capsule rather than the tensor itself: Tensor.__dlpack__() would make the default
    # stream wait on the current one, which breaks CUDA graph capture on a side stream.
    return None if t is None else to_dlpack(t.detach())


def _common(anchor: Tensor, max_seqlen_q: int, max_seqlen_k: int, op: str, cfg, cu_q, cu_k,
            total_q: int, total_k: int) -> dict:
    kw = dict(max_seqlen_q=max_seqlen_q, max_seqlen_k=max_seqlen_k)
    if anchor.is_cuda:
        # Scratch from PyTorch's caching allocator: stream-ordered and capturable in CUDA graphs.
        n = _C.workspace_bytes(op, cfg, _dl(cu_q), _dl(cu_k), total_q, total_k,
                               dtype=str(anchor.dtype).replace("torch.", ""), **kw)
        kw["stream"] = torch.cuda.current_stream(anchor.device).cuda_stream
        if n > 0:
            kw["workspace"] = _dl(torch.empty(n, dtype=torch.uint8, device=anchor.device))
    return kw


def _stats_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _contig(t: Optional[Tensor]) -> Optional[Tensor]:
    return t if t is None or t.stride(-1) == 1 else t.contiguous()


# ---- custom ops ------------------------------------------------------------------------------

@torch.library.custom_op("msa::index_topk", mutates_args=())
def _index_topk(qi: Tensor, ki: Tensor, cu_seqlens_q: Tensor, cu_seqlens_k: Tensor,
                cfg: List[int], scales: List[float], max_seqlen_q: int, max_seqlen_k: int,
                temperature: float, with_lse: bool) -> Tuple[Tensor, Tensor]:
    """(topk, selected_lse); without with_lse the LSE is [Hkv, 0] and never computed: the pooling
    then takes only each block's max, no exponential per score (the training step's case)."""
    c = _config(cfg, scales)
    tq, tk = qi.shape[0], ki.shape[0]
    topk = torch.empty((cfg[1], tq, cfg[5]), dtype=torch.int32, device=qi.device)
    lse = torch.empty((cfg[1], tq if with_lse else 0), dtype=_stats_dtype(qi.dtype),
                      device=qi.device)
    kw = _common(qi, max_seqlen_q, max_seqlen_k, "index_topk", c, cu_seqlens_q, cu_seqlens_k, tq, tk)
    _C.index_topk(c, _dl(qi), _dl(ki), _dl(cu_seqlens_q), _dl(cu_seqlens_k), _dl(topk),
                  selected_lse=_dl(lse) if with_lse else None, temperature=temperature, **kw)
    return topk, lse


@_index_topk.register_fake
def _(qi, ki, cu_seqlens_q, cu_seqlens_k, cfg, scales, max_seqlen_q, max_seqlen_k, temperature,
      with_lse):
    tq = qi.shape[0]
    return (qi.new_empty((cfg[1], tq, cfg[5]), dtype=torch.int32),
            qi.new_empty((cfg[1], tq if with_lse else 0), dtype=_stats_dtype(qi.dtype)))


def _forward_impl(q, k, v, topk, cu_q, cu_k, cfg, scales, max_q, max_k):
    c = _config(cfg, scales)
    out = torch.empty_like(q, memory_format=torch.contiguous_format)
    lse = torch.empty(q.shape[:2], dtype=_stats_dtype(q.dtype), device=q.device)
    op = "dense_forward" if topk is None else "sparse_forward"
    kw = _common(q, max_q, max_k, op, c, cu_q, cu_k, q.shape[0], k.shape[0])
    if topk is None:
        _C.dense_attention_forward(c, _dl(q), _dl(k), _dl(v), _dl(cu_q), _dl(cu_k), _dl(out),
                                   _dl(lse), **kw)
    else:
        _C.sparse_attention_forward(c, _dl(q), _dl(k), _dl(v), _dl(topk), _dl(cu_q), _dl(cu_k),
                                    _dl(out), _dl(lse), **kw)
    return out, lse


def _backward_impl(q, k, v, topk, out, lse, dout, cu_q, cu_k, cfg, scales, max_q, max_k,
                   deterministic):
    c = _config(cfg, scales)
    dq = torch.empty_like(q, memory_format=torch.contiguous_format)
    dk = torch.empty_like(k, memory_format=torch.contiguous_format)
    dv = torch.empty_like(v, memory_format=torch.contiguous_format)
    op = "dense_backward" if topk is None else "sparse_backward"
    kw = _common(q, max_q, max_k, op, c, cu_q, cu_k, q.shape[0], k.shape[0])
    if topk is None:
        _C.dense_attention_backward(c, _dl(q), _dl(k), _dl(v), _dl(out), _dl(lse), _dl(dout),
                                    _dl(cu_q), _dl(cu_k), _dl(dq), _dl(dk), _dl(dv),
                                    deterministic=deterministic, **kw)
    else:
        _C.sparse_attention_backward(c, _dl(q), _dl(k), _dl(v), _dl(topk), _dl(out), _dl(lse),
                                     _dl(dout), _dl(cu_q), _dl(cu_k), _dl(dq), _dl(dk), _dl(dv),
                                     deterministic=deterministic, **kw)
    return dq, dk, dv


@torch.library.custom_op("msa::sparse_attention_fwd", mutates_args=())
def _sparse_fwd(q: Tensor, k: Tensor, v: Tensor, topk: Tensor, cu_seqlens_q: Tensor,
                cu_seqlens_k: Tensor, cfg: List[int], scales: List[float], max_seqlen_q: int,
                max_seqlen_k: int) -> Tuple[Tensor, Tensor]:
    return _forward_impl(q, k, v, topk, cu_seqlens_q, cu_seqlens_k, cfg, scales, max_seqlen_q,
                         max_seqlen_k)


@torch.library.custom_op("msa::dense_attention_fwd", mutates_args=())
def _dense_fwd(q: Tensor, k: Tensor, v: Tensor, cu_seqlens_q: Tensor, cu_seqlens_k: Tensor,
               cfg: List[int], scales: List[float], max_seqlen_q: int,
               max_seqlen_k: int) -> Tuple[Tensor, Tensor]:
    return _forward_impl(q, k, v, None, cu_seqlens_q, cu_seqlens_k, cfg, scales, max_seqlen_q,
                         max_seqlen_k)


@torch.library.custom_op("msa::sparse_attention_bwd", mutates_args=())
def _sparse_bwd(q: Tensor, k: Tensor, v: Tensor, topk: Tensor, out: Tensor, lse: Tensor,
                dout: Tensor, cu_seqlens_q: Tensor, cu_seqlens_k: Tensor, cfg: List[int],
                scales: List[float], max_seqlen_q: int, max_seqlen_k: int,
                deterministic: bool) -> Tuple[Tensor, Tensor, Tensor]:
    return _backward_impl(q, k, v, topk, out, lse, dout, cu_seqlens_q, cu_seqlens_k, cfg, scales,
                          max_seqlen_q, max_seqlen_k, deterministic)


@torch.library.custom_op("msa::dense_attention_bwd", mutates_args=())
def _dense_bwd(q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, dout: Tensor,
               cu_seqlens_q: Tensor, cu_seqlens_k: Tensor, cfg: List[int], scales: List[float],
               max_seqlen_q: int, max_seqlen_k: int,
               deterministic: bool) -> Tuple[Tensor, Tensor, Tensor]:
    return _backward_impl(q, k, v, None, out, lse, dout, cu_seqlens_q, cu_seqlens_k, cfg, scales,
                          max_seqlen_q, max_seqlen_k, deterministic)


def _fake_fwd(q):
    return (torch.empty_like(q, memory_format=torch.contiguous_format),
            q.new_empty(q.shape[:2], dtype=_stats_dtype(q.dtype)))


def _fake_bwd(q, k, v):
    return tuple(torch.empty_like(t, memory_format=torch.contiguous_format) for t in (q, k, v))


_sparse_fwd.register_fake(lambda q, k, v, topk, *rest: _fake_fwd(q))
_dense_fwd.register_fake(lambda q, k, v, *rest: _fake_fwd(q))
_sparse_bwd.register_fake(lambda q, k, v, *rest: _fake_bwd(q, k, v))
_dense_bwd.register_fake(lambda q, k, v, *rest: _fake_bwd(q, k, v))

# Whether attention backward passes ask for bitwise-reproducible reductions.
deterministic_backward = False


def _setup_sparse(ctx, inputs, output):
    q, k, v, topk, cu_q, cu_k, cfg, scales, max_q, max_k = inputs
    ctx.save_for_backward(q, k, v, topk, output[0], output[1], cu_q, cu_k)
    ctx.args = (cfg, scales, max_q, max_k)


def _backward_sparse(ctx, dout, dlse):
    q, k, v, topk, out, lse, cu_q, cu_k = ctx.saved_tensors
    dq, dk, dv = _sparse_bwd(q, k, v, topk, out, lse, dout.contiguous(), cu_q, cu_k, *ctx.args,
                             deterministic_backward)
    return dq, dk, dv, None, None, None, None, None, None, None


def _setup_dense(ctx, inputs, output):
    q, k, v, cu_q, cu_k, cfg, scales, max_q, max_k = inputs
    ctx.save_for_backward(q, k, v, output[0], output[1], cu_q, cu_k)
    ctx.args = (cfg, scales, max_q, max_k)


def _backward_dense(ctx, dout, dlse):
    q, k, v, out, lse, cu_q, cu_k = ctx.saved_tensors
    dq, dk, dv = _dense_bwd(q, k, v, out, lse, dout.contiguous(), cu_q, cu_k, *ctx.args,
                            deterministic_backward)
    return dq, dk, dv, None, None, None, None, None, None


_sparse_fwd.register_autograd(_backward_sparse, setup_context=_setup_sparse)
_dense_fwd.register_autograd(_backward_dense, setup_context=_setup_dense)


@torch.library.custom_op("msa::kl_alignment", mutates_args=())
def _kl(q: Tensor, k: Tensor, lse: Tensor, qi: Tensor, ki: Tensor, topk: Optional[Tensor],
        cu_seqlens_q: Tensor, cu_seqlens_k: Tensor, cfg: List[int], scales: List[float],
        max_seqlen_q: int, max_seqlen_k: int, coeff: float) -> Tuple[Tensor, Tensor, Tensor]:
    c = _config(cfg, scales)
    loss = torch.empty(1, dtype=_stats_dtype(q.dtype), device=q.device)
    dqi = torch.empty_like(qi, memory_format=torch.contiguous_format)
    dki = torch.empty_like(ki, memory_format=torch.contiguous_format)
    kw = _common(q, max_seqlen_q, max_seqlen_k, "kl_alignment", c, cu_seqlens_q, cu_seqlens_k,
                 q.shape[0], k.shape[0])
    _C.kl_alignment(c, _dl(q), _dl(k), _dl(lse), _dl(qi), _dl(ki), _dl(topk), _dl(cu_seqlens_q),
                    _dl(cu_seqlens_k), coeff, _dl(loss), _dl(dqi), _dl(dki), **kw)
    return loss, dqi, dki


@_kl.register_fake
def _(q, k, lse, qi, ki, topk, cu_seqlens_q, cu_seqlens_k, cfg, scales, max_q, max_k, coeff):
    return (q.new_empty((1,), dtype=_stats_dtype(q.dtype)),
            torch.empty_like(qi, memory_format=torch.contiguous_format),
            torch.empty_like(ki, memory_format=torch.contiguous_format))


def _setup_kl(ctx, inputs, output):
    _, dqi, dki = output
    ctx.save_for_backward(dqi, dki)


def _backward_kl(ctx, dloss, ddqi, ddki):
    # The op computed the gradients already; the teacher side (q, k, lse) gets none.
    dqi, dki = ctx.saved_tensors
    g = dloss.reshape(())
    return (None, None, None, (dqi * g).to(dqi.dtype), (dki * g).to(dki.dtype), None, None, None,
            None, None, None, None, None)


_kl.register_autograd(_backward_kl, setup_context=_setup_kl)


# ---- dense main branch through torch SDPA ----------------------------------------------------

def _f32(x: float) -> float:
    return struct.unpack("f", struct.pack("f", x))[0]


def _softmax_scale(cfg: Sequence[int], scales: Sequence[float]) -> float:
    """Config::softmax_scale() to the bit: the float32 scale, or 1.f / std::sqrt(float(D))."""
    if scales[0] != 0.0:
        return _f32(scales[0])
    return _f32(1.0 / _f32(math.sqrt(_f32(float(cfg[2])))))


def _uniform_layout(q: Tensor, k: Tensor, cu_q: Tensor, cu_k: Tensor, max_q: int,
                    max_k: int) -> Optional[Tuple[int, int]]:
    """(batch, length) when every sequence has q_len == k_len == length (SDPA's top-left causal
    mask is then ours), else None. Decided from shapes and max_seqlen; only when max_seqlen is 0
    and batch > 1 does it read cu_seqlens (a host copy on CUDA, as our kernel would make), and
    never under torch.compile, where that would break the graph."""
    batch = cu_q.shape[0] - 1
    total = q.shape[0]
    if batch < 1 or total == 0 or k.shape[0] != total or cu_k.shape[0] != cu_q.shape[0]:
        return None
    if batch == 1:  # cu_seqlens = [0, total] (validated by our ops: it ends at total_q/total_k)
        return 1, total
    if max_q > 0 and max_q == max_k:  # lengths <= max that sum to batch*max are all max
        return (batch, max_q) if total == batch * max_q else None
    if torch.compiler.is_compiling() or total % batch:
        return None
    length = total // batch
    expect = torch.arange(0, total + 1, length, dtype=cu_q.dtype, device=cu_q.device)
    return (batch, length) if torch.equal(cu_q, expect) and torch.equal(cu_k, expect) else None


def _sdpa_dense(q: Tensor, k: Tensor, v: Tensor, batch: int, scale: float) -> Tensor:
    """Causal attention of `batch` equal-length sequences; packed [T, H, D] in and out, viewed as
    [B, H, L, D] without copies. Autograd is SDPA's own."""
    def bhld(t):
        return t.unflatten(0, (batch, t.shape[0] // batch)).transpose(1, 2)

    gqa = {"enable_gqa": True} if q.shape[1] != k.shape[1] else {}
    if sdpa_priority is not None:
        with sdpa_kernel(sdpa_priority, set_priority=True):
            out = F.scaled_dot_product_attention(bhld(q), bhld(k), bhld(v), is_causal=True,
                                                 scale=scale, **gqa)
    else:
        out = F.scaled_dot_product_attention(bhld(q), bhld(k), bhld(v), is_causal=True,
                                             scale=scale, **gqa)
    return out.transpose(1, 2).flatten(0, 1)


def _dense_main(q, k, v, cu_q, cu_k, cfg, scales, max_q, max_k, backend) -> Tensor:
    """Output of the dense main branch (no LSE): SDPA or our kernel, per `backend`."""
    backend = dense_backend if backend is None else backend
    if backend not in DENSE_BACKENDS:
        raise ArgumentError(f"msa: argument 'dense_backend': must be one of {DENSE_BACKENDS}, "
                            f"got {backend!r}", "dense_backend")
    use = backend == "sdpa" or (backend == "auto" and q.is_cuda
                                and q.dtype in (torch.bfloat16, torch.float16))
    if use and (q.shape[1] == k.shape[1] or _SDPA_GQA):
        layout = _uniform_layout(q, k, cu_q, cu_k, max_q, max_k)
        if layout is not None:
            return _sdpa_dense(q, k, v, layout[0], _softmax_scale(cfg, scales))
    return _dense_fwd(q, k, v, cu_q, cu_k, cfg, scales, max_q, max_k)[0]


# ---- functional API --------------------------------------------------------------------------

def index_topk(qi, ki, cu_seqlens_q, cu_seqlens_k, cfg, max_seqlen_q=0, max_seqlen_k=0,
               temperature=1.0, with_lse=True) -> Tuple[Tensor, Optional[Tensor]]:
    """(topk [Hkv, total_q, k] int32, selected_lse [Hkv, total_q], or None without with_lse: the
    ranking alone skips an exponential per score); no gradient."""
    c, s = config_args(cfg)
    topk, lse = _index_topk(_contig(qi.detach()), _contig(ki.detach()), cu_seqlens_q, cu_seqlens_k,
                            c, s, max_seqlen_q, max_seqlen_k, temperature, bool(with_lse))
    return topk, lse if with_lse else None


def kl_alignment_loss(q, k, lse, qi, ki, topk, cu_seqlens_q, cu_seqlens_k, cfg, coeff=1.0,
                      max_seqlen_q=0, max_seqlen_k=0) -> Tensor:
    """coeff * mean KL(teacher || index student), a scalar whose gradient reaches only qi, ki."""
    c, s = config_args(cfg)
    loss, _, _ = _kl(_contig(q.detach()), _contig(k.detach()), lse.detach(), _contig(qi),
                     _contig(ki), topk, cu_seqlens_q, cu_seqlens_k, c, s, max_seqlen_q,
                     max_seqlen_k, float(coeff))
    return loss.reshape(())


def msa_attention(q, k, v, qi, ki, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, cfg,
                  mode="sparse", kl_coeff=0.0, dense_backend=None) -> Tuple[Tensor, Tensor]:
    """MSA over packed varlen tensors. Returns (out [total_q, Hq, D], kl_loss scalar).

    mode "sparse": index top-k, sparse main branch, KL over the selected tokens;
    "warmup": dense main branch, KL over all visible tokens (MSA-CPT warmup);
    "dense": dense main branch, no index branch (qi, ki may be None), kl_loss = 0.
    The KL term (skipped when kl_coeff == 0) sends gradient only into qi and ki.
    dense_backend ("auto" | "msa" | "sdpa", None = msa.torch.dense_backend, itself from the
    environment variable MSA_DENSE_BACKEND, default "auto") picks mode "dense"'s kernel.
    """
    if mode not in MODES:
        raise ArgumentError(f"msa: argument 'mode': must be one of {MODES}, got {mode!r}", "mode")
    c, s = config_args(cfg)
    q, k, v = _contig(q), _contig(k), _contig(v)
    topk = None
    if mode == "sparse":
        topk, _ = _index_topk(_contig(qi.detach()), _contig(ki.detach()), cu_seqlens_q,
                              cu_seqlens_k, c, s, max_seqlen_q, max_seqlen_k, 1.0, False)
        out, lse = _sparse_fwd(q, k, v, topk, cu_seqlens_q, cu_seqlens_k, c, s, max_seqlen_q,
                               max_seqlen_k)
    elif mode == "dense":
        out = _dense_main(q, k, v, cu_seqlens_q, cu_seqlens_k, c, s, max_seqlen_q, max_seqlen_k,
                          dense_backend)
    else:
        out, lse = _dense_fwd(q, k, v, cu_seqlens_q, cu_seqlens_k, c, s, max_seqlen_q,
                              max_seqlen_k)
    if mode == "dense" or kl_coeff == 0.0 or qi is None:
        kl = out.new_zeros((), dtype=_stats_dtype(q.dtype))
    else:
        kl = kl_alignment_loss(q, k, lse, qi, ki, topk, cu_seqlens_q, cu_seqlens_k, (c, s),
                               kl_coeff, max_seqlen_q, max_seqlen_k)
    return out, kl


def positions_from_cu_seqlens(cu_seqlens: Tensor, total: int) -> Tensor:
    """Position of every packed token within its sequence (int64), without a host round trip."""
    idx = torch.arange(total, device=cu_seqlens.device)
    seq = torch.searchsorted(cu_seqlens[1:].to(torch.int64), idx, right=True)
    return idx - cu_seqlens.to(torch.int64)[seq]


# ---- layer -----------------------------------------------------------------------------------

class RMSNorm(nn.Module):
    """RMSNorm over the last dimension (per head when applied to [tokens, heads, dim])."""

    def __init__(self, dim: int, eps: float = 1e-6, device=None, dtype=None):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim, device=device, dtype=dtype))

    def forward(self, x: Tensor) -> Tensor:
        # torch's fused RMSNorm (one kernel each way; it accumulates in float32) wants the weight in
        # the input's dtype; the composite form was ~20 small ops a call, forward and backward.
        return F.rms_norm(x, (x.shape[-1],), self.weight.to(x.dtype), self.eps).to(x.dtype)


def _rotate(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotates the first 2 * cos.shape[-1] channels of x (half split) by the angles of cos/sin."""
    r = 2 * cos.shape[-1]
    xr = x[..., :r].float()
    x1, x2 = xr[..., : r // 2], xr[..., r // 2:]
    rot = torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).to(x.dtype)
    return torch.cat([rot, x[..., r:]], dim=-1) if r < x.shape[-1] else rot


class _Rotate(torch.autograd.Function):
    """Rotary as one autograd node: the gradient of a rotation is the rotation by the opposite
    angles, so the backward is the forward with -sin, and autograd records none of the slices and
    concatenations (their backward allocated and zero-filled a tensor per slice)."""

    @staticmethod
    def forward(ctx, x, cos, sin):
        ctx.save_for_backward(cos, sin)
        return _rotate(x, cos, sin)

    @staticmethod
    def backward(ctx, grad):
        cos, sin = ctx.saved_tensors
        return _rotate(grad, cos, -sin), None, None


class RotaryEmbedding:
    """Rotary position embedding on the first `rotary_dim` channels (partial rotary), half-split
    (GPT-NeoX) layout: a callable(q, k, positions) -> (q, k) usable as MSAAttention's `rotary`."""

    def __init__(self, rotary_dim: int, base: float = 10000.0):
        if rotary_dim % 2:
            raise ValueError("rotary_dim must be even")
        self.rotary_dim, self.base = rotary_dim, base

    def cos_sin(self, positions: Tensor) -> Tuple[Tensor, Tensor]:
        """(cos, sin) [T, 1, rotary_dim / 2] of every position."""
        r = self.rotary_dim
        inv = self.base ** (-torch.arange(0, r, 2, device=positions.device, dtype=torch.float32) / r)
        ang = positions.to(torch.float32)[:, None] * inv[None, :]  # [T, r/2]
        return ang.cos()[:, None, :], ang.sin()[:, None, :]

    def rotate(self, x: Tensor, positions: Tensor, cos_sin=None) -> Tensor:
        cos, sin = self.cos_sin(positions) if cos_sin is None else cos_sin
        return _Rotate.apply(x, cos, sin)

    def __call__(self, q: Tensor, k: Tensor, positions: Tensor) -> Tuple[Tensor, Tensor]:
        cs = self.cos_sin(positions)  # once for q and k
        return self.rotate(q, positions, cs), self.rotate(k, positions, cs)


RotaryHook = Callable[[Tensor, Tensor, Tensor], Tuple[Tensor, Tensor]]


class MSAAttention(nn.Module):
    """GQA attention with MSA's index branch, over packed varlen tokens.

    forward(hidden [T, d_model], cu_seqlens int32 [batch+1], max_seqlen=0, positions=None,
    mode=None) -> (output [T, d_model], kl_loss scalar).

    Main branch: q/k/v/o projections (optional per-head RMSNorm on q, k; `rotary` hook). Index
    branch: W_qi (qi_proj: d_model -> Hkv*Di) and W_ki (ki_proj: d_model -> Di) read the hidden
    states *detached*, so the KL loss trains only them (and their norms); optional per-head RMSNorm
    and the same `rotary` hook (or `index_rotary`) on qi/ki.
    """

    def __init__(self, d_model: int, num_q_heads: int, num_kv_heads: int, head_dim: int,
                 index_head_dim: int = 128, block_size: int = 128, topk: int = 16,
                 scale: float = 0.0, index_scale: float = 0.0, mode: str = "sparse",
                 kl_coeff: float = 1.0, qk_norm: bool = False, index_norm: bool = False,
                 rotary: Optional[RotaryHook] = None, index_rotary: Optional[RotaryHook] = None,
                 bias: bool = False, norm_eps: float = 1e-6, device=None, dtype=None,
                 dense_backend: Optional[str] = None):
        super().__init__()
        if mode not in MODES:
            raise ArgumentError(f"msa: argument 'mode': must be one of {MODES}", "mode")
        self.cfg = _C.Config(num_q_heads=num_q_heads, num_kv_heads=num_kv_heads,
                             head_dim=head_dim, index_head_dim=index_head_dim,
                             block_size=block_size, topk=topk, scale=scale,
                             index_scale=index_scale)
        self.cfg.validate()
        self._cfg_args = config_args(self.cfg)  # plain Python values: traceable by torch.compile
        self.d_model, self.mode, self.kl_coeff = d_model, mode, kl_coeff
        self.dense_backend = dense_backend  # mode "dense"'s kernel; None = msa.torch.dense_backend
        self.num_q_heads, self.num_kv_heads = num_q_heads, num_kv_heads
        self.head_dim, self.index_head_dim = head_dim, index_head_dim
        f = dict(device=device, dtype=dtype)
        self.q_proj = nn.Linear(d_model, num_q_heads * head_dim, bias=bias, **f)
        self.k_proj = nn.Linear(d_model, num_kv_heads * head_dim, bias=bias, **f)
        self.v_proj = nn.Linear(d_model, num_kv_heads * head_dim, bias=bias, **f)
        self.o_proj = nn.Linear(num_q_heads * head_dim, d_model, bias=bias, **f)
        self._init_index_branch(index_norm, qk_norm, norm_eps, f)
        self.rotary = rotary
        self.index_rotary = index_rotary if index_rotary is not None else rotary

    def _init_index_branch(self, index_norm, qk_norm, eps, f):
        self.qi_proj = nn.Linear(self.d_model, self.num_kv_heads * self.index_head_dim, bias=False, **f)
        self.ki_proj = nn.Linear(self.d_model, self.index_head_dim, bias=False, **f)
        self.q_norm = RMSNorm(self.head_dim, eps, **f) if qk_norm else None
        self.k_norm = RMSNorm(self.head_dim, eps, **f) if qk_norm else None
        self.qi_norm = RMSNorm(self.index_head_dim, eps, **f) if index_norm else None
        self.ki_norm = RMSNorm(self.index_head_dim, eps, **f) if index_norm else None

    def index_branch(self, hidden: Tensor, positions: Tensor) -> Tuple[Tensor, Tensor]:
        """qi [T, Hkv, Di], ki [T, Di] from detached hidden states."""
        T, h = hidden.shape[0], hidden.detach()
        qi = self.qi_proj(h).view(T, self.num_kv_heads, self.index_head_dim)
        ki = self.ki_proj(h).view(T, 1, self.index_head_dim)
        if self.qi_norm is not None:
            qi, ki = self.qi_norm(qi), self.ki_norm(ki)
        if self.index_rotary is not None:
            qi, ki = self.index_rotary(qi, ki, positions)
        return qi, ki.reshape(T, self.index_head_dim)

    def forward(self, hidden: Tensor, cu_seqlens: Tensor, max_seqlen: int = 0,
                positions: Optional[Tensor] = None, mode: Optional[str] = None):
        mode = mode or self.mode
        T = hidden.shape[0]
        q = self.q_proj(hidden).view(T, self.num_q_heads, self.head_dim)
        k = self.k_proj(hidden).view(T, self.num_kv_heads, self.head_dim)
        v = self.v_proj(hidden).view(T, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        if positions is None and (self.rotary is not None or self.index_rotary is not None):
            positions = positions_from_cu_seqlens(cu_seqlens, T)
        if self.rotary is not None:
            q, k = self.rotary(q, k, positions)
        qi = ki = None
        if mode != "dense":
            qi, ki = self.index_branch(hidden, positions)
        out, kl = msa_attention(q, k, v, qi, ki, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen,
                                self._cfg_args, mode, self.kl_coeff, self.dense_backend)
        return self.o_proj(out.reshape(T, self.num_q_heads * self.head_dim)), kl


def _find_attr(module, names, given):
    if given is not None:
        return given
    for holder in (module, getattr(module, "config", None)):
        for n in names:
            val = getattr(holder, n, None) if holder is not None else None
            if isinstance(val, int):
                return val
    return None


def convert_gqa_to_msa(module: nn.Module, index_head_dim: int = 128, block_size: int = 128,
                       topk: int = 16, num_q_heads: Optional[int] = None,
                       num_kv_heads: Optional[int] = None, head_dim: Optional[int] = None,
                       mode: str = "warmup", kl_coeff: float = 1.0, index_norm: bool = False,
                       rotary: Optional[RotaryHook] = None,
                       index_rotary: Optional[RotaryHook] = None, scale: float = 0.0,
                       proj_names: Sequence[str] = ("q_proj", "k_proj", "v_proj", "o_proj"),
                       init_std: Optional[float] = None) -> MSAAttention:
    """MSA-CPT: wrap a trained GQA attention module (with q/k/v/o nn.Linear projections) into an
    MSAAttention that shares those very Linear modules (no copy) and adds fresh W_qi / W_ki.

    Head counts come from the arguments, else from the module or its `.config`
    (num_heads / num_attention_heads, num_key_value_heads / num_kv_heads, head_dim), else
    head_dim = q_proj.out_features / num_q_heads. Starts in `mode` (default "warmup": dense main
    branch while the index branch learns by KL; switch `.mode = "sparse"` afterwards).
    """
    projs = [getattr(module, n, None) for n in proj_names]
    for n, p in zip(proj_names, projs):
        if not isinstance(p, nn.Linear):
            raise ArgumentError(f"msa: argument 'module': has no nn.Linear '{n}'", "module")
    q_proj, k_proj, v_proj, o_proj = projs
    hq = _find_attr(module, ("num_heads", "num_attention_heads", "num_q_heads"), num_q_heads)
    hkv = _find_attr(module, ("num_key_value_heads", "num_kv_heads"), num_kv_heads)
    if hq is None or hkv is None:
        raise ArgumentError("msa: argument 'num_q_heads': cannot infer the head counts; pass "
                            "num_q_heads and num_kv_heads", "num_q_heads")
    d = _find_attr(module, ("head_dim",), head_dim) or q_proj.out_features // hq
    if q_proj.out_features != hq * d or k_proj.out_features != hkv * d:
        raise ArgumentError("msa: argument 'head_dim': projections do not match "
                            f"Hq={hq}, Hkv={hkv}, D={d}", "head_dim")
    w = q_proj.weight
    layer = MSAAttention(q_proj.in_features, hq, hkv, d, index_head_dim, block_size, topk,
                         scale=scale, mode=mode, kl_coeff=kl_coeff, index_norm=index_norm,
                         rotary=rotary, index_rotary=index_rotary,
                         bias=q_proj.bias is not None, device=w.device, dtype=w.dtype)
    layer.q_proj, layer.k_proj, layer.v_proj, layer.o_proj = q_proj, k_proj, v_proj, o_proj
    std = init_std if init_std is not None else 1.0 / math.sqrt(q_proj.in_features)
    with torch.no_grad():
        layer.qi_proj.weight.normal_(0.0, std)
        layer.ki_proj.weight.normal_(0.0, std)
    return layer
