"""The serving API as torch custom ops, so that a model calling it compiles with
``torch.compile(fullgraph=True)``: ``torch.ops.msa.paged_append_kv`` and ``torch.ops.msa.paged_run``.

The plan is not an op argument (custom-op schemas take tensors and scalars, and a plan object would
make dynamo guard on it and recompile every step). It comes from the step's scope, the way serving
engines pass their per-step attention metadata to compiled models::

    import msa.paged, msa.paged_torch
    layer_step = torch.compile(model_step, fullgraph=True)   # calls msa.paged_torch.append / run
    for step in steps:
        p = msa.paged.plan(cfg, q_lens, kv_lens, dtype="bfloat16", device="cuda")
        with msa.paged.use_plan(p):
            layer_step(...)

A new plan (other lengths, page tables) needs no recompilation: the compiled graph only holds the
ops. Grids still come from the plan when the op runs, so a CUDA graph captured from a compiled step
replays the plan it was captured with (as with ``msa.paged.run`` itself; docs/serving.md).
"""
from typing import Optional

import torch
from torch import Tensor

from . import paged
from ._errors import ArgumentError

__all__ = ["append", "run"]


def _plan() -> paged.PagedPlan:
    p = paged.current_plan()
    if p is None:
        raise ArgumentError("plan: no plan in scope; call the step inside msa.paged.use_plan(plan)", "plan")
    return p


@torch.library.custom_op("msa::paged_append_kv", mutates_args=("k_cache", "v_cache", "ki_cache"))
def _append(cu_seqlens_q: Tensor, kv_lens: Tensor, page_table: Tensor, k_new: Tensor, v_new: Tensor,
            ki_new: Tensor, k_cache: Tensor, v_cache: Tensor, ki_cache: Tensor,
            k_scale: Optional[Tensor], v_scale: Optional[Tensor], ki_scale: Optional[Tensor]) -> None:
    paged.append(_plan(), paged.Batch(cu_seqlens_q, kv_lens, page_table), k_new, v_new, ki_new,
                 paged.Cache(k_cache, v_cache, ki_cache, k_scale, v_scale, ki_scale))


@_append.register_fake
def _(*args) -> None:
    return None


@torch.library.custom_op("msa::paged_run", mutates_args=("out", "lse", "topk", "workspace"))
def _run(cu_seqlens_q: Tensor, kv_lens: Tensor, page_table: Tensor, q: Tensor, qi: Optional[Tensor],
         k_cache: Tensor, v_cache: Tensor, ki_cache: Tensor, k_scale: Optional[Tensor],
         v_scale: Optional[Tensor], ki_scale: Optional[Tensor], out: Tensor, lse: Tensor,
         topk: Optional[Tensor], workspace: Tensor) -> None:
    paged.run(_plan(), paged.Batch(cu_seqlens_q, kv_lens, page_table), q, qi,
              paged.Cache(k_cache, v_cache, ki_cache, k_scale, v_scale, ki_scale), out, lse, topk,
              workspace)


@_run.register_fake
def _(*args) -> None:
    return None


def append(batch: paged.Batch, k_new: Tensor, v_new: Tensor, ki_new: Tensor, cache: paged.Cache) -> None:
    """msa.paged.append with the plan of the enclosing msa.paged.use_plan."""
    torch.ops.msa.paged_append_kv(batch.cu_seqlens_q, batch.kv_lens, batch.page_table, k_new, v_new,
                                  ki_new, cache.k, cache.v, cache.ki, cache.k_scale, cache.v_scale,
                                  cache.ki_scale)


def run(batch: paged.Batch, q: Tensor, qi: Optional[Tensor], cache: paged.Cache, out: Tensor, lse: Tensor,
        topk: Optional[Tensor], workspace: Tensor) -> None:
    """msa.paged.run with the plan of the enclosing msa.paged.use_plan."""
    torch.ops.msa.paged_run(batch.cu_seqlens_q, batch.kv_lens, batch.page_table, q, qi, cache.k, cache.v,
                            cache.ki, cache.k_scale, cache.v_scale, cache.ki_scale, out, lse, topk,
                            workspace)
