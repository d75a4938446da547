"""sd3tune's compat fixes: each lands on the pinned versions, and one whose upstream target moved says so (in the
training log, and through `sd3tune train` as a warning) instead of being skipped silently."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import types

import pytest

from sd3tune.simpletuner import compat
from sd3tune.simpletuner.compat import (blocking_prefetch, compiled_sd3_blocks, fix_name,
                                        untraced_factory_memory)

ALL_FIXES = [fix for fixes in compat.FIXES.values() for fix in fixes]

_PROBE = """
import importlib, json, os, sys
from sd3tune.simpletuner import compat
assert any(isinstance(f, compat._PostImportHook) for f in sys.meta_path), "the compat site did not install the fixes"
for name in compat.FIXES:
    importlib.import_module(name)
replaced = {
    "torch_threads": "torch:set_num_threads",
    "blocking_prefetch": "simpletuner.helpers.data_backend.runtime.batch_fetcher:BatchFetcher.next_response",
    "compiled_sd3_blocks": "simpletuner.helpers.models.sd3.transformer:_sd3_apply_joint_transformer_block",
    "replayed_sd3_training": "simpletuner.helpers.models.sd3.transformer:SD3Transformer2DModel.forward",
    "no_eager_step_marker": "simpletuner.helpers.training.dynamo:mark_cudagraph_step_begin",
    "kept_trainable_parameters": "simpletuner.helpers.training.trainer:Trainer._get_trainable_parameters",
    "private_dataloader_generators":
        "simpletuner.helpers.data_backend.factory:FactoryRegistry._create_dataset_and_sampler",
    "compiled_blocks_only": "accelerate.utils.other:compile_regions",
    "rank_samples": "simpletuner.helpers.multiaspect.sampler:MultiAspectSampler.__iter__",
    "rank_lora_digest": "simpletuner.helpers.training.trainer:Trainer.train",
    "tensorboard_hparams": "accelerate.tracking:TensorBoardTracker.store_init_configuration",
    "displayed_orientation": "simpletuner.helpers.image_manipulation.load:load_image",
    "alpha_on_background": "simpletuner.helpers.image_manipulation.load:_trainingsample_array_to_rgb_image",
    "unloaded_model_families": "simpletuner.helpers.models.registry:LazyModelClass.__getattr__",
    "package_map_once": "importlib.metadata:packages_distributions",
}
marked = {}
for fix, where in replaced.items():
    module, path = where.split(":")
    target = sys.modules[module]
    for part in path.split("."):
        target = getattr(target, part)
    marked[fix] = getattr(target, "sd3tune_fix", False)
factory = sys.modules["simpletuner.helpers.data_backend.factory"]
# a rank torchrun started on a host without GPU trains on the CPU, in the job's gloo group
marked["cpu_process_group"] = os.environ.get("ACCELERATE_USE_CPU") == "true" or sys.modules["torch"].cuda.is_available()
# the local data backend and the metadata scan imported load_image by name: they must hold the fixed one
for user in ("simpletuner.helpers.data_backend.local", "simpletuner.helpers.metadata.backends.discovery"):
    marked[user] = getattr(importlib.import_module(user).load_image, "sd3tune_fix", False)
# SimpleTuner's listings of its model families (the option registry, configure.py) imported no family's module
importlib.import_module("simpletuner.configure")
marked["no model family loaded"] = not [m for m in sys.modules
                                        if m.startswith("simpletuner.helpers.models.") and m.endswith(".model")]
# the exit handlers, as the interpreter runs them at exit: one registered now (as SimpleTuner's are, after the fixes)
# runs before fix 20's, which freezes the heap for the collections that follow
import atexit, gc
before = []
atexit.register(lambda: before.append(gc.get_freeze_count()))
atexit._run_exitfuncs()
print("RESULT " + json.dumps({"outcomes": compat.OUTCOMES, "marked": marked,
                              "untraced": type(factory.tracemalloc).__name__,
                              "frozen": [before, gc.get_freeze_count()]}))
"""


@pytest.fixture(scope="module")
def pinned(tmp_path_factory) -> dict:
    """What the fixes did in a process started as the training process is (the compat site first on PYTHONPATH), after
    importing every target module once (SimpleTuner's imports take seconds: one process for all fixes)."""
    env = {**os.environ, compat.CUDA_GRAPHS_ENV: "1",  # fix 9 only applies when asked for; 11-13 in a rank of 2
           "LOCAL_RANK": "0", "WORLD_SIZE": "2",
           "PYTHONPATH": os.pathsep.join([str(compat.SITE_DIR), os.environ.get("PYTHONPATH", "")])}
    cwd = tmp_path_factory.mktemp("probe")  # importing SimpleTuner's trainer writes debug.log into the cwd
    proc = subprocess.run([sys.executable, "-c", _PROBE], capture_output=True, text=True, cwd=cwd, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return {**json.JSONDecoder().raw_decode(proc.stdout.split("RESULT ", 1)[1])[0], "stderr": proc.stderr}


def test_every_fix_lands_on_the_pinned_versions(pinned):
    # every guard accepted its target as imported (before the fix changed it), and every fix was applied
    assert pinned["outcomes"] == {fix_name(fix): None for fix in ALL_FIXES}
    assert all(pinned["marked"].values()), pinned["marked"]
    assert pinned["untraced"] == "UntracedMemory"
    assert "did not apply" not in pinned["stderr"]
    # fix 20: the last exit handler freezes the heap (SimpleTuner's imports), out of the exit's garbage collections
    (before,), after = pinned["frozen"]
    assert before < 1_000 and after > 100_000  # (Python 3.12 starts with a few hundred in the frozen generation)


def test_each_guard_refuses_a_module_without_its_target():
    empty = types.ModuleType("moved")
    for fix in ALL_FIXES:
        why = fix.applies_to(empty)
        assert why and "moved" in why, (fix_name(fix), why)


def test_guards_check_the_signature_and_the_source_too():
    moved = types.ModuleType("moved")
    moved._sd3_apply_joint_transformer_block = lambda block, hidden_states, temb: None
    assert compiled_sd3_blocks.applies_to(moved) == (
        "moved._sd3_apply_joint_transformer_block takes (block, hidden_states, temb), not (block, hidden_states, "
        "encoder_hidden_states, temb_hidden, temb_context, joint_attention_kwargs, offload_attention)")

    class BatchFetcher:  # the pinned shape, but next_response no longer records the step the way the fix does
        def start_fetching(self):
            thread = None
            return thread

        def next_response(self, step):
            item = self.queue.get()
            return self.device_prefetcher.consume(item)

    moved.BatchFetcher, moved._set_epoch_step_for_training_step = BatchFetcher, print
    assert blocking_prefetch.applies_to(moved) == (
        "moved.BatchFetcher.next_response no longer contains '_set_epoch_step_for_training_step(step)'")
    moved.tracemalloc = types.SimpleNamespace()
    assert untraced_factory_memory.applies_to(moved) == "moved no longer imports tracemalloc as a module"


def test_a_fix_whose_target_moved_says_so_and_is_not_applied(tmp_path, monkeypatch, capfd, caplog):
    (tmp_path / "moved_fetcher.py").write_text("class BatchFetcher:\n    pass\n")  # upstream moved next_response
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(sys, "meta_path", [compat._PostImportHook({"moved_fetcher": (blocking_prefetch,)}),
                                           *sys.meta_path])
    monkeypatch.setattr(compat, "OUTCOMES", {})
    monkeypatch.delitem(sys.modules, "moved_fetcher", raising=False)
    with caplog.at_level(logging.WARNING, logger="sd3tune.compat"):
        import moved_fetcher  # noqa: F401 - the hook applies the fix after the import: no exception
    sys.modules.pop("moved_fetcher", None)
    line = "sd3tune: fix blocking_prefetch did not apply: moved_fetcher has no _set_epoch_step_for_training_step"
    assert line in capfd.readouterr().err.splitlines()
    assert [r.getMessage() for r in caplog.records] == [line]
    assert compat.OUTCOMES == {"blocking_prefetch": line.split(": ", 2)[2]}
    assert vars(moved_fetcher.BatchFetcher).keys().isdisjoint({"next_response", "start_fetching"})


def test_a_guard_that_breaks_counts_as_a_moved_target(capfd):
    broken = types.SimpleNamespace(__name__="sd3tune.simpletuner.compat.broken_fix", applied=[],
                                   applies_to=lambda module: module.missing)
    broken.apply = broken.applied.append
    compat.apply_fixes((broken,), types.ModuleType("moved"))
    assert broken.applied == []
    assert ("sd3tune: fix broken_fix did not apply: its check failed (AttributeError: module 'moved' has no attribute "
            "'missing')") in capfd.readouterr().err


def test_a_fix_not_asked_for_is_neither_applied_nor_reported(monkeypatch, capfd):
    from sd3tune.simpletuner.compat import replayed_sd3_training

    monkeypatch.delenv(compat.CUDA_GRAPHS_ENV, raising=False)  # no `train --cuda-graphs`
    monkeypatch.setattr(compat, "OUTCOMES", {})
    compat.apply_fixes((replayed_sd3_training,), types.ModuleType("moved"))
    assert compat.OUTCOMES == {} and "did not apply" not in capfd.readouterr().err


def test_a_module_only_looked_up_still_gets_its_fixes_when_imported(tmp_path, monkeypatch):
    """``importlib.util.find_spec`` (transformers asks it whether torch is installed) goes through the hook too; the
    fixes wait for the import that runs the module."""
    import importlib.util

    (tmp_path / "looked_up.py").write_text("")
    monkeypatch.syspath_prepend(str(tmp_path))
    fix = types.SimpleNamespace(__name__="looked_up_fix", applies_to=lambda module: None,
                                apply=lambda module: setattr(module, "fixed", True))
    monkeypatch.setattr(sys, "meta_path", [compat._PostImportHook({"looked_up": (fix,)}), *sys.meta_path])
    monkeypatch.setattr(compat, "OUTCOMES", {})
    monkeypatch.delitem(sys.modules, "looked_up", raising=False)
    assert importlib.util.find_spec("looked_up") is not None
    import looked_up

    sys.modules.pop("looked_up", None)
    assert looked_up.fixed is True


_SKIPPING_TRAINER = """
import types
from sd3tune.simpletuner.compat import apply_fixes, blocking_prefetch
apply_fixes((blocking_prefetch,), types.ModuleType("simpletuner.helpers.data_backend.runtime.batch_fetcher"))
apply_fixes((blocking_prefetch,), types.ModuleType("simpletuner.helpers.data_backend.runtime.batch_fetcher"))
"""


def test_train_shows_a_fix_that_did_not_apply_as_a_warning(tiny_init_options, monkeypatch):
    """The relay: `sd3tune train` reads the training process's output; a fix that did not apply is shown once."""
    import sd3tune.commands.train as train
    from sd3tune.commands.init import run_init
    from sd3tune.errors import TrainingFailed

    run_init(tiny_init_options)
    real_run_plan = train.run_plan

    def run_plan(plan, log, **kwargs):  # a training process that only applies a fix whose target moved (twice)
        child = train.LaunchPlan([sys.executable, "-c", _SKIPPING_TRAINER], plan.env, plan.cwd)
        return real_run_plan(child, log, **kwargs)

    monkeypatch.setattr(train, "run_plan", run_plan)
    said: list[str] = []
    with pytest.raises(TrainingFailed, match="wrote no"):
        train.run_train(train.TrainOptions(run_dir=tiny_init_options.run_dir), on_status=said.append)
    warning = ("warning: sd3tune's compat fix blocking_prefetch did not apply: "
               "simpletuner.helpers.data_backend.runtime.batch_fetcher has no _set_epoch_step_for_training_step "
               "(training goes on without it)")
    assert [s for s in said if "did not apply" in s] == [warning]


def test_model_family_answers_apply_only_with_the_catalog_of_the_installed_release(tmp_path, monkeypatch):
    # fix 17 answers SimpleTuner's family listings from catalog.json: a catalog of another release, or of other
    # families, would answer wrongly, so the fix says it did not apply
    import importlib.util
    from importlib.metadata import version

    from sd3tune.simpletuner.compat import unloaded_model_families as fix

    (tmp_path / "fake_registry.py").write_text(
        "import importlib\n"
        "class LazyModelClass:\n"
        "    def __getattr__(self, name):\n"
        "        return importlib.import_module(name)\n"
        "class ModelRegistry:\n"
        "    _metadata = {'sd3': {}}\n"
        "    @classmethod\n"
        "    def _load_metadata(cls):\n"
        "        pass\n")
    spec = importlib.util.spec_from_file_location("fake_registry", tmp_path / "fake_registry.py")
    registry = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(registry)
    installed = version("simpletuner")
    monkeypatch.setattr(fix, "_families", lambda: ("0.0.1", {"sd3": {}}))
    assert fix.applies_to(registry) == f"the catalog is of SimpleTuner 0.0.1, not the installed {installed}"
    monkeypatch.setattr(fix, "_families", lambda: (installed, {"sd3": {}, "flux": {}}))
    assert "model families are not SimpleTuner's" in fix.applies_to(registry)
    monkeypatch.setattr(fix, "_families", lambda: (installed, {"sd3": {}}))
    assert fix.applies_to(registry) is None


def test_the_package_map_made_once_is_the_one_python_makes():
    # fix 18: transformers and diffusers each asked Python for it on import (~0.6 s CPU each, most of it checking
    # ~23,000 files exist); the fix's names, wheel by wheel, and its whole map equal upstream's on this environment
    import collections
    import importlib.metadata as metadata

    from sd3tune.simpletuner.compat import package_map_once as fix

    assert fix.applies_to(metadata) is None
    upstream = collections.defaultdict(list)
    for dist in metadata.distributions():
        if not metadata._top_level_declared(dist):
            assert sorted(fix._top_level_inferred(dist)) == sorted(metadata._top_level_inferred(dist)), dist.name
        for name in metadata._top_level_declared(dist) or metadata._top_level_inferred(dist):
            upstream[name].append(dist.metadata["Name"])
    fixed = types.SimpleNamespace(**vars(metadata))  # the fix applied to a copy: this process keeps Python's
    fix.apply(fixed)
    assert fixed.packages_distributions() == dict(upstream) and len(upstream) > 100
    fixed.packages_distributions()["torch"].append("changed by a caller")
    assert fixed.packages_distributions()["torch"] == upstream["torch"]  # made once, each caller gets a copy
