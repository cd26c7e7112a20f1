#!/usr/bin/env python3
"""Turns bench/results/*.json (written by bench_prefill.py) into the README performance table and a
plot of MSA's speedup over the strongest dense baseline against context length.

    python3 bench/make_report.py                 # README.md table + bench/results/speedup_vs_context.png
    python3 bench/make_report.py --print         # print the table only, write nothing

The table goes between the markers <!-- perf-table --> and <!-- /perf-table --> of README.md; without
them it is printed. Every row names the device and commit its numbers come from. Where several
result files cover the same (device, config, context, inputs), the newest one wins.
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
REPO_ROOT = os.path.dirname(HERE)
START, END = "<!-- perf-table -->", "<!-- /perf-table -->"
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


def load_results(paths):
    docs = []
    for path in sorted(paths):
        try:
            with open(path) as f:
                doc = json.load(f)
        except (OSError, ValueError) as e:
            print(f"make_report: skipping {path}: {e}", file=sys.stderr)
            continue
        if not isinstance(doc, dict) or doc.get("benchmark", "prefill") != "prefill" or "rows" not in doc:
            print(f"make_report: skipping {path}: not a prefill result", file=sys.stderr)
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
    if errors:
        notes += ["", "Failed or skipped measurements:", ""] + [f"- {e}" for e in errors[:20]]
        if len(errors) > 20:
            notes.append(f"- ... and {len(errors) - 20} more (see the JSON files)")
    return text + "\n" + "\n".join(notes)


def write_readme(readme, table):
    try:
        with open(readme) as f:
            text = f.read()
    except OSError:
        return False
    i, j = text.find(START), text.find(END)
    if i < 0 or j < 0 or j < i:
        return False
    new = text[: i + len(START)] + "\n" + table + "\n" + text[j:]
    if new != text:
        with open(readme, "w") as f:
            f.write(new)
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
    if not series:
        return False
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    for label, pts in sorted(series.items()):
        pts.sort()
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=label)
        for x, y in pts:
            ax.annotate(f"{y:.1f}x", (x, y), textcoords="offset points", xytext=(0, 6), ha="center",
                        fontsize=8)
    ax.axhline(1.0, color="gray", lw=0.8, ls="--")
    ys = [p[1] for pts in series.values() for p in pts]
    if max(ys) / min(ys) > 8:
        ax.set_yscale("log", base=2)
    ax.set_xscale("log", base=2)
    ctxs = sorted({p[0] for pts in series.values() for p in pts})
    ax.set_xticks(ctxs)
    ax.set_xticklabels([fmt_ctx(x) for x in ctxs])
    ax.set_xlabel("context length (tokens, batch 1, prefill)")
    ax.set_ylabel("speedup: best dense / MSA total")
    ax.set_title("MSA prefill (index top-k + sparse forward) vs dense causal attention")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return True


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("results", nargs="*", help="result files (default bench/results/*.json)")
    p.add_argument("--readme", default=os.path.join(REPO_ROOT, "README.md"))
    p.add_argument("--plot", default=os.path.join(REPO_ROOT, "bench", "results", "speedup_vs_context.png"))
    p.add_argument("--print", dest="print_only", action="store_true", help="print the table, write nothing")
    args = p.parse_args(argv)
    paths = args.results or glob.glob(os.path.join(REPO_ROOT, "bench", "results", "*.json"))
    docs = load_results(paths)
    cases = collect_cases(docs)
    if not cases:
        print("make_report: no measured results found", file=sys.stderr)
        return 1
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
