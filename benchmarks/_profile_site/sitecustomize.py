# bench_train.py puts this folder first on the training process's PYTHONPATH (--profile, variant traced-allocations):
# first what the product's own sitecustomize does (sd3tune's compat fixes), then the benchmark's aids: tracemalloc
# started as the pinned SimpleTuner left it (SD3TUNE_BENCH_TRACEMALLOC=1), the step profiler of
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
if os.environ.get("SD3TUNE_BENCH_TRACEMALLOC") == "1":
    tracemalloc.start()  # compat fix 10 leaves a tracemalloc it did not start running
    print("sd3tune bench: tracing Python allocations (tracemalloc), as the pinned SimpleTuner did", file=sys.stderr)


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
