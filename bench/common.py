"""Timing and bookkeeping helpers shared by the benchmarks (see docs/benchmarks.md for the method).

Everything that touches the GPU imports torch lazily, so the pure helpers (statistics, JSON writing,
commit lookup) also run on a machine without torch.
"""
from __future__ import annotations

import datetime as _dt
import json
import os
import statistics
import subprocess
import time
from typing import Callable, Dict, List, Optional, Sequence


# ---- run metadata -------------------------------------------------------------------------------
def git_commit(repo_root: Optional[str] = None) -> str:
    """MSA_COMMIT wins: the device machine gets a copy of the working tree without .git."""
    env = os.environ.get("MSA_COMMIT", "").strip()
    if env:
        return env
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo_root, capture_output=True,
                             text=True, timeout=10)
        if out.returncode == 0 and out.stdout.strip():
            return out.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        pass
    return "unknown"


def utc_timestamp() -> str:
    return _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat()


def slug(text: str) -> str:
    keep = [c.lower() if c.isalnum() else "-" for c in text]
    out = "".join(keep)
    while "--" in out:
        out = out.replace("--", "-")
    return out.strip("-") or "x"


def write_json_atomic(path: str, obj) -> None:
    """Rewritten after every measured row, so a run killed by its time limit still leaves data."""
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(finite(obj), f, indent=1, sort_keys=False, allow_nan=False, default=_json_default)
        f.write("\n")
    os.replace(tmp, path)


def finite(obj):
    """NaN/inf become null: strict JSON, and a missing number never reads as a measurement."""
    if isinstance(obj, float):
        return obj if obj == obj and obj not in (float("inf"), float("-inf")) else None
    if isinstance(obj, dict):
        return {str(k): finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite(v) for v in obj]
    return obj


def _json_default(x):
    try:
        return float(x)
    except (TypeError, ValueError):
        return str(x)


# ---- statistics ---------------------------------------------------------------------------------
def summarize_ms(samples: Sequence[float]) -> Dict[str, float]:
    s = sorted(samples)
    n = len(s)

    def q(p: float) -> float:
        return s[min(n - 1, max(0, int(round(p * (n - 1)))))]

    return {"ms_median": statistics.median(s), "ms_min": s[0], "ms_p10": q(0.1), "ms_p90": q(0.9),
            "iters": n}


def tflops(flops: float, ms: float) -> float:
    return flops / (ms * 1e-3) / 1e12 if ms > 0 else float("nan")


# ---- input rotation -----------------------------------------------------------------------------
def l2_bytes() -> int:
    import torch
    props = torch.cuda.get_device_properties(torch.cuda.current_device())
    return int(getattr(props, "L2_cache_size", 50 * 2**20))


def rotation_sets(bytes_per_set: int, l2: int, max_sets: int = 3) -> int:
    """Inputs below ~3x L2 would partly stay cached between timed calls: rotate among sets then."""
    if bytes_per_set >= 3 * l2:
        return 1
    return max_sets if bytes_per_set < l2 else 2


def tensor_bytes(*tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


# ---- timing with CUDA events --------------------------------------------------------------------
class OverBudget(RuntimeError):
    """One warm-up call showed that the timed loop would not fit in the time allowed."""


def _warm_up(calls, warmup: int, target_s: Optional[float], sync: Callable[[], None]) -> float:
    """Runs the warm-up calls; returns the mean seconds of one (synchronised) call."""
    n = len(calls)
    t0 = time.perf_counter()
    done = 0
    for i in range(max(1, warmup)):
        calls[i % n]()
        sync()
        done += 1
        # Seconds-long calls (dense attention at 256K) are warm after one call.
        if target_s is not None and time.perf_counter() - t0 > target_s / 3:
            break
    return (time.perf_counter() - t0) / done


def _iterations(warm_s: float, iters: int, min_iters: int, target_s: Optional[float],
                max_total_s: Optional[float]) -> int:
    if target_s is not None and warm_s > 0:
        iters = max(min_iters, min(iters, int(target_s / warm_s)))
    if max_total_s is not None and warm_s * iters > max_total_s:
        raise OverBudget(f"one call takes {warm_s:.2f} s; {iters} timed calls do not fit in "
                         f"{max_total_s:.0f} s")
    return iters


def cuda_time(calls: Sequence[Callable[[], object]], warmup: int = 3, iters: int = 20,
              min_iters: int = 3, target_s: Optional[float] = None,
              max_total_s: Optional[float] = None) -> Dict[str, float]:
    """Times `calls[i % len(calls)]()` with one event pair per call on the current stream.

    Warm-up runs first (module load, autotuning, handle creation). With target_s, the iteration
    count is cut so that the timed loop takes about target_s (long dense baselines at 256K), but
    never below min_iters. With max_total_s, a loop that would take longer raises OverBudget after
    the warm-up (a time budget then skips the method instead of overrunning). Returns the median
    and spread in milliseconds.
    """
    import torch
    n = len(calls)
    warm_s = _warm_up(calls, warmup, target_s, torch.cuda.synchronize)
    iters = _iterations(warm_s, iters, min_iters, target_s, max_total_s)
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(iters)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(iters)]
    for i in range(iters):
        starts[i].record()
        calls[i % n]()
        ends[i].record()
    torch.cuda.synchronize()
    res = summarize_ms([s.elapsed_time(e) for s, e in zip(starts, ends)])
    res["input_sets"] = n
    return res


def cuda_graph_replays(calls: Sequence[Callable[[], object]]) -> list:
    """Each call captured once into a CUDA graph (torch.cuda.graph, on its side stream); returns the
    replays. Serving engines run a decode step this way, so its time carries no host launch cost.
    The caller warms the calls up first (module loads, workspace sizing)."""
    import torch
    graphs = []
    for call in calls:
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            call()
        graphs.append(g)
    return [g.replay for g in graphs]


def host_time(calls: Sequence[Callable[[], object]], warmup: int = 3, iters: int = 20,
              min_iters: int = 3, target_s: Optional[float] = None,
              max_total_s: Optional[float] = None) -> Dict[str, float]:
    """cuda_time's twin for CPU runs (the benchmarks' CPU test mode): perf_counter per call."""
    n = len(calls)
    warm_s = _warm_up(calls, warmup, target_s, lambda: None)
    iters = _iterations(warm_s, iters, min_iters, target_s, max_total_s)
    samples = []
    for i in range(iters):
        t0 = time.perf_counter()
        calls[i % n]()
        samples.append((time.perf_counter() - t0) * 1e3)
    res = summarize_ms(samples)
    res["input_sets"] = n
    return res


class Budget:
    """Wall-clock budget for the whole run: later work is recorded as skipped, never half-done."""

    def __init__(self, seconds: Optional[float]):
        self.t0 = time.perf_counter()
        self.seconds = seconds

    def left(self) -> float:
        if self.seconds is None:
            return float("inf")
        return self.seconds - (time.perf_counter() - self.t0)

    def exhausted(self, reserve: float = 0.0) -> bool:
        return self.left() <= reserve


def short_error(e: BaseException, limit: int = 300) -> str:
    msg = f"{type(e).__name__}: {e}".strip().replace("\n", " | ")
    return msg if len(msg) <= limit else msg[: limit - 3] + "..."


def fmt_ms(x: Optional[float]) -> str:
    if x is None:
        return "-"
    return f"{x:.3f}" if x < 10 else f"{x:.1f}"


def print_table(headers: List[str], rows: List[List[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]
    lines = ["  ".join(h.rjust(w) for h, w in zip(headers, widths))]
    for r in rows:
        lines.append("  ".join(c.rjust(w) for c, w in zip(r, widths)))
    text = "\n".join(lines)
    print(text, flush=True)
    return text


def first_gqa_variant(make: Callable[[bool], list], group_size: int, sync: Callable[[], None],
                      empty_cache: Callable[[], None]):
    """SDPA with native GQA (enable_gqa=True) first; if the backend refuses it, K/V expanded to the
    query heads. make(native) builds the timed calls; the first one is run once to find out.
    Returns (calls, gqa_mode, note); raises RuntimeError naming every refusal."""
    errors = []
    for native in ([True, False] if group_size > 1 else [False]):
        try:
            calls = make(native)
            calls[0]()
            sync()
            mode = "enable_gqa" if native else ("expanded_kv" if group_size > 1 else "mha")
            return calls, mode, (f"native GQA refused: {errors[0]}" if errors else None)
        except Exception as e:
            what = "enable_gqa" if native else ("expanded K/V" if group_size > 1 else "MHA")
            errors.append(f"{what}: {short_error(e, 200)}")
            calls = None
            empty_cache()
    raise RuntimeError("; ".join(errors))
