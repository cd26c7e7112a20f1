#!/usr/bin/env bash
# The whole quality study in one call on one GPU (a device call is limited to 10 minutes and its
# machine, with the checkpoints, is gone after it). The 20M-parameter model keeps an H100 far from
# busy, so the regimes run side by side: dense and MSA-PT start together, MSA-CPT starts as soon as
# the dense run has written its step-cpt_start checkpoint, and each regime is evaluated when it
# finishes. What the report needs (train logs, evaluations, arguments, the console log) is packed into
# $OUT/quality_runs.tgz; unpack it into the --out folder and run `report.py --no-train --no-eval`.
#
#   [MSA_STUDY_STEPS=2400] [MSA_STUDY_DEADLINE_S=560] [MSA_STUDY_REGIMES=dense,pt,cpt] \
#   [MSA_STUDY_EVAL_ARGS=...] [MSA_STUDY_TIMING=1] examples/msa_quality/device_study.sh [train.py args]
#
# Where the three do not fit in one call, split them: MSA_STUDY_REGIMES=dense,cpt then
# MSA_STUDY_REGIMES=pt (same STEPS); unpack both archives into one folder for the report.
#
# MSA_STUDY_DEADLINE_S stops whatever still runs that many seconds after the start, so the logs come
# back even when the study does not fit (the report then shows the steps that ran).
set -uo pipefail
cd "$(dirname "$0")"
STEPS=${MSA_STUDY_STEPS:-2400}
RUNS=${MSA_QUALITY_RUNS:-/tmp/msa_quality}
OUTDIR=${OUT:-/tmp/msa_quality_out}
DEADLINE=${MSA_STUDY_DEADLINE_S:-560}
CPT_START=${MSA_STUDY_CPT_START:-$((3 * STEPS / 4))}
REGIMES=${MSA_STUDY_REGIMES:-dense,pt,cpt}  # MSA-CPT needs the dense run: it trains dense too
mkdir -p "$RUNS" "$OUTDIR"
LOG="$OUTDIR/study.log"
T0=$SECONDS
train() { python3 train.py --steps "$STEPS" --out "$RUNS" --cpt-start "$CPT_START" "$@"; }
evaluate() { python3 evaluate.py --out "$RUNS" --regime "$1" ${MSA_STUDY_EVAL_ARGS:-}; }
DEMO_ARGS=${MSA_STUDY_DEMO_ARGS:-}

pack() {
  tar -C "$RUNS" -czf "$OUTDIR/quality_runs.tgz" --ignore-failed-read \
    train_args.json dense/train.jsonl pt/train.jsonl cpt/train.jsonl eval 2>/dev/null
  echo "[study] packed at $((SECONDS - T0)) s" | tee -a "$LOG"
}
trap 'pack' EXIT
# Everything started below belongs to this shell's process group; the watchdog stops it at the
# deadline and the EXIT trap still packs what was written.
( exec >/dev/null 2>&1  # holds no pipe of the caller open
  sleep "$DEADLINE"; echo "[study] deadline ${DEADLINE} s reached, stopping" >>"$LOG"
  pkill -TERM -f 'python3 (train|evaluate|step_timing|demo).py' ) &
WATCHDOG=$!

wants() { [[ ",$REGIMES," == *",$1,"* ]]; }
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader 2>/dev/null | tee -a "$LOG"
PIDS=()
if wants dense || wants cpt; then
  (train --regime dense "$@" && { ! wants dense || evaluate dense; }) 2>&1 \
    | sed -u 's/^/[dense] /' >>"$LOG" &
  DENSE=$!; PIDS+=($DENSE)
fi
if wants pt; then
  (train --regime pt "$@" && evaluate pt) 2>&1 | sed -u 's/^/[pt] /' >>"$LOG" &
  PIDS+=($!)
fi
if wants cpt; then
  # MSA-CPT converts the dense run's step-CPT_START checkpoint (saved atomically by model.py).
  (while [ ! -f "$RUNS/dense/step$CPT_START/model.pt" ]; do
     kill -0 $DENSE 2>/dev/null || { echo "dense run ended without step$CPT_START"; exit 1; }
     sleep 2
   done
   train --regime cpt "$@" && evaluate cpt) 2>&1 | sed -u 's/^/[cpt] /' >>"$LOG" &
  PIDS+=($!)
fi
tail -f "$LOG" --pid="${PIDS[-1]}" &
STATUS=0
for p in "${PIDS[@]}"; do wait "$p" || STATUS=1; done
# Step cost per mode, each alone on the GPU (the logs' times above were taken side by side).
[ "${MSA_STUDY_TIMING:-1}" = 1 ] && python3 step_timing.py --out "$RUNS" 2>&1 | tee -a "$LOG"
# The demo: a 32K retrieval prompt answered by each trained checkpoint.
for r in pt cpt dense; do
  wants $r && [ -f "$RUNS/$r/final/model.pt" ] && python3 demo.py --ckpt "$RUNS/$r/final" --length "${MSA_STUDY_DEMO_LENGTH:-32768}" \
    --depth 0.3 $DEMO_ARGS 2>&1 | sed 's/^/[demo] /' | tee -a "$LOG"
done
pkill -P $WATCHDOG 2>/dev/null; kill $WATCHDOG 2>/dev/null
echo "[study] done in $((SECONDS - T0)) s" | tee -a "$LOG"
exit $STATUS
