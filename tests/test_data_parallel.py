"""`train --gpus 2` on CPU is one data-parallel job through the real SimpleTuner + accelerate (gloo): the ranks split
every epoch, end with the same weights, save each checkpoint once, and a resume continues the job. Two trainings in
all: the 2-process run (the same settings and seed as `trained_run`) and its resume."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from helpers import sd3tune

from sd3tune.commands.init import run_init
from sd3tune.commands.quickstart import tiny_init_options
from sd3tune.simpletuner import keys

BATCH = re.compile(r"sd3tune rank (\d+)/(\d+) batch: (\S+)")
DIGEST = re.compile(r"sd3tune rank (\d+)/(\d+) lora digest: ([0-9a-f]{64})")
SAVED = re.compile(r"Saving current state to (\S+)")
STEP_SAID = re.compile(r"^step (\d+)/(\d+) ", re.M)
STEP_LOGGED = re.compile(r"Steps:\s*\d+%\|[^|]*\|\s*(\d+)/(\d+)")


def training_log(run: Path, which: int = 0) -> str:
    text = Path(json.loads((run / "sd3tune.json").read_text())["trainings"][which]["log"]).read_text(errors="replace")
    return re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", text)  # SimpleTuner colours its log lines


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory, tiny_model, concept_data):
    """A run with trained_run's settings (20 steps, checkpoints every 10, seed 42) trained by `train --gpus 2`."""
    run = tmp_path_factory.mktemp("ddp") / "run"
    run_init(tiny_init_options(run, concept_data, tiny_model, steps=20, checkpoint_every=10))
    r = sd3tune("train", run, "--gpus", "2")
    assert r.code == 0, r.err[-3000:]
    return run, r


def test_two_processes_form_one_job_and_split_each_epoch(ddp_run):
    run, _ = ddp_run
    log = training_log(run)
    batches = [(int(rank), int(world), names.split(",")) for rank, world, names in BATCH.findall(log)]
    assert {world for _, world, _ in batches} == {2} and {rank for rank, _, _ in batches} == {0, 1}
    # 8 images, batch 2 on each of 2 ranks: an epoch is each rank's first 2 batches; together they cover every image
    first_epoch = {rank: {n for _, _, names in [b for b in batches if b[0] == rank][:2] for n in names} for rank in (0, 1)}
    assert len(first_epoch[0]) == len(first_epoch[1]) == 4
    assert not first_epoch[0] & first_epoch[1]
    assert len(first_epoch[0] | first_epoch[1]) == 8


def test_both_ranks_end_with_the_same_lora_unlike_one_process(ddp_run, trained_run):
    run, _ = ddp_run
    digests = {int(rank): digest for rank, world, digest in DIGEST.findall(training_log(run)) if world == "2"}
    assert set(digests) == {0, 1} and digests[0] == digests[1]  # gradients averaged: one model
    # step 20 of both (the checkpoint's LoRA: a resume in this module may have trained the final one further)
    from safetensors.torch import load_file

    one = load_file(trained_run / "output" / "checkpoint-20" / keys.LORA_WEIGHT_NAME)
    two = load_file(run / "output" / "checkpoint-20" / keys.LORA_WEIGHT_NAME)
    assert one.keys() == two.keys() and any(not one[k].equal(two[k]) for k in one)  # each step averaged 4 samples over 2 ranks, not 2: another training


def test_each_checkpoint_is_saved_once_and_the_console_shows_one_progress(ddp_run):
    run, r = ddp_run
    log = training_log(run)
    saved = [Path(p).name for p in SAVED.findall(log)]
    assert saved == ["checkpoint-10", "checkpoint-20"]  # once each, by the main process
    for ckpt in ("checkpoint-10", "checkpoint-20"):  # one job: each rank's own RNG state in the one folder
        assert {p.name for p in (run / "output" / ckpt).glob("random_states_*.pkl")} == {"random_states_0.pkl",
                                                                                         "random_states_1.pkl"}
    logged = [int(s) for s, total in STEP_LOGGED.findall(log)]
    assert logged == sorted(logged) and logged[-1] == 20  # one progress bar, never going back
    said = [(int(s), int(t)) for s, t in STEP_SAID.findall(r.err)]
    assert said and [s for s, _ in said] == sorted({s for s, _ in said}) and said[-1] == (20, 20)
    assert "launching SimpleTuner (2 processes, effective batch 4)" in r.err
    entry = json.loads((run / "sd3tune.json").read_text())["trainings"][0]
    assert (entry["status"], entry["processes"], entry["effective_batch"], entry["steps"]) == ("ok", 2, 4, 20)


def test_a_two_process_run_resumes_as_one_job(ddp_run):
    run = ddp_run[0]  # in place: the other tests read the first training's log and record (trainings[0])
    env_file = run / "config" / "config.env"
    env_file.write_text(env_file.read_text().replace("MAX_NUM_STEPS='20'", "MAX_NUM_STEPS='24'"))
    r = sd3tune("train", run, "--gpus", "2", "--resume")
    assert r.code == 0, r.err[-3000:]
    entry = json.loads((run / "sd3tune.json").read_text())["trainings"][-1]
    assert (entry["status"], entry["resumed_from"], entry["steps"], entry["processes"]) == ("ok", "checkpoint-20", 24, 2)
    log = training_log(run, -1)
    digests = {int(rank): d for rank, world, d in DIGEST.findall(log)}
    assert set(digests) == {0, 1} and digests[0] == digests[1]
    assert min(int(s) for s, _ in STEP_LOGGED.findall(log)) >= 20  # continued from step 20, not restarted
