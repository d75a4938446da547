"""What a run needs (checks/budget.py): disk for the caches and the GPU memory estimate."""

from __future__ import annotations

import shutil

from check_helpers import backend_set, check, env_set, section


def test_summary_reports_memory_for_the_preset_and_warns_when_it_does_not_fit(make_run):
    import sd3tune.checks as checks

    run, _ = make_run()
    report = checks.check_run(run)
    assert report.summary.preset == "24gb" and 4 < report.summary.gpu_memory_gb < 24
    assert checks.gpu_memory_estimate(1, 1024**2, False, False) == 10.8  # reference profile: SimpleTuner, batch 1
    assert checks.gpu_memory_estimate(4, 1024**2, False, False) == 28.0
    assert checks.gpu_memory_estimate(1, 1024**2, True, False) == 10.6
    env_set(run, "RESOLUTION", "1024")
    backend_set(run, resolution=1024)
    env_set(run, "TRAIN_BATCH_SIZE", "4")
    result, _ = check(run)
    assert "does not fit the 24gb preset" in section(result.output, "warning")


def test_disk_space_for_caches_is_checked(make_run, monkeypatch):
    import sd3tune.checks as checks
    import sd3tune.checks.budget as budget

    run, _ = make_run()
    monkeypatch.setattr(budget.shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(10**12, 10**12, 1000))
    report = checks.check_run(run)
    assert not report.ok
    assert any(f.key == "cache_dir" and "GiB" in f.message for f in report.errors)
