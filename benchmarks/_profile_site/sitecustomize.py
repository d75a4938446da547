# bench_train.py puts this folder first on the training process's PYTHONPATH (--profile, variant traced-allocations):
# first what the product's own sitecustomize does (sd3tune's compat fixes), then the benchmark's aids: tracemalloc
# started where the pinned SimpleTuner starts it (SD3TUNE_BENCH_TRACEMALLOC=1), the step profiler of
# benchmarks/step_profile.py, and torch's peak reserved GPU memory of the process written at its exit
# (SD3TUNE_BENCH_MEMORY=FILE).
import atexit
import json
import os
import runpy
import sys
import tracemalloc
from pathlib import Path

from sd3tune.simpletuner.compat import SITE_DIR

runpy.run_path(str(SITE_DIR / "sitecustomize.py"))


class _TracedAllocations:
    """Started where the pinned SimpleTuner starts it (its data backend factory, which runs before the models load and
    the training loop); compat fix 10 leaves a tracemalloc it did not start running. Not at this site's start: that
    traced every import too (3x the CPU of the start-up), which the pinned SimpleTuner never did."""

    @staticmethod
    def applies_to(factory) -> None:
        return None

    @staticmethod
    def apply(factory) -> None:
        tracemalloc.start()
        print("sd3tune bench: tracing Python allocations (tracemalloc), as the pinned SimpleTuner did", file=sys.stderr)


if os.environ.get("SD3TUNE_BENCH_TRACEMALLOC") == "1":
    from sd3tune.simpletuner.compat import _PostImportHook

    sys.meta_path.insert(0, _PostImportHook({"simpletuner.helpers.data_backend.factory": (_TracedAllocations,)}))


def _write_peak_memory(path: str) -> None:
    torch = sys.modules.get("torch")
    cuda = torch is not None and torch.cuda.is_available()
    peak = {"max_memory_reserved": torch.cuda.max_memory_reserved() if cuda else None,
            "max_memory_allocated": torch.cuda.max_memory_allocated() if cuda else None}
    Path(path).write_text(json.dumps(peak))


if os.environ.get("SD3TUNE_BENCH_MEMORY"):
    atexit.register(_write_peak_memory, os.environ["SD3TUNE_BENCH_MEMORY"])
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import step_profile  # noqa: E402

step_profile.install_from_env()
