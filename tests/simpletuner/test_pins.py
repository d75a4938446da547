"""The pinned versions are the ones whose behaviour sd3tune encodes; fail loudly when they move."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from importlib.metadata import version
from pathlib import Path

import pytest
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


def test_compat_fails_instead_of_waiting_forever_when_the_prefetch_thread_stops():
    """SimpleTuner's loader thread ends silently on an error loading a batch (logged at debug level); the training
    thread then waited forever at 0% CPU (a caption file of blank lines hung `sd3tune train`). It now fails."""
    code = """
import simpletuner.helpers.data_backend.runtime.batch_fetcher as bf
from sd3tune.simpletuner.compat import install
install()
import simpletuner.helpers.data_backend.runtime.batch_fetcher as bf
fetcher = bf.BatchFetcher(step=0, max_size=2, datasets={})  # no datasets: the loader thread stops at once
fetcher.start_fetching().join(timeout=30)
try:
    fetcher.next_response(3)
except RuntimeError as exc:
    assert "prefetch thread stopped" in str(exc) and "--dataloader_prefetch=false" in str(exc), exc
else:
    raise AssertionError("next_response returned without a batch")
"""
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


# ---------------------------------------------------------------------------------------------- per-step fixes
# Each script runs in a fresh process, as the training child does: once on the pinned SimpleTuner as it is (to show
# the fix is still needed) and once with sd3tune's compat fixes installed.

def _result(proc: subprocess.CompletedProcess) -> dict:
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.JSONDecoder().raw_decode(proc.stdout.split("RESULT ", 1)[1])[0]  # SimpleTuner colours stdout


_TRAINER_SCRIPT = """
import json, os, sys, types, torch
if sys.argv[1] == "fixed":
    from sd3tune.simpletuner.compat import install
    install()
from simpletuner.helpers.training import dynamo
from simpletuner.helpers.training.trainer import Trainer

marks = []
torch.compiler.cudagraph_mark_step_begin = lambda: marks.append(1)
seen = {}
for backend in ("no", "inductor"):
    marks.clear()
    dynamo.mark_cudagraph_step_begin(types.SimpleNamespace(dynamo_backend=backend, dynamo_mode="default"))
    seen["marks_" + backend] = len(marks)

class Net(torch.nn.Module):
    walks = 0
    def __init__(self):
        super().__init__()
        self.base = torch.nn.Linear(4, 4).requires_grad_(False)
        self.lora_a, self.lora_b = torch.nn.Linear(4, 2), torch.nn.Linear(2, 4)
    def parameters(self, recurse=True):
        Net.walks += 1
        return super().parameters(recurse)

net = Net()
trainer = Trainer.__new__(Trainer)
trainer.config = types.SimpleNamespace(model_type="lora", lora_type="standard")
trainer.model = types.SimpleNamespace(get_trained_component=lambda unwrap_model=True: net)
trainer.optimizer = object()
counts, walks = [], []
for _ in range(3):
    counts.append(len(trainer._get_trainable_parameters())); walks.append(Net.walks)
net.lora_b.weight.requires_grad_(False)  # a kept parameter frozen: walk again
counts.append(len(trainer._get_trainable_parameters())); walks.append(Net.walks)
seen.update(counts=counts, walks=walks)
torch.set_num_threads(64)  # SimpleTuner asks for --torch_num_threads, 8 unless set
seen["threads"] = torch.get_num_threads()
print("RESULT " + json.dumps(seen))
"""


@pytest.fixture(scope="module")
def trainer_behaviour(tmp_path_factory) -> dict[str, dict]:
    out = {}
    cwd = tmp_path_factory.mktemp("trainer")  # importing SimpleTuner's trainer writes debug.log into the cwd
    for mode in ("pinned", "fixed"):
        proc = subprocess.run([sys.executable, "-c", _TRAINER_SCRIPT, mode], capture_output=True, text=True, cwd=cwd)
        out[mode] = _result(proc)
    return out


def test_compat_skips_the_cuda_graph_step_marker_when_nothing_is_compiled(trainer_behaviour):
    # pinned: 'no' is a truthy string, so an eager run marked steps (and imported torch._inductor at step 1)
    assert trainer_behaviour["pinned"]["marks_no"] == 1
    assert trainer_behaviour["fixed"]["marks_no"] == 0
    assert trainer_behaviour["fixed"]["marks_inductor"] == 1  # compiled runs still mark every step


def test_compat_keeps_the_trainable_parameters_of_a_standard_lora(trainer_behaviour):
    pinned, fixed = trainer_behaviour["pinned"], trainer_behaviour["fixed"]
    assert pinned["walks"][:3] == [1, 2, 3]  # the pin walks the whole model at every call (every step)
    assert fixed["counts"] == pinned["counts"] == [4, 4, 4, 3]  # the same parameters either way
    assert fixed["walks"] == [1, 1, 1, 2]  # one walk, and one more after a kept parameter was frozen


def test_compat_never_gives_torch_more_threads_than_cores(trainer_behaviour):
    cores = len(os.sched_getaffinity(0))
    assert load_catalog().options["torch_num_threads"].default == 8  # SimpleTuner's ask, whatever the machine
    assert trainer_behaviour["pinned"]["threads"] == 64
    assert trainer_behaviour["fixed"]["threads"] == min(64, cores)


_REGIONAL_SCRIPT = """
import json, sys, torch
if sys.argv[2] == "fixed":
    from sd3tune.simpletuner.compat import install
    install()
from accelerate.utils import compile_regions
from peft import LoraConfig
from simpletuner.helpers.models.sd3.transformer import SD3Transformer2DModel

torch.manual_seed(0)
model = SD3Transformer2DModel.from_pretrained(sys.argv[1], subfolder="transformer").eval()
model.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights="gaussian",
                             target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
c = model.config
inputs = dict(hidden_states=torch.randn(2, c.in_channels, 8, 8),
              encoder_hidden_states=torch.randn(2, 20, c.joint_attention_dim),
              pooled_projections=torch.randn(2, c.pooled_projection_dim), timestep=torch.tensor([10.0, 500.0]),
              return_dict=False)
with torch.no_grad():
    eager = model(**inputs)[0]
graph_calls = []

def backend(gm, example_inputs):  # records which compiled graphs run; runs them as they are
    def run(*args):
        graph_calls.append("to_q" in gm.code)  # a graph holding a block's attention
        return gm.forward(*args)
    return run

regional = compile_regions(model, backend=backend)  # what SimpleTuner's dynamo_use_regional_compilation does
with torch.no_grad():
    out = regional(**inputs)[0]
print("RESULT " + json.dumps({"blocks": c.num_layers, "block_graph_calls": sum(graph_calls),
                              "graph_calls": len(graph_calls), "max_abs_diff": (out - eager).abs().max().item(),
                              "lora_keys_kept": sorted(regional.state_dict()) == sorted(model.state_dict())}))
"""


def test_compat_compiles_only_the_sd3_blocks_and_runs_them_compiled(tiny_model, tmp_path):
    seen = {}
    for mode in ("pinned", "fixed"):
        proc = subprocess.run([sys.executable, "-c", _REGIONAL_SCRIPT, str(tiny_model), mode], capture_output=True,
                              text=True, cwd=tmp_path)
        seen[mode] = _result(proc)
    # pinned: SimpleTuner's forward calls each block's parts, never the compiled block: no block ran compiled, only
    # the small modules outside the blocks, each a graph of its own
    assert seen["pinned"]["block_graph_calls"] == 0 and seen["pinned"]["graph_calls"] > 0
    # fixed: every block runs compiled, and nothing else is compiled (fix 8)
    assert seen["fixed"]["block_graph_calls"] == seen["fixed"]["graph_calls"] == seen["fixed"]["blocks"] == 2
    assert seen["fixed"]["max_abs_diff"] == 0.0  # the same computation
    assert seen["fixed"]["lora_keys_kept"]  # compiled in place: parameter names (and the saved LoRA's) unchanged


def test_a_dataloader_with_its_own_generator_leaves_the_global_one_alone():
    """Why compat fix 7 works: every iter() of a DataLoader draws a worker seed, from the global generator unless the
    loader has its own (SimpleTuner calls iter() once per batch, on the prefetch thread)."""
    import torch

    data = torch.utils.data.DataLoader(list(range(4)), batch_size=2, num_workers=0)
    before = torch.random.get_rng_state()
    next(iter(data))
    assert not torch.equal(before, torch.random.get_rng_state())  # the pinned torch: the global generator moved
    data.generator = torch.Generator()
    before = torch.random.get_rng_state()
    next(iter(data))
    assert torch.equal(before, torch.random.get_rng_state())


_FACTORY_SCRIPT = """
import json, sys, tracemalloc, types
if sys.argv[1] == "fixed":
    from sd3tune.simpletuner.compat import install
    install()
from simpletuner.helpers.data_backend.factory import FactoryRegistry

factory = FactoryRegistry(types.SimpleNamespace(), None, None, None, None)  # SimpleTuner builds one per run
tracing_after_setup = tracemalloc.is_tracing()  # the training loop runs next
factory._update_peak_memory()
print("RESULT " + json.dumps({"tracing": tracing_after_setup, "memory_mb": factory.metrics["memory_usage"]}))
"""


def test_compat_keeps_python_allocations_untraced_through_the_training_loop(tmp_path):
    """The pinned factory starts tracemalloc and never stops it: every Python allocation of the whole run then records
    a traceback (a Python loop ran 14x slower inside the training process). Fixed: nothing is traced, and the factory
    still reports the memory the process holds (its psutil fallback) instead of zeros."""
    seen = {}
    for mode in ("pinned", "fixed"):
        proc = subprocess.run([sys.executable, "-c", _FACTORY_SCRIPT, mode], capture_output=True, text=True,
                              cwd=tmp_path)
        seen[mode] = _result(proc)
    assert seen["pinned"]["tracing"] is True
    assert seen["fixed"]["tracing"] is False
    assert seen["fixed"]["memory_mb"]["start"] > 50 and seen["fixed"]["memory_mb"]["peak"] > 50  # MB: torch is loaded


def test_compat_leaves_tracemalloc_to_a_user_who_started_it(tmp_path):
    # tracing starts once SimpleTuner's modules are imported (tracing their imports took ~50 s on 2 cores): what
    # counts is that it was on before the factory ran
    code = ("import tracemalloc, types;"
            "from sd3tune.simpletuner.compat import install; install();"
            "from simpletuner.helpers.data_backend.factory import FactoryRegistry;"
            "tracemalloc.start();"
            "f = FactoryRegistry(types.SimpleNamespace(), None, None, None, None);"
            "assert tracemalloc.is_tracing() and f.metrics['memory_usage']['start'] > 0, f.metrics")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=tmp_path)
