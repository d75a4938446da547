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


def test_shipped_catalog_matches_the_installed_simpletuner(probes):
    # scripts/update_simpletuner_catalog.py --check, run in the pinned probes' process (one SimpleTuner import less)
    assert probe(probes, "pinned", "catalog") == {"exit": 0, "said": "catalog is up to date"}


# ------------------------------------------------------------------------------------------------- the probes
# Each fix is shown on the pinned SimpleTuner as it is (the fix is still needed) and with sd3tune's compat fixes
# installed, as the training child has them. Importing SimpleTuner costs ~10 s, so the probes share two processes,
# one per mode, each probe a script run in a namespace of its own, in an order that keeps one probe's lasting effects
# (the threads asked of torch, tracing started by the pinned factory) after those they would disturb. A probe gives
# its numbers to report(); an exception is its failure.

PROBES: dict[str, str] = {}

PROBES["qwen3vl"] = """
# SimpleTuner imports this name at start-up; transformers >= 5.23 removed it (the compat shim restores it)
from transformers.models.qwen3_vl import modeling_qwen3_vl as m
assert hasattr(m, 'Qwen3VLCausalLMOutputWithPast')
"""

PROBES["pin_memory"] = """
import torch
t = torch.ones(2)
assert torch.cuda.is_available() or t.pin_memory() is t
"""

PROBES["prefetch_blocks"] = """
import importlib.util, threading, time
name = "simpletuner.helpers.data_backend.runtime.batch_fetcher"
assert "while self.queue.empty():" in open(importlib.util.find_spec(name).origin).read()  # the bug, in the pin
import simpletuner.helpers.data_backend.runtime.batch_fetcher as bf
fetcher = bf.BatchFetcher(step=0, max_size=2)
loader = threading.Timer(0.5, fetcher.queue.put, args=("batch-7",))  # the loader's work takes 0.5 s
cpu0 = time.process_time(); loader.start()
assert fetcher.next_response(7) == "batch-7" and fetcher.step == 7
cpu = time.process_time() - cpu0
assert cpu < 0.2, f"waiting for the batch burnt {cpu:.2f} s of CPU"
"""

PROBES["prefetch_stops"] = """
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

PROBES["regional"] = """
import torch
from accelerate.utils import compile_regions
from peft import LoraConfig
from simpletuner.helpers.models.sd3.transformer import SD3Transformer2DModel

torch.manual_seed(0)
model = SD3Transformer2DModel.from_pretrained(MODEL, subfolder="transformer").eval()
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
report({"blocks": c.num_layers, "block_graph_calls": sum(graph_calls), "graph_calls": len(graph_calls),
        "max_abs_diff": (out - eager).abs().max().item(),
        "lora_keys_kept": sorted(regional.state_dict()) == sorted(model.state_dict())})
"""

PROBES["trainer"] = """
import types, torch
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
report(seen)
"""

PROBES["factory"] = """
import tracemalloc, types
from simpletuner.helpers.data_backend.factory import FactoryRegistry

factory = FactoryRegistry(types.SimpleNamespace(), None, None, None, None)  # SimpleTuner builds one per run
tracing_after_setup = tracemalloc.is_tracing()  # the training loop runs next
factory._update_peak_memory()
report({"tracing": tracing_after_setup, "memory_mb": factory.metrics["memory_usage"]})
"""

PROBES["user_tracemalloc"] = """
# a user who traces allocations keeps tracing (started before the factory runs)
import tracemalloc, types
from simpletuner.helpers.data_backend.factory import FactoryRegistry
tracemalloc.start()
f = FactoryRegistry(types.SimpleNamespace(), None, None, None, None)
assert tracemalloc.is_tracing() and f.metrics['memory_usage']['start'] > 0, f.metrics
"""

PROBES["quanto_cuda"] = """
import torch, tracemalloc
tracemalloc.stop()  # the pinned factory probe (before) left it on
is_available = torch.cuda.is_available
torch.cuda.is_available = lambda: True  # the pinned workaround replaces the op only on a CUDA host
calls = []
import simpletuner.helpers.training.quantisation.quanto_workarounds as workarounds
from sd3tune.simpletuner.compat import walkable_quanto_ops

def walk():  # what importing torch._inductor does first (torch/_inductor/decomposition.py)
    try:
        return len({**torch._decomp.core_aten_decompositions()})
    except TypeError as exc:
        return str(exc)

seen = {"replaced_by": type(torch.ops.quanto.gemm_f16f8_marlin).__name__, "pinned": walk(),
        "guard": walkable_quanto_ops.applies_to(workarounds)}
walkable_quanto_ops.apply(workarounds)
# the wrapper calls the op it kept (a CUDA kernel): record what it is given instead
workarounds.original_gemm_f16f8_marlin = lambda *args: calls.append([a.dtype for a in args[:3]]) or args[0]
seen["fixed"] = walk()
op = torch.ops.quanto.gemm_f16f8_marlin
a, w, s = torch.ones(2, 2), torch.zeros(2, 2, dtype=torch.int32), torch.ones(2, dtype=torch.bfloat16)
op(a, w, s, None, 8, 2, 2, 2)  # SimpleTuner's wrapper still casts the input to the scales' dtype
seen.update(cast=[str(d) for d in calls[0]], overloads=op.overloads(), schema=str(op.default._schema))
torch.cuda.is_available = is_available  # a CPU host again for the probes after this one
report(seen)
"""

PROBES["catalog"] = """
# `scripts/update_simpletuner_catalog.py --check` as a user runs it (without the compat fixes: fix 17 answers
# SimpleTuner's model family listings from the catalog itself)
import contextlib, io, runpy, sys
sys.argv = [SCRIPTS + "/update_simpletuner_catalog.py", "--check"]
said = io.StringIO()
try:
    with contextlib.redirect_stdout(said):
        runpy.run_path(sys.argv[0], run_name="__main__")
    code = 0
except SystemExit as stop:
    code = stop.code
report({"exit": code, "said": said.getvalue().strip()})
"""

# what each process runs, in order (the pinned factory leaves tracemalloc on: last; the trainer probe asks torch for
# 64 threads: after the model probe; the catalog imports every model family, which changes what the trainer probe
# sees: last; the quanto probe fakes a CUDA host while it runs, and imports the quantisation workarounds before the
# catalog does)
PROBE_ORDER = {"pinned": ("regional", "trainer", "factory", "quanto_cuda", "catalog"),
               "fixed": ("qwen3vl", "pin_memory", "prefetch_blocks", "prefetch_stops", "regional", "trainer",
                         "factory", "user_tracemalloc")}

_RUNNER = """
import json, sys, traceback
mode, model, probes, scripts = sys.argv[1], sys.argv[2], json.load(open(sys.argv[3])), sys.argv[4]
if mode == "fixed":  # first, as the training process's sitecustomize does
    from sd3tune.simpletuner.compat import install
    install()
results = {}
for name, code in probes:
    results[name] = {}
    space = {"__name__": "probe_" + name, "MODEL": model, "SCRIPTS": scripts, "report": results[name].update}
    try:
        exec(compile(code, "<probe " + name + ">", "exec"), space)
    except BaseException:
        results[name] = {"error": traceback.format_exc()}
print("RESULT " + json.dumps(results))
"""


def _result(proc: subprocess.CompletedProcess) -> dict:
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.JSONDecoder().raw_decode(proc.stdout.split("RESULT ", 1)[1])[0]  # SimpleTuner colours stdout


@pytest.fixture(scope="module")
def probes(tmp_path_factory, tiny_model) -> dict[str, dict[str, dict]]:
    """{mode: {probe: what it reported}}, for mode "pinned" (SimpleTuner as it is) and "fixed" (compat installed)."""
    out = {}
    cwd = tmp_path_factory.mktemp("probes")  # importing SimpleTuner's trainer writes debug.log into the cwd
    for mode, names in PROBE_ORDER.items():
        scripts = cwd / f"{mode}.json"
        scripts.write_text(json.dumps([(name, PROBES[name]) for name in names]))
        proc = subprocess.run([sys.executable, "-c", _RUNNER, mode, str(tiny_model), str(scripts),
                               str(ROOT / "scripts")], capture_output=True, text=True, cwd=cwd, timeout=600)
        out[mode] = _result(proc)
    return out


def probe(probes: dict, mode: str, name: str) -> dict:
    result = probes[mode][name]
    assert "error" not in result, f"probe {name} ({mode}) failed:\n{result['error']}"
    return result


def test_compat_aliases_the_qwen3vl_name_simpletuner_imports(probes):
    probe(probes, "fixed", "qwen3vl")


def test_compat_makes_pin_memory_a_noop_without_an_accelerator(probes):
    probe(probes, "fixed", "pin_memory")


def test_compat_makes_the_prefetch_wait_block_instead_of_spinning(probes):
    """The pinned SimpleTuner busy-waits for prefetched batches; after the fix the wait costs no CPU time and still
    returns the batch the loader thread delivers."""
    probe(probes, "fixed", "prefetch_blocks")


def test_compat_fails_instead_of_waiting_forever_when_the_prefetch_thread_stops(probes):
    """SimpleTuner's loader thread ends silently on an error loading a batch (logged at debug level); the training
    thread then waited forever at 0% CPU (a caption file of blank lines hung `sd3tune train`). It now fails."""
    probe(probes, "fixed", "prefetch_stops")


def test_compat_skips_the_cuda_graph_step_marker_when_nothing_is_compiled(probes):
    pinned, fixed = probe(probes, "pinned", "trainer"), probe(probes, "fixed", "trainer")
    # pinned: 'no' is a truthy string, so an eager run marked steps (and imported torch._inductor at step 1)
    assert pinned["marks_no"] == 1
    assert fixed["marks_no"] == 0
    assert fixed["marks_inductor"] == 1  # compiled runs still mark every step


def test_compat_keeps_the_trainable_parameters_of_a_standard_lora(probes):
    pinned, fixed = probe(probes, "pinned", "trainer"), probe(probes, "fixed", "trainer")
    assert pinned["walks"][:3] == [1, 2, 3]  # the pin walks the whole model at every call (every step)
    assert fixed["counts"] == pinned["counts"] == [4, 4, 4, 3]  # the same parameters either way
    assert fixed["walks"] == [1, 1, 1, 2]  # one walk, and one more after a kept parameter was frozen


def test_compat_never_gives_torch_more_threads_than_cores(probes):
    cores = len(os.sched_getaffinity(0))
    assert load_catalog().options["torch_num_threads"].default == 8  # SimpleTuner's ask, whatever the machine
    assert probe(probes, "pinned", "trainer")["threads"] == 64
    assert probe(probes, "fixed", "trainer")["threads"] == min(64, cores)


def test_compat_compiles_only_the_sd3_blocks_and_runs_them_compiled(probes):
    pinned, fixed = probe(probes, "pinned", "regional"), probe(probes, "fixed", "regional")
    # pinned: SimpleTuner's forward calls each block's parts, never the compiled block: no block ran compiled, only
    # the small modules outside the blocks, each a graph of its own
    assert pinned["block_graph_calls"] == 0 and pinned["graph_calls"] > 0
    # fixed: every block runs compiled, and nothing else is compiled (fix 8)
    assert fixed["block_graph_calls"] == fixed["graph_calls"] == fixed["blocks"] == 2
    assert fixed["max_abs_diff"] == 0.0  # the same computation
    assert fixed["lora_keys_kept"]  # compiled in place: parameter names (and the saved LoRA's) unchanged


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


def test_compat_keeps_python_allocations_untraced_through_the_training_loop(probes):
    """The pinned factory starts tracemalloc and never stops it: every Python allocation of the whole run then records
    a traceback (a Python loop ran 14x slower inside the training process). Fixed: nothing is traced, and the factory
    still reports the memory the process holds (its psutil fallback) instead of zeros."""
    pinned, fixed = probe(probes, "pinned", "factory"), probe(probes, "fixed", "factory")
    assert pinned["tracing"] is True
    assert fixed["tracing"] is False
    assert fixed["memory_mb"]["start"] > 50 and fixed["memory_mb"]["peak"] > 50  # MB: torch is loaded


def test_compat_leaves_tracemalloc_to_a_user_who_started_it(probes):
    probe(probes, "fixed", "user_tracemalloc")


def test_compat_lets_torch_walk_its_ops_after_the_quanto_workaround(probes):
    """On a CUDA host the pinned quanto workarounds put a plain function where torch keeps the op
    ``quanto::gemm_f16f8_marlin``; the first import of torch._inductor then dies with "'CustomDecompTable' object is not
    a mapping" (a quantised run at its first step on an H100). Shown on this host by faking CUDA, with the locked
    torch; compat fix 19 makes the walk pass and keeps SimpleTuner's cast."""
    out = probe(probes, "pinned", "quanto_cuda")  # in the pinned probes' process: one SimpleTuner import less
    assert out["replaced_by"] == "function"
    assert out["pinned"] == "'CustomDecompTable' object is not a mapping"  # the upstream bug
    assert out["guard"] is None
    assert isinstance(out["fixed"], int) and out["fixed"] > 100  # the decomposition table builds
    assert out["cast"] == ["torch.bfloat16", "torch.int32", "torch.bfloat16"]
    assert out["overloads"] == ["default"] and "quanto::gemm_f16f8_marlin" in out["schema"]
