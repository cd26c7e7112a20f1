#!/usr/bin/env python3
"""Turns bench/results/*.json (written by bench_prefill.py and bench_training.py) into the README
performance tables and a plot of MSA's prefill speedup over the strongest dense baseline against
context length.

    python3 bench/make_report.py                 # README.md table + bench/results/speedup_vs_context.png
    python3 bench/make_report.py --print         # print the table only, write nothing

The prefill table goes between the markers <!-- perf-table --> and <!-- /perf-table --> of README.md,
the training table between <!-- training-table --> and <!-- /training-table -->, the decode table
(bench_decode.py, plot bench/results/decode_speedup_vs_context.png) between <!-- decode-table --> and
<!-- /decode-table -->, the CPU prefill table (bench_cpu.py, report_cpu.py, plot
bench/results/cpu_speedup_vs_context.png) between <!-- cpu-table --> and <!-- /cpu-table -->; without them it is printed. Every row names the device and commit its numbers come from. Where several
result files cover the same (device, config, context, inputs), the newest one wins.
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import sys

import report_cpu
import report_training_plot

HERE = os.path.dirname(os.path.abspath(__file__))
REPO_ROOT = os.path.dirname(HERE)
START, END = "<!-- perf-table -->", "<!-- /perf-table -->"
TRAIN_START, TRAIN_END = "<!-- training-table -->", "<!-- /training-table -->"
HF_START, HF_END = "<!-- hf-table -->", "<!-- /hf-table -->"
DECODE_START, DECODE_END = "<!-- decode-table -->", "<!-- /decode-table -->"
DENSE = ("cudnn_dense", "fa2_dense")
COLUMNS = [  # (method, header)
    ("msa_index_topk", "MSA index top-k"),
    ("msa_sparse_forward", "MSA sparse fwd"),
    ("msa_total", "MSA total"),
    ("cudnn_dense", "cuDNN dense"),
    ("fa2_dense", "FA2 dense"),
    ("flex_block_sparse", "Flex block-sparse"),
    ("torch_topk", "torch.topk"),
]


def load_results(paths, benchmark="prefill"):
    docs = []
    for path in sorted(paths):
        try:
            with open(path) as f:
                doc = json.load(f)
        except (OSError, ValueError) as e:
            print(f"make_report: skipping {path}: {e}", file=sys.stderr)
            continue
        if not isinstance(doc, dict) or "rows" not in doc:
            print(f"make_report: skipping {path}: not a benchmark result", file=sys.stderr)
            continue
        if doc.get("benchmark", "prefill") != benchmark:
            continue
        if doc.get("config", {}).get("cpu_test"):   # bench_training.py --cpu: a test, not a result
            print(f"make_report: skipping {path}: a --cpu test run", file=sys.stderr)
            continue
        doc["_path"] = os.path.relpath(path, REPO_ROOT)
        docs.append(doc)
    return docs


def config_label(doc, name):
    p = doc.get("config", {}).get("configs", {}).get(name)
    if p:
        return f"Hq={p['hq']} Hkv={p['hkv']} D={p['d']}"
    return name


def collect_cases(docs):
    """One entry per (device, config, context, inputs): the newest document that measured it."""
    cases = {}
    for doc in sorted(docs, key=lambda d: d.get("timestamp", "")):
        by_case = {}
        for r in doc["rows"]:
            by_case.setdefault((r["config"], r["context"], r["inputs"]), []).append(r)
        for (cfg, ctx, inputs), rows in by_case.items():
            if not any(r.get("ms_median") is not None for r in rows):
                continue
            key = (doc.get("device", "?"), cfg, ctx, inputs)
            cases[key] = {"doc": doc, "rows": {r["method"]: r for r in rows}, "dense_from": None,
                          "extra": next((c for c in doc.get("cases", [])
                                         if (c.get("config"), c.get("context"), c.get("inputs")) ==
                                         (cfg, ctx, inputs)), {})}
    # Dense attention does not depend on the index inputs: the i.i.d. case borrows the dense rows
    # measured on smooth inputs of the same file, device, config and context.
    for (device, cfg, ctx, inputs), c in cases.items():
        if best_dense(c["rows"])[0] is None:
            other = cases.get((device, cfg, ctx, "smooth"))
            if other is not None and other["doc"] is c["doc"]:
                for m in DENSE:
                    if ms_of(other["rows"].get(m)) is not None:
                        c["rows"][m] = other["rows"][m]
                c["dense_from"] = "smooth"
    return cases


def ms_of(row):
    return None if row is None else row.get("ms_median")


def best_dense(rows):
    found = [(ms_of(rows.get(m)), m) for m in DENSE if ms_of(rows.get(m)) is not None]
    return min(found) if found else (None, None)


def speedup(rows, method="msa_total"):
    dense_ms, _ = best_dense(rows)
    ms = ms_of(rows.get(method))
    return dense_ms / ms if dense_ms and ms else None


def fmt_ms(x):
    if x is None:
        return "n/a"
    return f"{x:.3f}" if x < 1 else (f"{x:.2f}" if x < 100 else f"{x:.0f}")


def fmt_ctx(n):
    return f"{n // 1024}K" if n % 1024 == 0 else str(n)


def error_notes(errors, shown=20):
    """Markdown lines listing the failed or skipped measurements (the first `shown` of them)."""
    if not errors:
        return []
    notes = ["", "Failed or skipped measurements:", ""] + [f"- {e}" for e in errors[:shown]]
    if len(errors) > shown:
        notes.append(f"- ... and {len(errors) - shown} more (see the JSON files)")
    return notes


def finish_table(lines, description, sources, errors, plot_link=None, plot_alt=""):
    """A markdown table's rows, then its description, its source files, its plot and its failures."""
    notes = ["", description, "", "Sources: " + ", ".join(f"`{s}`" for s in sources) + "."]
    if plot_link:
        notes += ["", f"![{plot_alt}]({plot_link})"]
    notes += error_notes(errors)
    return "\n".join(lines) + "\n" + "\n".join(notes)


def make_table(cases):
    headers = (["Device", "Commit", "Config", "Context", "Index q"] + [h + " (ms)" for _, h in COLUMNS] +
               ["MSA fwd TFLOP/s", "Speedup vs best dense", "Blocks per 64-q tile"])
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    errors, sources = [], []
    order = sorted(cases, key=lambda k: (k[0], k[1], k[3] != "smooth", k[2]))
    for key in order:
        device, cfg, ctx, inputs = key
        c = cases[key]
        doc, rows, extra = c["doc"], c["rows"], c["extra"]
        commit = str(doc.get("commit", "unknown"))[:10]
        label = inputs + (" (dense: smooth run)" if c["dense_from"] else "")
        cells = [device, f"`{commit}`", config_label(doc, cfg), fmt_ctx(ctx), label]
        for method, _ in COLUMNS:
            row = rows.get(method)
            if row is None:
                cells.append("-")
            elif row.get("ms_median") is None:
                cells.append("err" if not str(row.get("error", "")).startswith("skipped") else "skip")
                errors.append(f"{device}, {cfg}, {fmt_ctx(ctx)}, {inputs}, {method}: "
                              f"{str(row.get('error', '?'))[:140]}")
            else:
                mark = ""
                if method in DENSE and row.get("gqa") == "expanded_kv":
                    mark = "\u2020"
                cells.append(fmt_ms(row["ms_median"]) + mark)
        fwd = rows.get("msa_sparse_forward") or {}
        tf = fwd.get("tflops")
        cells.append("n/a" if not tf else (f"{tf:.0f}" if tf >= 10 else f"{tf:.2f}"))
        sp = speedup(rows)
        _, best = best_dense(rows)
        cells.append(f"{sp:.2f}x ({'cuDNN' if best == 'cudnn_dense' else 'FA2'})" if sp else "n/a")
        u = extra.get("union_blocks_per_64q_tile") or (rows.get("msa_index_topk") or {}).get(
            "union_blocks_per_64q_tile")
        cells.append(f"{u:.1f}" if u else "n/a")
        lines.append("| " + " | ".join(cells) + " |")
        if doc["_path"] not in sources:
            sources.append(doc["_path"])
    text = "\n".join(lines)
    notes = [
        "",
        "Medians of CUDA-event timings, batch 1, bf16, B=128, k=16, Di=128 (method: "
        "[docs/benchmarks.md](docs/benchmarks.md)). MSA total = index top-k + sparse forward timed "
        "together; speedup = best dense (cuDNN or FA2 through PyTorch SDPA, causal, GQA) / MSA total. "
        "Index q: `smooth` index queries drift with position (neighbours share blocks), `iid` is the "
        "worst case. \u2020: K/V expanded to Hq heads for that backend.",
        "",
        "Sources: " + ", ".join(f"`{s}`" for s in sources) + ".",
    ]
    notes += error_notes(errors)
    return text + "\n" + "\n".join(notes)


def write_readme(readme, table, start=START, end=END):
    try:
        with open(readme) as f:
            text = f.read()
    except OSError:
        return False
    i, j = text.find(start), text.find(end)
    if i < 0 or j < 0 or j < i:
        return False
    new = text[: i + len(start)] + "\n" + table + "\n" + text[j:]
    if new != text:
        with open(readme, "w") as f:
            f.write(new)
    return True


# ---- training (bench_training.py) ----------------------------------------------------------------
TRAIN_COLUMNS = [  # (method, header)
    ("msa_index_topk", "index top-k"),
    ("msa_sparse_forward", "sparse fwd"),
    ("msa_sparse_backward", "sparse bwd"),
    ("msa_kl_sparse", "KL"),
    ("msa_step", "MSA step"),
    ("msa_autograd_step", "MSA step, autograd"),
    ("cudnn_dense_fwd_bwd", "cuDNN fwd+bwd"),
    ("fa2_dense_fwd_bwd", "FA2 fwd+bwd"),
]
WARMUP_COLUMNS = [("msa_dense_forward", "dense fwd"), ("msa_dense_backward", "dense bwd"),
                  ("msa_kl_dense", "dense KL")]
TRAIN_DENSE = ("cudnn_dense_fwd_bwd", "fa2_dense_fwd_bwd")


def collect_training(docs):
    """One entry per (device, config, context): the newest document that measured it."""
    cases = {}
    for doc in sorted(docs, key=lambda d: d.get("timestamp", "")):
        by_case = {}
        for r in doc["rows"]:
            by_case.setdefault((r["config"], r["context"]), []).append(r)
        for (cfg, ctx), rows in by_case.items():
            if any(r.get("ms_median") is not None for r in rows):
                cases[(doc.get("device", "?"), cfg, ctx)] = {
                    "doc": doc, "rows": {r["method"]: r for r in rows},
                    "extra": next((c for c in doc.get("cases", [])
                                   if (c.get("config"), c.get("context")) == (cfg, ctx)), {})}
    return cases


def _ms_cell(row, errors, where):
    if row is None:
        return "-"
    if row.get("ms_median") is None:
        errors.append(f"{where}: {str(row.get('error', '?'))[:140]}")
        return "skip" if str(row.get("error", "")).startswith("skipped") else "err"
    mark = "\u2020" if row.get("gqa") == "expanded_kv" else ""
    return fmt_ms(row["ms_median"]) + mark


def _tf(x):
    return "n/a" if not x else (f"{x:.0f}" if x >= 10 else f"{x:.2f}")


def make_training_table(cases):
    headers = (["Device", "Commit", "Config", "Context"] + [h + " (ms)" for _, h in TRAIN_COLUMNS] +
               ["fwd / bwd TFLOP/s", "bwd/fwd", "Speedup vs best dense fwd+bwd"] +
               [h + " (ms)" for _, h in WARMUP_COLUMNS])
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    errors, sources = [], []
    for key in sorted(cases, key=lambda k: (k[0], k[1], k[2])):
        device, cfg, ctx = key
        c = cases[key]
        doc, rows = c["doc"], c["rows"]
        where = f"{device}, {cfg}, {fmt_ctx(ctx)}"
        cells = [device, f"`{str(doc.get('commit', 'unknown'))[:10]}`", config_label(doc, cfg), fmt_ctx(ctx)]
        cells += [_ms_cell(rows.get(m), errors, f"{where}, {m}") for m, _ in TRAIN_COLUMNS]
        fwd = (rows.get("msa_sparse_forward") or {}).get("tflops")
        bwd = (rows.get("msa_sparse_backward") or {}).get("tflops")
        cells.append(f"{_tf(fwd)} / {_tf(bwd)}")
        cells.append(f"{bwd / fwd:.2f}" if fwd and bwd else "n/a")
        found = [(ms_of(rows.get(m)), m) for m in TRAIN_DENSE if ms_of(rows.get(m)) is not None]
        step = ms_of(rows.get("msa_step"))
        if found and step:
            dense_ms, best = min(found)
            cells.append(f"{dense_ms / step:.2f}x ({'cuDNN' if best.startswith('cudnn') else 'FA2'})")
        else:
            cells.append("n/a")
        cells += [_ms_cell(rows.get(m), errors, f"{where}, {m}") for m, _ in WARMUP_COLUMNS]
        lines.append("| " + " | ".join(cells) + " |")
        if doc["_path"] not in sources:
            sources.append(doc["_path"])
    notes = [
        "",
        "One training step of the attention layer, batch 1, bf16, B=128, k=16, Di=128, medians of "
        "CUDA-event timings (method: [docs/benchmarks.md](docs/benchmarks.md#training-step)). MSA step "
        "= index top-k + sparse forward + sparse backward + KL (sparse), timed together through the "
        "low-level API; autograd = the same through `msa.torch.msa_attention` and "
        "`torch.autograd.grad`. Dense fwd+bwd: PyTorch SDPA, causal, GQA, autograd. TFLOP/s: forward "
        "4*D FLOPs per visible key per query head, backward 2.5x that. Targets (issue 4, 128K): "
        "speedup >= 8x, bwd/fwd >= 0.6. The last three columns are the dense-warmup ops (MSA dense "
        "attention and the KL over all visible tokens). \u2020: K/V expanded to Hq heads.",
        "",
        "Sources: " + ", ".join(f"`{s}`" for s in sources) + ".",
    ]
    notes += error_notes(errors)
    return "\n".join(lines) + "\n" + "\n".join(notes)


def plot_speedup_series(plt, series, path, point_format, xlabel, ylabel, title):
    """One line per label of series {label: [(context, speedup)]}, log2 context axis; False if empty."""
    if not series:
        return False
    crowded = len(series) > 6  # then the legend goes beside the axes and points are not labelled
    fig, ax = plt.subplots(figsize=(10.5 if crowded else 7, 4.5), dpi=120)
    for label, pts in sorted(series.items()):
        pts.sort()
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=label)
        for x, y in ([] if crowded else pts):
            ax.annotate(point_format.format(y=y), (x, y), textcoords="offset points", xytext=(0, 6),
                        ha="center", fontsize=8)
    ax.axhline(1.0, color="gray", lw=0.8, ls="--")
    ys = [p[1] for pts in series.values() for p in pts]
    if max(ys) / min(ys) > 8:
        ax.set_yscale("log", base=2)
    ax.set_xscale("log", base=2)
    ctxs = sorted({p[0] for pts in series.values() for p in pts})
    ax.set_xticks(ctxs)
    ax.set_xticklabels([fmt_ctx(x) for x in ctxs])
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    if crowded:
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    else:
        ax.legend(fontsize=8)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return True


def make_plot(cases, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series = {}
    for (device, cfg, ctx, inputs), c in cases.items():
        if inputs != "smooth":
            continue
        sp = speedup(c["rows"])
        if sp is None:
            continue
        label = f"{config_label(c['doc'], cfg)} ({device}, {str(c['doc'].get('commit', '?'))[:8]})"
        series.setdefault(label, []).append((ctx, sp))
    return plot_speedup_series(plt, series, path, "{y:.1f}x",
                               xlabel="context length (tokens, batch 1, prefill)",
                               ylabel="speedup: best dense / MSA total",
                               title="MSA prefill (index top-k + sparse forward) vs dense causal attention")


# ---- MiniMax-M3 in transformers (bench_hf.py) ----------------------------------------------------
HF_METHODS = [("msa+idx", "msa + msa index"), ("msa", "msa + model index"), ("sdpa", "sdpa (default)"),
              ("eager", "eager")]
HF_PHASES = [("prefill", "prefill"), ("prefill-chunked", "chunked prefill"), ("decode", "decode / token")]


def collect_hf(docs):
    """(device, context, phase) -> (doc, {method: row}); the newest file wins; smoke runs skipped."""
    out = {}
    for doc in sorted(docs, key=lambda d: d.get("timestamp", "")):
        if doc.get("config", {}).get("smoke"):
            continue
        for r in doc["rows"]:
            key = (doc.get("device", "?"), r.get("context"), r.get("phase"))
            if key not in out or out[key][0] is not doc:
                out[key] = (doc, {})
            out[key][1][r.get("method")] = r
    return out


def hf_cell(row, phase):
    if not row:
        return "-"
    status = row.get("status")
    if status != "ok" or row.get("ms") is None:
        return "OOM" if status == "oom" else (status or "-")
    ms = row["ms"]
    cell = f"{ms:.1f} ms" if ms >= 10 else f"{ms:.2f} ms"
    if phase == "prefill-chunked" and row.get("chunk"):
        cell += f" ({row['chunk']}/chunk)"
    return cell


def make_hf_table(cases):
    head = "| GPU | context | phase | " + " | ".join(h for _, h in HF_METHODS) + " | msa speedup | commit |"
    lines = [head, "|" + " --- |" * (len(HF_METHODS) + 5)]
    order = {p: i for i, (p, _) in enumerate(HF_PHASES)}
    for (device, L, phase) in sorted(cases, key=lambda k: (k[0], k[1] or 0, order.get(k[2], 9))):
        doc, rows = cases[(device, L, phase)]
        ours = [rows[m]["ms"] for m in ("msa+idx", "msa") if rows.get(m, {}).get("status") == "ok"]
        theirs = [rows[m]["ms"] for m in ("sdpa", "eager") if rows.get(m, {}).get("status") == "ok"]
        speed = f"{min(theirs) / min(ours):.1f}x" if ours and theirs else "-"
        label = dict(HF_PHASES).get(phase, phase)
        cells = " | ".join(hf_cell(rows.get(m), phase) for m, _ in HF_METHODS)
        ctx = f"{L // 1024}K" if L and L % 1024 == 0 else str(L)
        lines.append(f"| {device} | {ctx} | {label} | {cells} | {speed} | "
                     f"`{doc.get('commit', '?')[:8]}` |")
    return "\n".join(lines)


def write_hf(paths, readme, print_only):
    cases = collect_hf(load_results(paths, "hf"))
    if not cases:
        return False
    table = make_hf_table(cases)
    if print_only:
        print(table + "\n")
    elif write_readme(readme, table, HF_START, HF_END):
        print(f"make_report: hf table ({len(cases)} rows) written to {readme}")
    else:
        print(f"make_report: no {HF_START} ... {HF_END} markers in {readme}; the hf table:\n\n{table}\n")
    return True


# ---- decode step over paged caches (bench_decode.py) ---------------------------------------------
DECODE_PLOT = os.path.join(REPO_ROOT, "bench", "results", "decode_speedup_vs_context.png")


def collect_decode(docs):
    """(device, batch, context, q_len, cache) -> (doc, msa_sparse row, {dense method: row}).

    The newest file that measured a case wins (one that only failed it replaces nothing); smoke runs
    are skipped, and so are schedule experiments (--num-workers). The dense baselines run on bf16 caches only: every cache kind of a case is compared
    with the bf16 dense rows of the same file."""
    out = {}
    for doc in sorted(docs, key=lambda d: d.get("timestamp", "")):
        if doc.get("config", {}).get("smoke") or doc.get("config", {}).get("num_workers"):
            continue
        dense = {}
        # Cases the bench skipped before running them (too large for the device's memory) are no rows.
        rows = [r for r in doc["rows"] if not r.get("skipped")]
        for r in rows:
            if r.get("method") in ("sdpa_dense", "msa_paged_dense") and r.get("cache", "bf16") == "bf16":
                dense.setdefault((r.get("batch"), r.get("context"), r.get("q_len")), {})[r["method"]] = r
            elif r.get("method") == "flashinfer_dense" and ms_of(r) is not None and \
                    (r.get("check_rel_err") or 0) <= 2e-2:
                # FlashInfer: its faster backend (fa2 / fa3) among those that agreed with SDPA.
                case = dense.setdefault((r.get("batch"), r.get("context"), r.get("q_len")), {})
                if ms_of(case.get("flashinfer_dense")) is None or ms_of(r) < ms_of(case["flashinfer_dense"]):
                    case["flashinfer_dense"] = r
        for r in rows:
            if r.get("method") != "msa_sparse":
                continue
            # Head-major K / V pages are their own rows; files before the layout option are token-major.
            layout = r.get("kv_layout", "token_major")
            cache = r.get("cache") if layout == "token_major" else f"{r.get('cache')} {layout.replace('_', '-')}"
            key = (doc.get("device", "?"), r.get("batch"), r.get("context"), r.get("q_len"), cache)
            if key in out and r.get("ms_median") is None:
                continue
            out[key] = (doc, r, dense.get(key[1:4], {}))
    return out


def decode_pair_ms(row, base):
    """(msa, dense) step times of one comparison: CUDA-graph replays where both rows have them (what a
    serving engine that captures its step sees; no host launch noise, which at batch 1 made eager
    medians swing 2-5x between runs), else both eager medians (FlashInfer has no graph time)."""
    if row is None or base is None:
        return None, None
    if row.get("ms_graph") and base.get("ms_graph"):
        return row["ms_graph"], base["ms_graph"]
    return ms_of(row), ms_of(base)


def decode_speedup(row, dense, method="sdpa_dense"):
    ms, base = decode_pair_ms(row, dense.get(method))
    return base / ms if base and ms else None


def decode_speedup_best(row, dense):
    """Against the fastest dense baseline of the same run (SDPA or FlashInfer)."""
    found = [x for x in (decode_speedup(row, dense, m) for m in ("sdpa_dense", "flashinfer_dense")) if x]
    return min(found) if found else None


def _decode_shape(doc):
    c = doc.get("config", {})
    names = [("hq", "Hq"), ("hkv", "Hkv"), ("d", "D"), ("di", "Di"), ("block", "B"), ("topk", "k")]
    return " ".join(f"{label}={c[k]}" for k, label in names if k in c)


def make_decode_table(cases, plot_link=None):
    headers = ["Device", "Commit", "Batch", "Context", "q_len", "Cache", "index (ms)", "attention (ms)",
               "MSA total (ms)", "MSA total, CUDA graph (ms)", "index GB/s", "attention GB/s", "% of copy bandwidth (index / attention)",
               "paged dense, ours (ms)", "SDPA dense (ms)", "FlashInfer dense (ms)", "Speedup vs SDPA",
               "Speedup vs fastest dense"]
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    errors, sources = [], []
    for key in sorted(cases, key=lambda k: (k[0], k[1] or 0, k[2] or 0, k[3] or 0, str(k[4]))):
        device, batch, ctx, q_len, cache = key
        doc, row, dense = cases[key]
        where = f"{device}, batch {batch}, {fmt_ctx(ctx)}, q_len {q_len}, {cache}"
        bw = (doc.get("copy_bandwidth") or {}).get("gb_per_s")

        def gbs(x):
            return "n/a" if x is None else f"{x:.0f}"

        def pct(x):
            return "n/a" if x is None or not bw else f"{100 * x / bw:.0f}%"
        idx_bw, att_bw = row.get("index_gb_per_s"), row.get("attention_gb_per_s")
        sp, best = decode_speedup(row, dense), decode_speedup_best(row, dense)
        fi = dense.get("flashinfer_dense")
        cells = [device, f"`{str(doc.get('commit', 'unknown'))[:10]}`", str(batch), fmt_ctx(ctx), str(q_len),
                 str(cache), fmt_ms(row.get("index_ms")), fmt_ms(row.get("attention_ms")),
                 _ms_cell(row, errors, f"{where}, msa_sparse"), fmt_ms(row.get("ms_graph")), gbs(idx_bw), gbs(att_bw),
                 f"{pct(idx_bw)} / {pct(att_bw)}",
                 _ms_cell(dense.get("msa_paged_dense"), errors, f"{where}, msa_paged_dense"),
                 _ms_cell(dense.get("sdpa_dense"), errors, f"{where}, sdpa_dense"),
                 f"{fmt_ms(fi['ms_median'])} ({fi.get('backend', '?')})" if fi else "-",
                 f"{sp:.2f}x" if sp else "n/a", f"{best:.2f}x" if best else "n/a"]
        lines.append("| " + " | ".join(cells) + " |")
        if doc["_path"] not in sources:
            sources.append(doc["_path"])
    shapes = ", ".join(sorted({_decode_shape(cases[k][0]) for k in cases})) or "?"
    return finish_table(lines, (
        f"One decode step (`msa.paged.run` over paged caches), {shapes}; MSA total = median of CUDA-event "
        "timings of the whole call, index / attention = the kernels' own device times (torch profiler, "
        "mean of 5 calls, launched without PDL from 3912cbb on). GB/s = bytes the kernel reads / its time; % of copy "
        "bandwidth = that over the device's measured copy bandwidth (read + write bytes / time, in each "
        "file). The dense columns use bf16 caches for every row: paged dense = our paged kernel over "
        "every block; SDPA = PyTorch SDPA over contiguous K/V (GQA); FlashInfer = its paged decode on tensor "
        "cores (q_len > 1: its causal paged prefill) over head-major pages of the same size, the faster of its "
        "fa2 / fa3 backends, checked against SDPA in the run (files before it have none). Speedup = dense / "
        "MSA, both as CUDA-graph replays where both were timed so (SDPA, paged dense), else both eager "
        "(FlashInfer); fastest dense = the smaller of the two speedups."),
        sources, errors, plot_link, "decode speedup vs SDPA against context")


def make_decode_plot(cases, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series = {}
    for (device, batch, ctx, q_len, cache), (doc, row, dense) in cases.items():
        sp = decode_speedup(row, dense)
        if sp is None:
            continue
        if q_len != 1:
            continue  # the table has q_len 4, where SDPA leaves its fast path (docs/serving.md)
        gpu = device.replace("NVIDIA ", "").replace(" 80GB HBM3", "")
        label = f"batch {batch:>3}, {cache} ({gpu}, {str(doc.get('commit', '?'))[:7]})"
        series.setdefault(label, []).append((ctx, sp))
    return plot_speedup_series(plt, series, path, "{y:.2f}x",
                               xlabel="context length (tokens per sequence, decode)",
                               ylabel="speedup: SDPA dense (bf16) / MSA total",
                               title="MSA decode step (q_len 1, paged) vs dense SDPA decode")


def write_decode(paths, readme, plot, print_only):
    cases = collect_decode(load_results(paths, "decode"))
    if not cases:
        return False
    link = os.path.relpath(os.path.abspath(plot), os.path.dirname(os.path.abspath(readme)))
    plotted = False if print_only else make_decode_plot(cases, plot)
    table = make_decode_table(cases, link if plotted else None)
    if print_only:
        print(table + "\n")
        return True
    if plotted:
        print(f"make_report: decode plot written to {plot}")
    if write_readme(readme, table, DECODE_START, DECODE_END):
        print(f"make_report: decode table ({len(cases)} rows) written to {readme}")
    else:
        print(f"make_report: no {DECODE_START} ... {DECODE_END} markers in {readme}; the decode "
              f"table:\n\n{table}\n")
    return True


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("results", nargs="*", help="result files (default bench/results/*.json)")
    p.add_argument("--readme", default=os.path.join(REPO_ROOT, "README.md"))
    p.add_argument("--plot", default=os.path.join(REPO_ROOT, "bench", "results", "speedup_vs_context.png"))
    p.add_argument("--decode-plot", default=DECODE_PLOT)
    p.add_argument("--training-plot",
                   default=os.path.join(REPO_ROOT, "bench", "results", "training_step_history.png"))
    p.add_argument("--cpu-plot", default=os.path.join(REPO_ROOT, "bench", "results", "cpu_speedup_vs_context.png"))
    p.add_argument("--print", dest="print_only", action="store_true", help="print the table, write nothing")
    args = p.parse_args(argv)
    paths = args.results or glob.glob(os.path.join(REPO_ROOT, "bench", "results", "*.json"))
    cases = collect_cases(load_results(paths))
    train = collect_training(load_results(paths, "training"))
    hf = write_hf(paths, args.readme, args.print_only)
    decode = write_decode(paths, args.readme, args.decode_plot, args.print_only)
    cpu = report_cpu.write(load_results(paths, "cpu_prefill"), args.readme, args.cpu_plot, args.print_only,
                           dict(write_readme=write_readme, plot_speedup_series=plot_speedup_series,
                                fmt_ms=fmt_ms, fmt_ctx=fmt_ctx, config_label=config_label,
                                finish_table=finish_table))
    if not cases and not train and not hf and not decode and not cpu:
        print("make_report: no measured results found", file=sys.stderr)
        return 1
    if train and not args.print_only:
        if report_training_plot.make_training_history_plot(load_results(paths, "training"), args.training_plot):
            print(f"make_report: plot written to {args.training_plot}")
    if train:
        ttable = make_training_table(train)
        if args.print_only:
            print(ttable + "\n")
        elif write_readme(args.readme, ttable, TRAIN_START, TRAIN_END):
            print(f"make_report: training table ({len(train)} rows) written to {args.readme}")
        else:
            print(f"make_report: no {TRAIN_START} ... {TRAIN_END} markers in {args.readme}; the "
                  f"training table:\n\n{ttable}\n")
    if not cases:
        return 0
    table = make_table(cases)
    if args.print_only:
        print(table)
        return 0
    if write_readme(args.readme, table):
        print(f"make_report: table ({len(cases)} rows) written to {args.readme}")
    else:
        print(f"make_report: no {START} ... {END} markers in {args.readme}; the table:\n")
        print(table)
    if make_plot(cases, args.plot):
        print(f"make_report: plot written to {args.plot}")
    else:
        print("make_report: nothing to plot (no case with both MSA total and a dense baseline)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
