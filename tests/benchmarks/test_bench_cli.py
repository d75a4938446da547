"""bench_cli.py: sd3tune --help's start-up time and what --help and check import."""

from __future__ import annotations

import pytest
from bench_helpers import run_script

pytestmark = pytest.mark.bench


def test_bench_cli_reports_start_up_and_imports_stay_light():
    """The timing verdict belongs to the benchmark (a loaded CI machine may miss it); the import sets are exact."""
    proc, result = run_script("bench_cli.py", "--runs", "3", timeout=180)
    assert result["verdict_imports"] == "PASS", proc.stdout + proc.stderr
    assert result["help_ratio"] > 0 and result["verdict_help_time"] in ("PASS", "FAIL")
    assert proc.returncode == (0 if result["verdict_help_time"] == "PASS" else 1), proc.stdout + proc.stderr
    for key in ("help_imports", "check_imports"):
        assert not {"torch", "diffusers", "simpletuner"} & set(result[key]), (key, result[key])
