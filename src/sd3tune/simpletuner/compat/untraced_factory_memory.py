"""Fix 10: SimpleTuner's data backend factory calls ``tracemalloc.start()`` to report the memory its set-up takes and
never stops it, so every Python allocation of the whole run records a traceback: a Python loop runs 14x slower
(measured inside the training process, 2-core CPU), and each op a training step launches from Python pays for the
objects it allocates (the 24-block CPU proxy step: see the speed notes in the README). Keep tracemalloc off unless it
was already on: the factory then reports the process's resident memory (its own fallback) instead of traced bytes."""

from __future__ import annotations

import tracemalloc as _tracemalloc

from sd3tune.simpletuner.compat._patching import expect


class UntracedMemory:
    """What SimpleTuner's data backend factory sees as ``tracemalloc``: ``start`` does nothing, and the traced memory
    is unavailable unless the process was already tracing (the factory then falls back to psutil's RSS)."""

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


def applies_to(module) -> str | None:
    imported = getattr(module, "tracemalloc", None)
    if imported is not _tracemalloc and not isinstance(imported, UntracedMemory):
        return f"{module.__name__} no longer imports tracemalloc as a module"
    # the factory starts it, and falls back to the process's memory when traced memory is unavailable
    return (expect(module, "FactoryRegistry.__init__", source=("tracemalloc.start()",))
            or expect(module, "FactoryRegistry._get_memory_usage",
                      source=("tracemalloc.get_traced_memory()", "except RuntimeError")))


def apply(module) -> None:
    tracemalloc = getattr(module, "tracemalloc", None)
    if tracemalloc is not None and not isinstance(tracemalloc, UntracedMemory):
        module.tracemalloc = UntracedMemory(tracemalloc)
