"""Rules on the folders a run reads and writes (checks/paths.py): the dataset file, the output folder and resuming,
write access, folders inside another run."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest
from check_helpers import (Case, assert_fails_naming_the_culprit, backends_path, check, env_set, image_backend,
                           json_edit, section)
from helpers import sd3tune

from sd3tune.simpletuner import keys


# (id, config format, break(run, data, tmp) -> optional other path to check, strings the output must contain)
CASES: list[Case] = [
    # run folder and config files
    ("dataloader-config-elsewhere", "env", lambda r, d, t: env_set(r, "DATALOADER_CONFIG", str(t / "nope.json")),
     ("DATALOADER_CONFIG", "nope.json")),
    ("output-dir-is-a-file", "env",
     lambda r, d, t: ((t / "afile").write_text("x"), env_set(r, "OUTPUT_DIR", str(t / "afile")))[-1],
     ("OUTPUT_DIR",)),
]


@pytest.mark.parametrize("case_id, fmt, breaker, needles", CASES, ids=[c[0] for c in CASES])
def test_a_broken_run_fails_naming_the_culprit(make_run, tmp_path, case_id, fmt, breaker, needles):
    assert_fails_naming_the_culprit(make_run, tmp_path, fmt, breaker, needles)


def test_check_resume_refuses_a_checkpoint_of_another_rank_and_warns_of_other_settings(make_run):
    # SimpleTuner failed loading a checkpoint of another LoRA rank only after loading every model; a changed shift or
    # resolution trains on silently with the new value
    import torch
    from safetensors.torch import save_file

    run, _ = make_run()
    checkpoint = run / "output" / "checkpoint-2"  # of 4 steps: one to resume from
    checkpoint.mkdir(parents=True)
    (checkpoint / ".guard").write_text("complete")  # SimpleTuner's mark of a finished save

    def write(rank: int, shift: str) -> None:
        save_file({"transformer.transformer_blocks.0.attn.to_q.lora_A.weight": torch.zeros(rank, 32)},
                  str(checkpoint / keys.LORA_WEIGHT_NAME), metadata={"sd3tune.flow_schedule_shift": shift})

    write(4, "3.0")
    result, _ = check(run, "--resume")
    assert result.exit_code == 2
    assert "TRAINER_EXTRA_ARGS (line" in result.output and "--lora_rank: 4 in checkpoint-2, the checkpoint --resume " \
           "continues, but 16 here: SimpleTuner cannot resume a LoRA of another rank" in section(result.output, "error"), result.output
    assert "then run `sd3tune check " + str(run) + " --resume` again" in result.output
    env = run / "config" / "config.env"
    text = env.read_text()
    env.write_text(text.replace("--lora_rank=16", "--lora_rank=four"))  # invalid: its own error, no made-up 16
    result, _ = check(run, "--resume")
    assert "checkpoint-2" not in section(result.output, "error") and "lora_rank" in result.output, result.output
    env.write_text(text)
    write(16, "2.5")
    result, _ = check(run, "--resume")
    assert result.exit_code == 0, result.output
    assert "checkpoint-2 trained with other settings (schedule shift 2.5 -> 3.0); the resumed LoRA trains on with " \
           "the new ones" in section(result.output, "warning"), result.output
    result, _ = check(run)  # without --resume: train would refuse the folder, whatever the checkpoint holds
    assert "rank" not in result.output and "already holds checkpoint-2" in section(result.output, "warning")


def test_check_resume_fails_where_train_resume_would_refuse_or_fail(make_run):
    # check --resume said ok where train --resume then refused (no checkpoint, every step done), or failed after
    # loading every model (the latest checkpoint cut short by a Ctrl-C during its save)
    run, _ = make_run()  # 4 steps, no output folder yet
    result, _ = check(run, "--resume")
    assert result.exit_code == 2 and "nothing to resume: no checkpoint in" in section(result.output, "error")
    output = run / "output"
    for step in (2, 4):
        (output / f"checkpoint-{step}").mkdir(parents=True)
        (output / f"checkpoint-{step}" / ".guard").write_text("complete")
    result, _ = check(run, "--resume")
    assert result.exit_code == 2
    assert "nothing to resume: checkpoint-4 has all 4 steps of the run" in section(result.output, "error")
    env_set(run, "MAX_NUM_STEPS", "8")
    (output / "checkpoint-4" / ".guard").unlink()
    result, _ = check(run, "--resume")
    assert result.exit_code == 2
    assert "checkpoint-4 is incomplete (its save was interrupted" in section(result.output, "error")
    # the hint, followed, resumes from the last complete checkpoint
    assert f"delete it (rm -r {output / 'checkpoint-4'}), then continue from checkpoint-2 with `sd3tune train {run} " \
           "--resume`" in result.output
    (output / "checkpoint-3").mkdir()  # cut short too, after the last complete one: SimpleTuner would resume it next
    result, _ = check(run, "--resume")
    assert f"delete them (rm -r {output / 'checkpoint-3'} {output / 'checkpoint-4'}), then continue from " \
           "checkpoint-2" in result.output, result.output
    shutil.rmtree(output / "checkpoint-3")
    shutil.rmtree(output / "checkpoint-4")
    result, _ = check(run, "--resume")
    assert result.exit_code == 0, result.output
    result = sd3tune("train", run, "--resume", "--dry-run")
    assert result.code == 0, result.err


def test_folders_simpletuner_must_write_are_checked_for_write_access(make_run, monkeypatch):
    # a read-only dataset mount or cache disk failed only after the model loaded; the tests run as root, who may write
    # anywhere, so the permission answer is what is replaced here
    import os

    run, data = make_run()
    read_only = {data, run}  # the image folder, and the run folder the output and caches are made in
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda path, mode, **kw: real_access(path, mode, **kw) and not (
        mode & os.W_OK and Path(path) in read_only))
    result, _ = check(run)
    assert result.exit_code == 2
    errors = section(result.output, "error")
    assert f"images.instance_data_dir: {data} is not writable; SimpleTuner writes its aspect-bucket cache" in errors
    assert f"images.cache_dir_vae: {run} is not writable, so {run / 'cache'}" in errors
    assert f"text-embeds.cache_dir: {run} is not writable" in errors
    assert re.search(rf"OUTPUT_DIR \(line \d+\): {run} is not writable, so {run / 'output'} cannot be made", errors)
    read_only.clear()
    assert check(run)[0].exit_code == 0


def test_a_copied_run_keeps_the_originals_bucket_cache_suffix_and_is_told(make_run, tmp_path):
    run, _ = make_run()
    assert "cache_file_suffix" not in check(run)[0].output
    copy = Path(shutil.copytree(run, tmp_path / "copy"))
    result, _ = check(copy)
    assert "images.cache_file_suffix" in result.output and "was made for another run folder" in result.output
    fix = re.search(r"set it to '([^']+)'", result.output)[1]
    json_edit(backends_path(copy), lambda data: image_backend(data).update(cache_file_suffix=fix))
    assert "cache_file_suffix" not in check(copy)[0].output


def test_a_copied_run_folder_is_refused_while_it_points_into_the_original(make_run):
    import shutil

    run, _ = make_run()
    copy = Path(shutil.copytree(run, run.with_name("copy")))
    r = sd3tune("check", copy)
    assert r.code == 2 and "inside another run's folder" in r.out and str(run) in r.out
    assert "OUTPUT_DIR" in r.out and "cache_dir_vae" in r.out
    assert sd3tune("check", run).code == 0  # the original is fine
