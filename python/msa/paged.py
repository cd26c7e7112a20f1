"""Serving API of MSA (include/msa/paged.h, docs/serving.md): a paged KV cache and one step of a
batch of requests. Thin wrappers of msa._C's paged_plan / paged_append_kv / paged_run; every array
is preallocated by the caller (DLPack: torch or numpy), nothing is allocated per layer.

    p = msa.paged.plan(cfg, q_lens, kv_lens, dtype="bfloat16", device="cuda")   # host, per step
    ws = torch.empty(p.workspace_bytes, dtype=torch.uint8, device="cuda")
    batch = msa.paged.Batch(cu_seqlens_q, kv_lens, page_table)                     # device int32
    cache = msa.paged.Cache(k_cache, v_cache, ki_cache)                            # per layer
    msa.paged.append(p, batch, k_new, v_new, ki_new, cache)
    msa.paged.check_batch(p, batch, cache)   # optional: on a GPU, reads the batch back (a sync)
    msa.paged.run(p, batch, q, qi, cache, out, lse, topk, ws)

FP8 E4M3 caches: torch ``float8_e4m3fn`` tensors, or their bytes as uint8 of the same shape (NumPy,
or torch ``t.view(torch.uint8)``), with the f32 scales (``k_scale`` / ``v_scale`` [num_pages, Hkv],
``ki_scale`` [num_pages]).

K / V pages may lie token-major ([num_pages, B, Hkv, D], contiguous) or head-major in memory
([num_pages, Hkv, B, D], FlashInfer's "HND"): pass ``head_major(storage)``, a strided view of the
logical shape. Any outer strides work; the innermost dimension must be contiguous.

Compiled models (torch.compile) call msa.paged_torch.append / run instead, which take the plan from
the enclosing ``with msa.paged.use_plan(p):``.
"""
import contextlib
import contextvars
import sys
from dataclasses import dataclass
from typing import Any, Optional

import numpy as _np

from . import _C
from ._errors import ArgumentError

PagedPlan = _C.PagedPlan


@dataclass
class Batch:
    """Per-step lengths on the device of the tensors: cu_seqlens_q [batch+1], kv_lens [batch]
    (new tokens included), page_table [batch, max_pages], all int32. Page ids must lie in
    [0, num_pages): the CPU raises ArgumentError; on a GPU the rows that would read a page outside
    the cache come out NaN (a kernel cannot raise without a synchronisation; check_batch can)."""
    cu_seqlens_q: Any
    kv_lens: Any
    page_table: Any


@dataclass
class Cache:
    """One layer's paged cache: k, v [num_pages, B, Hkv, D], ki [num_pages, B, Di]."""
    k: Any
    v: Any
    ki: Any
    k_scale: Optional[Any] = None
    v_scale: Optional[Any] = None
    ki_scale: Optional[Any] = None


_current_plan = contextvars.ContextVar("msa_paged_plan", default=None)


@contextlib.contextmanager
def use_plan(p: PagedPlan):
    """The plan that msa.paged_torch's ops use inside the block (per thread / async task)."""
    if not isinstance(p, PagedPlan):
        raise ArgumentError(f"plan: expected an msa.paged.PagedPlan, got {type(p).__name__}", "plan")
    token = _current_plan.set(p)
    try:
        yield p
    finally:
        _current_plan.reset(token)


def current_plan() -> Optional[PagedPlan]:
    """The plan of the innermost enclosing use_plan, or None."""
    return _current_plan.get()


def head_major(storage):
    """The logical [num_pages, B, Hkv, D] view of K or V pages stored head-major,
    [num_pages, Hkv, B, D] (torch tensor or NumPy array; no copy). Each (page, head) is then one
    contiguous run of B rows, the order in which the decode attention reads a group's keys."""
    return storage.swapaxes(1, 2)


def _dl(x):
    """What the binding receives for one array: torch tensors as DLPack capsules. Given the tensor,
    nanobind would call Tensor.__dlpack__(), which makes the default stream wait on the current one
    through an event: an error inside a CUDA graph capture on a side stream (torch.cuda.graph), and
    a cross-stream wait per tensor otherwise. NumPy arrays and capsules pass as they are."""
    torch = sys.modules.get("torch")
    if x is None or torch is None or not isinstance(x, torch.Tensor):
        return x
    if x.dtype == torch.float8_e4m3fn:  # DLPack has no E4M3 code: its bytes, which a cache reads as FP8
        x = x.view(torch.uint8)
    return torch.utils.dlpack.to_dlpack(x.detach())


def _stream(stream, like):
    """The stream to launch on: the caller's, else torch's current stream for CUDA tensors, else 0."""
    if stream is not None:
        return stream
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(like, torch.Tensor) and like.is_cuda:
        return torch.cuda.current_stream(like.device).cuda_stream
    return 0


def _host_int32(x):
    if hasattr(x, "detach"):  # torch
        x = x.detach().cpu().numpy()
    return _np.ascontiguousarray(_np.asarray(x, dtype=_np.int32))


def plan(cfg, q_lens, kv_lens, dtype="bfloat16", device="cpu", device_index=0, dense=False,
         num_threads=0, num_workers=0) -> PagedPlan:
    """Host-side plan of one step (outside any graph capture); serves every layer of the step.
    q_lens / kv_lens: host integer sequences. device: "cpu" or "cuda"."""
    return _C.paged_plan(cfg, _host_int32(q_lens), _host_int32(kv_lens), dtype=dtype, device=device,
                         device_index=device_index, dense=dense, num_threads=num_threads,
                         num_workers=num_workers)


def append(p: PagedPlan, batch: Batch, k_new, v_new, ki_new, cache: Cache, stream=None):
    """Writes the step's new k / v / ki rows [total_q, ...] into their pages (FP8: quantised with
    the page's scale). stream: a CUDA stream handle (int); default torch's current stream."""
    _C.paged_append_kv(p, _dl(batch.cu_seqlens_q), _dl(batch.kv_lens), _dl(batch.page_table), _dl(k_new),
                       _dl(v_new), _dl(ki_new), _dl(cache.k), _dl(cache.v), _dl(cache.ki),
                       k_scale=_dl(cache.k_scale), v_scale=_dl(cache.v_scale), ki_scale=_dl(cache.ki_scale),
                       stream=_stream(stream, k_new))


def check_batch(p: PagedPlan, batch: Batch, cache: Cache, stream=None):
    """Raises ArgumentError when the batch's contents disagree with the plan (cu_seqlens_q, kv_lens)
    or a page id a request uses lies outside the cache. The CPU's run checks this on every call; on
    a GPU this reads the tensors back and synchronises the stream, so call it outside graph capture
    (a debug mode, a test, or once per step where a sync is affordable)."""
    _C.paged_check_batch(p, _dl(batch.cu_seqlens_q), _dl(batch.kv_lens), _dl(batch.page_table), _dl(cache.k),
                         _dl(cache.v), _dl(cache.ki), k_scale=_dl(cache.k_scale), v_scale=_dl(cache.v_scale),
                         ki_scale=_dl(cache.ki_scale), stream=_stream(stream, batch.page_table))


def run(p: PagedPlan, batch: Batch, q, qi, cache: Cache, out, lse, topk, workspace, stream=None):
    """One layer: index top-k then sparse attention (dense mode: qi / topk may be None). Writes out
    [total_q, Hq, D], lse [total_q, Hq] f32 and topk [Hkv, total_q, k] int32 (logical block ids).
    stream: a CUDA stream handle (int); default torch's current stream (so the call can be captured
    by torch.cuda.graph)."""
    _C.paged_run(p, _dl(batch.cu_seqlens_q), _dl(batch.kv_lens), _dl(batch.page_table), _dl(q), _dl(qi),
                 _dl(cache.k), _dl(cache.v), _dl(cache.ki), _dl(out), _dl(lse), _dl(topk), _dl(workspace),
                 k_scale=_dl(cache.k_scale), v_scale=_dl(cache.v_scale), ki_scale=_dl(cache.ki_scale),
                 stream=_stream(stream, q))
