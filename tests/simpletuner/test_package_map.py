"""preview's import of SimpleTuner's pieces: ``importlib.metadata.packages_distributions()`` (a walk of every installed
file, which diffusers and transformers each make as they are imported) is answered from one walk made by a child
process, identical to this process's own answer; should the child fail, it is made here, once."""

from __future__ import annotations

import importlib.metadata
import json
import subprocess
import sys
import textwrap

import pytest

from sd3tune.simpletuner import preview


@pytest.fixture(scope="module")
def expected() -> dict:
    return importlib.metadata.packages_distributions()


@pytest.fixture()
def counted(monkeypatch):
    """The real packages_distributions, counting its calls in this process (the list, and the counting function);
    preview's shim never skips its walk because the callers happen to be imported already."""
    calls = []
    real = importlib.metadata.packages_distributions

    def counting():
        calls.append(1)
        return real()

    monkeypatch.setattr(importlib.metadata, "packages_distributions", counting)
    monkeypatch.setattr(preview, "PACKAGE_MAP_CALLERS", ("sd3tune_absent_module",))
    return calls, counting


def test_the_child_answers_every_call_as_this_process_would(counted, expected):
    calls, counting = counted
    with preview.one_package_map():
        first = importlib.metadata.packages_distributions()
        first["numpy"].append("changed by a caller")  # each caller gets its own copy
        second = importlib.metadata.packages_distributions()
    assert second == expected and first != expected and "numpy" in expected
    assert calls == []  # no walk in this process
    assert importlib.metadata.packages_distributions is counting  # restored on exit


def test_a_failed_child_means_one_walk_here(counted, expected, monkeypatch):
    calls, _ = counted
    monkeypatch.setattr(preview, "_PACKAGE_MAP", "raise SystemExit(3)")
    with preview.one_package_map():
        assert importlib.metadata.packages_distributions() == expected
        assert importlib.metadata.packages_distributions() == expected
    assert calls == [1]


@pytest.mark.e2e
def test_diffusers_and_transformers_are_answered_by_the_child(tmp_path):
    """In a fresh process, as `sd3tune preview` imports them: both callers ask, no walk happens in the process."""
    code = textwrap.dedent("""
        import importlib.metadata, json, sys
        from sd3tune.simpletuner import preview
        real, calls, asked = importlib.metadata.packages_distributions, [], []
        importlib.metadata.packages_distributions = lambda: calls.append(1) or real()
        _of = preview._package_map_of
        preview._package_map_of = lambda child: asked.append(1) or _of(child)
        with preview.one_package_map():
            import diffusers.utils.import_utils as d
            import transformers.utils.import_utils as t
        print(json.dumps({"walks_here": len(calls), "asked": len(asked), "same": d._package_map == real()
                          == t.PACKAGE_DISTRIBUTION_MAPPING}))
    """)
    proc = subprocess.run([sys.executable, "-W", "ignore", "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result == {"walks_here": 0, "asked": 1, "same": True}
