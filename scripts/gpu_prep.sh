#!/bin/bash
# Prepare, on a connected machine, what scripts/gpu_host.sh needs on a lent offline CUDA host, and check that it
# fits what such a host takes along with the repository (64 MiB):
#
#   scripts/gpu_prep.sh [KIT_DIR]      KIT_DIR: the project's GPU-host kit (default ../shared/gpu-host)
#
# Writes .whl/ (the kit's wheels, fetched by its fetch_wheels.sh, plus open_clip_torch at the version uv.lock pins:
# the random SD3M's CLIP tokenizers are built from the BPE vocabulary it ships, and such hosts lack it) and
# .gpu-host/ (a copy of the kit: its stubs/). Both are git-ignored; send both along (`carry`). Environment: PYTHON
# (runs pip download; default python3.12), LIMIT_BYTES (default 64 MiB).
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
KIT_SRC="$(cd "${1:-$ROOT/../shared/gpu-host}" && pwd)"
PYTHON=${PYTHON:-python3.12}; LIMIT=${LIMIT_BYTES:-$((64 * 1024 * 1024))}
[ "$KIT_SRC" != "$ROOT/.gpu-host" ] || { echo "gpu_prep.sh: KIT_DIR is the copy this script replaces" >&2; exit 2; }
OPEN_CLIP=$(awk '/^name = "open-clip-torch"$/ { getline; gsub(/version = |"/, ""); print; exit }' "$ROOT/uv.lock")
[ -n "$OPEN_CLIP" ] || { echo "gpu_prep.sh: open-clip-torch is not in $ROOT/uv.lock" >&2; exit 2; }
# pip's noise about local indexes it skips, dropped; anything else it says goes on to stderr
quiet() { { "$@" 2>&1 >/dev/null; } | { grep -v "^WARNING: Location .* is ignored" >&2 || true; }; }
NEW=$(mktemp -d "$ROOT/.gpu-prep.XXXXXX"); trap 'rm -rf "$NEW"' EXIT   # the last good copy stays until this one is
PYTHON=$PYTHON quiet "$KIT_SRC/fetch_wheels.sh" "$NEW/.whl"
quiet "$PYTHON" -m pip download -q --no-deps --only-binary=:all: -d "$NEW/.whl" "open_clip_torch==$OPEN_CLIP"
cp -r "$KIT_SRC" "$NEW/.gpu-host"
rm -rf "$ROOT/.whl" "$ROOT/.gpu-host" && mv "$NEW/.whl" "$NEW/.gpu-host" "$ROOT/"
size=$(du -sb --total "$ROOT/.whl" "$ROOT/.gpu-host" | tail -1 | cut -f1)   # GNU du
echo "gpu_prep.sh: .whl/ ($(ls "$ROOT/.whl" | wc -l) wheels, open_clip_torch $OPEN_CLIP) and .gpu-host/: $size bytes"
if [ "$size" -gt "$LIMIT" ]; then
  echo "gpu_prep.sh: $size bytes is over the $LIMIT bytes a lent host takes along; drop wheels an SD3 run never" \
    "imports" >&2
  exit 1
fi
