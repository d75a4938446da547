#!/bin/bash
# The speed acceptance measurements in one command, on one CUDA machine, with a time budget:
#   the plain diffusers + peft anchor (benchmarks/anchor_sd3m.py), then bench_train.py and bench_generate.py against it.
#
#   benchmarks/bench_suite.sh [ANCHOR_SCRIPT.py] OUT_DIR [DEADLINE_S]
#
# ANCHOR_SCRIPT (a first argument ending in .py) defaults to benchmarks/anchor_sd3m.py, the reference anchor kept
# verbatim in this repository; OUT_DIR gets anchor.json and one log per stage.
# Stages run most important first; each gets what is left of DEADLINE_S (default 580) and is stopped with SIGINT
# (sd3tune then stops SimpleTuner's whole process group), so the command ends in time and keeps what it measured.
# Environment: PY (python, default python3), SIZE (sd3m | tiny: CPU rehearsal; default sd3m), WORK (model, images
# and runs; default /tmp/sd3tune-bench), TRAIN / GEN (comma-separated variants; "" skips the stage),
# TRAIN_ARGS / GEN_ARGS (more arguments for each script), ANCHOR_ARGS (e.g. --skip-gen).
set -u
HERE="$(cd "$(dirname "$0")" && pwd)"
ANCHOR="$HERE/anchor_sd3m.py"
if [[ ${1-} == *.py ]]; then ANCHOR=$1; shift; fi
OUT=${1:?usage: bench_suite.sh [ANCHOR_SCRIPT.py] OUT_DIR [DEADLINE_S]}; DEADLINE=${2:-580}
PY=${PY:-python3}; SIZE=${SIZE:-sd3m}; WORK=${WORK:-/tmp/sd3tune-bench}
T0=$(date +%s)
mkdir -p "$OUT" "$WORK"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 WANDB_MODE=disabled

stage() {  # stage NAME LOG COMMAND...: run COMMAND with what is left of the deadline, output to LOG and stdout
  local name=$1 log=$2; shift 2
  local left=$(( DEADLINE - ($(date +%s) - T0) ))
  echo "=== $name at $(( $(date +%s) - T0 )) s, $left s left"
  if [ "$left" -lt 30 ]; then echo "=== $name skipped: out of time"; return 1; fi
  timeout -s INT --kill-after=15 "$(( left - 5 ))" "$@" 2>&1 | tee "$log" | grep -v '^RESULT '
  echo "=== $name exit ${PIPESTATUS[0]} at $(( $(date +%s) - T0 )) s"
}

nvidia-smi -L 2>/dev/null
tiny=(); [ "$SIZE" = tiny ] && tiny=(--tiny)
# shellcheck disable=SC2086
stage anchor "$OUT/anchor.log" "$PY" "$ANCHOR" "${tiny[@]}" ${ANCHOR_ARGS:-} --out "$OUT"
common=(--size "$SIZE" --work "$WORK" --anchor-json "$OUT/anchor.json")
# anchor_sd3m.py --tiny times batch 1 and 4 (as at full size); the tiny preset trains batch 2, which it has no row for
tiny_train=(); [ "$SIZE" = tiny ] && tiny_train=(--batch 1)
if [ -n "${TRAIN-default}" ]; then
  # shellcheck disable=SC2086
  stage train "$OUT/train.log" "$PY" "$HERE/bench_train.py" "${common[@]}" "${tiny_train[@]}" \
    --variants "${TRAIN-default}" --json "$WORK/train.json" ${TRAIN_ARGS:-}
fi
if [ -n "${GEN-default,compile}" ]; then
  # shellcheck disable=SC2086
  stage generate "$OUT/generate.log" "$PY" "$HERE/bench_generate.py" "${common[@]}" --variants "${GEN-default,compile}" \
    --json "$WORK/generate.json" ${GEN_ARGS:-}
fi
echo "=== done at $(( $(date +%s) - T0 )) s; logs in $OUT"
