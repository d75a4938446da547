"""Compatibility fixes for the pinned SimpleTuner, applied only inside the training process.

The child gets ``SITE_DIR`` prepended to PYTHONPATH; its ``sitecustomize.py`` calls :func:`install`. Nothing is
imported eagerly: each fix is applied right after its target module is first imported.

1. transformers >= 5.23 removed ``Qwen3VLCausalLMOutputWithPast``; SimpleTuner's vendored mageflow imports it and
   the field registry imports every model family at start-up, so the ImportError kills every run (SD3 too).
   Alias it to ``MultimodalCausalLMOutputWithPast`` when missing (our pin keeps it; this guards user upgrades).
2. SimpleTuner's collate calls ``Tensor.pin_memory()`` unconditionally; without CUDA/MPS that dies with
   "Found no NVIDIA driver". Make it a no-op when no accelerator exists.
3. With ``dataloader_prefetch`` (opt-in: ``data.prefetch``), SimpleTuner's ``BatchFetcher.next_response`` waits for the next
   batch with ``while self.queue.empty(): continue``: the training thread spins, taking the GIL from the very thread
   that loads the batch (py-spy on an H200, SD3M at 1024 px: 10% of the training thread's samples in that loop).
   Block on the queue instead (with a timeout, so Ctrl-C still gets through).
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import queue
import sys
from pathlib import Path

SITE_DIR = Path(__file__).with_name("site")


def _alias_qwen3vl(module) -> None:
    if not hasattr(module, "Qwen3VLCausalLMOutputWithPast") and hasattr(module, "MultimodalCausalLMOutputWithPast"):
        module.Qwen3VLCausalLMOutputWithPast = module.MultimodalCausalLMOutputWithPast


def _cpu_pin_memory_noop(torch) -> None:
    try:
        has_accelerator = torch.cuda.is_available() or torch.backends.mps.is_available()
    except Exception:  # pragma: no cover - a broken CUDA install counts as none
        has_accelerator = False
    if not has_accelerator:
        torch.Tensor.pin_memory = lambda self, *args, **kwargs: self


def _blocking_next_batch(module) -> None:
    fetcher = getattr(module, "BatchFetcher", None)
    set_step = getattr(module, "_set_epoch_step_for_training_step", None)
    if fetcher is None or set_step is None or getattr(fetcher.next_response, "sd3tune_fix", False):
        return

    def next_response(self, step: int):
        self.step = step
        while True:
            try:
                item = self.queue.get(timeout=1.0)
                break
            except queue.Empty:
                continue
        if self.device_prefetcher is not None:
            item = self.device_prefetcher.consume(item)
        set_step(step)
        return item

    next_response.sd3tune_fix = True  # type: ignore[attr-defined]
    fetcher.next_response = next_response


FIXES = {
    "transformers.models.qwen3_vl.modeling_qwen3_vl": _alias_qwen3vl,
    "torch": _cpu_pin_memory_noop,
    "simpletuner.helpers.data_backend.runtime.batch_fetcher": _blocking_next_batch,
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
