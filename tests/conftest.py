"""Shared fixtures: a tiny offline SD3, a captioned image folder, and one real SimpleTuner-trained run.

The tiny model and the trained run are built once per test session (the training takes ~25 s on 2 cores).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from helpers import shared_groups

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing in the tests may reach the Hub
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

# What makes a test end-to-end (marker e2e; `pytest -m "not e2e"` is the quick inner loop): a module whose tests run
# SimpleTuner itself (a training, or its modules imported in a child process), or a fixture that builds or trains the
# tiny model.
E2E_MODULES = {"test_train.py", "test_quickstart.py", "test_pins.py", "test_cuda_graphs.py", "test_compat.py",
                "test_image_fixes.py", "test_preview.py"}
E2E_FIXTURES = {"tiny_model", "tiny_clip", "trained_run", "trained_run_as_left", "kohya_run"}
# Session or module fixtures that cost tens of seconds or minutes: every test that uses one runs on the same xdist
# worker (`--dist loadgroup`), so the fixture is made once, not once per worker. A test that uses two of them joins
# their groups into one (the trained run's tests, the data-parallel ones that compare with it, the evaluated ones).
SHARED_ONCE = {"probes": "pins-probes", "ddp_run": "data-parallel", "kohya_run": "kohya-run",
               "evaluated": "evaluated", "trained_run_as_left": "trained-run"}


@pytest.hookimpl(tryfirst=True)  # before xdist reads the groups
def pytest_collection_modifyitems(config, items) -> None:
    groups = shared_groups(items, SHARED_ONCE)
    for item in items:
        fixtures = set(getattr(item, "fixturenames", ()))
        if item.path.name in E2E_MODULES or fixtures & E2E_FIXTURES:
            item.add_marker(pytest.mark.e2e)
        if item in groups:
            item.add_marker(pytest.mark.xdist_group(groups[item]))
    # the slow tests first (the groups' first of all), the quick ones last: xdist hands out tests in this order, so
    # the workers end together instead of one finishing a training while the other idles
    items.sort(key=lambda item: (not any(m.name == "xdist_group" for m in item.iter_markers()),
                                 item.get_closest_marker("e2e") is None))


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    from sd3tune.tiny import build_tiny_sd3

    return build_tiny_sd3(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture(scope="session")
def concept_data(tmp_path_factory) -> Path:
    from sd3tune.tiny import make_concept_images

    return make_concept_images(tmp_path_factory.mktemp("data") / "concepts", count=8, size=64)


@pytest.fixture()
def data_copy(tmp_path, concept_data) -> Path:
    """A private copy of the image folder that a test may break."""
    import shutil

    return Path(shutil.copytree(concept_data, tmp_path / "images"))


@pytest.fixture(scope="session")
def trained_run_as_left(tmp_path_factory, tiny_model, concept_data) -> tuple[Path, Path, bytes, object]:
    """A run trained for real through SimpleTuner on the tiny model (20 steps, checkpoints every 10, 64 px, CPU),
    and what SimpleTuner left of it before sd3tune stamped anything: (the run folder, a copy of its output folder as
    SimpleTuner left it, its log, run_plan's outcome)."""
    import shutil

    from sd3tune.commands import train
    from sd3tune.commands.init import run_init
    from sd3tune.commands.quickstart import tiny_init_options
    from sd3tune.simpletuner.launch import run_plan

    run_dir = tmp_path_factory.mktemp("trained") / "run"
    run_init(tiny_init_options(run_dir, concept_data, tiny_model, steps=20, checkpoint_every=10))
    kept = {}

    def keep_what_simpletuner_left(plan, log, **kwargs):
        kept["outcome"] = run_plan(plan, log, **kwargs)
        shutil.copytree(run_dir / "output", run_dir.parent / "as-trained")
        kept["log"] = log.read_bytes()
        return kept["outcome"]

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(train, "run_plan", keep_what_simpletuner_left)
        result = train.run_train(train.TrainOptions(run_dir=run_dir))
    assert result.lora is not None and result.lora.is_file()
    return run_dir, run_dir.parent / "as-trained", kept["log"], kept["outcome"]


@pytest.fixture(scope="session")
def trained_run(trained_run_as_left) -> Path:
    """The run trained_run_as_left trained (read-only: copy it to change it)."""
    return trained_run_as_left[0]


@pytest.fixture(scope="session")
def kohya_run(tmp_path_factory, concept_data) -> Path:
    """A run trained for real through SimpleTuner (6 steps, a checkpoint at 3) on the tiny SD3 in the shape kohya
    sd-scripts and ComfyUI accept (head dim 64, 2 layers of 2 heads), rank 16, alpha 4: trained strength 0.25.
    `sd3tune export`'s tests share it (read-only: copy it to change it); its model is ``RUN/../model``."""
    from sd3tune.commands.init import run_init
    from sd3tune.commands.quickstart import tiny_init_options
    from sd3tune.commands.train import TrainOptions, run_train
    from sd3tune.tiny import KOHYA_SHAPED_SIZES, build_tiny_sd3

    folder = tmp_path_factory.mktemp("kohya")
    model = build_tiny_sd3(folder / "model", sizes=KOHYA_SHAPED_SIZES)
    options = tiny_init_options(folder / "run", concept_data, model, steps=6, checkpoint_every=3)
    options.overrides = {**options.overrides, "lora": {"rank": 16, "alpha": 4.0}}
    run_init(options)
    result = run_train(TrainOptions(run_dir=folder / "run"))
    assert result.lora is not None and result.lora.is_file()
    return folder / "run"


@pytest.fixture()
def tiny_init_options(tmp_path, tiny_model, data_copy):
    """InitOptions for a CPU-sized run in a fresh folder (not yet written)."""
    from sd3tune.commands.quickstart import tiny_init_options as options

    return options(tmp_path / "run", data_copy, tiny_model, steps=4, checkpoint_every=2)
