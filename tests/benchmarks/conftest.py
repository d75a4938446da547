"""The benchmark scripts' tests: benchmarks/ goes on sys.path (the tests import bench_generate, bench_train,
_bench_common and step_profile, as the scripts import each other), and one working folder holds the tests' tiny
model as the scripts' `--size tiny` model."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from bench_helpers import BENCHMARKS

sys.path.insert(0, str(BENCHMARKS))


@pytest.fixture(scope="session")
def bench_work(tmp_path_factory, tiny_model) -> Path:
    """A --work folder whose tiny model (what `--size tiny` builds) is the tests' own."""
    work = tmp_path_factory.mktemp("bench")
    (work / "model-tiny").symlink_to(tiny_model)
    return work
