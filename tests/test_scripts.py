"""The benchmark scripts keep working: each runs at tiny size on CPU as a user would run it (a subprocess) and
prints the keys the README promises. The numbers themselves are not checked here (tiny/CPU timings say nothing
about the acceptance targets, and the scripts say so)."""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import child_env, sd3_transformer_inputs

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"
sys.path.insert(0, str(SCRIPTS))  # the tests below import bench_generate
NOT_ACCEPTANCE = "tiny/CPU: not an acceptance number"


def run_script(name: str, *args: str, timeout: float) -> tuple[subprocess.CompletedProcess, dict]:
    proc = subprocess.run([sys.executable, str(SCRIPTS / name), *args], capture_output=True, text=True,
                          env=child_env(), timeout=timeout)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    result = json.loads(lines[-1][len("RESULT "):]) if lines else {}
    return proc, result


def positive(result: dict, key: str) -> float:
    value = result.get(key)
    assert isinstance(value, (int, float)) and value > 0, (key, value)
    return value


@pytest.fixture(scope="module")
def bench_work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("bench")


@pytest.fixture(scope="module")
def train_bench(bench_work):
    return run_script("bench_train.py", "--size", "tiny", "--work", str(bench_work), "--steps", "8", "--warmup", "3",
                      "--variants", "default,traced-allocations", "--profile", "2", "--json",
                      str(bench_work / "train.json"), timeout=600)


@pytest.mark.e2e
def test_bench_train_runs_at_tiny_size(train_bench, bench_work):
    proc, result = train_bench
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert result["bench"] == "train" and result["size"] == "tiny"
    for key in ("anchor.s_per_step", "default.s_per_step", "default.time_to_first_step_s", "default.peak_mem_gib",
                "default.ratio_s_per_step"):
        positive(result, key)
    assert result["default.verdict_step"] == NOT_ACCEPTANCE
    assert f"default.ratio_s_per_step: {result['default.ratio_s_per_step']}  ({NOT_ACCEPTANCE})" in proc.stdout
    # The defaults the reference profile chose are what SimpleTuner really ran with.
    resolved = result["default.simpletuner_resolved"]
    assert resolved["optimizer"] == "torch-adamw"
    assert resolved["grad_clip_method"] == "norm"
    assert resolved["lora_dropout"] == 0.0
    assert resolved["compress_disk_cache"] is False
    assert resolved["dataloader_prefetch"] is True
    assert resolved["set_grads_to_none"] is True
    assert json.loads((bench_work / "train.json").read_text())["default.s_per_step"] == result["default.s_per_step"]
    assert (bench_work / "runs" / "default" / "output" / "pytorch_lora_weights.safetensors").is_file()
    # --profile 2: two more steps after the 8 timed ones (and one to close the window), profiled in the training
    # process and in the anchor's; the timed window stays steps 3..7
    assert result["default.steps"] == 12
    assert "steps 3..7" in next(line for line in proc.stdout.splitlines() if line.startswith("default.s_per_step:"))
    for who, path in (("default", bench_work / "runs" / "default" / "logs" / "step-profile.json"),
                      ("anchor", bench_work / "anchor" / "step-profile.json")):
        assert result[f"{who}.profile"] == str(path)
        profile = json.loads(path.read_text())
        assert profile["steps"] == 2 and profile["device"] == "cpu"
        assert profile["wall_s_per_step"] > 0 and sum(profile["cpu_ops_per_step"].values()) > 100
        assert profile["gpu"]["kernels_per_step"] == 0 and profile["sync_sites"] == []  # no GPU here
        assert result[f"{who}.profile_gpu_ms_per_step_by_kind"] == {}
    # the pinned SimpleTuner's traced allocations, for measuring compat fix 10: the training process said it traced
    # (bench_train reports traced-allocations.error otherwise) and the run trained
    assert "traced-allocations.error" not in result and "default.error" not in result
    positive(result, "traced-allocations.s_per_step")
    assert "tracing Python allocations" in Path(result["traced-allocations.log"]).read_text()
    assert "tracing Python allocations" not in Path(result["default.log"]).read_text()


def test_the_deep_proxy_model_has_sd3_mediums_blocks_at_the_tiny_width(tmp_path, tiny_model):
    """--size deep: every op of an SD3 Medium step (24 blocks), on tiny tensors: the CPU proxy for the GPU step."""
    proc = subprocess.run([sys.executable, str(SCRIPTS / "_bench_common.py"), "build-model", str(tmp_path / "deep"),
                           "--size", "deep"], capture_output=True, text=True, env=child_env(), timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    deep = json.loads((tmp_path / "deep" / "transformer" / "config.json").read_text())
    tiny = json.loads((tiny_model / "transformer" / "config.json").read_text())
    assert deep.pop("num_layers") == 24 and tiny.pop("num_layers") == 2
    assert deep == tiny


@pytest.mark.e2e
def test_bench_generate_runs_at_tiny_size(train_bench, bench_work):
    # Reuses the tiny model bench_train built, and generates with the LoRA it trained.
    variants = ("default", "compile", "fp8", "compile-qkv", "compile-autotune")
    proc, result = run_script("bench_generate.py", "--size", "tiny", "--work", str(bench_work), "--variants",
                              ",".join(variants), "--images", "4", "--batch-size", "2", "--steps", "8",
                              "--anchor-images", "1", "--lora", str(bench_work / "runs" / "default"), "--profile",
                              timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert result["bench"] == "generate" and result["model_build_s"] == 0.0  # reused, not rebuilt
    for key in ("anchor.s_per_image", "anchor.time_to_first_image_s", "default.s_per_image",
                "default.time_to_first_image_s", "default.peak_mem_gib", "default.ratio_s_per_image",
                *(f"{name}.s_per_image" for name in variants[1:])):
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
    for name in variants:  # --profile: one warm batch each, on CPU without GPU numbers
        positive(result, f"{name}.profile_wall_s_per_image")
        assert result[f"{name}.profile_gpu_busy_s_per_image"] == 0.0
        assert json.loads(Path(result[f"{name}.profile_summary"]).read_text())["cpu_ops_per_step"]


@pytest.mark.e2e
def test_a_variant_that_fails_is_reported_and_the_next_one_still_runs(train_bench, bench_work, monkeypatch, capsys):
    import bench_generate

    def broken(transformer):
        raise RuntimeError("cuDNN Frontend error: no valid execution plan\nmore detail")

    monkeypatch.setitem(bench_generate.CANDIDATES, "compile-qkv", (broken, "{}"))
    code = bench_generate.main(["--size", "tiny", "--work", str(bench_work), "--variants", "compile-qkv,compile",
                                "--images", "4", "--batch-size", "2", "--steps", "2", "--anchor-images", "1"])
    out = capsys.readouterr().out
    result = json.loads(out.splitlines()[-1][len("RESULT "):])
    assert code == 1
    assert result["compile-qkv.error"] == "RuntimeError: cuDNN Frontend error: no valid execution plan"
    assert "compile-qkv.s_per_image" not in result
    positive(result, "compile.s_per_image")


def test_the_qkv_candidate_computes_sd3_mediums_blocks_and_leaves_normalised_q_k_alone(tiny_model):
    import torch
    from diffusers import SD3Transformer2DModel

    from bench_generate import fuse_qkv

    config = SD3Transformer2DModel.load_config(tiny_model / "transformer")
    for qk_norm, fused in ((None, config["num_layers"]), ("rms_norm", 0)):  # SD3 Medium; SD3.5-style q/k norms
        torch.manual_seed(0)
        model = SD3Transformer2DModel.from_config({**config, "qk_norm": qk_norm}).eval()
        args = sd3_transformer_inputs(config)  # a batch of 2; the tiny model's last block is context-pre-only
        with torch.inference_mode():
            before = model(*args).sample
            assert fuse_qkv(model) == fused
            after = model(*args).sample
        assert torch.allclose(after, before, atol=1e-5), (qk_norm, (after - before).abs().max())
        assert sum(hasattr(b.attn, "to_qkv") for b in model.transformer_blocks) == fused


def test_bench_cache_read_times_simpletuners_gzip_and_plain_reads():
    proc, result = run_script("bench_cache_read.py", "--repeats", "3", timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for dtype in ("float32", "bfloat16"):
        for kind in ("gzip", "plain"):
            positive(result, f"{dtype}.{kind}.ms_per_step")
            positive(result, f"{dtype}.{kind}.mib_per_step")
        positive(result, f"{dtype}.gzip_over_plain")


def test_bench_feedforward_times_the_feed_forward_paths_and_compares_their_outputs():
    proc, result = run_script("bench_feedforward.py", "--repeats", "3", "--no-compile", timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert result["fused_layers"] == 1 and result["fp8_layers"] == 2 and NOT_ACCEPTANCE in proc.stdout
    for stream in ("image", "text"):
        for key in ("unfused_ms", "fused_ms", "fp8_ms", "fused_vs_unfused", "fp8_vs_fused"):
            positive(result, f"{stream}.{key}")
        assert result[f"{stream}.max_abs_diff"] == 0.0  # CPU: both are diffusers' own ops
        assert 0 < result[f"{stream}.fp8_relative_error"] < 0.1  # e4m3 rounding, nothing worse


def test_bench_cli_reports_start_up_and_imports_stay_light():
    """The timing verdict belongs to the benchmark (a loaded CI machine may miss it); the import sets are exact."""
    proc, result = run_script("bench_cli.py", "--runs", "3", timeout=180)
    assert result["verdict_imports"] == "PASS", proc.stdout + proc.stderr
    assert result["help_ratio"] > 0 and result["verdict_help_time"] in ("PASS", "FAIL")
    assert proc.returncode == (0 if result["verdict_help_time"] == "PASS" else 1), proc.stdout + proc.stderr
    for key in ("help_imports", "check_imports"):
        assert not {"torch", "diffusers", "simpletuner"} & set(result[key]), (key, result[key])


def test_bench_check_prints_key_value_lines_and_a_result_like_the_other_benchmarks(tmp_path):
    out = tmp_path / "check.json"
    proc, result = run_script("bench_check.py", "--images", "30", "--repeat", "2", "--json", str(out), timeout=120)
    assert result["verdict"] in ("PASS", "FAIL"), proc.stdout + proc.stderr
    assert proc.returncode == (0 if result["verdict"] == "PASS" else 1), proc.stdout + proc.stderr
    assert result["bench"] == "check" and result["images"] == 30 and result["budget_s"] == 2.0
    for key in ("import_s", "check_run_s", "cli_s"):
        positive(result, key)
        assert any(line.startswith(f"{key}: {result[key]}") for line in proc.stdout.splitlines()), key
    assert len(result["check_run_times_s"]) == 2
    summary = result["summary"]
    assert set(summary) == {"images", "buckets", "steps", "errors", "warnings"}
    assert summary["images"] == 30 and summary["steps"] == 500 and summary["errors"] == 0
    assert result["cli_exit"] == 0 and "unexpected_errors" not in result
    assert proc.stdout.splitlines()[-1].startswith("RESULT ")  # the last line, once
    assert sum(line.startswith("RESULT ") for line in proc.stdout.splitlines()) == 1
    assert json.loads(out.read_text()) == result


ANCHOR_SHA256 = "0753149b9969054382f4c979b076d8a75ba8e5bad0f3ed676b1307e060cb8a5a"


def test_the_vendored_anchor_is_the_reference_anchor_unchanged():
    """scripts/anchor_sd3m.py is a verbatim copy of the project's reference anchor: an edit would make its numbers
    incomparable with every ratio measured before (compare the copy the project keeps, where this checkout has it)."""
    text = (SCRIPTS / "anchor_sd3m.py").read_bytes()
    assert hashlib.sha256(text).hexdigest() == ANCHOR_SHA256
    reference = SCRIPTS.parents[1] / "shared" / "bench" / "anchor_sd3m.py"
    if reference.is_file():
        assert text == reference.read_bytes()


@pytest.mark.e2e
def test_bench_suite_runs_the_vendored_anchor_then_the_benchmarks_within_a_deadline(train_bench, bench_work,
                                                                                     tmp_path):
    # no anchor argument: scripts/anchor_sd3m.py --tiny (~15 s on 2 cores) writes OUT/anchor.json
    work = tmp_path / "work"  # the tiny model bench_train built, its runs left alone
    work.mkdir()
    (work / "model-tiny").symlink_to(bench_work / "model-tiny")
    out = tmp_path / "out"
    env = child_env(PY=sys.executable, SIZE="tiny", WORK=str(work), TRAIN="default", GEN="default",
                    TRAIN_ARGS="--steps 6 --warmup 2", GEN_ARGS="--images 2 --batch-size 1")
    proc = subprocess.run(["bash", str(SCRIPTS / "bench_suite.sh"), str(out), "400"], env=env,
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
    assert train["default.ratio_s_per_step"] == round(train["default.s_per_step"] / train["anchor.s_per_step"], 3)
    assert f"default.ratio_s_per_step: {train['default.ratio_s_per_step']}  ({NOT_ACCEPTANCE})" in proc.stdout
    # bench_suite.sh hands anchor.json to bench_generate.py (--anchor-json): no anchor of its own is timed
    gen = result("generate")
    assert gen["anchor.s_per_image"] == anchor["gen_1024_28steps_cfg_s"] > 0 and gen["default.s_per_image"] > 0
    assert "anchor.time_to_first_image_s" not in gen
    assert gen["default.ratio_s_per_image"] == round(gen["default.s_per_image"] / gen["anchor.s_per_image"], 3)
    # like with like: sd3tune runs the denoising steps anchor_sd3m.py --tiny ran (2), not its own default (28)
    assert gen["anchor.steps"] == gen["default.steps"] == gen["config"]["steps"] == 2


@pytest.mark.e2e
def test_bench_generate_prints_no_ratio_when_its_steps_differ_from_the_anchor_jsons(train_bench, bench_work, tmp_path,
                                                                                    capsys):
    import bench_generate

    anchor = tmp_path / "anchor.json"
    anchor.write_text(json.dumps({"gpu": "test card", "gen_1024_28steps_cfg_s": 1.6}))  # a full-size anchor: 28
    assert bench_generate.anchor_json_steps(anchor) == 28
    anchor.write_text(json.dumps({"gen_1024_28steps_cfg_s": 0.25}))  # anchor_sd3m.py --tiny logs no gpu: 2 steps
    assert bench_generate.anchor_json_steps(anchor) == 2
    code = bench_generate.main(["--size", "tiny", "--work", str(bench_work), "--variants", "default", "--images", "2",
                                "--batch-size", "1", "--steps", "3", "--anchor-json", str(anchor)])
    out = capsys.readouterr().out
    result = json.loads(out.splitlines()[-1][len("RESULT "):])
    assert code == 0
    assert result["anchor.steps"] == 2 and result["default.steps"] == 3 and result["default.s_per_image"] > 0
    assert result["default.ratio_s_per_image"] is None
    assert ("default.ratio_s_per_image: None  (no ratio: the anchor ran 2 denoising steps, sd3tune --steps 3)"
            in out)


def test_bench_train_says_which_batch_sizes_the_anchor_json_timed(tmp_path, capsys):
    """Without a row for the run's batch there is no ratio; anchor.error says which batches anchor_sd3m.py timed."""
    import bench_train
    from _bench_common import Report, anchor_row

    path = tmp_path / "anchor.json"
    path.write_text(json.dumps({"train_bs1_nockpt_s_per_step": 0.02, "train_bs4_nockpt_s_per_step": 0.05,
                                "train_bs1_ckpt_s_per_step": 0.03}))
    report = Report()
    assert anchor_row(path, "train_bs2_nockpt_s_per_step", "s_per_step", "", report,
                      missing=bench_train.anchor_batches_hint(path, 2)) is None
    assert report.data["anchor.error"] == (f"{path} has no train_bs2_nockpt_s_per_step row (anchor_sd3m.py timed "
                                           "batch 1 and 4, this run trains batch 2: pass --batch 1 to compare)")
    path.write_text(json.dumps({"gen_1024_28steps_cfg_s": 0.2}))  # anchor_sd3m.py --skip-train
    assert bench_train.anchor_batches_hint(path, 1) == "no training rows: was anchor_sd3m.py run with --skip-train?"
    assert anchor_row(path, "train_bs1_nockpt_s_per_step", "s_per_step", "", report) is None
    assert report.data["anchor.error"].endswith("(was anchor_sd3m.py run with --skip-gen or --skip-train?)")
    assert anchor_row(tmp_path / "none.json", "x", "s_per_step", "", report) is None
    assert report.data["anchor.error"].endswith("has no x row (no such file)")


def test_bench_suite_takes_another_anchor_script_as_its_first_argument(tmp_path):
    anchor = tmp_path / "anchor.py"  # a stand-in anchor: writes OUT/anchor.json
    anchor.write_text("import json, sys\nout = sys.argv[sys.argv.index('--out') + 1]\n"
                      "json.dump({'gpu': 'test card', 'tiny': '--tiny' in sys.argv},\n"
                      "          open(out + '/anchor.json', 'w'))\n")
    out = tmp_path / "out"
    env = child_env(PY=sys.executable, SIZE="tiny", WORK=str(tmp_path / "work"), TRAIN="", GEN="")
    proc = subprocess.run(["bash", str(SCRIPTS / "bench_suite.sh"), str(anchor), str(out), "120"], env=env,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "=== anchor exit 0" in proc.stdout and "=== train" not in proc.stdout and "=== generate" not in proc.stdout
    assert json.loads((out / "anchor.json").read_text()) == {"gpu": "test card", "tiny": True}
    proc = subprocess.run(["bash", str(SCRIPTS / "bench_suite.sh")], env=env, capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode != 0 and "usage: bench_suite.sh [ANCHOR_SCRIPT.py] OUT_DIR [DEADLINE_S]" in proc.stderr


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
