"""The tools in scripts/ that are not benchmarks: gpu_host.sh (runs benchmarks/bench_suite.sh on a lent GPU host) and
gpu_prep.sh (prepares what it needs), with stand-ins for the anchor, the kit and pip. The benchmarks' own tests are
in tests/benchmarks/; update_simpletuner_catalog.py's is in tests/simpletuner/test_pins.py."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

from helpers import child_env

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"


def test_gpu_host_installs_the_wheels_once_and_runs_the_suite_with_them_on_the_path(tmp_path):
    # the lent GPU host: SimpleTuner's wheels go into SITE, which comes first on PYTHONPATH with the kit's stubs
    anchor = tmp_path / "anchor.py"  # a stand-in anchor: records the path it ran with
    anchor.write_text("import json, sys\nout = sys.argv[sys.argv.index('--out') + 1]\n"
                      "json.dump({'path': sys.path}, open(out + '/anchor.json', 'w'))\n")
    site, kit = tmp_path / "site", tmp_path / "kit"
    (kit / "stubs").mkdir(parents=True)
    env = child_env(PY=sys.executable, SIZE="tiny", WORK=str(tmp_path / "work"), TRAIN="", GEN="", SITE=str(site),
                    KIT=str(kit), WHEELS=str(tmp_path / "no-wheels"))
    proc = subprocess.run(["bash", str(SCRIPTS / "gpu_host.sh"), str(anchor), str(tmp_path / "out")], env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and f"no wheels in {tmp_path / 'no-wheels'}" in proc.stderr, proc.stderr
    (site / "simpletuner").mkdir(parents=True)  # installed by an earlier call: not installed again
    proc = subprocess.run(["bash", str(SCRIPTS / "gpu_host.sh"), str(anchor), str(tmp_path / "out"), "100"],
                          env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert re.search(r"^versions: torch [^,]+, .*simpletuner 4\.10\.1", proc.stdout, re.M), proc.stdout
    assert re.search(r"=== anchor at \d+ s, (9\d|100) s left", proc.stdout) and "=== anchor exit 0" in proc.stdout
    path = json.loads((tmp_path / "out" / "anchor.json").read_text())["path"]
    assert path.index(str(site)) < path.index(str(SCRIPTS.parent / "src")) < path.index(str(kit / "stubs"))


def test_gpu_host_measure_presets_runs_the_anchor_s_training_rows_then_the_preset_variants(tmp_path):
    """MEASURE=presets: the anchor without its generation rows, then bench_train.py's default and the three small-card
    preset variants, no generation stage; TRAIN/GEN/ANCHOR_ARGS set by hand still win; another MEASURE is refused."""
    anchor = tmp_path / "anchor.py"  # never run: the stand-in suite runs nothing
    site, kit = tmp_path / "site", tmp_path / "kit"
    (kit / "stubs").mkdir(parents=True)
    (site / "simpletuner").mkdir(parents=True)
    suite = tmp_path / "bench_suite.sh"  # a stand-in for benchmarks/bench_suite.sh: says what it was handed
    suite.write_text('echo "TRAIN=$TRAIN GEN=[$GEN] ANCHOR_ARGS=$ANCHOR_ARGS args=$*"\n')
    suite.chmod(0o755)
    env = child_env(PY=sys.executable, SIZE="tiny", WORK=str(tmp_path / "work"), SITE=str(site), KIT=str(kit),
                    SUITE=str(suite), MEASURE="presets")
    proc = subprocess.run(["bash", str(SCRIPTS / "gpu_host.sh"), str(anchor), str(tmp_path / "out"), "480"], env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "TRAIN=default,preset-8gb,preset-12gb,preset-16gb GEN=[] ANCHOR_ARGS=--skip-gen args=" in proc.stdout
    proc = subprocess.run(["bash", str(SCRIPTS / "gpu_host.sh"), str(anchor), str(tmp_path / "out")],
                          env={**env, "TRAIN": "default,preset-8gb-bf16"}, capture_output=True, text=True,
                          timeout=120)
    assert "TRAIN=default,preset-8gb-bf16 GEN=[] ANCHOR_ARGS=--skip-gen" in proc.stdout
    proc = subprocess.run(["bash", str(SCRIPTS / "gpu_host.sh"), str(anchor), str(tmp_path / "out")],
                          env={**env, "MEASURE": "speed"}, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "the one mode is MEASURE=presets" in proc.stderr


def test_gpu_prep_sends_the_kits_wheels_and_the_locked_open_clip_and_refuses_what_a_host_cannot_take(tmp_path):
    # gpu_prep.sh writes the repository's .whl/ and .gpu-host/: copy the scripts and the lock into a scratch repo
    repo = tmp_path / "repo"
    (repo / "scripts").mkdir(parents=True)
    shutil.copy(SCRIPTS / "gpu_prep.sh", repo / "scripts")
    shutil.copy(SCRIPTS.parent / "uv.lock", repo)
    kit = tmp_path / "kit"  # a stand-in kit: its fetch_wheels.sh writes one wheel
    (kit / "stubs").mkdir(parents=True)
    (kit / "fetch_wheels.sh").write_text('#!/bin/bash\nmkdir -p "$1"\n'
                                         'echo w > "$1/simpletuner-4.10.1-py3-none-any.whl"\n')
    (kit / "fetch_wheels.sh").chmod(0o755)
    pip = tmp_path / "python"  # a stand-in `python -m pip download ... -d DIR SPEC`: writes DIR/SPEC.whl
    pip.write_text('#!/bin/bash\nargs=("$@")\n'
                   'for i in "${!args[@]}"; do [ "${args[$i]}" = -d ] && d=${args[$((i+1))]}; done\n'
                   'echo w > "$d/${args[-1]}.whl"\n')
    pip.chmod(0o755)
    locked = re.search(r'^name = "open-clip-torch"\nversion = "([^"]+)"', (repo / "uv.lock").read_text(), re.M)[1]
    env = child_env(PYTHON=str(pip))
    proc = subprocess.run(["bash", str(repo / "scripts" / "gpu_prep.sh"), str(kit)], env=env, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert sorted(p.name for p in (repo / ".whl").iterdir()) == [f"open_clip_torch=={locked}.whl",
                                                                  "simpletuner-4.10.1-py3-none-any.whl"]
    assert (repo / ".gpu-host" / "stubs").is_dir() and (repo / ".gpu-host" / "fetch_wheels.sh").is_file()
    assert f"2 wheels, open_clip_torch {locked}" in proc.stdout
    proc = subprocess.run(["bash", str(repo / "scripts" / "gpu_prep.sh"), str(kit)], env={**env, "LIMIT_BYTES": "100"},
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1 and "over the 100 bytes a lent host takes along" in proc.stderr, proc.stderr
