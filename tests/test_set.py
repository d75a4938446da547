"""`sd3tune set` / `sd3tune show`: options of an existing run changed in place (SimpleTuner reads the new values),
every other line of a hand-edited config.env byte for byte the same; bad values refused with nothing written."""

from __future__ import annotations

import json

import pytest
from helpers import assert_one_line_user_error, sd3tune, simpletuner_namespace

# a hand-edited config.env: comments, blank lines, `export`, double quotes, CRLF line ends, no final line end
HAND_EDITED = (
    "# my notes about this run\r\n"
    "\r\n"
    "export MODEL_TYPE='lora'\r\n"
    "MODEL_FAMILY=\"sd3\"\r\nOPTIMIZER=torch-adamw\r\n"
    "  # indented comment\r\n"
    "MODEL_NAME='{model}'\r\n"
    "OUTPUT_DIR='{run}/output'\r\n"
    "DATALOADER_CONFIG='{run}/config/multidatabackend.json'\r\n"
    "export LEARNING_RATE=\"0.0001\"\r\n"
    "\r\n"
    "DISABLE_BENCHMARK=true\r\n"
    "MIXED_PRECISION='no'\r\n"
    "RESOLUTION='64'\r\n"
    "VALIDATION_RESOLUTION='128x128'\r\n"
    "MAX_NUM_STEPS=40\r\nNUM_EPOCHS=0\r\n"
    "TRAINER_EXTRA_ARGS='--lora_rank=4 --gradient_checkpointing=false --validation_disable=true'"
)


@pytest.fixture()
def hand_run(tmp_path, tiny_model, concept_data):
    run = tmp_path / "run"
    assert sd3tune("init", run, "--data", concept_data, "--model", tiny_model, "--resolution", "64").code == 0
    env = run / "config" / "config.env"
    env.write_bytes(HAND_EDITED.format(model=tiny_model, run=run).encode())
    return run


def _changed_lines(before: bytes, after: bytes) -> tuple[list[bytes], list[bytes]]:
    old, new = before.splitlines(keepends=True), after.splitlines(keepends=True)
    return [line for line in old if line not in new], [line for line in new if line not in old]


def test_set_changes_only_the_lines_of_the_options_and_simpletuner_reads_them(hand_run):
    env = hand_run / "config" / "config.env"
    before = env.read_bytes()
    r = sd3tune("set", hand_run, "LEARNING_RATE=2e-4", "lora_rank=8", "DISABLE_BENCHMARK=false",
                "lr_warmup_steps=5", "tracker_project_name=my project")
    assert r.code == 0, r.err + r.out
    after = env.read_bytes()
    removed, added = _changed_lines(before, after)
    assert removed == [b'export LEARNING_RATE="0.0001"\r\n', b"DISABLE_BENCHMARK=true\r\n",
                       b"TRAINER_EXTRA_ARGS='--lora_rank=4 --gradient_checkpointing=false --validation_disable=true'"]
    assert added == [b"export LEARNING_RATE='0.0002'\r\n",
                     b"TRAINER_EXTRA_ARGS='--lora_rank=8 --gradient_checkpointing=false --validation_disable=true "
                     b"--disable_benchmark=false'\n",
                     b"LR_WARMUP_STEPS='5'\n", b"TRACKER_PROJECT_NAME='my project'\n"]
    # every other line, comments, blanks, quotes and CRLF ends included, is where it was
    kept = [line for line in before.splitlines(keepends=True) if line not in removed]
    assert [line for line in after.splitlines(keepends=True) if line in kept] == kept
    ns = simpletuner_namespace(hand_run, "env")
    assert (ns.learning_rate, ns.lora_rank, ns.disable_benchmark, ns.lr_warmup_steps, ns.tracker_project_name) == (
        2e-4, 8, False, 5, "my project")
    assert "checked" in r.out  # check ran after


def test_set_on_a_json_run_and_show_lists_each_option_with_its_source(tmp_path, tiny_model, concept_data):
    run = tmp_path / "run"
    assert sd3tune("init", run, "--data", concept_data, "--model", tiny_model, "--resolution", "64",
                   "--format", "json").code == 0
    assert sd3tune("set", run, "train_batch_size=2", "gradient_checkpointing=true").code == 0
    data = json.loads((run / "config" / "config.json").read_text())
    assert data["train_batch_size"] == 2 and data["gradient_checkpointing"] is True
    shown = sd3tune("show", run)
    assert shown.code == 0 and any(line.split()[:3] == ["train_batch_size", "=", "2"] for line in shown.out.splitlines())


@pytest.mark.parametrize("assignment, needles", [
    ("LEARNING_RATE=-1", ["learning_rate='-1'", "greater than 0"]),
    ("optimizer=adamw8", ["did you mean", "adamw_bf16"]),
    ("LEARNIG_RATE=1", ["unknown option", "did you mean learning_rate"]),
    ("HF_TOKEN=hf_secret", ["credentials belong in the environment"]),
    ("lora_rank=many", ["not a whole number"]),
    ("gradient_checkpointing=maybe", ["not true or false"]),
    ("VALIDATION_PROMPT=a\tb", ["TAB", ""]),
    ("noequals", ["not KEY=VALUE"]),
])
def test_a_bad_assignment_is_one_line_and_the_file_is_untouched(hand_run, assignment, needles):
    env = hand_run / "config" / "config.env"
    before = env.read_bytes()
    result = sd3tune("set", hand_run, "lora_rank=8", assignment)
    needles = [n for n in needles if n != "TAB"] if "\t" not in assignment else ["VALIDATION_PROMPT"]
    assert_one_line_user_error(result, *needles)
    assert "hf_secret" not in result.err
    assert env.read_bytes() == before
