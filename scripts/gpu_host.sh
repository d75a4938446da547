#!/bin/bash
# The speed suite (benchmarks/bench_suite.sh) on a lent, offline CUDA host whose Python already has torch,
# transformers, peft and accelerate but neither SimpleTuner nor sd3tune's other dependencies. Prepare on a connected
# machine, then run one command there:
#
#   here:  scripts/gpu_prep.sh   (writes .whl/ and .gpu-host/, both git-ignored: send them along with the repository)
#   there: scripts/gpu_host.sh [ANCHOR_SCRIPT.py] OUT_DIR [DEADLINE_S]
#
# It installs the wheels in .whl/ into SITE (default /tmp/sd3tune-site; once per host), puts SITE, src/ and the
# kit's stubs/ (spacy, boto3: imported at start-up by unrelated model families, never used by an SD3 run) on
# PYTHONPATH, prints the versions it runs with, then runs benchmarks/bench_suite.sh with its arguments, DEADLINE_S
# (default 560) less the time taken so far (SUITE names another suite script: the tests' stand-in).
# bench_suite.sh's variables (PY, SIZE, WORK, TRAIN, GEN, TRAIN_ARGS, GEN_ARGS, ANCHOR_ARGS) pass through, e.g.
#   ANCHOR_ARGS=--skip-train TRAIN= GEN=compile,fp8 GEN_ARGS="--images 16" scripts/gpu_host.sh /tmp/out 420
# sd3tune's own SimpleTuner fixes (src/sd3tune/simpletuner/compat) reach the training process by themselves.
# MEASURE=presets (issue 32) measures the small-card presets against the anchor in one command: the anchor's training
# rows, then bench_train.py's default (speed) and preset-8gb, preset-12gb, preset-16gb (each what `sd3tune init
# --preset P` writes; V.max_memory_reserved_gib is torch's peak in the training process), no generation:
#   MEASURE=presets scripts/gpu_host.sh /tmp/out 480
# (TRAIN, GEN, ANCHOR_ARGS still win when set, e.g. TRAIN=default,preset-8gb,preset-8gb-bf16.)
set -u
if [ "${MEASURE-}" = presets ]; then
  export TRAIN=${TRAIN-default,preset-8gb,preset-12gb,preset-16gb} GEN=${GEN-} ANCHOR_ARGS=${ANCHOR_ARGS---skip-gen}
elif [ -n "${MEASURE-}" ]; then
  echo "gpu_host.sh: MEASURE=$MEASURE: the one mode is MEASURE=presets" >&2; exit 2
fi
HERE="$(cd "$(dirname "$0")" && pwd)"
ROOT="$(dirname "$HERE")"
ANCHOR=(); if [[ ${1-} == *.py ]]; then ANCHOR=("$1"); shift; fi
OUT=${1:?usage: gpu_host.sh [ANCHOR_SCRIPT.py] OUT_DIR [DEADLINE_S]}; DEADLINE=${2:-560}
SITE=${SITE:-/tmp/sd3tune-site}; KIT=${KIT:-$ROOT/.gpu-host}; WHEELS=${WHEELS:-$ROOT/.whl}
export PY=${PY:-python3}
T0=$(date +%s)
if [ ! -d "$SITE/simpletuner" ]; then
  compgen -G "$WHEELS/*.whl" >/dev/null || { echo "gpu_host.sh: no wheels in $WHEELS (see the header)" >&2; exit 2; }
  python3 -m pip install --quiet --disable-pip-version-check --no-index --no-deps --target "$SITE" "$WHEELS"/*.whl \
    || exit 2
fi
[ -d "$KIT/stubs" ] || { echo "gpu_host.sh: no $KIT/stubs (see the header)" >&2; exit 2; }
export PYTHONPATH="$SITE:$ROOT/src:$KIT/stubs${PYTHONPATH:+:$PYTHONPATH}"
"$PY" - <<'EOF' || exit 2
import importlib.metadata as md
import torch
import sd3tune.simpletuner.launch  # noqa: F401  (sd3tune and its SimpleTuner adapter import)
from sd3tune.tiny import clip_bpe_file
try:  # the random SD3M's CLIP tokenizers are built from open_clip_torch's BPE file
    clip_bpe_file()
except RuntimeError as exc:
    raise SystemExit(f"gpu_host.sh: {exc} (scripts/gpu_prep.sh puts its wheel in .whl/)")
names = ("torch", "transformers", "diffusers", "peft", "accelerate", "simpletuner", "pydantic")
print("versions: " + ", ".join(f"{n} {md.version(n)}" for n in names)
      + f"; CUDA {torch.version.cuda}, {torch.cuda.get_device_name() if torch.cuda.is_available() else 'no GPU'}")
EOF
exec "${SUITE:-$ROOT/benchmarks/bench_suite.sh}" "${ANCHOR[@]}" "$OUT" "$(( DEADLINE - ($(date +%s) - T0) ))"
