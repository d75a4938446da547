"""bench_train.py at tiny size on CPU, as a user would run it: the keys benchmarks/README.md promises, the settings
SimpleTuner really ran with, the step profiles; and its anchor.json rows. The numbers themselves are not checked
(tiny/CPU timings say nothing about the acceptance targets, and the script says so)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from bench_helpers import NOT_ACCEPTANCE, positive

pytestmark = pytest.mark.bench


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
    assert "default.error" not in result
    # torch's peak reserved GPU memory of the training process: none on CPU, and the script says why
    assert result["default.max_memory_reserved_gib"] is None
    assert "default.max_memory_reserved_gib: None  (n/a: no CUDA in the training process)" in proc.stdout
    # (the traced-allocations variant is proven by test_bench_suite's training stage)
    assert "tracing Python allocations" not in Path(result["default.log"]).read_text()


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


@pytest.mark.parametrize("variant", ["preset-16gb", "preset-12gb", "preset-8gb", "preset-8gb-bf16"])
def test_each_small_card_preset_variant_trains_what_init_writes_for_its_preset(tmp_path, tiny_model, variant):
    """The preset variants run `sd3tune init --preset P` (whatever --preset says) plus only what a benchmark needs; the
    memory they are meant to measure is read in the training process (the default variant shows it at tiny size)."""
    import bench_train

    from sd3tune.config.presets import PRESETS
    from sd3tune.tiny import make_concept_images

    args = bench_train.parse_args(["--work", str(tmp_path), "--preset", "24gb"])
    data = make_concept_images(tmp_path / "data", count=2, size=64)
    _, cfg = bench_train.init_variant(variant, bench_train.VARIANTS[variant], args, tiny_model, data, "tiny", 6, 64)
    preset = PRESETS[bench_train.PRESET_VARIANTS[variant][0]].overrides
    assert cfg.precision.gradient_checkpointing == preset["precision"]["gradient_checkpointing"]
    expected = "no_change" if variant.endswith("bf16") else preset["precision"].get("base_model_precision",
                                                                                     "no_change")
    assert cfg.precision.base_model_precision == expected
    assert cfg.extra == preset.get("extra", {})
    assert cfg.validation.enabled is False and cfg.data.resolution == 64
    manifest = json.loads((tmp_path / "runs" / variant / "sd3tune.json").read_text())
    assert manifest["init"]["preset"] == bench_train.PRESET_VARIANTS[variant][0]
