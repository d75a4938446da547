"""`sd3tune train --cuda-graphs`: SimpleTuner's SD3 transformer replays its training passes from CUDA graphs.

Without a GPU the graph is the stand-in of rerun_graphs.py (a replay re-runs the captured Python into the captured
tensors); everything around it is real: SimpleTuner's SD3 transformer with a peft LoRA, torch's AdamW, autograd.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from rerun_graphs import RerunGraphs
from sd3tune.simpletuner.compat.cuda_graphs import MIN_REPLAYS_PER_MOVE, GraphedModule

HERE = Path(__file__).resolve().parent
TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]  # SimpleTuner's SD3 LoRA default


def lora_transformer(model_dir: Path, device: str = "cpu"):
    from peft import LoraConfig
    from simpletuner.helpers.models.sd3.transformer import SD3Transformer2DModel

    torch.manual_seed(0)
    model = SD3Transformer2DModel.from_pretrained(str(model_dir), subfolder="transformer").to(device)
    model.requires_grad_(False)
    model.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights="gaussian", target_modules=TARGETS))
    return model.train()


def batch(model, seed: int, side: int = 8, n: int = 2) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    c = model.config
    tensors = [torch.randn(n, c.in_channels, side, side, generator=g), torch.randn(n, 20, c.joint_attention_dim, generator=g),
               torch.randn(n, c.pooled_projection_dim, generator=g), torch.rand(n, generator=g) * 1000]
    device = next(model.parameters()).device
    return [t.to(device) for t in tensors]


def sample(model):
    return lambda h, e, p, t: model(hidden_states=h, encoder_hidden_states=e, pooled_projections=p, timestep=t,
                                    return_dict=False)[0]


def trainable(model) -> list[torch.Tensor]:
    return [p for p in model.parameters() if p.requires_grad]


def train(model, steps: int, runner: GraphedModule | None = None, micro: int = 1) -> list[float]:
    """A LoRA loop like SimpleTuner's: flow-matching-style loss, AdamW, ``micro`` forwards accumulated per step."""
    opt = torch.optim.AdamW(trainable(model), lr=1e-2)
    losses = []
    for step in range(steps):
        for m in range(micro):
            inputs = batch(model, seed=100 * step + m)
            out = runner(inputs) if runner is not None else None
            if out is None:
                out = sample(model)(*inputs)
            loss = (out.float() - inputs[0].float()).pow(2).mean() / micro
            loss.backward()
            losses.append(loss.item())
        opt.step()
        opt.zero_grad(set_to_none=True)
    return losses


@pytest.mark.parametrize("micro", [1, 2], ids=["one-forward-per-step", "two-accumulated-forwards"])
def test_replayed_training_matches_eager_training(tiny_model, micro):
    eager, replayed = lora_transformer(tiny_model), lora_transformer(tiny_model)
    graphs = RerunGraphs()
    runner = GraphedModule(replayed, sample(replayed), new_graph=lambda: graphs, warmup=1)
    assert train(replayed, 3, runner, micro) == train(eager, 3, micro=micro)
    for a, b in zip(trainable(eager), trainable(replayed), strict=True):
        assert torch.equal(a, b)  # the same LoRA, to the bit (AdamW steps between replays were seen by the graphs)
    assert graphs.captures == 2  # one forward and one backward graph, captured once
    assert runner.replays == 3 * micro and graphs.replays == 2 * 3 * micro


def test_a_second_forward_before_the_first_backward_runs_eagerly(tiny_model):
    eager, replayed = lora_transformer(tiny_model), lora_transformer(tiny_model)
    runner = GraphedModule(replayed, sample(replayed), new_graph=RerunGraphs, warmup=1)
    first, second = batch(replayed, 1), batch(replayed, 2)
    out1 = runner(first)
    assert out1 is not None
    assert runner(second) is None  # a replay now would overwrite the activations out1's backward needs
    out2 = sample(replayed)(*second)
    (out1.sum() + out2.square().mean()).backward()
    (sample(eager)(*first).sum() + sample(eager)(*second).square().mean()).backward()
    for a, b in zip(trainable(eager), trainable(replayed), strict=True):
        assert torch.equal(a.grad, b.grad)
    assert runner(batch(replayed, 3)) is not None  # backward done: replaying again


def test_a_forward_dropped_without_backward_does_not_block_the_next(tiny_model):
    model = lora_transformer(tiny_model)
    runner = GraphedModule(model, sample(model), new_graph=RerunGraphs, warmup=1)
    assert runner(batch(model, 1)) is not None  # result thrown away (a skipped step)
    assert runner(batch(model, 2)) is not None


def test_each_input_shape_is_captured_once_up_to_the_limit(tiny_model):
    model = lora_transformer(tiny_model)
    graphs = RerunGraphs()
    runner = GraphedModule(model, sample(model), new_graph=lambda: graphs, max_captures=2, warmup=1)
    for side in (8, 16, 8, 16):
        assert runner(batch(model, side, side=side)) is not None
    assert graphs.captures == 4  # two shapes, forward + backward each
    assert runner(batch(model, 0, side=24)) is None  # a third shape: eager
    assert runner(batch(model, 0, side=8)) is not None


def test_moved_parameters_are_captured_again_unless_they_move_all_the_time(tiny_model):
    model = lora_transformer(tiny_model)
    graphs = RerunGraphs()
    runner = GraphedModule(model, sample(model), new_graph=lambda: graphs, warmup=1)
    lora = trainable(model)[0]
    for move in range(2):  # e.g. the model offloaded for validation and back, now and then
        for i in range(MIN_REPLAYS_PER_MOVE):
            assert runner(batch(model, i)) is not None
        lora.data = lora.data.clone()  # new storage: the captured graphs would read the old one
    assert runner(batch(model, 0)) is not None
    assert graphs.captures == 2 * 3  # captured anew after each move
    lora.data = lora.data.clone()  # moved again after one replay: offloading every step
    assert runner(batch(model, 1)) is None and "storage moved after 1 replays" in runner.off
    assert runner(batch(model, 2)) is None


def test_a_failed_capture_leaves_the_run_eager(tiny_model, capfd):
    model = lora_transformer(tiny_model)
    runner = GraphedModule(model, sample(model), new_graph=lambda: RerunGraphs(fail=True), warmup=1)
    assert runner(batch(model, 1)) is None
    assert runner(batch(model, 2)) is None
    assert "off for this run: capture failed: RuntimeError: operation not permitted" in capfd.readouterr().err
    assert all(p.grad is None for p in trainable(model))  # the warm-up passes left no gradients behind


def test_a_failed_capture_of_another_shape_runs_that_shape_eagerly_and_the_first_keeps_replaying(tiny_model, capfd):
    eager, replayed = lora_transformer(tiny_model), lora_transformer(tiny_model)
    graphs = RerunGraphs(fail_from=3)  # the first shape's forward and backward capture; the second shape's fails
    runner = GraphedModule(replayed, sample(replayed), new_graph=lambda: graphs, warmup=1)
    small, large = batch(replayed, 1, side=8), batch(replayed, 2, side=16)
    for inputs in (small, large, small, large):
        out = runner(inputs)
        replayed_now = out is not None
        if out is None:
            out = sample(replayed)(*inputs)
        assert replayed_now == (inputs is small)
        out.square().mean().backward()
        sample(eager)(*inputs).square().mean().backward()
    assert graphs.captures == 3  # the failed shape is not tried again
    for a, b in zip(trainable(eager), trainable(replayed), strict=True):
        assert torch.equal(a.grad, b.grad)
    err = capfd.readouterr().err
    assert "running eagerly: inputs 2x16x16x16" in err and "capture failed: RuntimeError" in err
    assert err.count("running eagerly") == 1 and "off for this run" not in err


def test_another_shape_is_captured_only_with_memory_for_it(tiny_model, capfd):
    model = lora_transformer(tiny_model)
    graphs = RerunGraphs(bytes_per_capture=3 * 2**30, free=20 * 2**30)  # a capture keeps 6 GiB (forward + backward)
    runner = GraphedModule(model, sample(model), new_graph=lambda: graphs, warmup=1)
    assert runner(batch(model, 1, side=8)) is not None
    assert runner(batch(model, 2, side=16)) is not None  # 20 GiB free >= 1.25 x 6 GiB
    graphs.free = 7 * 2**30  # < 7.5 GiB
    assert runner(batch(model, 3, side=24)) is None
    assert runner(batch(model, 4, side=24)) is None  # not tried again
    assert runner(batch(model, 5, side=8)) is not None  # (one assert each: pytest keeps an assert's values alive,
    assert runner(batch(model, 6, side=16)) is not None  # and a live replayed output waits for its backward)
    assert graphs.captures == 4
    err = capfd.readouterr().err
    assert err.count("keeps 6.0 GiB") == 1  # said of the first capture, the estimate for the others
    assert err.count("inputs 2x16x24x24, 2x20x32, 2x64, 2: no memory for another capture (~6.0 GiB each, "
                     "7.0 GiB free)") == 1


def test_a_module_with_hooks_is_never_replayed(tiny_model, capfd):
    model = lora_transformer(tiny_model)
    calls = []
    model.transformer_blocks[1].register_forward_hook(lambda *_: calls.append(1))
    runner = GraphedModule(model, sample(model), new_graph=RerunGraphs, warmup=1)
    assert runner(batch(model, 1)) is None  # a replay would run the block's kernels but never the hook
    assert "module hooks on transformer_blocks.1" in capfd.readouterr().err


def test_inputs_that_need_gradients_are_not_replayed(tiny_model):
    model = lora_transformer(tiny_model)
    runner = GraphedModule(model, sample(model), new_graph=RerunGraphs, warmup=1)
    inputs = batch(model, 1)
    inputs[0].requires_grad_(True)
    assert runner(inputs) is None


_HOOK_SCRIPT = """
import json, os, sys, torch
from sd3tune.simpletuner import compat
from sd3tune.simpletuner.compat import cuda_graphs, replayed_sd3_training
from rerun_graphs import RerunGraphs
os.environ.pop(compat.CUDA_GRAPHS_ENV, None)  # first as a run without --cuda-graphs imports SimpleTuner's model
compat.install()
replayed_sd3_training.REPLAY_DEVICES = ("cuda", "cpu")
from test_cuda_graphs import batch, lora_transformer, trainable
from simpletuner.helpers.models.sd3 import transformer as sd3
results = {}

def run(mode):
    graphs = RerunGraphs()
    cuda_graphs.NEW_GRAPH = lambda: graphs
    model = lora_transformer(sys.argv[1])
    def call(inputs, **extra):  # what SimpleTuner's SD3 model_predict passes
        h, e, p, t = inputs
        return model(hidden_states=h, timestep=t, timestep_sign=None, encoder_hidden_states=e, pooled_projections=p,
                     return_dict=False, hidden_states_buffer=None, grounding_kwargs=None, **extra)[0]

    losses = []
    for step in range(2):
        inputs = batch(model, step)
        loss = (call(inputs).float() - inputs[0]).pow(2).mean()
        loss.backward()
        losses.append(loss.item())
    runner = model.__dict__.get("_sd3tune_graphs")
    replays = graphs.replays
    with torch.no_grad():
        model.eval()
        call(batch(model, 5))  # validation
        model.train()
    print(f"--- {mode}", file=sys.stderr, flush=True)
    call(batch(model, 6), joint_attention_kwargs={"scale": 1.0}).sum().backward()
    results[mode] = {
        "patched": getattr(sd3.SD3Transformer2DModel.forward, "sd3tune_fix", False), "losses": losses,
        "replays": runner.replays if runner else 0, "graph_replays_after_others": graphs.replays - replays,
        "grads": [p.grad.sum().item() for p in trainable(model)][:3]}

run("off")
os.environ[compat.CUDA_GRAPHS_ENV] = "1"  # `sd3tune train --cuda-graphs`: the fix applies when asked
compat.apply_fixes((replayed_sd3_training,), sd3)
run("on")
print("RESULT " + json.dumps(results))
"""


def test_simpletuners_sd3_transformer_replays_training_calls_only(tiny_model, tmp_path):
    # one process for both (SimpleTuner's imports take seconds): without --cuda-graphs first, then asked for
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-c", _HOOK_SCRIPT, str(tiny_model)], capture_output=True, text=True,
                          cwd=tmp_path, env=env)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stderr[-3000:]
    result = json.loads(lines[-1][7:])
    on, off = result["on"], result["off"]
    said_on = proc.stderr.split("--- on", 1)[1]  # what the run with graphs said after its training steps
    assert on["patched"] and not off["patched"]  # nothing changes unless `sd3tune train --cuda-graphs` asked
    assert on["replays"] == 2  # both training steps came from the graphs
    assert on["losses"] == off["losses"]  # and computed what SimpleTuner's own forward computes
    assert on["graph_replays_after_others"] == 0  # validation (no grad) and an unusual option ran eagerly
    assert "running eagerly: option(s) joint_attention_kwargs set" in said_on
    assert "running eagerly: no gradients" not in proc.stderr  # validation is not worth a log line
    assert on["grads"] == off["grads"]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="a CUDA graph needs a CUDA GPU")
def test_real_cuda_graphs_train_like_eager(tiny_model):
    eager, replayed = lora_transformer(tiny_model, "cuda"), lora_transformer(tiny_model, "cuda")
    runner = GraphedModule(replayed, sample(replayed))
    torch.testing.assert_close(train(replayed, 4, runner, micro=2), train(eager, 4, micro=2), rtol=1e-4, atol=1e-6)
    for a, b in zip(trainable(eager), trainable(replayed), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    assert runner.replays == 8 and runner.off is None


_STAND_IN_SITE = """
from sd3tune.simpletuner import compat
compat.install()
from rerun_graphs import RerunGraphs
from sd3tune.simpletuner.compat import cuda_graphs, replayed_sd3_training
replayed_sd3_training.REPLAY_DEVICES = ("cuda", "cpu")
cuda_graphs.NEW_GRAPH = RerunGraphs
"""


def test_a_simpletuner_training_replayed_from_stand_in_graphs_learns_the_default_lora(trained_run, tiny_model,
                                                                                     concept_data, tmp_path):
    """The whole SimpleTuner loop (accelerate, prefetching, clipping, AdamW, checkpoints) with every training forward
    and backward of the transformer coming from the graphs: the LoRA of the default run, bit for bit."""
    from safetensors.torch import load_file

    from sd3tune.commands.init import run_init
    from sd3tune.commands.quickstart import tiny_init_options
    from sd3tune.commands.train import TrainOptions, prepare
    from sd3tune.simpletuner import keys
    from sd3tune.simpletuner.launch import run_plan

    run_dir = tmp_path / "graphed"
    run_init(tiny_init_options(run_dir, concept_data, tiny_model, steps=20, checkpoint_every=10))
    plan, _ = prepare(TrainOptions(run_dir=run_dir, cuda_graphs=True))
    site = tmp_path / "stand-in-site"  # its sitecustomize replaces compat's: install() + the stand-in graph
    site.mkdir()
    (site / "sitecustomize.py").write_text(_STAND_IN_SITE)
    plan.env["PYTHONPATH"] = os.pathsep.join([str(site), str(HERE), plan.env["PYTHONPATH"]])
    outcome = run_plan(plan, tmp_path / "train.log")
    log = (tmp_path / "train.log").read_text(errors="replace")
    assert outcome.returncode == 0, log[-3000:]
    assert "sd3tune cuda-graphs: captured forward + backward" in log and "running eagerly" not in log
    replayed = load_file(str(run_dir / "output" / keys.LORA_WEIGHT_NAME))
    default = load_file(str(trained_run / "output" / keys.LORA_WEIGHT_NAME))
    assert replayed.keys() == default.keys()
    assert all(replayed[k].equal(default[k]) for k in default)
