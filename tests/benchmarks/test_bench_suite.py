"""bench_suite.sh: the anchor, then bench_train.py and bench_generate.py against it, in one command with a deadline."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from bench_helpers import BENCHMARKS, NOT_ACCEPTANCE
from helpers import child_env

pytestmark = pytest.mark.bench


@pytest.mark.e2e
def test_bench_suite_runs_the_vendored_anchor_then_the_benchmarks_within_a_deadline(tiny_model, tmp_path):
    # no anchor argument: benchmarks/anchor_sd3m.py --tiny (~15 s on 2 cores) writes OUT/anchor.json
    work = tmp_path / "work"  # the tests' tiny model (the one `--size tiny` builds) stands in for a built one
    work.mkdir()
    (work / "model-tiny").symlink_to(tiny_model)
    out = tmp_path / "out"
    env = child_env(PY=sys.executable, SIZE="tiny", WORK=str(work), TRAIN="traced-allocations", GEN="default",
                    TRAIN_ARGS="--steps 6 --warmup 2", GEN_ARGS="--images 2 --batch-size 1")
    proc = subprocess.run(["bash", str(BENCHMARKS / "bench_suite.sh"), str(out), "400"], env=env,
                          capture_output=True, text=True, timeout=500)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for stage in ("anchor", "train", "generate"):
        assert f"=== {stage} exit 0" in proc.stdout, proc.stdout[-3000:]
    anchor = json.loads((out / "anchor.json").read_text())

    def result(stage: str) -> dict:
        return json.loads(next(line for line in (out / f"{stage}.log").read_text().splitlines()
                               if line.startswith("RESULT "))[len("RESULT "):])

    # training is compared with a row the tiny anchor writes (batch 1 and 4; the tiny preset trains batch 2)
    train = result("train")
    assert "anchor.error" not in train and train["config"]["batch"] == 1
    assert train["anchor.s_per_step"] == anchor["train_bs1_nockpt_s_per_step"] > 0
    assert "row train_bs1_nockpt_s_per_step" in train["anchor.source"]
    # the stage trains the traced-allocations variant (the pinned SimpleTuner's traced allocations, for measuring
    # compat fix 10): the training process said it traced (bench_train reports traced-allocations.error otherwise)
    v = "traced-allocations"
    assert f"{v}.error" not in train and "tracing Python allocations" in Path(train[f"{v}.log"]).read_text()
    assert train[f"{v}.ratio_s_per_step"] == round(train[f"{v}.s_per_step"] / train["anchor.s_per_step"], 3)
    assert f"{v}.ratio_s_per_step: {train[f'{v}.ratio_s_per_step']}  ({NOT_ACCEPTANCE})" in proc.stdout
    # bench_suite.sh hands anchor.json to bench_generate.py (--anchor-json): no anchor of its own is timed
    gen = result("generate")
    assert gen["anchor.s_per_image"] == anchor["gen_1024_28steps_cfg_s"] > 0 and gen["default.s_per_image"] > 0
    assert "anchor.time_to_first_image_s" not in gen
    assert gen["default.ratio_s_per_image"] == round(gen["default.s_per_image"] / gen["anchor.s_per_image"], 3)
    # like with like: sd3tune runs the denoising steps anchor_sd3m.py --tiny ran (2), not its own default (28)
    assert gen["anchor.steps"] == gen["default.steps"] == gen["config"]["steps"] == 2


def test_bench_suite_takes_another_anchor_script_as_its_first_argument(tmp_path):
    anchor = tmp_path / "anchor.py"  # a stand-in anchor: writes OUT/anchor.json
    anchor.write_text("import json, sys\nout = sys.argv[sys.argv.index('--out') + 1]\n"
                      "json.dump({'gpu': 'test card', 'tiny': '--tiny' in sys.argv},\n"
                      "          open(out + '/anchor.json', 'w'))\n")
    out = tmp_path / "out"
    env = child_env(PY=sys.executable, SIZE="tiny", WORK=str(tmp_path / "work"), TRAIN="", GEN="")
    proc = subprocess.run(["bash", str(BENCHMARKS / "bench_suite.sh"), str(anchor), str(out), "120"], env=env,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "=== anchor exit 0" in proc.stdout and "=== train" not in proc.stdout and "=== generate" not in proc.stdout
    assert json.loads((out / "anchor.json").read_text()) == {"gpu": "test card", "tiny": True}
    proc = subprocess.run(["bash", str(BENCHMARKS / "bench_suite.sh")], env=env, capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode != 0 and "usage: bench_suite.sh [ANCHOR_SCRIPT.py] OUT_DIR [DEADLINE_S]" in proc.stderr
