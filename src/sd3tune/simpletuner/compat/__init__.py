"""Compatibility fixes for the pinned SimpleTuner, applied only inside the training process.

The child gets ``SITE_DIR`` prepended to PYTHONPATH; its ``sitecustomize.py`` calls :func:`install`. Nothing is
imported eagerly: each fix is applied right after its target module is first imported.

One module per fix, named by its effect (the numbers are the ones notes elsewhere cite). Each has a docstring saying
what upstream does wrong, ``applies_to(module)`` (None when the target still has the shape the fix was written
against, else why not) and ``apply(module)``; a fix meant only for some runs also has ``requested()``. A fix whose
guard fails is not applied, and says so in the training log: ``sd3tune: fix <name> did not apply: <why>`` (a logging
warning and a line on stderr), which ``sd3tune train`` shows as a warning.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import logging
import os
import signal
import sys
from pathlib import Path

from sd3tune.simpletuner.compat import (alpha_on_background, blocking_prefetch, compiled_blocks_only,
                                        compiled_sd3_blocks, cpu_process_group, displayed_orientation,
                                        frozen_heap_at_exit, kept_trainable_parameters, no_eager_step_marker,
                                        package_map_once, pin_memory_without_accelerator,
                                        private_dataloader_generators, qwen3vl_output_alias, rank_lora_digest,
                                        rank_samples, replayed_sd3_training, tensorboard_hparams, torch_threads,
                                        unloaded_model_families, untraced_factory_memory, walkable_quanto_ops)
from sd3tune.simpletuner.compat.alpha_on_background import ALPHA_BACKGROUND_ENV  # noqa: F401 (public)
from sd3tune.simpletuner.compat.replayed_sd3_training import CUDA_GRAPHS_ENV, GRAPHED_INPUTS  # noqa: F401 (public)
from sd3tune.simpletuner.compat.torch_threads import usable_cores  # noqa: F401 (public)

SITE_DIR = Path(__file__).with_name("site")

# Which module's import triggers which fixes, in the order they apply.
FIXES = {
    "transformers.models.qwen3_vl.modeling_qwen3_vl": (qwen3vl_output_alias,),  # fix 1
    "torch": (pin_memory_without_accelerator, torch_threads),  # fix 2
    "simpletuner.helpers.data_backend.runtime.batch_fetcher": (blocking_prefetch,),  # fix 3
    "simpletuner.helpers.models.sd3.transformer": (compiled_sd3_blocks, replayed_sd3_training),  # fixes 4 and 9
    "simpletuner.helpers.training.dynamo": (no_eager_step_marker,),  # fix 5
    "simpletuner.helpers.training.trainer": (kept_trainable_parameters, rank_lora_digest),  # fix 6, evidence 13
    "simpletuner.helpers.data_backend.factory": (private_dataloader_generators, untraced_factory_memory),  # 7, 10
    "accelerate.utils.other": (compiled_blocks_only,),  # fix 8
    "accelerate.state": (cpu_process_group,),  # fix 11
    "simpletuner.helpers.multiaspect.sampler": (rank_samples,),  # evidence 12
    "accelerate.tracking": (tensorboard_hparams,),  # fix 14
    # before the data backends import load_image by name: they get the fixed one
    "simpletuner.helpers.image_manipulation.load": (displayed_orientation, alpha_on_background),  # fixes 15, 16
    "simpletuner.helpers.models.registry": (unloaded_model_families,),  # fix 17
    "importlib.metadata": (package_map_once,),  # fix 18 (imported before sitecustomize runs: applied at once)
    "simpletuner.helpers.training.quantisation.quanto_workarounds": (walkable_quanto_ops,),  # fix 19
    "gc": (frozen_heap_at_exit,),  # fix 20 (built in: applied at install, the first exit handler: it runs last)
}

NOT_APPLIED = "sd3tune: fix {name} did not apply: {why}"  # `sd3tune train` relays these lines (launch.py)
OUTCOMES: dict[str, str | None] = {}  # fix name -> None (applied) or why it did not apply, in this process
log = logging.getLogger("sd3tune.compat")


def fix_name(fix) -> str:
    return fix.__name__.rpartition(".")[2]


def apply_fixes(fixes, module) -> None:
    """Apply each fix whose guard accepts ``module``; say why for each that does not (never raises for that)."""
    for fix in fixes:
        if hasattr(fix, "requested") and not fix.requested():
            continue
        try:
            why = fix.applies_to(module)
        except Exception as exc:  # a guard that breaks on a changed target: that target changed
            why = f"its check failed ({type(exc).__name__}: {exc})"
        OUTCOMES[fix_name(fix)] = why
        if why is None:
            fix.apply(module)
            continue
        line = NOT_APPLIED.format(name=fix_name(fix), why=why)
        if log.hasHandlers():  # SimpleTuner's logging, once configured; else the stderr line alone says it
            log.warning(line)
        print(f"\n{line}", file=sys.stderr, flush=True)  # a line of its own: a progress bar may leave one open


class _PostImportHook(importlib.abc.MetaPathFinder):
    """Applies fixes right after a named module finishes importing (``{module name: fixes}``)."""

    def __init__(self, fixes) -> None:
        self.fixes = dict(fixes)
        self.busy: set[str] = set()

    def find_spec(self, fullname, path, target=None):
        fixes = self.fixes.get(fullname)
        if fixes is None or fullname in self.busy:
            return None
        self.busy.add(fullname)
        try:
            spec = importlib.util.find_spec(fullname)
        finally:
            self.busy.discard(fullname)
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        original = spec.loader.exec_module

        def exec_module(module, _original=original):
            _original(module)
            pending = self.fixes.pop(fullname, None)  # once: a spec only looked at (find_spec) applies nothing
            if pending is not None:
                apply_fixes(pending, module)

        spec.loader.exec_module = exec_module
        return spec


def install() -> None:
    """Apply every fix: now for modules already imported, on import for the rest. Idempotent."""
    if any(isinstance(f, _PostImportHook) for f in sys.meta_path):
        return
    pending = {}
    for name, fixes in FIXES.items():
        if name in sys.builtin_module_names:  # part of the interpreter: imported now, nothing to wait for
            importlib.import_module(name)
        if name in sys.modules:
            apply_fixes(fixes, sys.modules[name])
        else:
            pending[name] = fixes
    sys.meta_path.insert(0, _PostImportHook(pending))


# ------------------------------------------------------------------------------------------------ dying with sd3tune

LAUNCHED_ENV = "SD3TUNE_LAUNCHED"  # set (to sd3tune's pid) in the environment of every process of a launch
_PR_SET_PDEATHSIG = 1


def _load_prctl():
    if not sys.platform.startswith("linux"):
        return None
    try:
        import ctypes

        return ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):  # pragma: no cover - a libc without prctl
        return None


_PRCTL = _load_prctl()  # resolved before any fork: loading a library between fork and exec may deadlock


def die_with_parent(parent: int, sig: int = signal.SIGKILL) -> None:
    """Have Linux send ``sig`` to this process when its parent (pid ``parent``) ends, and end now if it already has
    (this process was re-parented between its fork and this call). Nothing elsewhere (no such call)."""
    if _PRCTL is None:
        return
    _PRCTL(_PR_SET_PDEATHSIG, int(sig), 0, 0, 0)
    if os.getppid() != parent:
        os.kill(os.getpid(), sig)


def die_with_launch() -> None:
    """In a process of a training sd3tune launched (``LAUNCHED_ENV`` set): end with the launch.

    sd3tune starts ``accelerate launch`` as the leader of its own session, which dies with sd3tune (``die_with_parent``
    in ``launch.py``). The launcher's own children (SimpleTuner's ``train.py``, one per GPU) die with the launcher; a
    process of the launch whose parent has already left the session was orphaned before it got here and ends now."""
    if LAUNCHED_ENV not in os.environ or _PRCTL is None:
        return
    session, parent = os.getsid(0), os.getppid()
    if os.getpid() == session:  # the launcher itself: sd3tune did it between fork and exec
        return
    try:
        orphaned = os.getsid(parent) != session  # re-parented to init (or a subreaper) outside the session
    except OSError:
        orphaned = True
    if orphaned:
        os.kill(os.getpid(), signal.SIGKILL)
    if parent == session:
        die_with_parent(session)
