"""Compatibility fixes for the pinned SimpleTuner, applied only inside the training process.

The child gets ``SITE_DIR`` prepended to PYTHONPATH; its ``sitecustomize.py`` calls :func:`install`. Nothing is
imported eagerly: each fix is applied right after its target module is first imported.

1. transformers >= 5.23 removed ``Qwen3VLCausalLMOutputWithPast``; SimpleTuner's vendored mageflow imports it and
   the field registry imports every model family at start-up, so the ImportError kills every run (SD3 too).
   Alias it to ``MultimodalCausalLMOutputWithPast`` when missing (our pin keeps it; this guards user upgrades).
2. SimpleTuner's collate calls ``Tensor.pin_memory()`` unconditionally; without CUDA/MPS that dies with
   "Found no NVIDIA driver". Make it a no-op when no accelerator exists.
   SimpleTuner also calls ``torch.set_num_threads(--torch_num_threads)``, default 8, whatever the machine: on 2 cores
   the oversubscribed threads made every CPU step 1.4x (tiny SD3) to 2.4x (24 blocks) slower. Clamp the request to
   the cores this process may use; more intra-op threads than cores never helps.
3. With ``dataloader_prefetch`` (``data.prefetch``, on by default), SimpleTuner's ``BatchFetcher.next_response`` waits for the next
   batch with ``while self.queue.empty(): continue``: the training thread spins, taking the GIL from the very thread
   that loads the batch (py-spy on an H200, SD3M at 1024 px: 10% of the training thread's samples in that loop).
   Block on the queue instead (with a timeout, so Ctrl-C still gets through). The loader thread also ends silently
   on any error loading a batch (it logs it at debug level only), and the wait then never ended (seen: a caption file
   of blank lines, whose IndexError hung the run at 0% CPU): when that thread has stopped and the queue is empty,
   fail with a message instead.
4. Regional compilation (``compile.regional``, accelerate's ``compile_regions``) wraps each SD3 transformer block in
   a compiled module, but SimpleTuner's SD3 forward never calls a block: ``_sd3_apply_joint_transformer_block`` calls
   the block's norms, attention and feed-forward one by one, so every block ran eagerly and only the small top-level
   layers were compiled (24 blocks: 7 Inductor graphs, no faster than eager, ~25 s of compile for nothing). A
   compiled block is now called as a block when its inputs are the ones diffusers' ``JointTransformerBlock.forward``
   takes (one timestep embedding per sample, no attention offload): the same computation, through the compiled
   code. Eager blocks keep SimpleTuner's path untouched.
5. SimpleTuner marks a CUDA-graph step before every forward unless ``dynamo_backend`` is empty, and sd3tune writes
   ``no``: an eager run imported ``torch._inductor``'s CUDA-graph trees during step 1 (2.1 s on 2 cores) and marked
   steps of graphs that do not exist. Skip the marker when no compiler backend is active.
6. For norm clipping SimpleTuner walks every parameter of the transformer each step to find the trainable ones
   (``Trainer._get_trainable_parameters``; SD3M: ~1,000 tensors, 3.6% of an H200 step in py-spy, 6% of a CPU step
   with 24 blocks). For a standard LoRA the set is fixed once the optimizer exists: keep it, and walk again only if
   the trained module is replaced or a kept parameter stops requiring gradients.
7. SimpleTuner starts a new iterator over its DataLoader for every batch, and each ``iter(DataLoader)`` draws a
   worker base seed from torch's global generator (unused: SimpleTuner loads with ``num_workers=0``). With
   ``dataloader_prefetch`` those draws happen on the loader thread while the training thread draws its noise and
   timesteps from the same generator, in no fixed order: two runs with one seed trained different LoRAs. Give each
   of SimpleTuner's DataLoaders a private generator, so loading never touches the global one.
8. accelerate's regional compilation also compiles every module outside the repeated blocks, one graph each (SD3:
   patch and timestep embedders, context embedder, final norm and projection): on an H200 those took ~22 s of step
   1 while they hold a sliver of the step's work. Compile only the repeated blocks, in place (``Module.compile``,
   so parameter names and the saved LoRA keep their names).
9. Only with ``sd3tune train --cuda-graphs`` (``SD3TUNE_CUDA_GRAPHS=1`` in the training process): SimpleTuner's SD3
   transformer replays its training forward and backward from CUDA graphs (``compat/cuda_graphs.py``) when the call
   is one a graph can repeat: keyword inputs ``hidden_states``, ``encoder_hidden_states``, ``pooled_projections``,
   ``timestep`` on the GPU and no other option set, training mode with gradients, one process, no gradient
   checkpointing, TREAD routing, block swapping or compiled blocks. Every other call (validation, sampling) runs
   SimpleTuner's forward unchanged.
10. SimpleTuner's data backend factory calls ``tracemalloc.start()`` to report the memory its set-up takes and never
   stops it, so every Python allocation of the whole run records a traceback: a Python loop runs 14x slower (measured
   inside the training process, 2-core CPU), and each op a training step launches from Python pays for the objects
   it allocates (the 24-block CPU proxy step: see the speed notes in the README). Keep tracemalloc off unless it was
   already on: the factory then reports the process's resident memory (its own fallback) instead of traced bytes.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import os
import queue
import sys
from pathlib import Path

SITE_DIR = Path(__file__).with_name("site")
CUDA_GRAPHS_ENV = "SD3TUNE_CUDA_GRAPHS"  # "1": `sd3tune train --cuda-graphs` (fix 9); set by the launcher only


def _replace(owner, name: str, make) -> None:
    """Set ``owner.name`` to ``make(original)``, once (installing twice changes nothing); nothing when the pinned code
    has no such attribute (an upgraded SimpleTuner: the fix no longer applies)."""
    original = getattr(owner, name, None)
    if original is None or getattr(original, "sd3tune_fix", False):
        return
    replacement = make(original)
    replacement.sd3tune_fix = True
    setattr(owner, name, replacement)


def _alias_qwen3vl(module) -> None:
    if not hasattr(module, "Qwen3VLCausalLMOutputWithPast") and hasattr(module, "MultimodalCausalLMOutputWithPast"):
        module.Qwen3VLCausalLMOutputWithPast = module.MultimodalCausalLMOutputWithPast


def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0)) or 1
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


def _fix_torch(torch) -> None:
    try:
        has_accelerator = torch.cuda.is_available() or torch.backends.mps.is_available()
    except Exception:  # pragma: no cover - a broken CUDA install counts as none
        has_accelerator = False
    if not has_accelerator:
        torch.Tensor.pin_memory = lambda self, *args, **kwargs: self

    def clamped(set_num_threads):
        return lambda n: set_num_threads(max(1, min(int(n), usable_cores())))

    _replace(torch, "set_num_threads", clamped)


PREFETCH_STOPPED = ("sd3tune: SimpleTuner's batch prefetch thread stopped without a batch for step {step} (it "
                    "drops the error that stopped it); set --dataloader_prefetch=false in TRAINER_EXTRA_ARGS and train again "
                    "to see that error")


def _blocking_next_batch(module) -> None:
    set_step = getattr(module, "_set_epoch_step_for_training_step", None)
    fetcher = getattr(module, "BatchFetcher", None)
    if set_step is None or fetcher is None:
        return

    def remembering(start_fetching):
        def start(self):
            thread = start_fetching(self)
            self.__dict__["_sd3tune_thread"] = thread
            return thread
        return start

    def blocking(_busy_wait):
        def next_response(self, step: int):
            self.step = step
            while True:
                try:
                    item = self.queue.get(timeout=1.0)
                    break
                except queue.Empty:
                    thread = self.__dict__.get("_sd3tune_thread")
                    if thread is not None and not thread.is_alive() and self.queue.empty():
                        raise RuntimeError(PREFETCH_STOPPED.format(step=step)) from None
                    continue
            if self.device_prefetcher is not None:
                item = self.device_prefetcher.consume(item)
            set_step(step)
            return item
        return next_response

    _replace(fetcher, "start_fetching", remembering)
    _replace(fetcher, "next_response", blocking)


def _is_compiled(block) -> bool:
    if getattr(block, "_compiled_call_impl", None) is not None:  # nn.Module.compile() (in place)
        return True
    dynamo = sys.modules.get("torch._dynamo.eval_frame")  # torch.compile(module) wraps; nothing compiled without it
    return dynamo is not None and isinstance(block, dynamo.OptimizedModule)


def _call_compiled_sd3_blocks(module) -> None:
    def through_compiled_blocks(original):
        def apply_block(block, hidden_states, encoder_hidden_states, temb_hidden, temb_context,
                        joint_attention_kwargs=None, offload_attention=False):
            if (not offload_attention and temb_context is temb_hidden and temb_hidden.ndim == 2
                    and _is_compiled(block)):
                return block(hidden_states, encoder_hidden_states, temb_hidden, joint_attention_kwargs)
            return original(block, hidden_states, encoder_hidden_states, temb_hidden, temb_context,
                            joint_attention_kwargs=joint_attention_kwargs, offload_attention=offload_attention)
        return apply_block

    _replace(module, "_sd3_apply_joint_transformer_block", through_compiled_blocks)


def _skip_step_marker_without_compile(module) -> None:
    backend_of = getattr(module, "_effective_dynamo_backend", None)
    if backend_of is None:
        return

    def only_when_compiling(original):
        def mark_cudagraph_step_begin(config) -> None:
            if backend_of(config) != "no":
                original(config)
        return mark_cudagraph_step_begin

    _replace(module, "mark_cudagraph_step_begin", only_when_compiling)


def _cache_trainable_parameters(module) -> None:
    def kept(original):
        def _get_trainable_parameters(self):
            config = self.config
            if (config.model_type != "lora" or str(getattr(config, "lora_type", "standard")).lower() != "standard"
                    or getattr(self, "optimizer", None) is None):  # before the optimizer exists, setup may unfreeze
                return original(self)
            component = self.model.get_trained_component(unwrap_model=False)
            known = self.__dict__.get("_sd3tune_trainable")
            if known is not None and known[0] is component and all(p.requires_grad for p in known[1]):
                return list(known[1])
            params = original(self)
            if isinstance(params, list):
                self.__dict__["_sd3tune_trainable"] = (component, tuple(params))
            return params
        return _get_trainable_parameters

    _replace(getattr(module, "Trainer", None), "_get_trainable_parameters", kept)


def _private_dataloader_generators(module) -> None:
    def with_private_generator(original):
        def _create_dataset_and_sampler(self, backend, init_backend, *args, **kwargs):
            result = original(self, backend, init_backend, *args, **kwargs)
            loader = init_backend.get("train_dataloader") if isinstance(init_backend, dict) else None
            if loader is not None and getattr(loader, "generator", False) is None:
                import torch

                loader.generator = torch.Generator()  # fixed default seed; only iter()'s unused worker seed uses it
            return result
        return _create_dataset_and_sampler

    _replace(getattr(module, "FactoryRegistry", None), "_create_dataset_and_sampler", with_private_generator)


class _UntracedMemory:
    """What SimpleTuner's data backend factory sees as ``tracemalloc`` (fix 10): ``start`` does nothing, and the traced
    memory is unavailable unless the process was already tracing (the factory then falls back to psutil's RSS)."""

    def __init__(self, tracemalloc) -> None:
        self._tracemalloc = tracemalloc

    def start(self, *args) -> None:
        return None

    def get_traced_memory(self) -> tuple[int, int]:
        if not self._tracemalloc.is_tracing():
            raise RuntimeError("tracemalloc is off (sd3tune: SimpleTuner would leave it on for the whole run)")
        return self._tracemalloc.get_traced_memory()

    def __getattr__(self, name: str):
        return getattr(self._tracemalloc, name)


def _untraced_factory_memory(module) -> None:
    tracemalloc = getattr(module, "tracemalloc", None)
    if tracemalloc is not None and not isinstance(tracemalloc, _UntracedMemory):
        module.tracemalloc = _UntracedMemory(tracemalloc)


def _fix_data_backend_factory(module) -> None:
    _private_dataloader_generators(module)
    _untraced_factory_memory(module)


def _compile_repeated_blocks_only(module) -> None:
    is_repeated = getattr(module, "is_repeated_blocks", None)
    if is_repeated is None:
        return

    def blocks_only(original):
        def compile_regions(model, **compile_kwargs):
            outermost: dict[str, object] = {}
            for name, sub in model.named_modules():
                if is_repeated(sub) and not any(outer == "" or name.startswith(f"{outer}.") for outer in outermost):
                    outermost[name] = sub
            if not outermost:  # nothing repeats: accelerate's own behaviour (the whole model)
                return original(model, **compile_kwargs)
            for repeated in outermost.values():
                for block in repeated:
                    if not _is_compiled(block):
                        block.compile(**compile_kwargs)
            return model
        return compile_regions

    _replace(module, "compile_regions", blocks_only)


GRAPHED_INPUTS = ("hidden_states", "encoder_hidden_states", "pooled_projections", "timestep")
REPLAY_DEVICES = ("cuda",)  # where inputs must live for a replay (the tests add "cpu" with a stand-in graph)
NO_GRAD = "no gradients"  # validation and sampling: never replayed, not worth a log line


def _replay_blocker(transformer, args: tuple, kwargs: dict) -> str | None:
    """Why this SD3 transformer call cannot be replayed from CUDA graphs, or None when it can."""
    import torch

    if not torch.is_grad_enabled():
        return NO_GRAD
    if not transformer.training:
        return "module in eval mode"
    if args:
        return "positional arguments"
    extra = [k for k, v in kwargs.items() if k not in GRAPHED_INPUTS and k != "return_dict" and v is not None]
    if extra:
        return f"option(s) {', '.join(sorted(extra))} set"
    inputs = [kwargs.get(k) for k in GRAPHED_INPUTS]
    if not all(isinstance(x, torch.Tensor) for x in inputs):
        return "an input missing"
    if not all(x.device.type in REPLAY_DEVICES for x in inputs):
        return f"inputs on {inputs[0].device.type}"
    if getattr(transformer, "gradient_checkpointing", False):
        return "gradient checkpointing"
    if getattr(transformer, "_tread_routes", None) or getattr(transformer, "_musubi_block_swap", None) is not None:
        return "TREAD routing or block swapping"
    if any(_is_compiled(b) for b in getattr(transformer, "transformer_blocks", ())):
        return "compiled blocks (torch.compile)"
    if torch.distributed.is_available() and torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
        return "several processes"
    return None


def _replay_sd3_training(module) -> None:
    if os.environ.get(CUDA_GRAPHS_ENV) != "1":
        return
    from sd3tune.simpletuner.compat import cuda_graphs

    def replayed(original):
        def forward(self, *args, **kwargs):
            blocker = _replay_blocker(self, args, kwargs)
            out = None
            if blocker is None:
                runner = self.__dict__.get("_sd3tune_graphs")
                if runner is None:
                    def sample(hidden_states, encoder_hidden_states, pooled_projections, timestep):
                        return original(self, hidden_states=hidden_states, encoder_hidden_states=encoder_hidden_states,
                                        pooled_projections=pooled_projections, timestep=timestep, return_dict=False)[0]
                    runner = self.__dict__["_sd3tune_graphs"] = cuda_graphs.GraphedModule(self, sample)
                out = runner([kwargs[k] for k in GRAPHED_INPUTS])
            elif blocker != NO_GRAD:
                cuda_graphs.eager_because(blocker)
            if out is None:
                return original(self, *args, **kwargs)
            if kwargs.get("return_dict", True):
                return module.Transformer2DModelOutput(sample=out)
            return (out,)
        return forward

    _replace(getattr(module, "SD3Transformer2DModel", None), "forward", replayed)


def _fix_sd3_transformer(module) -> None:
    _call_compiled_sd3_blocks(module)
    _replay_sd3_training(module)


FIXES = {
    "transformers.models.qwen3_vl.modeling_qwen3_vl": _alias_qwen3vl,
    "torch": _fix_torch,
    "simpletuner.helpers.data_backend.runtime.batch_fetcher": _blocking_next_batch,
    "simpletuner.helpers.models.sd3.transformer": _fix_sd3_transformer,
    "simpletuner.helpers.training.dynamo": _skip_step_marker_without_compile,
    "simpletuner.helpers.training.trainer": _cache_trainable_parameters,
    "simpletuner.helpers.data_backend.factory": _fix_data_backend_factory,
    "accelerate.utils.other": _compile_repeated_blocks_only,
}


class _PostImportHook(importlib.abc.MetaPathFinder):
    """Runs a callback right after a named module finishes importing."""

    def __init__(self, callbacks) -> None:
        self.callbacks = dict(callbacks)
        self.busy: set[str] = set()

    def find_spec(self, fullname, path, target=None):
        callback = self.callbacks.get(fullname)
        if callback is None or fullname in self.busy:
            return None
        self.busy.add(fullname)
        try:
            spec = importlib.util.find_spec(fullname)
        finally:
            self.busy.discard(fullname)
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        original = spec.loader.exec_module

        def exec_module(module, _original=original, _callback=callback):
            _original(module)
            _callback(module)

        spec.loader.exec_module = exec_module
        self.callbacks.pop(fullname, None)
        return spec


def install() -> None:
    """Apply every fix: now for modules already imported, on import for the rest. Idempotent."""
    if any(isinstance(f, _PostImportHook) for f in sys.meta_path):
        return
    pending = {}
    for name, fix in FIXES.items():
        if name in sys.modules:
            fix(sys.modules[name])
        else:
            pending[name] = fix
    sys.meta_path.insert(0, _PostImportHook(pending))
