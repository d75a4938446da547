"""`sd3tune init` as a user runs it."""

from __future__ import annotations

import json
import shutil
import subprocess

import pytest
from helpers import assert_one_line_user_error, sd3tune

from sd3tune.defaults import SD3M
from sd3tune.manifest import read_manifest
from sd3tune.simpletuner.reader import read_run



def init_cli(*args, **kw):
    """`sd3tune init` as a user runs it online: init ends with check, which (offline) refuses the default Hub model
    when it is not in the cache; these tests look at what init writes and says, not at the cache."""
    return sd3tune("init", *args, env={"HF_HUB_OFFLINE": "0"}, **kw)

def test_init_writes_sd3m_lora_configs_that_read_back(tmp_path, data_copy):
    run = tmp_path / "run"
    r = init_cli(run, "--data", data_copy, "--trigger", "myst")
    assert r.code == 0, r.err
    assert (run / "config" / "config.env").is_file() and (run / "config" / "multidatabackend.json").is_file()
    loaded = read_run(run)
    assert loaded.findings == []
    assert loaded.config.model.name_or_path == SD3M and loaded.config.model.model_type == "lora"
    assert loaded.config.model.family == "sd3"
    image = loaded.backends[0]
    assert image.instance_data_dir == str(data_copy.resolve()) and image.caption_strategy == "textfile"
    assert loaded.backends[1].dataset_type == "text_embeds" and loaded.backends[1].default is True
    manifest = json.loads((run / "sd3tune.json").read_text())
    assert manifest["init"]["versions"]["simpletuner"] == "4.10.1"


def test_second_init_without_force_refuses_and_changes_nothing(tmp_path, data_copy):
    run = tmp_path / "run"
    assert init_cli(run, "--data", data_copy).code == 0
    before = {p: p.read_bytes() for p in (run / "config").iterdir()}
    r = init_cli(run, "--data", data_copy, "--rank", "64", "--format", "json")
    assert_one_line_user_error(r, "config.env, ", "multidatabackend.json already exist; nothing was written",
                               "--force")
    assert {p: p.read_bytes() for p in (run / "config").iterdir()} == before


def test_force_switching_format_removes_the_shadowing_file(tmp_path, data_copy):
    run = tmp_path / "run"
    assert init_cli(run, "--data", data_copy, "--format", "json").code == 0
    assert init_cli(run, "--data", data_copy, "--force").code == 0
    assert not (run / "config" / "config.json").exists()  # it would silently win over config.env
    assert read_run(run).format == "env"


def test_prompt_with_shell_metacharacters_is_inert_when_sourced(tmp_path, data_copy):
    run = tmp_path / "run"
    sentinel = tmp_path / "pwned"
    prompt = f"myst, a castle $(touch {sentinel}) `touch {sentinel}` & \"moon\"; night"
    assert init_cli(run, "--data", data_copy, "--validation-prompt", prompt).code == 0
    out = subprocess.run(["bash", "-c", f'set -a; source "{run}/config/config.env"; printf %s "$VALIDATION_PROMPT"'],
                         capture_output=True, text=True, check=True)
    assert out.stdout == prompt and not sentinel.exists()
    assert read_run(run).config.validation.prompt == prompt


def test_presets_and_flags_reach_the_config(tmp_path, data_copy):
    run = tmp_path / "run"
    assert init_cli(run, "--data", data_copy, "--preset", "80gb", "--rank", "32", "--steps", "2000",
                   "--resolution", "768").code == 0
    cfg = read_run(run).config
    assert (cfg.optim.train_batch_size, cfg.lora.rank, cfg.optim.max_train_steps, cfg.optim.num_train_epochs) == \
        (4, 32, 2000, 0)
    assert cfg.data.resolution == 768 and cfg.validation.resolution == "768x768"


@pytest.mark.parametrize("preset", ["16gb", "12gb", "8gb"])
def test_the_small_card_presets_warn_unverified_cite_only_files_a_user_has_and_pass_check(tmp_path, data_copy,
                                                                                          tiny_model, preset):
    """No preset below 24gb was measured on a GPU: init says so (it once pointed 16gb users at SIMPLETUNER_NOTES.md,
    which is not in the repository), and check accepts what init wrote for each."""
    from pathlib import Path
    import re

    from sd3tune.config.presets import PRESETS

    run = tmp_path / "run"
    result = init_cli(run, "--data", data_copy, "--model", tiny_model, "--preset", preset, "--resolution", "64")
    said = result.out + result.err
    assert result.code == 0 and not PRESETS[preset].verified
    assert f"--preset: unverified: the {preset} preset" in said
    repo = Path(__file__).resolve().parents[1]
    for name in set(re.findall(r"[\w./-]+\.md\b", said)):
        assert (repo / name).is_file(), f"{name} is cited but not in the repository:\n{said}"
    checked = sd3tune("check", run)
    assert checked.code == 0 and "error" not in checked.out.split("summary:")[0], checked.out + checked.err
    quantised = "int8-quanto is not proven on a GPU: it died at the first training step with torch 2.11 before"
    assert (quantised in checked.out) == (preset == "8gb")  # the base, not the int8 T5 every small preset has
    cfg = read_run(run).config
    overrides = PRESETS[preset].overrides
    assert cfg.precision.gradient_checkpointing == overrides["precision"]["gradient_checkpointing"]
    assert cfg.extra == overrides.get("extra", {})


def test_user_errors_are_one_line_and_write_nothing(tmp_path, data_copy):
    empty = tmp_path / "empty"
    empty.mkdir()
    cases = [
        (["--data", tmp_path / "missing"], "does not exist"),
        (["--data", empty], "no readable images"),
        (["--data", data_copy, "--rank", "0"], "rank"),
        (["--data", data_copy, "--preset", "6gb"], "unknown preset"),
        (["--data", data_copy, "--format", "yaml"], "--format"),
        (["--data", data_copy, "--validation-prompt", "it's $5"], "VALIDATION_PROMPT"),
        (["--data", data_copy, "--steps", "0"], "--steps 0 must be at least 1"),
        (["--data", next(data_copy.glob("*.png"))], "is a file, not a folder"),
    ]
    for i, (args, needle) in enumerate(cases):
        run = tmp_path / f"run{i}"
        assert_one_line_user_error(init_cli(run, *args), needle)
        assert not (run / "config").exists()


def test_written_files_follow_the_umask_and_an_unwritable_folder_is_a_user_error(tmp_path, data_copy):
    import os
    import stat

    old = os.umask(0o027)  # the child inherits it
    try:
        assert init_cli(tmp_path / "run", "--data", data_copy).code == 0
    finally:
        os.umask(old)
    for written in ("config/config.env", "config/multidatabackend.json", "sd3tune.json"):
        assert stat.S_IMODE((tmp_path / "run" / written).stat().st_mode) == 0o640, written
    (tmp_path / "a-file").write_text("")
    assert_one_line_user_error(init_cli(tmp_path / "a-file" / "run", "--data", data_copy),
                               "cannot write", "Not a directory")


def test_a_relative_model_folder_is_recorded_as_the_folder_the_user_meant(tmp_path, data_copy, tiny_model):
    import os

    work = tmp_path / "work"
    work.mkdir()
    relative = os.path.relpath(tiny_model, work)
    assert init_cli("runs/art", "--data", data_copy, "--model", relative, cwd=work).code == 0
    run = work / "runs" / "art"
    assert read_run(run).config.model.name_or_path == str(tiny_model.resolve())
    assert sd3tune("check", run).code == 0  # read from anywhere: the path does not depend on where init ran



def test_init_shows_what_check_finds_in_the_written_run(tmp_path, data_copy, tiny_model):
    # a missing caption stops SimpleTuner (and so check and train); an empty one trains unconditioned
    captions = sorted(data_copy.glob("*.txt"))
    captions[0].unlink()
    captions[1].write_text("")
    r = init_cli(tmp_path / "run", "--data", data_copy, "--model", tiny_model, "--resolution", "64")
    assert r.code == 2, r.err  # written, and the check says what to fix before training
    count = len(list(data_copy.glob("*.png")))
    assert (f"1 error:\n  multidatabackend.json:images.caption_strategy: textfile captions, but 1 of {count} images "
            f"has no .txt caption ({captions[0].name} missing)") in r.out
    assert f"1 caption file is empty ({captions[1].name})" in r.out
    assert "check failed: fix the 1 error above" in r.out and "next: sd3tune train" not in r.out
    assert sd3tune("check", tmp_path / "run").out == r.out[r.out.index("checked "):]  # the same report

    captions[0].with_suffix(".txt").write_text("a castle")
    captions[1].write_text("a tower")
    r = init_cli(tmp_path / "run", "--data", data_copy, "--model", tiny_model, "--resolution", "64", "--force")
    assert r.code == 0 and r.out.rstrip().endswith(f"ok\nnext: sd3tune train {tmp_path / 'run'}"), r.out


def test_init_again_over_a_trained_run_says_train_would_refuse_and_offers_no_next_step(trained_run, tmp_path):
    # init --force rewrites the config, not the output: `next: sd3tune train` was then refused
    run = tmp_path / "run"
    shutil.copytree(trained_run / "output", run / "output")
    options = read_manifest(trained_run)["init"]
    r = init_cli(run, "--data", options["data"], "--model", options["model"], "--resolution", "64")
    assert r.code == 0, r.err
    assert f"{run / 'output'} already holds checkpoint-20" in r.out and "`sd3tune train` refuses" in r.out
    assert "next:" not in r.out


def test_one_existing_file_is_named_in_the_singular(tmp_path):
    from sd3tune.errors import RefuseOverwriteError
    from sd3tune.fsutil import refuse_existing

    (tmp_path / "a.json").write_text("{}")
    with pytest.raises(RefuseOverwriteError, match=r"a\.json already exists; nothing was written"):
        refuse_existing([tmp_path / "a.json", tmp_path / "b.json"], force=False)


def test_a_control_character_in_a_caption_is_named_with_its_file_and_line_and_nothing_is_written(tmp_path,
                                                                                                   data_copy):
    # a NUL in the first caption failed with a message about VALIDATION_PROMPT, which the user never gave
    captions = sorted(data_copy.glob("*.txt"))
    captions[0].write_bytes(b"a castle\x00 on a hill")
    captions[3].write_text("a tower\nat \x1b[1mnight")
    run = tmp_path / "run"
    r = sd3tune("init", run, "--data", data_copy)
    assert_one_line_user_error(r, f"{captions[0]}:line 1 column 9: holds a NUL byte (U+0000)",
                               "(and 1 more caption file)", "delete it from the file")
    assert "VALIDATION_PROMPT" not in r.err and not run.exists()
    captions[0].write_text("a castle on a hill\r\n")  # a Windows line end is no control character
    assert_one_line_user_error(sd3tune("init", run, "--data", data_copy, "--force"),
                               f"{captions[3]}:line 2 column 4: holds an escape character (U+001B)")
    assert not run.exists()


def test_the_80gb_preset_on_mixed_sizes_fills_small_buckets_and_check_passes(tmp_path, tiny_model):
    # 23 mixed-size images: batch 4 is larger than two aspect buckets, and init wrote a run its own check refused
    from PIL import Image

    data = tmp_path / "art"
    data.mkdir()
    for i, size in enumerate([(256, 256)] * 15 + [(304, 208)] * 5 + [(208, 304)] * 2 + [(384, 160)]):
        Image.new("RGB", size, (10 * i, 80, 120)).save(data / f"sketch_{i:02d}.png")
        (data / f"sketch_{i:02d}.txt").write_text(f"concept art sketch {i}")
    run = tmp_path / "run"
    r = sd3tune("init", run, "--data", data, "--model", tiny_model, "--preset", "80gb", "--resolution", "512")
    assert r.code == 0, r.out + r.err
    assert ("warning: flags:--preset: 3 images of 23 sit in aspect buckets smaller than the batch of 4 (448x640: 2, "
            "768x320: 1), which SimpleTuner refuses; init turned on --allow_dataset_oversubscription: SimpleTuner "
            "repeats only those images to fill a batch (each up to 4x per epoch), and the batch stays 4 as the 80gb "
            "preset sets it, rather than shrinking for every image") in r.err
    assert "--allow_dataset_oversubscription=true" in (run / "config" / "config.env").read_text()
    assert read_run(run).config.optim.train_batch_size == 4
    r = sd3tune("check", run)
    assert r.code == 0 and "--allow_dataset_oversubscription repeats them to fit" in r.out, r.out

    env = run / "config" / "config.env"  # without it: check's error says what SimpleTuner offers
    env.write_text(env.read_text().replace(" --allow_dataset_oversubscription=true", ""))
    r = sd3tune("check", run)
    assert r.code == 2 and "or add --allow_dataset_oversubscription=true to TRAINER_EXTRA_ARGS" in r.out, r.out


def _mixed_sizes(folder, sizes):
    from PIL import Image

    folder.mkdir()
    for i, size in enumerate(sizes):
        Image.new("RGB", size, (10 * i, 80, 120)).save(folder / f"sketch_{i:02d}.png")
        (folder / f"sketch_{i:02d}.txt").write_text(f"concept art sketch {i}")
    return folder


def test_small_buckets_of_every_dataset_are_named_in_the_one_warning(tmp_path, tiny_model):
    # the option covers all datasets: each one's small buckets are said, not only the first one's
    art = _mixed_sizes(tmp_path / "art", [(256, 256)] * 15 + [(304, 208)] * 5 + [(208, 304)] * 2 + [(384, 160)])
    square = _mixed_sizes(tmp_path / "square", [(256, 256)] * 8)
    more = _mixed_sizes(tmp_path / "more", [(256, 256)] * 8 + [(208, 304)])
    run = tmp_path / "run"
    r = sd3tune("init", run, "--data", art, "--data", square, "--data", more, "--model", tiny_model,
                "--preset", "80gb", "--resolution", "512")
    assert r.code == 0, r.out + r.err
    assert ("warning: flags:--preset: aspect buckets smaller than the batch of 4 hold 3 images of 23 in dataset art "
            "(448x640: 2, 768x320: 1) and 1 image of 9 in dataset more (448x640: 1), which SimpleTuner refuses; init "
            "turned on --allow_dataset_oversubscription: SimpleTuner repeats only those images to fill a batch (each "
            "up to 4x per epoch), and the batch stays 4 as the 80gb preset sets it") in r.err
    assert r.err.count("aspect buckets smaller than the batch") == 1
    assert (run / "config" / "config.env").read_text().count("--allow_dataset_oversubscription=true") == 1
    assert sd3tune("check", run).code == 0
