"""The suite's own machinery: the xdist groups that keep an expensive session fixture's tests on one worker."""

from __future__ import annotations

import subprocess
import sys


def test_tests_of_one_xdist_group_run_on_one_worker(tmp_path):
    # pytest 9 with pytest-xdist 3.8 ignored the groups (pyproject pins pytest < 9): the bench training, made once per
    # worker that needs it, ran twice
    (tmp_path / "conftest.py").write_text(
        "import pytest\n"
        "@pytest.fixture(scope='session')\n"
        "def costly():\n    return 1\n"
        "@pytest.hookimpl(tryfirst=True)\n"
        "def pytest_collection_modifyitems(config, items):\n"
        "    for item in items:\n"
        "        if 'costly' in item.fixturenames:\n"
        "            item.add_marker(pytest.mark.xdist_group('costly'))\n")
    tests = ["import os, pathlib\n"]
    for i in range(6):
        tests.append(f"def test_grouped_{i}(costly, tmp_path_factory):\n"
                     f"    (pathlib.Path({str(tmp_path)!r}) / 'grouped-{i}').write_text(os.environ['PYTEST_XDIST_WORKER'])\n")
        tests.append(f"def test_free_{i}():\n    pass\n")
    (tmp_path / "test_groups.py").write_text("".join(tests))
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-n", "2", "--dist",
                           "loadgroup", "-c", "/dev/null", "--rootdir", str(tmp_path), str(tmp_path)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    workers = {(tmp_path / f"grouped-{i}").read_text() for i in range(6)}
    assert len(workers) == 1, f"the grouped tests ran on {sorted(workers)}"


def test_tests_that_share_two_costly_fixtures_join_their_groups():
    from helpers import shared_groups

    class Item:  # what shared_groups reads of a pytest item
        def __init__(self, fixturenames: list[str]) -> None:
            self.fixturenames = fixturenames

    shared = {"trained": "t", "evaluated": "e", "parallel": "p", "kohya": "k"}
    items = [Item(names) for names in (
        ["trained"], ["evaluated", "trained"], ["parallel"], ["parallel", "trained"], ["kohya"], ["tmp_path"])]
    groups = shared_groups(items, shared)
    assert [groups.get(item) for item in items] == ["e", "e", "e", "e", "k", None]  # one worker makes "trained" once
