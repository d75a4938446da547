"""Compatibility fixes for the pinned SimpleTuner, applied only inside the training process.

The child gets ``SITE_DIR`` prepended to PYTHONPATH; its ``sitecustomize.py`` calls :func:`install`. Nothing is
imported eagerly: each fix is applied right after its target module is first imported.

1. transformers >= 5.23 removed ``Qwen3VLCausalLMOutputWithPast``; SimpleTuner's vendored mageflow imports it and
   the field registry imports every model family at start-up, so the ImportError kills every run (SD3 too).
   Alias it to ``MultimodalCausalLMOutputWithPast`` when missing (our pin keeps it; this guards user upgrades).
2. SimpleTuner's collate calls ``Tensor.pin_memory()`` unconditionally; without CUDA/MPS that dies with
   "Found no NVIDIA driver". Make it a no-op when no accelerator exists.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
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


FIXES = {
    "transformers.models.qwen3_vl.modeling_qwen3_vl": _alias_qwen3vl,
    "torch": _cpu_pin_memory_noop,
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
