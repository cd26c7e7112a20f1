"""The training step's parts across the measured commits (bench/results/training_*.json), one panel
per device: for the 128K Hq=64/Hkv=4 case, stacked bars of index top-k, sparse forward, sparse
backward and KL per commit (in measurement order), with the best dense fwd+bwd / 8 (issue 4's 8x
target) as a line. Written by bench/make_report.py to bench/results/training_step_history.png."""

PARTS = (("msa_index_topk", "index top-k"), ("msa_sparse_forward", "sparse fwd"),
         ("msa_sparse_backward", "sparse bwd"), ("msa_kl_sparse", "KL"))
DENSE = ("cudnn_dense_fwd_bwd", "fa2_dense_fwd_bwd")


def history(docs, config, context):
    """{device: [(commit, {method: ms})]} in timestamp order, for the docs that measured the case."""
    out = {}
    for doc in sorted(docs, key=lambda d: d.get("timestamp", "")):
        rows = {r["method"]: r.get("ms_median") for r in doc["rows"]
                if r.get("config") == config and r.get("context") == context}
        if all(rows.get(m) is not None for m, _ in PARTS):
            out.setdefault(doc.get("device", "?"), []).append((str(doc.get("commit", "?"))[:7], rows))
    return out


def make_training_history_plot(docs, path, config="hq64_hkv4_d128", context=131072):
    """False when no document measured every part of the case."""
    series = history(docs, config, context)
    if not series:
        return False
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(series), figsize=(5.5 * len(series), 4.5), dpi=120, squeeze=False)
    for ax, (device, points) in zip(axes[0], sorted(series.items())):
        xs = range(len(points))
        bottom = [0.0] * len(points)
        for method, label in PARTS:
            ys = [rows[method] for _, rows in points]
            ax.bar(xs, ys, bottom=bottom, label=label)
            bottom = [b + y for b, y in zip(bottom, ys)]
        target = [min(rows[m] for m in DENSE if rows.get(m) is not None) / 8.0
                  if any(rows.get(m) is not None for m in DENSE) else None for _, rows in points]
        if any(t is not None for t in target):
            ax.plot([x for x, t in zip(xs, target) if t is not None], [t for t in target if t is not None],
                    color="black", ls="--", marker="_", label="best dense fwd+bwd / 8")
        for x, total in zip(xs, bottom):
            ax.annotate(f"{total:.0f}", (x, total), textcoords="offset points", xytext=(0, 3), ha="center",
                        fontsize=8)
        ax.set_xticks(list(xs))
        ax.set_xticklabels([c for c, _ in points], rotation=45, ha="right", fontsize=8)
        ax.set_ylabel("ms per step")
        ax.set_title(f"{device}: training step, 128K, Hq=64/Hkv=4", fontsize=9)
        ax.grid(True, axis="y", alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return True
