"""The README's CPU prefill table and bench/results/cpu_speedup_vs_context.png, from the
bench_cpu.py results (benchmark "cpu_prefill"); called by make_report.py.

The prefill table goes between <!-- cpu-table --> and <!-- /cpu-table -->, the decode table between
<!-- cpu-decode-table --> and <!-- /cpu-decode-table -->. Where several files measured the same case,
the newest wins."""
from __future__ import annotations

import os

CPU_START, CPU_END = "<!-- cpu-table -->", "<!-- /cpu-table -->"
DECODE_START, DECODE_END = "<!-- cpu-decode-table -->", "<!-- /cpu-decode-table -->"
COLUMNS = [  # (method, header)
    ("msa_index_topk", "MSA index top-k"),
    ("msa_sparse_forward", "MSA sparse fwd"),
    ("msa_total", "MSA total"),
    ("msa_total_no_amx", "MSA total, no AMX"),
    ("msa_dense_forward", "MSA dense fwd"),
    ("sdpa_dense", "SDPA dense"),
    ("torch_topk", "torch.topk"),
]


def collect(docs):
    """(device, config, context, inputs) -> (doc, {method: row}); the i.i.d. case borrows the dense
    row measured on smooth inputs in the same file (dense attention ignores the index inputs)."""
    cases = {}
    for doc in sorted(docs, key=lambda d: d.get("timestamp", "")):
        by_case = {}
        for r in doc["rows"]:
            if r["inputs"] != "decode":
                by_case.setdefault((r["config"], r["context"], r["inputs"]), {})[r["method"]] = r
        for (cfg, ctx, inputs), rows in by_case.items():
            if any(r.get("ms_median") is not None for r in rows.values()):
                cases[(doc.get("device", "?"), cfg, ctx, inputs)] = (doc, rows)
    for (device, cfg, ctx, inputs), (doc, rows) in cases.items():
        smooth = cases.get((device, cfg, ctx, "smooth"))
        if "sdpa_dense" not in rows and smooth is not None and smooth[0] is doc:
            rows["sdpa_dense"] = smooth[1].get("sdpa_dense")
    return cases


def speedup(rows):
    dense, msa = (rows.get("sdpa_dense") or {}).get("ms_median"), (rows.get("msa_total") or {}).get("ms_median")
    return dense / msa if dense and msa else None


def make_table(cases, fmt_ms, fmt_ctx, config_label, finish_table, plot_link=None):
    headers = (["CPU", "Commit", "Config", "Context", "Index q"] + [h + " (ms)" for _, h in COLUMNS] +
               ["MSA fwd TFLOP/s", "Speedup vs SDPA dense", "Check"])
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    sources, errors = [], []
    order = sorted(cases, key=lambda k: (k[0], k[1], k[3] != "smooth", k[2]))
    for key in order:
        device, cfg, ctx, inputs = key
        doc, rows = cases[key]
        label = config_label(doc, cfg)
        cells = [device, f"`{str(doc.get('commit', '?'))[:10]}`", label, fmt_ctx(ctx), inputs]
        for method, _ in COLUMNS:
            r = rows.get(method)
            if r is not None and r.get("error"):
                errors.append(f"{device}, {cfg}, {fmt_ctx(ctx)}, {method}: {r['error']}")
            cells.append(fmt_ms(None if r is None else r.get("ms_median")) if r else "-")
        tf = (rows.get("msa_sparse_forward") or {}).get("tflops")
        sp = speedup(rows)
        check = next((c.get("check", {}) for c in doc.get("cases", [])
                      if (c.get("config"), c.get("context"), c.get("inputs")) == (cfg, ctx, inputs)), {})
        cells += [f"{tf:.2f}" if tf else "-", f"{sp:.2f}x" if sp else "n/a",
                  "-" if not check else ("ok" if check.get("ok") else "FAILED")]
        lines.append("| " + " | ".join(cells) + " |")
        if doc["_path"] not in sources:
            sources.append(doc["_path"])
    return finish_table(lines, (
        "Wall-clock medians on the CPU, batch 1, bf16, B=128, k=16, Di=128, all cores, same process and "
        "inputs for every column (method: [docs/benchmarks.md](docs/benchmarks.md#cpu-prefill)). MSA total = "
        "index top-k + sparse forward; no AMX = the same with `MSA_CPU_AMX=0`; SDPA dense = "
        "`torch.nn.functional.scaled_dot_product_attention`, causal, GQA (PyTorch's CPU flash kernel). "
        "Check: sampled queries against an fp32 reference (selection within tolerance, out and lse). "
        "TFLOP/s: 4*D FLOPs per selected visible key per query head."),
        sources, errors, plot_link, "CPU prefill speedup vs SDPA against context")


def collect_decode(docs):
    """(device, config, batch, context) -> (doc, {method: row}) for the decode rows."""
    cases = {}
    for doc in sorted(docs, key=lambda d: d.get("timestamp", "")):
        for r in doc["rows"]:
            if r["inputs"] == "decode":
                key = (doc.get("device", "?"), r["config"], r.get("batch"), r["context"])
                if key not in cases or cases[key][0] is not doc:
                    cases[key] = (doc, {})
                cases[key][1][r["method"]] = r
    return cases


def make_decode_table(cases, fmt_ms, fmt_ctx, config_label, finish_table):
    headers = ["CPU", "Commit", "Config", "Batch", "Context", "MSA decode (ms)", "MSA dense decode (ms)",
               "MSA decode, head-major pages (ms)", "MSA dense decode, head-major pages (ms)",
               "MSA decode, FP8 caches (ms)",
               "SDPA dense (ms)", "Speedup vs SDPA"]
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    sources, errors = [], []
    for key in sorted(cases):
        device, cfg, batch, ctx = key
        doc, rows = cases[key]
        label = config_label(doc, cfg)
        ms = {m: (rows.get(m) or {}).get("ms_median") for m in
              ("msa_paged_decode", "msa_paged_dense_decode", "msa_paged_decode_head_major",
               "msa_paged_dense_decode_head_major", "msa_paged_decode_fp8", "sdpa_decode")}
        for m, r in rows.items():
            if r.get("error"):
                errors.append(f"{device}, {cfg}, batch {batch}, {fmt_ctx(ctx)}, {m}: {r['error']}")
        sp = ms["sdpa_decode"] / ms["msa_paged_decode"] if ms["sdpa_decode"] and ms["msa_paged_decode"] else None
        lines.append("| " + " | ".join([device, f"`{str(doc.get('commit', '?'))[:10]}`", label, str(batch),
                                        fmt_ctx(ctx)] + [fmt_ms(v) for v in ms.values()] +
                                       [f"{sp:.2f}x" if sp else "n/a"]) + " |")
        if doc["_path"] not in sources:
            sources.append(doc["_path"])
    return finish_table(lines, (
        "One decode step (q_len 1) on the CPU, bf16 paged caches (pages of B=128 tokens, shuffled page "
        "tables), k=16, Di=128, all cores, wall-clock medians of 40 calls over two alternating caches "
        "(method: [docs/benchmarks.md](docs/benchmarks.md#cpu-prefill)). MSA decode = `msa.paged.run` "
        "(index over every cached block, attention over the selected pages); MSA dense decode = the same "
        "call in dense mode; head-major = the same pages laid out [pages, Hkv, B, D] in memory (files before "
        "that column have none); FP8 caches = the same tokens as float8_e4m3fn K / V / ki with one amax / 448 "
        "scale each; SDPA dense = PyTorch SDPA over contiguous K/V of the same tokens (GQA). "
        "Speedup = SDPA / MSA decode on token-major pages."),
        sources, errors)


def make_plot(cases, path, plot_series, fmt_ctx):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series = {}
    for (device, cfg, ctx, inputs), (doc, rows) in cases.items():
        sp = speedup(rows)
        if sp is None or inputs != "smooth":
            continue
        shape = doc.get("config", {}).get("configs", {}).get(cfg, {})
        label = f"Hq={shape.get('hq')} Hkv={shape.get('hkv')} ({device}, {str(doc.get('commit', '?'))[:7]})"
        series.setdefault(label, []).append((ctx, sp))
    return plot_series(plt, series, path, "{y:.2f}x", xlabel="context length (tokens, batch 1, prefill)",
                       ylabel="speedup: SDPA dense / MSA total",
                       title="MSA prefill on the CPU vs PyTorch SDPA dense causal attention")


def write(docs, readme, plot, print_only, helpers):
    """helpers: make_report's write_readme, plot_speedup_series, fmt_ms, fmt_ctx, config_label and
    finish_table."""
    write_readme, plot_series, fmt_ms, fmt_ctx, config_label, finish_table = (
        helpers[k] for k in ("write_readme", "plot_speedup_series", "fmt_ms", "fmt_ctx", "config_label",
                             "finish_table"))
    decode = collect_decode(docs)
    if decode:
        dtable = make_decode_table(decode, fmt_ms, fmt_ctx, config_label, finish_table)
        if print_only:
            print(dtable + "\n")
        elif not write_readme(readme, dtable, DECODE_START, DECODE_END):
            print(f"make_report: no {DECODE_START} ... {DECODE_END} markers in {readme}; the CPU decode "
                  f"table:\n\n{dtable}\n")
    cases = collect(docs)
    if not cases:
        return bool(decode)
    link = os.path.relpath(os.path.abspath(plot), os.path.dirname(os.path.abspath(readme)))
    plotted = False if print_only else make_plot(cases, plot, plot_series, fmt_ctx)
    table = make_table(cases, fmt_ms, fmt_ctx, config_label, finish_table, link if plotted else None)
    if print_only:
        print(table + "\n")
    elif write_readme(readme, table, CPU_START, CPU_END):
        print(f"make_report: CPU table ({len(cases)} rows) written to {readme}")
    else:
        print(f"make_report: no {CPU_START} ... {CPU_END} markers in {readme}; the CPU table:\n\n{table}\n")
    return True
