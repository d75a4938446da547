"""`sd3tune init`'s training knobs and datasets: each flag reaches SimpleTuner as given (read back by SimpleTuner's own
loaders, env and json), each --data / --reg-data is its own dataset, and bad values are one line, exit 2, no file."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from helpers import assert_one_line_user_error, sd3tune, simpletuner_namespace

from sd3tune.simpletuner.reader import read_run

KNOB_FLAGS = ["--lr", "2e-4", "--batch-size", "2", "--grad-accum", "3", "--optimizer", "adamw_bf16",
              "--scheduler", "cosine", "--warmup-steps", "10", "--alpha", "8", "--checkpoint-every", "50",
              "--validate-every", "25", "--seed", "7", "--tracker", "tensorboard", "--tracker-project", "proj x",
              "--tracker-run", "run-1", "--validation-prompt", "myst, a castle", "--validation-prompt",
              "myst, a boat at 'dusk'", "--caption-prefix", "myst"]
# what SimpleTuner's parser must hold afterwards (argparse's Namespace names and typed values)
EXPECTED = {"learning_rate": 2e-4, "train_batch_size": 2, "gradient_accumulation_steps": 3, "optimizer": "adamw_bf16",
            "lr_scheduler": "cosine", "lr_warmup_steps": 10, "lora_alpha": 8.0, "checkpoint_step_interval": 50,
            "validation_step_interval": 25, "seed": 7, "report_to": "tensorboard", "tracker_project_name": "proj x",
            "tracker_run_name": "run-1", "validation_prompt": "myst, a castle"}


@pytest.mark.parametrize("fmt", ["env", "json"])
def test_every_knob_reads_back_exactly_through_simpletuners_own_loaders(tmp_path, tiny_model, concept_data, fmt):
    from simpletuner.helpers.prompts import PromptHandler

    run = tmp_path / "run"
    r = sd3tune("init", run, "--data", concept_data, "--model", tiny_model, "--resolution", "64", "--format", fmt,
                *KNOB_FLAGS)
    assert r.code == 0, r.err + r.out
    ns = simpletuner_namespace(run, fmt)
    assert {k: getattr(ns, k) for k in EXPECTED} == EXPECTED
    library = PromptHandler.load_user_prompts(ns.user_prompt_library)
    assert [e.prompt for e in library.values()] == ["myst, a boat at 'dusk'"]
    [images] = [b for b in json.loads((run / "config" / "multidatabackend.json").read_text())
                if b["dataset_type"] == "image"]
    assert images["instance_prompt"] == "myst" and images["prepend_instance_prompt"] is True
    loaded = read_run(run)  # sd3tune's reader agrees, with nothing to report
    assert loaded.findings == [] and loaded.config.optim.learning_rate == 2e-4


def test_caption_strategy_and_prefix_reach_the_dataset_and_checks_sees_the_prefixed_captions(tmp_path, tiny_model,
                                                                                           concept_data):
    run = tmp_path / "run"
    r = sd3tune("init", run, "--data", concept_data, "--model", tiny_model, "--resolution", "64",
                "--caption-strategy", "filename", "--caption-prefix", "zq")
    assert r.code == 0, r.err + r.out
    [images, _] = json.loads((run / "config" / "multidatabackend.json").read_text())
    assert (images["caption_strategy"], images["instance_prompt"]) == ("filename", "zq")
    from sd3tune.simpletuner.dataset import dataset_captions
    from sd3tune.datascan import scan_folder

    captions = dataset_captions("filename", "zq", scan_folder(concept_data).images, prepend=True)
    assert captions and all(c.startswith("zq ") for c in captions)


def test_several_datasets_each_get_a_backend_and_check_reports_each(tmp_path, tiny_model, concept_data):
    second = Path(shutil.copytree(concept_data, tmp_path / "more"))
    reg = Path(shutil.copytree(concept_data, tmp_path / "reg"))
    run = tmp_path / "run"
    r = sd3tune("init", run, "--data", concept_data, "--data", f"{second}:repeats=3,resolution=128,crop=center",
                "--reg-data", f"{reg}:probability=0.3", "--model", tiny_model, "--resolution", "64")
    assert r.code == 0, r.err + r.out
    backends = json.loads((run / "config" / "multidatabackend.json").read_text())
    images = {b["id"]: b for b in backends if b["dataset_type"] == "image"}
    assert list(images) == ["concepts", "more", "reg"]
    assert (images["more"]["repeats"], images["more"]["resolution"], images["more"]["crop_style"]) == (3, 128, "center")
    assert images["reg"]["is_regularisation_data"] is True and images["reg"]["probability"] == 0.3
    assert "repeats" not in images["concepts"]
    # check: one line per dataset, images and the share of the epoch's steps (repeats 3 -> 4x the batches)
    lines = {line.split()[1].rstrip(":"): line for line in map(str.strip, r.out.splitlines()) if line.startswith("dataset ")}
    assert set(lines) == {"concepts", "more", "reg"}
    assert "8 images" in lines["more"] and "32 samples/epoch" in lines["more"] and "66.7% of steps" in lines["more"]


TRIGGER = "sd3tune-style"  # what every caption of concept_data holds
NOT_FROM_FLAGS = ("instance_prompt", "prepend_instance_prompt")


@pytest.mark.parametrize("extra, training", [
    ([], {"caption_strategy": "textfile"}),
    (["--caption-prefix", TRIGGER], {"caption_strategy": "textfile", "instance_prompt": TRIGGER,
                                     "prepend_instance_prompt": True}),
    (["--caption-strategy", "instanceprompt"], {"caption_strategy": "instanceprompt", "instance_prompt": TRIGGER}),
])
def test_regularisation_images_never_train_on_the_trigger_or_the_caption_prefix(tmp_path, tiny_model, concept_data,
                                                                                 extra, training):
    """The trigger in regularisation captions would unteach it (SimpleTuner trains them toward the base model's
    output): --reg-data keeps its .txt captions, else its file names (as SimpleTuner reads them), and no warning asks
    for the trigger there."""
    from simpletuner.helpers.prompts import PromptHandler

    bare = tmp_path / "bare"  # regularisation images without captions
    bare.mkdir()
    for image in sorted(concept_data.glob("*.png")):
        shutil.copy(image, bare / f"a_photo_of_{image.name}")
    captioned = Path(shutil.copytree(concept_data, tmp_path / "captioned"))
    for caption in captioned.glob("*.txt"):
        caption.write_text("concept art of a castle, warm light\n")
    run = tmp_path / "run"
    r = sd3tune("init", run, "--data", concept_data, "--reg-data", bare, "--reg-data", f"{captioned}:probability=0.5",
                "--trigger", TRIGGER, "--model", tiny_model, "--resolution", "64", *extra)
    assert r.code == 0, r.err + r.out
    images = {b["id"]: b for b in json.loads((run / "config" / "multidatabackend.json").read_text())
              if b["dataset_type"] == "image"}
    assert {k: images["concepts"].get(k) for k in training} == training
    assert images["bare"]["caption_strategy"] == "filename" and images["captioned"]["caption_strategy"] == "textfile"
    assert not [k for k in NOT_FROM_FLAGS if images["bare"].get(k) or images["captioned"].get(k)]
    bare_backend = images["bare"]
    said = [PromptHandler.prepare_instance_prompt_from_filename(
        str(image), use_captions=True, prepend_instance_prompt=bare_backend.get("prepend_instance_prompt", False),
        instance_prompt=bare_backend.get("instance_prompt")) for image in sorted(bare.glob("*.png"))]
    assert said[0] == "a photo of concept 00" and not [c for c in said if TRIGGER in c]
    assert (f"warning: {bare.resolve()}: no .txt captions in this --reg-data folder: file names are used as captions "
            "— write a .txt caption describing each image, without the trigger") in r.err
    assert "do not contain the trigger" not in r.err and str(captioned.resolve()) not in r.err


def test_regularisation_captions_holding_the_trigger_are_a_warning(tmp_path, tiny_model, concept_data):
    reg = Path(shutil.copytree(concept_data, tmp_path / "reg"))
    (reg / "concept_00.txt").write_text("concept art of a castle\n")
    r = sd3tune("init", tmp_path / "run", "--data", concept_data, "--reg-data", reg, "--trigger", TRIGGER,
                "--model", tiny_model, "--resolution", "64")
    assert r.code == 0, r.err + r.out
    assert (f"warning: {reg.resolve()}: 7 regularisation captions hold the trigger 'sd3tune-style' — take it out of "
            "them: SimpleTuner trains regularisation captions toward the base model's output, which unteaches the "
            "trigger") in r.err


def test_a_given_id_is_kept_or_refused_and_folder_names_give_way(tmp_path, tiny_model, concept_data):
    more = Path(shutil.copytree(concept_data, tmp_path / "more"))
    same_name = Path(shutil.copytree(concept_data, tmp_path / "other" / "concepts"))
    embeds = Path(shutil.copytree(concept_data, tmp_path / "text-embeds"))
    run = tmp_path / "run"
    r = sd3tune("init", run, "--data", f"{concept_data}:id=art", "--reg-data", f"{more}:id=art")
    assert_one_line_user_error(r, f"--reg-data {more}: id=art is already the id of --data {concept_data}",
                               "give each dataset its own id=NAME")
    r = sd3tune("init", run, "--data", f"{more}:id=text-embeds")
    assert_one_line_user_error(r, f"--data {more}: id=text-embeds is already the id of the text embeds' dataset")
    assert not run.exists()
    r = sd3tune("init", run, "--data", concept_data, "--data", same_name, "--data", f"{more}:id=concepts",
                "--data", embeds, "--model", tiny_model, "--resolution", "64")
    assert r.code == 0, r.err + r.out
    backends = json.loads((run / "config" / "multidatabackend.json").read_text())
    assert [(b["id"], b.get("instance_data_dir")) for b in backends] == [
        ("concepts-2", str(concept_data.resolve())), ("concepts-3", str(same_name.resolve())),
        ("concepts", str(more.resolve())), ("text-embeds-2", str(embeds.resolve())), ("text-embeds", None)]


@pytest.mark.parametrize("args, needles", [
    (["--lr", "-1"], ["--lr", "greater than 0"]),
    (["--optimizer", "adamw8"], ["--optimizer 'adamw8'", "did you mean", "adamw_bf16"]),
    (["--data", "{data}"], ["given twice"]),
    (["--data", "{copy}:repets=3"], ["unknown dataset option 'repets'", "did you mean repeats"]),
    (["--data", "{copy}:repeats=many"], ["repeats='many' is not a whole number"]),
    (["--scheduler", "cosin"], ["--scheduler", "'cosine'"]),
    (["--tracker", "tb"], ["--tracker", "'tensorboard'"]),
    (["--batch-size", "0"], ["--batch-size"]),
    (["--caption-strategy", "instanceprompt", "--caption-prefix", "x", "--trigger", "t"], ["--caption-prefix"]),
])
def test_a_bad_value_is_one_line_exit_2_and_nothing_is_written(tmp_path, concept_data, args, needles):
    copy = tmp_path / "copy"
    copy.mkdir()
    args = [a.format(data=concept_data, copy=copy) for a in args]
    run = tmp_path / "run"
    result = sd3tune("init", run, "--data", concept_data, *args)
    assert_one_line_user_error(result, *needles)
    assert not run.exists()


def test_tracker_tensorboard_without_the_package_is_one_line_naming_it(tmp_path, concept_data, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "tensorboard" else real(name, *a))
    result = sd3tune("init", tmp_path / "run", "--data", concept_data, "--tracker", "tensorboard")
    assert_one_line_user_error(result, "needs the tensorboard package", "pip install tensorboard")
    assert not (tmp_path / "run").exists()


def test_init_help_says_force_keeps_nothing():
    r = sd3tune("init", "--help")
    assert "keeps nothing" in " ".join(r.out.split()) and "sd3tune set" in r.out


SECRET = "hf_Sup3rSecretValue0123456789"


@pytest.mark.parametrize("fmt, line", [
    ("env", f"HF_TOKEN={SECRET}\n"),
    ("env", f"export WANDB_API_KEY='{SECRET}'\n"),
    ("env", f"MY_SERVICE_KEY=\"{SECRET}\"\n"),
    ("env", f"TRAINER_EXTRA_ARGS='--hub_token={SECRET}'\n"),
    ("json", {"HF_TOKEN": SECRET}),
])
def test_a_credential_in_the_config_is_an_error_that_never_shows_it(tmp_path, tiny_model, concept_data, fmt, line):
    run = tmp_path / "run"
    assert sd3tune("init", run, "--data", concept_data, "--model", tiny_model, "--resolution", "64",
                   "--format", fmt).code == 0
    config = run / "config" / f"config.{fmt}"
    if fmt == "env":
        config.write_text(config.read_text() + line)
    else:
        config.write_text(json.dumps({**json.loads(config.read_text()), **line}))
    result = sd3tune("check", run)
    assert result.code == 2
    assert "credentials belong in the environment" in result.out and "export" in result.out
    assert SECRET not in result.out + result.err and SECRET[:8] not in result.out + result.err
    as_json = sd3tune("check", run, "--json")
    assert SECRET not in as_json.out and "credential" in as_json.out
    shown = sd3tune("show", run)
    assert shown.code == 0 and SECRET not in shown.out and "see `sd3tune check" in shown.out


@pytest.mark.e2e
def test_two_datasets_train_as_check_predicts_with_a_tensorboard_log(tmp_path, tiny_model, concept_data, monkeypatch):
    """One real SimpleTuner training of one epoch: datasets with repeats 1 and 3, tensorboard tracking. Each dataset
    gives exactly the batches check predicted (SimpleTuner's debug log names the dataset of every batch), and the
    event file holds the loss of every step."""
    import re

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from sd3tune.commands.init import run_init
    from sd3tune.commands.quickstart import tiny_init_options
    from sd3tune.commands.train import TrainOptions, run_train
    from sd3tune.knobs import Knobs

    images = sorted(concept_data.glob("*.png"))
    many, few = tmp_path / "many", tmp_path / "few"  # 4 x (1 + 1) = 8 samples: 4 batches of 2; 3 x (3 + 1): 6
    for folder, chosen in ((many, images[:4]), (few, images[4:7])):
        folder.mkdir()
        for image in chosen:
            shutil.copy(image, folder / image.name)
            shutil.copy(image.with_suffix(".txt"), folder / f"{image.stem}.txt")
    run = tmp_path / "run"
    opts = tiny_init_options(run, f"{many}:repeats=1", tiny_model, steps=10, checkpoint_every=100)
    opts.more_data = [f"{few}:repeats=3"]
    opts.knobs = Knobs(tracker="tensorboard", tracker_project="proj", tracker_run="two")
    opts.overrides["data"] = {**opts.overrides["data"], "prefetch": False}  # no batch fetched past the last step
    predicted = {d.id: d.batches for d in run_init(opts).check.summary.datasets}
    assert predicted == {"many": 4, "few": 6}  # one epoch: 10 steps
    monkeypatch.setenv("SIMPLETUNER_LOG_LEVEL", "DEBUG")
    assert run_train(TrainOptions(run_dir=run)).lora is not None
    log = (run / "debug.log").read_text()
    trained = {name: len(re.findall(rf"\(MultiAspectSampler-{name}\) .*Yielding samples", log)) for name in predicted}
    assert trained == predicted
    [events] = (run / "output" / "logs" / "proj").glob("events.out.tfevents.*")
    acc = EventAccumulator(str(events))
    acc.Reload()
    assert [e.step for e in acc.Scalars("train_loss")] == list(range(1, 11))
    assert all(e.value > 0 for e in acc.Scalars("train_loss"))


def test_wandb_without_a_key_is_a_warning_unless_offline(tmp_path, tiny_model, concept_data, monkeypatch):
    from sd3tune.checks import check_run

    run = tmp_path / "run"
    assert sd3tune("init", run, "--data", concept_data, "--model", tiny_model, "--resolution", "64",
                   "--tracker", "wandb", "--tracker-project", "art").code == 0
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    [finding] = [f for f in check_run(run).warnings if "wandb" in f.message]
    assert "WANDB_MODE=offline" in finding.hint
    monkeypatch.setenv("WANDB_MODE", "offline")
    assert not [f for f in check_run(run).warnings if "wandb" in f.message]
