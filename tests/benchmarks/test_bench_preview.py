"""bench_preview.py: `sd3tune preview` on a run of captioned photos, timed as a fresh command on at most 2 cores."""

from __future__ import annotations

import json

import pytest
from bench_helpers import positive, run_script

pytestmark = [pytest.mark.bench, pytest.mark.e2e]  # the preview imports SimpleTuner


def test_bench_preview_prints_key_value_lines_and_a_result_like_the_other_benchmarks(tmp_path):
    out = tmp_path / "preview.json"
    proc, result = run_script("bench_preview.py", "--images", "5", "--resolution", "256", "--json", str(out),
                              "--no-reference", timeout=300)  # one SimpleTuner import fewer
    assert result["verdict"] in ("PASS", "FAIL"), proc.stdout + proc.stderr
    assert proc.returncode == (0 if result["verdict"] == "PASS" else 1), proc.stdout + proc.stderr
    assert result["bench"] == "preview" and result["images"] == 5 and result["budget_s"] == 20.0
    for key in ("cli_s", "cpu_s", "build_s"):
        positive(result, key)
        assert any(line.startswith(f"{key}: {result[key]}") for line in proc.stdout.splitlines()), key
    assert result["cli_exit"] == 0 and result["cores"] <= 2 and "import_only_s" not in result
    assert result["written"] == {"images": 5, "buckets": result["written"]["buckets"], "contact_sheet": True}
    assert proc.stdout.splitlines()[-1].startswith("RESULT ") and json.loads(out.read_text()) == result
