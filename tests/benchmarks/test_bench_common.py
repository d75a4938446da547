"""_bench_common.py's build-model subcommand: the random SD3 folders the benchmarks time."""

from __future__ import annotations

import json

import pytest

pytestmark = pytest.mark.bench


@pytest.mark.e2e
def test_the_deep_proxy_model_has_sd3_mediums_blocks_at_the_tiny_width(tmp_path, tiny_model):
    """--size deep: every op of an SD3 Medium step (24 blocks), on tiny tensors: the CPU proxy for the GPU step."""
    import _bench_common

    # its command line, in this process (a fresh one costs seconds of imports; model_for runs it as one)
    assert _bench_common.main(["build-model", str(tmp_path / "deep"), "--size", "deep"]) == 0
    deep = json.loads((tmp_path / "deep" / "transformer" / "config.json").read_text())
    tiny = json.loads((tiny_model / "transformer" / "config.json").read_text())
    assert deep.pop("num_layers") == 24 and tiny.pop("num_layers") == 2
    assert deep == tiny
