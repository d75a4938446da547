"""The benchmark scripts' tests: benchmarks/ goes on sys.path (the tests import bench_generate, bench_train,
_bench_common and step_profile, as the scripts import each other), and the tiny training run that several tests
reuse is made once per session."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from bench_helpers import BENCHMARKS, run_script

sys.path.insert(0, str(BENCHMARKS))


@pytest.fixture(scope="session")
def bench_work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("bench")


@pytest.fixture(scope="session")
def train_bench(bench_work, tiny_model):
    """bench_train.py at tiny size (the default variant, profiled): its LoRA in ``bench_work`` serves
    bench_generate.py's tests. The tests' tiny model (what `--size tiny` builds) is its model."""
    (bench_work / "model-tiny").symlink_to(tiny_model)
    return run_script("bench_train.py", "--size", "tiny", "--work", str(bench_work), "--steps", "8", "--warmup", "3",
                      "--variants", "default", "--profile", "2", "--json",
                      str(bench_work / "train.json"), timeout=600)
