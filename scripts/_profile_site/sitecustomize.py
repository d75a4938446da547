# bench_train.py --profile puts this folder first on the training process's PYTHONPATH: first what the product's own
# sitecustomize does (sd3tune's compat fixes), then the step profiler of scripts/step_profile.py.
import runpy
import sys
from pathlib import Path

from sd3tune.simpletuner.compat import SITE_DIR

runpy.run_path(str(SITE_DIR / "sitecustomize.py"))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import step_profile  # noqa: E402

step_profile.install_from_env()
