"""The pinned versions are the ones whose behaviour sd3tune encodes; fail loudly when they move."""

from __future__ import annotations

import subprocess
import sys
from importlib.metadata import version
from pathlib import Path

from packaging.version import Version

from sd3tune.simpletuner.catalog import load_catalog

ROOT = Path(__file__).parents[2]


def test_installed_versions_match_the_pins():
    assert version("simpletuner") == "4.10.1" == load_catalog().simpletuner_version
    assert version("diffusers") == "0.42.1"
    assert Version("5.17") <= Version(version("transformers")) < Version("5.23")
    assert Version("0.21.2") <= Version(version("peft")) < Version("0.22")
    assert Version(version("torch").split("+")[0]) >= Version("2.11")


def test_shipped_catalog_matches_the_installed_simpletuner():
    out = subprocess.run([sys.executable, str(ROOT / "scripts" / "update_simpletuner_catalog.py"), "--check"],
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr[-2000:]


def test_compat_aliases_the_qwen3vl_name_simpletuner_imports():
    """SimpleTuner imports this name at start-up; transformers >= 5.23 removed it (the compat shim restores it)."""
    code = ("from sd3tune.simpletuner.compat import install; install();"
            "from transformers.models.qwen3_vl import modeling_qwen3_vl as m;"
            "assert hasattr(m, 'Qwen3VLCausalLMOutputWithPast')")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_compat_makes_pin_memory_a_noop_without_an_accelerator():
    code = ("from sd3tune.simpletuner.compat import install; install(); import torch;"
            "t = torch.ones(2);"
            "assert torch.cuda.is_available() or t.pin_memory() is t")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_compat_makes_the_prefetch_wait_block_instead_of_spinning():
    """The pinned SimpleTuner busy-waits for prefetched batches; after the fix the wait costs no CPU time and still
    returns the batch the loader thread delivers."""
    code = """
import importlib.util, threading, time
name = "simpletuner.helpers.data_backend.runtime.batch_fetcher"
assert "while self.queue.empty():" in open(importlib.util.find_spec(name).origin).read()  # the bug, in the pin
from sd3tune.simpletuner.compat import install
install()
import simpletuner.helpers.data_backend.runtime.batch_fetcher as bf
fetcher = bf.BatchFetcher(step=0, max_size=2)
loader = threading.Timer(0.5, fetcher.queue.put, args=("batch-7",))  # the loader's work takes 0.5 s
cpu0 = time.process_time(); loader.start()
assert fetcher.next_response(7) == "batch-7" and fetcher.step == 7
cpu = time.process_time() - cpu0
assert cpu < 0.2, f"waiting for the batch burnt {cpu:.2f} s of CPU"
"""
    subprocess.run([sys.executable, "-c", code], check=True)
