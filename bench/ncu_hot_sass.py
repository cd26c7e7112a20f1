#!/usr/bin/env python3
"""The hot spots of one kernel from Nsight Compute's source page (SASS, CSV):

    ncu -i report.ncu-rep --page source --csv --print-source sass > sass.csv
    python3 bench/ncu_hot_sass.py sass.csv [--top 40]

prints the instructions with the most warp-stall samples (where the warps wait) and the samples
summed by opcode, so a kernel's limit can be read without the Nsight Compute GUI. Column names differ
between ncu versions: the stall column is the first whose name contains "Warp Stall Sampling (All",
else "Stall Sampling"."""
import argparse
import collections
import csv
import sys


def number(text):
    try:
        return float(str(text).replace(",", ""))
    except ValueError:
        return 0.0


def find(headers, *keys):
    for key in keys:
        for h in headers:
            if key.lower() in h.lower():
                return h
    return None


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("csv")
    p.add_argument("--top", type=int, default=40)
    args = p.parse_args(argv)
    with open(args.csv, newline="") as f:
        lines = [line for line in f if not line.startswith("==")]  # ncu's own messages
    # Each profiled kernel's table opens with a "Kernel Name" line, then its own header row.
    sections, current = [], None
    for line in lines:
        if line.startswith('"Kernel Name"'):
            current = {"name": next(csv.reader([line]))[1], "lines": []}
            sections.append(current)
        elif current is None:
            current = {"name": "?", "lines": [line]}
            sections.append(current)
        else:
            current["lines"].append(line)
    status = 1
    for section in sections:
        status = min(status, report(section["name"], list(csv.DictReader(section["lines"])), args.top))
    return status


def report(name, rows, top):
    print(f"== {name[:160]}")
    if not rows:
        print("ncu_hot_sass: no rows", file=sys.stderr)
        return 1
    headers = list(rows[0].keys())
    stall = find(headers, "Warp Stall Sampling (All", "Stall Sampling")
    source = find(headers, "Source")
    address = find(headers, "Address")
    executed = find(headers, "Instructions Executed")
    if stall is None or source is None:
        print(f"ncu_hot_sass: no stall / source column among {headers}", file=sys.stderr)
        return 1
    total = sum(number(r[stall]) for r in rows) or 1.0
    print(f"== hot SASS ({len(rows)} instructions, {total:.0f} stall samples; column '{stall}')")
    for r in sorted(rows, key=lambda r: -number(r[stall]))[:top]:
        ex = f" exec {number(r[executed]):.0f}" if executed else ""
        print(f"{100 * number(r[stall]) / total:5.1f}%  {r.get(address, '') if address else ''}  "
              f"{r[source].strip()[:90]}{ex}")
    by_op = collections.Counter()
    for r in rows:
        op = (r[source].strip().split() or ["?"])[0]
        if op.startswith("@"):  # predicate guard: the opcode follows it
            op = (r[source].strip().split() + ["?", "?"])[1]
        by_op[op.split(".")[0]] += number(r[stall])
    print("== stall samples by opcode")
    for op, n in by_op.most_common(15):
        print(f"{100 * n / total:5.1f}%  {op}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
