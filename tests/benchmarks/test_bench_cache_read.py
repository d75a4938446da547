"""bench_cache_read.py times SimpleTuner's own cache reads, gzip-compressed and plain."""

from __future__ import annotations

import pytest
from bench_helpers import positive, run_script

pytestmark = pytest.mark.bench


@pytest.mark.e2e
def test_bench_cache_read_times_simpletuners_gzip_and_plain_reads():
    proc, result = run_script("bench_cache_read.py", "--repeats", "3", timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for dtype in ("float32", "bfloat16"):
        for kind in ("gzip", "plain"):
            positive(result, f"{dtype}.{kind}.ms_per_step")
            positive(result, f"{dtype}.{kind}.mib_per_step")
        positive(result, f"{dtype}.gzip_over_plain")
