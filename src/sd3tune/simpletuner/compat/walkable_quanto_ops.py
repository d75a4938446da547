"""Fix 19: on a CUDA host SimpleTuner's quanto workarounds replace the op ``torch.ops.quanto.gemm_f16f8_marlin`` by a
plain function (a dtype cast around the op). torch walks every op namespace when it first builds Inductor's
decomposition table (``{**core_aten_decompositions()}``, torch/_inductor/decomposition.py, reached by importing
``torch._inductor``: compiling, CUDA-graph step markers) and calls ``op_overloads()`` on each op it lists there: the
function has none, and the AttributeError surfaces as ``TypeError: 'CustomDecompTable' object is not a mapping``: a
quantised (``*-quanto``) run died at its first step on an H100 (torch 2.11; the locked 2.14 still does). Put back an
op packet that calls SimpleTuner's cast and answers everything else as the original op does.

Without CUDA the workaround replaces nothing (it is inside ``if torch.cuda.is_available()``) and the fix does nothing.
"""

from __future__ import annotations

import inspect

REPLACED = "torch.ops.quanto.gemm_f16f8_marlin = fp8_marlin_gemm_wrapper"  # the upstream line the fix undoes


class CastingOpPacket:
    """The original op packet as torch's walks see it (``op_overloads()``, overloads, schema), called through
    SimpleTuner's wrapper."""

    def __init__(self, packet, wrapper) -> None:
        self._packet, self._wrapper = packet, wrapper

    def __call__(self, *args, **kwargs):
        return self._wrapper(*args, **kwargs)

    def __getattr__(self, name: str):
        return getattr(self._packet, name)


def applies_to(module) -> str | None:
    try:
        source = inspect.getsource(module)
    except (OSError, TypeError):
        return f"the source of {module.__name__} is not available"
    if REPLACED not in source:
        return f"{module.__name__} no longer contains {REPLACED!r}"
    return None


def apply(module) -> None:
    import torch

    namespace = torch.ops.quanto
    wrapper = namespace.__dict__.get("gemm_f16f8_marlin")
    original = getattr(module, "original_gemm_f16f8_marlin", None)
    if original is None or wrapper is None or isinstance(wrapper, (torch._ops.OpOverloadPacket, CastingOpPacket)):
        return  # no CUDA: nothing was replaced (or this fix already ran)
    namespace.gemm_f16f8_marlin = CastingOpPacket(original, wrapper)
