"""One command for the quality study: trains the three regimes, evaluates them, writes the report.

    python3 examples/msa_quality/report.py [train.py / evaluate.py arguments] \
        [--report-dir examples/msa_quality/report] [--no-train] [--no-eval]

Arguments of train.py and evaluate.py pass through (--out, --device, --dtype are shared). Finished
work is reused: a regime with OUT/<regime>/final is not retrained, a stopped one resumes from
OUT/<regime>/last, and --no-train / --no-eval only read the logs and OUT/eval/*.json. Writes
REPORT.md, loss_curves.png, needle.png and retrieval.png into --report-dir.
"""

import argparse
import datetime
import json
import math
import os
import statistics
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import evaluate  # noqa: E402
import train  # noqa: E402
import data  # noqa: E402

NAMES = {"dense": "dense GQA", "pt": "MSA-PT", "cpt": "MSA-CPT"}


def split_args(argv):
    rp = argparse.ArgumentParser(add_help=False)
    rp.add_argument("--report-dir", default=os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                                         "report"))
    rp.add_argument("--no-train", action="store_true")
    rp.add_argument("--no-eval", action="store_true")
    rp.add_argument("--commit", default=None, help="the commit the runs were made at, for the report "
                    "(the device's copy of the tree has no git history)")
    rargs, rest = rp.parse_known_args(argv)
    tp, ep = train.build_parser(), evaluate.build_parser()
    targs, t_rest = tp.parse_known_args(rest)
    eargs, e_rest = ep.parse_known_args(rest)
    unknown = [a for a in t_rest if a.startswith("--") and a in e_rest]
    if unknown:
        raise SystemExit(f"report.py: unknown arguments {unknown}")
    return rargs, train.finish_args(targs), evaluate.finish_args(eargs)


def read_log(out, regime):
    p = os.path.join(out, regime, "train.jsonl")
    return [json.loads(l) for l in open(p)] if os.path.exists(p) else []


def smooth(y, w):
    if len(y) < w or w <= 1:
        return np.asarray(y, dtype=float)
    return np.convolve(y, np.ones(w) / w, mode="valid")


def plots(logs, evals, rdir):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    files = []
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
    for reg, rows in logs.items():
        if not rows:
            continue
        w = max(1, len(rows) // 50)
        st = np.array([r["step"] for r in rows])
        for ax, key in zip(axes, ("lm_loss", "answer_loss", "kl")):
            y = smooth([r[key] for r in rows], w)
            ax.plot(st[len(st) - len(y):], y, label=NAMES[reg])
    for ax, t in zip(axes, ("LM loss (all tokens)", "answer loss (retrieval targets)",
                            "KL (summed over layers, x kl_coeff)")):
        ax.set_title(t); ax.set_xlabel("step"); ax.legend(); ax.grid(alpha=0.3)
    axes[0].axhline(data.filler_entropy_nats(), color="gray", ls=":", lw=1)
    fig.tight_layout(); fig.savefig(os.path.join(rdir, "loss_curves.png"), dpi=110); plt.close(fig)
    files.append("loss_curves.png")
    if evals:
        fig, ax = plt.subplots(figsize=(6, 4))
        for reg, ev in evals.items():
            L = list(ev["retrieval"])
            ax.plot([int(x) for x in L], [ev["retrieval"][x]["accuracy"] for x in L], "o-",
                    label=NAMES[reg])
        ax.set_xscale("log", base=2); ax.set_xlabel("context length"); ax.set_ylabel("accuracy")
        ax.set_ylim(-0.02, 1.02); ax.set_title("multi-key retrieval"); ax.legend(); ax.grid(alpha=0.3)
        fig.tight_layout(); fig.savefig(os.path.join(rdir, "retrieval.png"), dpi=110); plt.close(fig)
        files.append("retrieval.png")
        lens = list(next(iter(evals.values()))["needle"].values())[0].keys()
        fig, axes = plt.subplots(1, len(lens), figsize=(5 * len(lens), 4), squeeze=False)
        for ax, L in zip(axes[0], lens):
            for reg, ev in evals.items():
                ds = list(ev["needle"])
                ax.plot([float(d) for d in ds], [ev["needle"][d][L]["accuracy"] for d in ds], "o-",
                        label=NAMES[reg])
            ax.set_title(f"needle, {L} tokens"); ax.set_xlabel("depth of the answer")
            ax.set_ylim(-0.02, 1.02); ax.legend(); ax.grid(alpha=0.3)
        fig.tight_layout(); fig.savefig(os.path.join(rdir, "needle.png"), dpi=110); plt.close(fig)
        files.append("needle.png")
    return files


def table(header, rows):
    out = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    out += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(out)


def step_times(rows):
    """Median step time per (mode, seq_len), skipping each group's first 3 steps (warm-up)."""
    groups = {}
    for r in rows:
        groups.setdefault((r["mode"], r["seq_len"], r["tokens"]), []).append(r["step_time_s"])
    return {k: statistics.median(v[3:] if len(v) > 6 else v) for k, v in groups.items()}


def verdict(targs, evals):
    """The issue's two conditions, checked on what the run measured (never assumed)."""
    out = ["## Verdict", ""]
    if "dense" not in evals or not any(r in evals for r in ("pt", "cpt")):
        return out + ["Not all regimes were evaluated; no verdict.", ""]
    dense = evals["dense"]["retrieval"]
    best = max(v["accuracy"] for v in dense.values())
    for r in ("pt", "cpt"):
        if r in evals:
            gaps = {L: 100 * (evals[r]["retrieval"][L]["accuracy"] - dense[L]["accuracy"]) for L in dense}
            worst = min(gaps.values())
            out.append(f"- {NAMES[r]} retrieval vs dense: worst gap {worst:+.1f} points "
                       f"({'within' if worst >= -2 else 'NOT within'} 2 points at every length).")
    if best < 0.5:
        out.append(f"- The dense baseline does not retrieve (best accuracy {best:.3f}): the 2-point "
                   "comparison holds trivially and says little; see the per-token table and the "
                   "training curves for the finer comparison.")
    tp = os.path.join(targs.out, "eval", "step_timing.json")
    if os.path.exists(tp):
        ms = json.load(open(tp))["ms"]
        L = max(ms.get("sparse", {}), key=int, default=None)
        if L and L in ms.get("dense", {}):
            sp, de = ms["sparse"][L], ms["dense"][L]
            out.append(f"- Training step at {L} tokens: sparse {sp:.1f} ms vs dense {de:.1f} ms "
                       f"({'faster' if sp < de else 'NOT faster'} than dense).")
            for name, per in ms.items():
                if name.startswith("sparse (") and L in per:
                    out.append(f"  With the {name[8:-1]}: {per[L]:.1f} ms "
                               f"({'faster' if per[L] < de else 'NOT faster'} than dense).")
    return out + [""]


def write_report(rargs, targs, eargs, logs, evals, files):
    cfg = json.load(open(os.path.join(targs.out, "train_args.json")))
    m = cfg["model"]
    # The machine that trained (train_args.json), not the one writing the report.
    dev, tv = cfg.get("device_name", "?"), cfg.get("torch_version", "?")
    L = [f"# MSA quality study (issue 6)", "",
         f"Generated {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC by "
         f"`examples/msa_quality/report.py {' '.join(sys.argv[1:])}`; trained and evaluated on "
         f"{dev}, torch {tv}" + (f", at commit {rargs.commit}." if rargs.commit else "."), "",
         "## Setup", "",
         f"Decoder: {m['n_layers']} layers, d_model {m['d_model']}, Hq {m['n_q_heads']}, "
         f"Hkv {m['n_kv_heads']}, head_dim {m['head_dim']}, SwiGLU {m['mlp_hidden']}, RoPE (base "
         f"{m['rope_base']:g}) on {m.get('rotary_dim', m['head_dim'])} of {m['head_dim']} channels; "
         f"index head dim {m['index_head_dim']} (RoPE on {m.get('index_rotary_dim', m['index_head_dim'])}), "
         f"block {m['block_size']}, top-k {m['topk']} blocks "
         f"({m['block_size'] * m['topk']} keys), KL coefficient {m['kl_coeff']}.",
         f"Training: {cfg['steps']} steps, lengths {cfg['seq_len']} (cycled), "
         f"{cfg['batch']} x max length tokens/step, AdamW lr {cfg['lr']} (index projections: "
         f"{cfg.get('index_lr', cfg['lr'])} constant), {cfg['dtype']}, seed "
         f"{cfg['seed']}. MSA-PT: dense warmup {cfg['pt_warmup']} steps. MSA-CPT: dense checkpoint "
         f"of step {cfg['cpt_start']} converted, warmup {cfg['cpt_warmup']} steps, then sparse.",
         f"Curriculum: the first {cfg.get('warm_steps', 0)} steps on lengths "
         f"{cfg.get('warm_lengths', '-')} (same tokens per step); "
         f"{cfg.get('inline_per_1k', 0):g} inline questions per 1K training tokens (their answers "
         f"are targets but not shown in the text).",
         f"Task: records `key -> value` in Markov filler (entropy {data.filler_entropy_nats():.3f} "
         f"nats/token), {data.records_for(1024):d} records per 1K tokens, 4 questions at the end.", ""]
    L += verdict(targs, evals)
    L += ["## Training", "", *[f"![{f}]({f})" for f in files if f == "loss_curves.png"], ""]
    rows = []
    for reg, rs in logs.items():
        if rs:
            tail = rs[-max(1, len(rs) // 20):]
            rows.append([NAMES[reg], rs[-1]["step"] + 1,
                         f"{np.mean([r['lm_loss'] for r in tail]):.4f}",
                         f"{np.mean([r['answer_loss'] for r in tail]):.4f}",
                         f"{np.mean([r['kl'] for r in tail]):.4f}"])
    L += [table(["regime", "steps", "LM loss (last 5%)", "answer loss", "KL"], rows), ""]
    rows = []
    for reg, rs in logs.items():
        for (mode, sl, tok), t in sorted(step_times(rs).items()):
            rows.append([NAMES[reg], mode, sl, tok, f"{t * 1e3:.1f}"])
    timing_path = os.path.join(targs.out, "eval", "step_timing.json")
    if os.path.exists(timing_path):
        tm = json.load(open(timing_path))
        dense = tm["ms"].get("dense", {})
        trow = [[mode, sl, f"{ms:.1f}", f"{dense[sl] / ms:.2f}x" if sl in dense else "-"]
                for mode, per in tm["ms"].items() for sl, ms in per.items()]
        at = f" at commit {tm['commit']}" if tm.get("commit") else ""
        L += [f"Wall clock per training step (forward, backward, AdamW; {tm['tokens_per_step']} "
              f"tokens/step), measured alone on {tm['device_name']}{at} by `step_timing.py` (median "
              f"of {tm['steps']} steps; a freshly initialised model of the same configuration):", "",
              table(["mode", "seq len", "ms/step", "speedup vs dense"], trow), ""]
    L += ["Median step time in the training logs (device_study.sh trains the regimes side by side "
          "on one GPU, so these include the other runs' load):", "",
          table(["regime", "mode", "seq len", "tokens/step", "ms/step"], rows), ""]
    if evals:
        lens = list(next(iter(evals.values()))["retrieval"])
        L += ["## Multi-key retrieval", "", "Accuracy (the answer token right, teacher forced), "
              "held-out sequences:", "",
              table(["regime"] + lens, [[NAMES[r]] + [f"{e['retrieval'][x]['accuracy']:.3f}"
                                                     for x in lens] for r, e in evals.items()]),
              "", f"Per answer token (chance 1/{data.NUM_VALUE_TOKENS}) and the answer tokens' "
              f"mean NLL (chance ln {data.NUM_VALUE_TOKENS} = {math.log(data.NUM_VALUE_TOKENS):.2f}):", "",
              table(["regime"] + lens, [[NAMES[r]] + [
                  f"{e['retrieval'][x].get('token_accuracy', float('nan')):.3f} / "
                  f"{e['retrieval'][x]['answer_nll']:.2f}" for x in lens] for r, e in evals.items()]),
              "", "![retrieval](retrieval.png)", "", "## Needle by depth", ""]
        for nl in list(next(iter(evals.values()))["needle"].values())[0]:
            ds = list(next(iter(evals.values()))["needle"])
            L += [f"{nl} tokens:", "", table(["regime"] + ds, [
                [NAMES[r]] + [f"{e['needle'][d][nl]['accuracy']:.2f}" for d in ds]
                for r, e in evals.items()]), ""]
        L += ["![needle](needle.png)", "", "## Index recall", "",
              "Mass of the model's own dense attention (group mean) on the selected blocks "
              "(coverage), on the best k blocks (oracle), and their ratio (recall), per layer, "
              "queries seeing more than k blocks:", ""]
        rows = []
        for r, e in evals.items():
            for sl, v in e.get("index_recall", {}).items():
                for i, x in enumerate(v["layers"]):
                    rows.append([NAMES[r], sl, i, f"{x['coverage']:.3f}", f"{x['oracle']:.3f}",
                                 f"{x['recall']:.3f}"])
        L += [table(["regime", "length", "layer", "coverage", "oracle", "recall"], rows), ""]
        rows = [[NAMES[r], e["mode"], sl, f"{v['prefill_s'] * 1e3:.1f}",
                 f"{v['per_token_s'] * 1e3:.2f}"]
                for r, e in evals.items() for sl, v in e["decode"].items()]
        L += ["## Generation", "", "Prefill of the prompt through the KV cache, then greedy decode "
              "(median ms per token, batch 1, unfused PyTorch around the msa ops):", "",
              table(["regime", "mode", "prompt", "prefill ms", "ms/token"], rows), ""]
    os.makedirs(rargs.report_dir, exist_ok=True)
    with open(os.path.join(rargs.report_dir, "REPORT.md"), "w") as f:
        f.write("\n".join(L))


def main(argv=None):
    rargs, targs, eargs = split_args(sys.argv[1:] if argv is None else argv)
    if not rargs.no_train:
        train.main_with(targs)
    if not rargs.no_eval:
        for r in train.REGIMES if eargs.regime == "all" else (eargs.regime,):
            if os.path.exists(os.path.join(eargs.out, r, "final", "model.pt")):
                evaluate.evaluate_regime(r, eargs)
    logs = {r: read_log(targs.out, r) for r in train.REGIMES}
    evals = {}
    for r in train.REGIMES:
        p = os.path.join(eargs.out, "eval", f"{r}.json")
        if os.path.exists(p):
            evals[r] = json.load(open(p))
    os.makedirs(rargs.report_dir, exist_ok=True)
    files = plots(logs, evals, rargs.report_dir)
    write_report(rargs, targs, eargs, logs, evals, files)
    print(f"report: {os.path.join(rargs.report_dir, 'REPORT.md')}")


if __name__ == "__main__":
    main()
