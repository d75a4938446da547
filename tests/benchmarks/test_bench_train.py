"""bench_train.py at tiny size on CPU: its own anchor, its anchor.json rows, the preset variants. Its run as a user
runs it (the keys benchmarks/README.md promises, the settings SimpleTuner really ran with, the step profile) is
test_bench_suite.py's training stage. The numbers themselves are not checked (tiny/CPU timings say nothing about the
acceptance targets, and the script says so)."""

from __future__ import annotations

import json

import pytest
from bench_helpers import assert_cpu_profile, positive

pytestmark = pytest.mark.bench


@pytest.mark.e2e
def test_alone_it_times_its_own_anchor_in_a_fresh_process_and_profiles_it(bench_work, tmp_path, capsys):
    """Without --anchor-json, bench_train.py times the plain diffusers + peft loop itself (the suite's run compares
    with anchor_sd3m.py's row instead: test_bench_suite.py, which also checks the training side of a run)."""
    import bench_train
    from _bench_common import Report

    from sd3tune.tiny import make_concept_images

    args = bench_train.parse_args(["--size", "tiny", "--work", str(tmp_path), "--profile", "2"])
    data = make_concept_images(tmp_path / "data", count=2, size=64)
    _, cfg = bench_train.init_variant("default", {}, args, bench_work / "model-tiny", data, "tiny", 12, 64)
    report = Report()
    s_per_step = bench_train.run_anchor(args, bench_work / "model-tiny", "tiny", cfg, "children", report, 3)
    result = report.data
    assert "anchor.error" not in result, (tmp_path / "anchor" / "anchor.log").read_text()[-3000:]
    assert s_per_step == result["anchor.s_per_step"] > 0
    for key in ("anchor.time_to_first_step_s", "anchor.wall_s", "anchor.peak_mem_gib"):
        positive(result, key)
    assert result["anchor.source"] == "plain diffusers + peft loop (_bench_common.py anchor-train), fresh process"
    assert result["anchor.recipe"].endswith("64 px, batch 2, no gradient checkpointing")  # the run's size and batch
    assert result["anchor.profile"] == str(tmp_path / "anchor" / "step-profile.json")
    assert_cpu_profile(json.loads((tmp_path / "anchor" / "step-profile.json").read_text()), steps=2)
    assert result["anchor.profile_gpu_ms_per_step_by_kind"] == {}
    assert f"anchor.s_per_step: {s_per_step}" in capsys.readouterr().out


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
