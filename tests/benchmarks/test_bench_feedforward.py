"""bench_feedforward.py times the feed-forward paths of generate --compile / --fp8 and compares their outputs."""

from __future__ import annotations

import pytest
from bench_helpers import NOT_ACCEPTANCE, positive, run_script

pytestmark = pytest.mark.bench


@pytest.mark.e2e
def test_bench_feedforward_times_the_feed_forward_paths_and_compares_their_outputs():
    proc, result = run_script("bench_feedforward.py", "--repeats", "3", "--no-compile", timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert result["fused_layers"] == 1 and result["fp8_layers"] == 2 and NOT_ACCEPTANCE in proc.stdout
    for stream in ("image", "text"):
        for key in ("unfused_ms", "fused_ms", "fp8_ms", "fused_vs_unfused", "fp8_vs_fused"):
            positive(result, f"{stream}.{key}")
        assert result[f"{stream}.max_abs_diff"] == 0.0  # CPU: both are diffusers' own ops
        assert 0 < result[f"{stream}.fp8_relative_error"] < 0.1  # e4m3 rounding, nothing worse
