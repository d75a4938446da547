"""bench_suite.sh: the anchor, then bench_train.py and bench_generate.py against it, in one command with a deadline."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from bench_helpers import BENCHMARKS, NOT_ACCEPTANCE, assert_cpu_profile, positive
from helpers import child_env

pytestmark = pytest.mark.bench


GENERATE_VARIANTS = ("default", "compile", "fp8", "compile-qkv", "compile-autotune")


@pytest.mark.e2e
def test_bench_suite_runs_the_vendored_anchor_then_the_benchmarks_within_a_deadline(tiny_model, tmp_path):
    # no anchor argument: benchmarks/anchor_sd3m.py --tiny (~15 s on 2 cores) writes OUT/anchor.json. The train stage
    # is also bench_train.py's run at tiny size (profiled), the generate stage bench_generate.py's: every variant and
    # candidate, profiled, with the LoRA the train stage trained (one process for both proofs, each)
    work = tmp_path / "work"  # the tests' tiny model (the one `--size tiny` builds) stands in for a built one
    work.mkdir()
    (work / "model-tiny").symlink_to(tiny_model)
    out = tmp_path / "out"
    env = child_env(PY=sys.executable, SIZE="tiny", WORK=str(work), TRAIN="traced-allocations",
                    GEN=",".join(GENERATE_VARIANTS), TRAIN_ARGS="--steps 6 --warmup 2 --profile 2",
                    GEN_ARGS=f"--images 4 --batch-size 2 --profile --lora {work / 'runs' / 'traced-allocations'}")
    proc = subprocess.run(["bash", str(BENCHMARKS / "bench_suite.sh"), str(out), "500"], env=env,
                          capture_output=True, text=True, timeout=600)
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
    _assert_training(train, v, work, proc.stdout)
    # bench_suite.sh hands anchor.json to bench_generate.py (--anchor-json): no anchor of its own is timed
    gen = result("generate")
    assert gen["anchor.s_per_image"] == anchor["gen_1024_28steps_cfg_s"] > 0 and gen["default.s_per_image"] > 0
    assert "anchor.time_to_first_image_s" not in gen
    assert gen["default.ratio_s_per_image"] == round(gen["default.s_per_image"] / gen["anchor.s_per_image"], 3)
    # like with like: sd3tune runs the denoising steps anchor_sd3m.py --tiny ran (2), not its own default (28)
    assert gen["anchor.steps"] == gen["default.steps"] == gen["config"]["steps"] == 2
    _assert_generate_variants(gen)


def _assert_training(result: dict, v: str, work: Path, stdout: str) -> None:
    """bench_train.py at tiny size: what SimpleTuner really ran with, the step profile, the files it leaves."""
    for key in ("s_per_step", "time_to_first_step_s", "peak_mem_gib"):
        positive(result, f"{v}.{key}")
    assert result[f"{v}.verdict_step"] == NOT_ACCEPTANCE and f"{v}.error" not in result
    # The defaults the reference profile chose are what SimpleTuner really ran with.
    resolved = result[f"{v}.simpletuner_resolved"]
    assert (resolved["optimizer"], resolved["grad_clip_method"], resolved["lora_dropout"]) == ("torch-adamw", "norm",
                                                                                                0.0)
    assert resolved["compress_disk_cache"] is False and resolved["dataloader_prefetch"] is True
    assert resolved["set_grads_to_none"] is True
    assert json.loads((work / "train.json").read_text())[f"{v}.s_per_step"] == result[f"{v}.s_per_step"]
    assert (work / "runs" / v / "output" / "pytorch_lora_weights.safetensors").is_file()
    # --profile 2: two more steps after the 6 timed ones (and one to close the window); the timed window stays 2..5
    assert result[f"{v}.steps"] == 10
    assert "steps 2..5" in next(line for line in stdout.splitlines() if line.startswith(f"{v}.s_per_step:"))
    path = work / "runs" / v / "logs" / "step-profile.json"
    assert result[f"{v}.profile"] == str(path)
    assert_cpu_profile(json.loads(path.read_text()), steps=2)
    assert result[f"{v}.profile_gpu_ms_per_step_by_kind"] == {}
    # torch's peak reserved GPU memory of the training process: none on CPU, and the script says why
    assert result[f"{v}.max_memory_reserved_gib"] is None
    assert f"{v}.max_memory_reserved_gib: None  (n/a: no CUDA in the training process)" in stdout


def _assert_generate_variants(result: dict) -> None:
    """bench_generate.py at tiny size: its variants and candidates, what each applied, their profiles."""
    assert result["bench"] == "generate" and result["model_build_s"] == 0.0  # reused, not rebuilt
    for key in ("default.time_to_first_image_s", "default.peak_mem_gib",
                *(f"{name}.s_per_image" for name in GENERATE_VARIANTS)):
        positive(result, key)
    assert result["default.verdict"] == NOT_ACCEPTANCE
    assert "LoRA fused into the transformer weights" in result["compile.notes"], result["compile.notes"]
    assert any("nothing compiled on cpu" in note for note in result["compile.notes"]), result["compile.notes"]
    assert result["compile.mean_abs_diff_vs_default"] < 0.5  # fusing the LoRA only rounds differently
    # the q/k/v candidate applied on CPU too: both tiny blocks changed, the images those of compile
    assert "candidate: q/k/v fused into one matmul per stream in 2 attention layers" in result["compile-qkv.notes"]
    assert result["compile-qkv.mean_abs_diff_vs_compile"] < 0.5
    assert "candidate: 0 blocks compiled with max-autotune-no-cudagraphs" in result["compile-autotune.notes"]  # CPU
    assert any(note.startswith("--fp8: 21 transformer matmuls in FP8") for note in result["fp8.notes"])
    assert 0 < result["fp8.mean_abs_diff_vs_compile"] < 5  # e4m3 moves the images, a little
    for name in GENERATE_VARIANTS:  # --profile: one warm batch each, on CPU without GPU numbers
        positive(result, f"{name}.profile_wall_s_per_image")
        assert result[f"{name}.profile_gpu_busy_s_per_image"] == 0.0
        assert json.loads(Path(result[f"{name}.profile_summary"]).read_text())["cpu_ops_per_step"]


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
