"""Fix 2: SimpleTuner's collate calls ``Tensor.pin_memory()`` unconditionally; without CUDA/MPS that dies with "Found
no NVIDIA driver". Make it a no-op when no accelerator exists."""

from __future__ import annotations

from sd3tune.simpletuner.compat._patching import expect, has_accelerator


def applies_to(torch) -> str | None:
    return expect(torch, "Tensor.pin_memory")


def apply(torch) -> None:
    if not has_accelerator(torch):
        torch.Tensor.pin_memory = lambda self, *args, **kwargs: self
