# bench_train.py --profile puts this folder first on the training process's PYTHONPATH: sd3tune's compat fixes (what
# the product's own sitecustomize does), then the step profiler of scripts/step_profile.py.
import sys
from pathlib import Path

from sd3tune.simpletuner.compat import install

install()
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import step_profile  # noqa: E402

step_profile.install_from_env()
