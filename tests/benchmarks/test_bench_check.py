"""bench_check.py: sd3tune check on a run of captioned images, in-process and as a fresh command."""

from __future__ import annotations

import json

import pytest
from bench_helpers import positive, run_script

pytestmark = pytest.mark.bench


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
