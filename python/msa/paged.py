"""Serving API of MSA (include/msa/paged.h, docs/serving.md): a paged KV cache and one step of a
batch of requests. Thin wrappers of msa._C's paged_plan / paged_append_kv / paged_run; every array
is preallocated by the caller (DLPack: torch or numpy), nothing is allocated per layer.

    p = msa.paged.plan(cfg, q_lens, kv_lens, dtype="bfloat16", device="cuda")   # host, per step
    ws = torch.empty(p.workspace_bytes, dtype=torch.uint8, device="cuda")
    batch = msa.paged.Batch(cu_seqlens_q, kv_lens, page_table)                     # device int32
    cache = msa.paged.Cache(k_cache, v_cache, ki_cache)                            # per layer
    msa.paged.append(p, batch, k_new, v_new, ki_new, cache)
    msa.paged.run(p, batch, q, qi, cache, out, lse, topk, ws)

FP8 E4M3 caches: pass the cache as uint8 bytes of the same shape (torch: ``t.view(torch.uint8)``)
with its f32 scale (``k_scale`` / ``v_scale`` [num_pages, Hkv], ``ki_scale`` [num_pages]).

K / V pages may lie token-major ([num_pages, B, Hkv, D], contiguous) or head-major in memory
([num_pages, Hkv, B, D], FlashInfer's "HND"): pass ``head_major(storage)``, a strided view of the
logical shape. Any outer strides work; the innermost dimension must be contiguous.
"""
from dataclasses import dataclass
from typing import Any, Optional

import numpy as _np

from . import _C

PagedPlan = _C.PagedPlan


@dataclass
class Batch:
    """Per-step lengths on the device of the tensors: cu_seqlens_q [batch+1], kv_lens [batch]
    (new tokens included), page_table [batch, max_pages], all int32."""
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


def head_major(storage):
    """The logical [num_pages, B, Hkv, D] view of K or V pages stored head-major,
    [num_pages, Hkv, B, D] (torch tensor or NumPy array; no copy). Each (page, head) is then one
    contiguous run of B rows, the order in which the decode attention reads a group's keys."""
    return storage.swapaxes(1, 2)


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


def append(p: PagedPlan, batch: Batch, k_new, v_new, ki_new, cache: Cache, stream=0):
    """Writes the step's new k / v / ki rows [total_q, ...] into their pages (FP8: quantised with
    the page's scale)."""
    _C.paged_append_kv(p, batch.cu_seqlens_q, batch.kv_lens, batch.page_table, k_new, v_new, ki_new,
                       cache.k, cache.v, cache.ki, k_scale=cache.k_scale, v_scale=cache.v_scale,
                       ki_scale=cache.ki_scale, stream=stream)


def run(p: PagedPlan, batch: Batch, q, qi, cache: Cache, out, lse, topk, workspace, stream=0):
    """One layer: index top-k then sparse attention (dense mode: qi / topk may be None). Writes out
    [total_q, Hq, D], lse [total_q, Hq] f32 and topk [Hkv, total_q, k] int32 (logical block ids)."""
    _C.paged_run(p, batch.cu_seqlens_q, batch.kv_lens, batch.page_table, q, qi, cache.k, cache.v,
                 cache.ki, out, lse, topk, workspace, k_scale=cache.k_scale, v_scale=cache.v_scale,
                 ki_scale=cache.ki_scale, stream=stream)
