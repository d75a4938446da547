"""Fix 2: SimpleTuner's collate calls ``Tensor.pin_memory()`` unconditionally; without CUDA/MPS that dies with "Found
no NVIDIA driver". Make it a no-op when no accelerator exists."""

from __future__ import annotations

from sd3tune.simpletuner.compat._patching import expect


def applies_to(torch) -> str | None:
    return expect(torch, "Tensor.pin_memory")


def apply(torch) -> None:
    try:
        has_accelerator = torch.cuda.is_available() or torch.backends.mps.is_available()
    except Exception:  # pragma: no cover - a broken CUDA install counts as none
        has_accelerator = False
    if not has_accelerator:
        torch.Tensor.pin_memory = lambda self, *args, **kwargs: self
