"""anchor_sd3m.py, the reference anchor every benchmark compares with, stays the project's copy byte for byte."""

from __future__ import annotations

import hashlib

import pytest
from bench_helpers import BENCHMARKS

pytestmark = pytest.mark.bench


ANCHOR_SHA256 = "0753149b9969054382f4c979b076d8a75ba8e5bad0f3ed676b1307e060cb8a5a"


def test_the_vendored_anchor_is_the_reference_anchor_unchanged():
    """benchmarks/anchor_sd3m.py is a verbatim copy of the project's reference anchor: an edit would make its numbers
    incomparable with every ratio measured before (compare the copy the project keeps, where this checkout has it)."""
    text = (BENCHMARKS / "anchor_sd3m.py").read_bytes()
    assert hashlib.sha256(text).hexdigest() == ANCHOR_SHA256
    reference = BENCHMARKS.parents[1] / "shared" / "bench" / "anchor_sd3m.py"
    if reference.is_file():
        assert text == reference.read_bytes()
