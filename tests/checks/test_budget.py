"""What a run needs (checks/budget.py): disk for the caches and the GPU memory estimate."""

from __future__ import annotations

import json
import shutil

from check_helpers import backend_set, check, env_set, extra_args, section


def test_summary_reports_memory_for_the_preset_and_warns_when_it_does_not_fit(make_run):
    import sd3tune.checks as checks

    run, _ = make_run()
    report = checks.check_run(run)
    assert report.summary.preset == "24gb" and 4 < report.summary.gpu_memory_gb < 24
    # no peak was measured at this run's size: the estimate is an extrapolation, and says so instead of an error bar
    assert report.summary.gpu_memory_error_gb is None
    assert "(extrapolated: no measured peak of this setup)" in check(run)[0].output
    env_set(run, "RESOLUTION", "1024")
    backend_set(run, resolution=1024)
    env_set(run, "TRAIN_BATCH_SIZE", "4")
    result, _ = check(run)
    warned = section(result.output, "warning")
    assert "does not fit the 24gb preset" in warned and "measured peaks, within" in warned
    assert "est. GPU memory ~28" in result.output  # the batch-4 row: 28.0 measured
    assert f"(±{checks.budget.measured_fit().max_error_gib:g} over the measured peaks)" in result.output
    extra_args(run, "--gradient_checkpointing=false", "--gradient_checkpointing=true")  # batch 4: never measured
    result, _ = check(run)
    assert "does not fit" not in result.output and "extrapolated" in result.output


def test_checkpointing_is_not_extrapolated_from_one_size():
    # the only checkpointed peak is at batch 1, 1024 px: it fixes what checkpointing adds at that size, not how its
    # memory grows per image (that stays the prior); the fit said 28.5 GiB at batch 4, more than without it (28.0)
    from sd3tune.checks import budget

    fit = budget.measured_fit()
    assert "checkpointing" in fit.fitted and "checkpointed" not in fit.fitted
    assert fit.measured(1, 1024**2, True, False) and not fit.measured(4, 1024**2, True, False)
    assert budget.gpu_memory_estimate(4, 1024**2, True, False) < budget.gpu_memory_estimate(4, 1024**2, False, False)


def test_the_memory_estimate_reproduces_every_measured_peak_within_its_stated_error():
    from sd3tune.checks import budget

    rows = json.loads(budget.PEAKS_FILE.read_text())["rows"]
    fit = budget.measured_fit()
    assert fit.rows == len(rows) >= 16 and 0 < fit.max_error_gib <= 0.5
    for row in rows:
        estimate = budget.gpu_memory_estimate(row["batch"], row["side"] ** 2, row["checkpointing"], row["quantised"])
        assert abs(estimate - row["gib"]) <= fit.max_error_gib + 0.05, row  # + the estimate's rounding to 0.1
    # nothing quantised was measured yet: that term is the prior (an int8 base halves 2.03 B bf16 weights)
    assert "quantised" not in fit.fitted and round(fit.coefficients["quantised"], 2) == -1.89


def test_a_new_measurement_refits_the_estimate():
    from sd3tune.checks import budget

    rows = json.loads(budget.PEAKS_FILE.read_text())["rows"]
    before = budget.fit_memory(rows)
    measured = {**rows[0], "gib": 6.2, "checkpointing": True, "quantised": True, "how": "max_memory_reserved"}
    after = budget.fit_memory([*rows, measured])
    assert "quantised" in after.fitted and after.coefficients != before.coefficients
    assert abs(after.estimate(1, 1024**2, True, True) - 6.2) < 0.01  # the only quantised row: reproduced
    assert abs(before.estimate(1, 1024**2, True, True) - 6.2) > 2  # the prior alone was far off


def test_disk_space_for_caches_is_checked(make_run, monkeypatch):
    import sd3tune.checks as checks
    import sd3tune.checks.budget as budget

    run, _ = make_run()
    monkeypatch.setattr(budget.shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(10**12, 10**12, 1000))
    report = checks.check_run(run)
    assert not report.ok
    assert any(f.key == "cache_dir" and "GiB" in f.message for f in report.errors)
