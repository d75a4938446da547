"""_bench_common.py's build-model subcommand: the random SD3 folders the benchmarks time."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from bench_helpers import BENCHMARKS
from helpers import child_env

pytestmark = pytest.mark.bench


@pytest.mark.e2e
def test_the_deep_proxy_model_has_sd3_mediums_blocks_at_the_tiny_width(tmp_path, tiny_model):
    """--size deep: every op of an SD3 Medium step (24 blocks), on tiny tensors: the CPU proxy for the GPU step."""
    proc = subprocess.run([sys.executable, str(BENCHMARKS / "_bench_common.py"), "build-model", str(tmp_path / "deep"),
                           "--size", "deep"], capture_output=True, text=True, env=child_env(), timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    deep = json.loads((tmp_path / "deep" / "transformer" / "config.json").read_text())
    tiny = json.loads((tiny_model / "transformer" / "config.json").read_text())
    assert deep.pop("num_layers") == 24 and tiny.pop("num_layers") == 2
    assert deep == tiny
