"""`sd3tune check` (and the same check at the start of `train`): a catalog of broken runs, each caught in seconds.

Every case starts from a valid run written by `run_init`, breaks one thing in the written files or the data
folder, and asserts: exit code 2, the culprit key or file is named, no traceback.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import pytest
from helpers import sd3tune
from typer.testing import CliRunner

from sd3tune.cli import app
from sd3tune.commands.init import run_init
from sd3tune.simpletuner import keys

runner = CliRunner()


# ----------------------------------------------------------------------------------------------- helpers


def env_path(run: Path) -> Path:
    return run / "config" / "config.env"


def json_path(run: Path) -> Path:
    return run / "config" / "config.json"


def backends_path(run: Path) -> Path:
    return run / "config" / "multidatabackend.json"


def env_set(run: Path, key: str, value: str) -> None:
    """Set KEY='value' in config.env (replacing the line, or appending one)."""
    text = env_path(run).read_text()
    line = f"{key}='{value}'"
    new, n = re.subn(rf"^{key}=.*$", lambda m: line, text, flags=re.M)
    env_path(run).write_text(new if n else text + line + "\n")


def env_del(run: Path, key: str) -> None:
    text = env_path(run).read_text()
    env_path(run).write_text(re.sub(rf"^{key}=.*\n", "", text, flags=re.M))


def env_line(run: Path, line: str) -> None:
    env_path(run).write_text(env_path(run).read_text() + line + "\n")


def extra_args(run: Path, old: str, new: str) -> None:
    """Edit TRAINER_EXTRA_ARGS (replace ``old`` by ``new``; old '' appends)."""
    text = env_path(run).read_text()
    m = re.search(r"^TRAINER_EXTRA_ARGS='(.*)'$", text, flags=re.M)
    assert m, text
    args = m.group(1)
    args = args.replace(old, new) if old else f"{args} {new}"
    env_path(run).write_text(text[:m.start(1)] + args + text[m.end(1):])


def json_edit(path: Path, fn: Callable) -> None:
    data = json.loads(path.read_text())
    result = fn(data)
    path.write_text(json.dumps(data if result is None else result, indent=2))


def image_backend(data: list) -> dict:
    return next(b for b in data if b.get("dataset_type") != "text_embeds")


def backend_set(run: Path, **values) -> None:
    json_edit(backends_path(run), lambda d: image_backend(d).update(values))


def fake_model(tmp: Path, class_name: str, parts: tuple[str, ...] = ()) -> Path:
    folder = tmp / f"fake-{class_name}"
    folder.mkdir()
    (folder / "model_index.json").write_text(json.dumps({"_class_name": class_name, "transformer": ["x", "y"]}))
    for p in parts:
        (folder / p).mkdir()
    return folder


def _psd(path: Path, size: tuple[int, int] = (64, 64)) -> None:
    """A minimal RGB Photoshop file (PIL reads PSD but cannot write it): header, empty sections, raw planes."""
    w, h = size
    path.write_bytes(b"8BPS" + (1).to_bytes(2, "big") + bytes(6) + (3).to_bytes(2, "big") + h.to_bytes(4, "big")
                     + w.to_bytes(4, "big") + (8).to_bytes(2, "big") + (3).to_bytes(2, "big") + bytes(12)
                     + bytes(2) + bytes(3 * w * h))


# ----------------------------------------------------------------------------------------------- the catalog
# (id, config format, break(run, data, tmp) -> optional other path to check, strings the output must contain)

Case = tuple[str, str, Callable[[Path, Path, Path], Path | None], tuple[str, ...]]

CASES: list[Case] = [
    # config.env: types, unknown keys, choices, syntax
    ("env-wrong-type-int", "env", lambda r, d, t: env_set(r, "TRAIN_BATCH_SIZE", "two"), ("TRAIN_BATCH_SIZE",)),
    ("env-wrong-type-float", "env", lambda r, d, t: env_set(r, "LEARNING_RATE", "fast"), ("LEARNING_RATE",)),
    ("env-wrong-type-extra-arg", "env", lambda r, d, t: extra_args(r, "", "--aspect_bucket_rounding=two"),
     ("aspect_bucket_rounding", "not an integer")),
    ("env-typo-key", "env", lambda r, d, t: env_line(r, "LEARNING_RAT='1e-4'"), ("LEARNING_RAT", "LEARNING_RATE")),
    ("env-typo-extra-arg", "env", lambda r, d, t: extra_args(r, "", "--lora_rnk=8"), ("--lora_rnk", "lora_rank")),
    ("env-bad-choice", "env", lambda r, d, t: env_set(r, "LR_SCHEDULE", "cosinus"), ("LR_SCHEDULE", "cosine")),
    ("env-bad-choice-extra-arg", "env", lambda r, d, t: extra_args(r, "", "--lora_type=loraa"),
     ("lora_type", "standard")),
    ("env-bad-model-family", "env", lambda r, d, t: env_set(r, "MODEL_FAMILY", "sdxl"), ("MODEL_FAMILY",)),
    ("env-malformed-line", "env", lambda r, d, t: env_line(r, "this line has no equals sign"), ("config.env:line ",)),
    ("env-plus-equals", "env", lambda r, d, t: env_set(r, "VALIDATION_PROMPT", "a+=b"), ("config.env:line ", "+=")),
    ("env-not-utf8", "env", lambda r, d, t: env_path(r).write_bytes(b"MODEL_TYPE='\xff\xfe'\n"), ("config.env",)),
    ("env-lora-rank-zero", "env", lambda r, d, t: extra_args(r, "--lora_rank=16", "--lora_rank=0"), ("lora_rank",)),
    ("env-validation-resolution-garbage", "env", lambda r, d, t: env_set(r, "VALIDATION_RESOLUTION", "big"),
     ("VALIDATION_RESOLUTION",)),
    ("env-lower-case-key", "env", lambda r, d, t: env_line(r, "learning_rate='2e-4'"),
     ("learning_rate", "rename learning_rate to LEARNING_RATE")),
    ("env-option-name-as-key", "env", lambda r, d, t: env_line(r, "max_train_steps=5"),
     ("max_train_steps", "rename max_train_steps to MAX_NUM_STEPS")),
    # the SimpleTuner traps
    ("trap-key-false-dropped", "env", lambda r, d, t: (extra_args(r, " --gradient_checkpointing=false", ""),
                                                       env_line(r, "USE_GRADIENT_CHECKPOINTING=false")),
     ("USE_GRADIENT_CHECKPOINTING", "stays ON (its default)",
      "add --gradient_checkpointing=false to TRAINER_EXTRA_ARGS")),
    ("trap-key-false-dropped-extra-arg-on", "env",
     lambda r, d, t: (extra_args(r, "--gradient_checkpointing=false", "--gradient_checkpointing=true"),
                      env_line(r, "USE_GRADIENT_CHECKPOINTING=false")),
     ("USE_GRADIENT_CHECKPOINTING", "stays ON (set by TRAINER_EXTRA_ARGS",
      "set --gradient_checkpointing=false in TRAINER_EXTRA_ARGS")),
    ("trap-extra-args-split-on-spaces", "env", lambda r, d, t: extra_args(r, "", "--tracker_run_name=my run"),
     ("TRAINER_EXTRA_ARGS", "'run'")),
    ("trap-validation-megapixels", "env", lambda r, d, t: env_set(r, "VALIDATION_RESOLUTION", "64"),
     ("VALIDATION_RESOLUTION", "megapixels")),
    ("trap-optimizer-adamw", "env", lambda r, d, t: env_set(r, "OPTIMIZER", "adamw"), ("OPTIMIZER", "torch-adamw")),
    ("trap-no-model-name", "env", lambda r, d, t: env_del(r, "MODEL_NAME"), ("MODEL_NAME", "SD3.5")),
    ("trap-use-dora", "env", lambda r, d, t: env_line(r, "USE_DORA='true'"), ("USE_DORA",)),
    ("trap-steps-and-epochs", "env", lambda r, d, t: env_set(r, "NUM_EPOCHS", "3"), ("NUM_EPOCHS", "MAX_NUM_STEPS")),
    ("trap-steps-with-default-epochs", "env", lambda r, d, t: env_del(r, "NUM_EPOCHS"), ("NUM_EPOCHS=0",)),
    ("trap-json-shadows-env", "env", lambda r, d, t: json_path(r).write_text("{}"), ("config.json", "config.env")),
    ("trap-typo-dataset-key", "env", lambda r, d, t: backend_set(r, repeat=2), ("repeat", "repeats")),
    ("trap-false-string-in-dataset", "env", lambda r, d, t: backend_set(r, crop="false"), ("crop",)),
    # steps
    ("steps-nothing-to-train", "env", lambda r, d, t: env_set(r, "MAX_NUM_STEPS", "0"), ("MAX_NUM_STEPS",)),
    ("steps-negative", "env", lambda r, d, t: env_set(r, "MAX_NUM_STEPS", "-5"), ("MAX_NUM_STEPS",)),
    # run folder and config files
    ("no-config-file", "env", lambda r, d, t: env_path(r).unlink(), ("config.env",)),
    ("only-toml-config", "env", lambda r, d, t: [env_path(r).rename(r / "config" / "config.toml")],
     ("config.toml", "not TOML")),
    ("run-dir-missing", "env", lambda r, d, t: t / "no-such-run", ("no-such-run", "does not exist")),
    ("dataloader-config-elsewhere", "env", lambda r, d, t: env_set(r, "DATALOADER_CONFIG", str(t / "nope.json")),
     ("DATALOADER_CONFIG", "nope.json")),
    ("output-dir-is-a-file", "env",
     lambda r, d, t: ((t / "afile").write_text("x"), env_set(r, "OUTPUT_DIR", str(t / "afile")))[-1],
     ("OUTPUT_DIR",)),
    # base model
    ("model-missing-local", "env", lambda r, d, t: env_set(r, "MODEL_NAME", str(t / "models" / "sd3")),
     ("MODEL_NAME", "does not exist")),
    ("model-not-diffusers", "env", lambda r, d, t: env_set(r, "MODEL_NAME", str(d)),
     ("MODEL_NAME", "model_index.json")),
    ("model-not-sd3", "env",
     lambda r, d, t: env_set(r, "MODEL_NAME", str(fake_model(t, "StableDiffusionXLPipeline"))),
     ("MODEL_NAME", "StableDiffusionXLPipeline")),
    ("model-incomplete", "env",
     lambda r, d, t: env_set(r, "MODEL_NAME", str(fake_model(t, "StableDiffusion3Pipeline", ("transformer",)))),
     ("MODEL_NAME", "vae/")),
    # config.json
    ("json-syntax-error", "json", lambda r, d, t: json_path(r).write_text('{\n  "lora_rank": 16,\n}\n'),
     ("config.json:line 3",)),
    ("json-not-an-object", "json", lambda r, d, t: json_path(r).write_text("[]"), ("config.json",)),
    ("json-false-string", "json", lambda r, d, t: json_edit(json_path(r), lambda c: c.update(
        gradient_checkpointing="False")), ("gradient_checkpointing", "'False'")),
    ("json-typo-key", "json", lambda r, d, t: json_edit(json_path(r), lambda c: c.update(learnng_rate=1e-4)),
     ("learnng_rate", "learning_rate")),
    ("json-wrong-type", "json", lambda r, d, t: json_edit(json_path(r), lambda c: c.update(train_batch_size="2x")),
     ("train_batch_size",)),
    ("json-bool-for-int-extra", "json", lambda r, d, t: json_edit(json_path(r), lambda c: c.update(
        aspect_bucket_rounding=True)), ("aspect_bucket_rounding",)),
    ("json-steps-and-epochs", "json", lambda r, d, t: json_edit(json_path(r), lambda c: c.update(num_train_epochs=2)),
     ("num_train_epochs",)),
    ("json-optimizer-adamw", "json", lambda r, d, t: json_edit(json_path(r), lambda c: c.update(optimizer="adamw")),
     ("optimizer", "torch-adamw")),
    # multidatabackend.json
    ("backends-syntax-error", "env", lambda r, d, t: backends_path(r).write_text('[\n  {"id": "x",}\n]\n'),
     ("multidatabackend.json:line 2",)),
    ("backends-not-a-list", "env", lambda r, d, t: backends_path(r).write_text("{}"), ("multidatabackend.json",)),
    ("backends-missing", "env", lambda r, d, t: backends_path(r).unlink(), ("multidatabackend.json",)),
    ("backends-typo-required-key", "env", lambda r, d, t: json_edit(backends_path(r), lambda b: image_backend(
        b).update(instance_data_dri=image_backend(b).pop("instance_data_dir"))), ("instance_data_dri",)),
    ("backends-bad-choice", "env", lambda r, d, t: backend_set(r, caption_strategy="textfiles"),
     ("caption_strategy", "textfile")),
    ("backends-no-text-embeds", "env", lambda r, d, t: json_edit(backends_path(r), lambda b: [image_backend(b)]),
     ("multidatabackend.json", "text_embeds")),
    ("backends-duplicate-id", "env", lambda r, d, t: json_edit(backends_path(r), lambda b: b[1].update(
        id=image_backend(b)["id"])), ("more than one dataset",)),
    ("backends-unknown-text-embeds", "env", lambda r, d, t: backend_set(r, text_embeds="nope"),
     ("text_embeds", "nope")),
    ("backends-max-size-without-target", "env", lambda r, d, t: backend_set(r, maximum_image_size=1024),
     ("maximum_image_size", "target_downsample_size")),
    ("backends-quoted-resolution", "env", lambda r, d, t: backend_set(r, resolution="64"),
     ("resolution: the string '64' is not a number", "write 64 without quotes")),
    ("backends-quoted-repeats", "env", lambda r, d, t: backend_set(r, repeats="1"),
     ("repeats", "write 1 without quotes")),
    ("backends-quoted-minimum-size", "env", lambda r, d, t: backend_set(r, minimum_image_size="32"),
     ("minimum_image_size", "'32' is not a number")),
    ("backends-area-minimum-megapixels", "env",
     lambda r, d, t: backend_set(r, resolution_type="area", resolution=0.25, minimum_image_size=64),
     ("minimum_image_size", "megapixels")),
    # data folder
    ("data-missing", "env", lambda r, d, t: backend_set(r, instance_data_dir=str(t / "gone")),
     ("instance_data_dir", "gone")),
    ("data-empty", "env", lambda r, d, t: (shutil.rmtree(d), d.mkdir()), ("instance_data_dir", "no readable images")),
    ("data-corrupt-image", "env", lambda r, d, t: (d / "concept_03.png").write_bytes(b"not a png at all"),
     ("concept_03.png",)),
    ("data-truncated-image", "env", lambda r, d, t: (d / "concept_05.png").write_bytes(
        (d / "concept_05.png").read_bytes()[:200]), ("concept_05.png",)),
    ("data-empty-image-file", "env", lambda r, d, t: (d / "concept_02.png").write_bytes(b""), ("concept_02.png",)),
    # `echo > x.txt`: SimpleTuner reads no caption from it and stops (IndexError; with prefetch, train hung)
    ("data-caption-of-blank-lines", "env", lambda r, d, t: (d / "concept_06.txt").write_text("  \n"),
     ("concept_06.txt", "only blank lines")),
    ("data-uncaptioned-psd", "env", lambda r, d, t: _psd(d / "sketch.psd"), ("sketch.txt", "1 of 9 images")),
    ("data-uncaptioned-video", "env", lambda r, d, t: (d / "reference.mp4").write_bytes(b"\0\0\0\x18ftypmp42"),
     ("reference.txt", "1 of 9 files", "reference.mp4: a video file")),
    ("data-unreadable-psd", "env", lambda r, d, t: ((d / "sketch.psd").write_bytes(b"8BPS broken"),
                                                    (d / "sketch.txt").write_text("a sketch")), ("sketch.psd",)),
    ("captions-all-missing", "env", lambda r, d, t: [p.unlink() for p in d.glob("*.txt")],
     ("caption_strategy", ".txt")),
    ("captions-one-missing", "env", lambda r, d, t: (d / "concept_04.txt").unlink(), ("concept_04.txt",)),
    ("caption-not-utf8", "env", lambda r, d, t: (d / "concept_01.txt").write_bytes("caf\xe9".encode("latin-1")),
     ("concept_01.txt", "UTF-8")),
    ("instance-prompt-missing", "env", lambda r, d, t: backend_set(r, caption_strategy="instanceprompt"),
     ("instance_prompt",)),
    ("instance-prompt-spelled-like-the-key", "env",  # SimpleTuner stops on it after loading the model
     lambda r, d, t: backend_set(r, caption_strategy="instance_prompt", instance_prompt="myst"), ("instanceprompt",)),
    ("too-few-images-for-batch", "env", lambda r, d, t: env_set(r, "TRAIN_BATCH_SIZE", "16"), ("TRAIN_BATCH_SIZE",)),
    ("batch-times-accumulation-too-large", "env", lambda r, d, t: env_set(r, "GRADIENT_ACCUMULATION_STEPS", "8"),
     ("GRADIENT_ACCUMULATION_STEPS", "effective batch 16")),
    ("all-images-below-minimum-size", "env", lambda r, d, t: backend_set(r, minimum_image_size=128),
     ("minimum_image_size", "all 8")),
]


@pytest.fixture()
def make_run(tiny_init_options):
    def make(fmt: str = "env") -> tuple[Path, Path]:
        tiny_init_options.format = fmt
        run_init(tiny_init_options)
        return tiny_init_options.run_dir, tiny_init_options.data

    return make


def check(run: Path, *args: str, env: dict | None = None):
    start = time.perf_counter()
    result = runner.invoke(app, ["check", str(run), *args], env=env)
    elapsed = time.perf_counter() - start
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    assert "Traceback" not in result.output
    return result, elapsed


@pytest.mark.parametrize("fmt", ["env", "json"])
def test_a_run_from_init_passes(make_run, fmt):
    run, _ = make_run(fmt)
    result, _ = check(run)
    assert result.exit_code == 0, result.output
    assert result.output.rstrip().splitlines()[-1].startswith("ok")
    assert "error" not in result.output.lower().replace("0 error", "")
    assert "summary: 8 images; 1 bucket [64x64: 8]" in result.output
    assert "4 steps = 1 epoch of 4 steps" in result.output


@pytest.mark.parametrize("case_id, fmt, breaker, needles", CASES, ids=[c[0] for c in CASES])
def test_a_broken_run_fails_naming_the_culprit(make_run, tmp_path, case_id, fmt, breaker, needles):
    run, data = make_run(fmt)
    other = breaker(run, data, tmp_path)
    target = other if isinstance(other, Path) else run
    result, elapsed = check(target)
    assert result.exit_code == 2, result.output
    errors = _section(result.output, "error")
    for needle in needles:
        assert needle in errors, f"{needle!r} not among the errors:\n{result.output}"
    assert "check failed" in result.output
    assert elapsed < 5, f"check took {elapsed:.1f} s"


def _section(output: str, kind: str) -> str:
    """The finding lines under the "N error(s):" (or warning) heading."""
    lines, inside = [], False
    for line in output.splitlines():
        if re.match(rf"^\d+ {kind}s?:$", line):
            inside = True
            continue
        if inside and not line.startswith("  "):
            inside = False
        if inside:
            lines.append(line)
    return "\n".join(lines)


def test_a_dropped_key_false_line_beside_the_extra_arg_that_decides_only_warns(make_run):
    # init turns checkpointing off with --gradient_checkpointing=false in TRAINER_EXTRA_ARGS; SimpleTuner drops the
    # hand-added KEY=false line, so the extra arg decides: off, as the user meant
    run, _ = make_run()
    env_line(run, "USE_GRADIENT_CHECKPOINTING=false")
    result, _ = check(run)
    assert result.exit_code == 0, result.output
    assert "stays ON" not in result.output
    assert re.search(r"USE_GRADIENT_CHECKPOINTING \(line \d+\): SimpleTuner drops 'USE_GRADIENT_CHECKPOINTING=false'; "
                     r"--gradient_checkpointing is off \(set by TRAINER_EXTRA_ARGS \(line \d+\) "
                     r"--gradient_checkpointing, not by this line\) — remove the line",
                     _section(result.output, "warning"))


def test_a_bare_number_is_a_square_validation_resolution_in_config_json(make_run):
    # SimpleTuner passes a JSON number on as its text (--validation_resolution=512): the same as "512"
    run, _ = make_run("json")
    json_edit(json_path(run), lambda c: c.update(validation_resolution=512))
    result, _ = check(run)
    assert result.exit_code == 0, result.output
    assert "validation_resolution" not in result.output
    json_edit(json_path(run), lambda c: c.update(validation_resolution=64))
    result, _ = check(run)
    assert result.exit_code == 2 and "config.json:validation_resolution: '64': SimpleTuner reads numbers below 128 " \
                                      "as megapixels" in _section(result.output, "error")
    json_edit(json_path(run), lambda c: c.update(validation_resolution=512.5))
    result, _ = check(run)
    assert result.exit_code == 2 and "validation_resolution" in _section(result.output, "error")


def test_an_option_written_twice_in_config_json_warns(make_run):
    # json.loads (sd3tune's and SimpleTuner's) keeps only the last value: the first edit is silently lost
    run, _ = make_run("json")
    text = json_path(run).read_text(encoding="utf-8")
    json_path(run).write_text(text.replace('{', '{\n  "lora_rank": 4,', 1), encoding="utf-8")
    result, _ = check(run)
    assert "config.json:lora_rank: is written more than once; SimpleTuner uses the last value" \
           in _section(result.output, "warning"), result.output


def test_json_values_simpletuners_parser_refuses_are_errors(make_run):
    # SimpleTuner turns config.json into --option=text for argparse: 2.0 is an invalid int, true a bare --seed
    # ("expected one argument"), false --seed=false; pydantic's lax int accepted all three
    run, _ = make_run("json")
    json_edit(json_path(run), lambda c: c.update(checkpoint_step_interval=2.0, seed=True, learning_rate=False))
    result, _ = check(run)
    errors = _section(result.output, "error")
    assert result.exit_code == 2
    assert "config.json:checkpoint_step_interval: 2.0 is refused by SimpleTuner, which reads this option as a whole " \
           "number (--checkpoint_step_interval=2.0: invalid int value) — write checkpoint_step_interval: 2" in errors
    assert "config.json:seed: true is not a number; SimpleTuner passes it as a bare --seed" in errors
    assert "config.json:learning_rate: false is not a number; SimpleTuner passes it as --learning_rate=false" in errors
    assert "500 > " not in result.output  # the meant 2, not SimpleTuner's default, for the other checks


def test_quoted_booleans_in_config_json_are_refused_only_where_simpletuner_misreads_them(make_run):
    # SimpleTuner drops the string "false" (the option's default applies: true for gradient_checkpointing), makes
    # "true" a bare --option and parses "yes"/"0"/"off" as booleans; check refused every quoted word
    run, _ = make_run("json")
    json_edit(json_path(run), lambda c: c.update(use_ema="yes", disable_benchmark="True", set_grads_to_none="on"))
    result, _ = check(run)
    assert result.exit_code == 0, result.output
    assert "use_ema" not in result.output and "disable_benchmark" not in result.output
    json_edit(json_path(run), lambda c: c.update(use_ema="false", gradient_checkpointing="False"))
    result, _ = check(run)
    assert result.exit_code == 2
    assert "config.json:gradient_checkpointing: SimpleTuner drops the string 'False', so its default, true, applies " \
           "— write gradient_checkpointing: false without quotes" in _section(result.output, "error"), result.output
    assert "config.json:use_ema: SimpleTuner drops the string 'false', so its default, false, applies, as meant" \
           in _section(result.output, "warning"), result.output


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
           "continues, but 16 here: SimpleTuner cannot resume a LoRA of another rank" in _section(result.output, "error"), result.output
    assert "then run `sd3tune check " + str(run) + " --resume` again" in result.output
    env = run / "config" / "config.env"
    text = env.read_text()
    env.write_text(text.replace("--lora_rank=16", "--lora_rank=four"))  # invalid: its own error, no made-up 16
    result, _ = check(run, "--resume")
    assert "checkpoint-2" not in _section(result.output, "error") and "lora_rank" in result.output, result.output
    env.write_text(text)
    write(16, "2.5")
    result, _ = check(run, "--resume")
    assert result.exit_code == 0, result.output
    assert "checkpoint-2 trained with other settings (schedule shift 2.5 -> 3.0); the resumed LoRA trains on with " \
           "the new ones" in _section(result.output, "warning"), result.output
    result, _ = check(run)  # without --resume: train would refuse the folder, whatever the checkpoint holds
    assert "rank" not in result.output and "already holds checkpoint-2" in _section(result.output, "warning")


def test_check_resume_fails_where_train_resume_would_refuse_or_fail(make_run):
    # check --resume said ok where train --resume then refused (no checkpoint, every step done), or failed after
    # loading every model (the latest checkpoint cut short by a Ctrl-C during its save)
    run, _ = make_run()  # 4 steps, no output folder yet
    result, _ = check(run, "--resume")
    assert result.exit_code == 2 and "nothing to resume: no checkpoint in" in _section(result.output, "error")
    output = run / "output"
    for step in (2, 4):
        (output / f"checkpoint-{step}").mkdir(parents=True)
        (output / f"checkpoint-{step}" / ".guard").write_text("complete")
    result, _ = check(run, "--resume")
    assert result.exit_code == 2
    assert "nothing to resume: checkpoint-4 has all 4 steps of the run" in _section(result.output, "error")
    env_set(run, "MAX_NUM_STEPS", "8")
    (output / "checkpoint-4" / ".guard").unlink()
    result, _ = check(run, "--resume")
    assert result.exit_code == 2
    assert "checkpoint-4 is incomplete (its save was interrupted" in _section(result.output, "error")
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


def test_names_simpletuner_still_reads_are_warnings_not_errors(make_run):
    # SimpleTuner renames save_total_limit (config.json) and reads lr_scheduler cosine_with_warmup as cosine;
    # check called them unknown / an invalid choice (suggesting constant_with_warmup) and refused the run
    run, _ = make_run("json")
    def edit(config):
        config.pop("checkpoints_total_limit", None)
        config.update(save_total_limit=3, lr_scheduler="cosine_with_warmup")

    json_edit(json_path(run), edit)
    result, _ = check(run)
    assert result.exit_code == 0, result.output
    warnings = _section(result.output, "warning")
    assert "config.json:save_total_limit: an old name of checkpoints_total_limit; SimpleTuner reads it as that" \
           in warnings
    assert "config.json:lr_scheduler: SimpleTuner reads 'cosine_with_warmup' as 'cosine'" in warnings


def test_a_config_json_saved_with_a_bom_says_so(make_run):
    # SimpleTuner's json.load fails on a BOM too; the hint said "a trailing comma or a missing quote is typical"
    run, _ = make_run("json")
    json_path(run).write_bytes(b"\xef\xbb\xbf" + json_path(run).read_bytes())
    result, _ = check(run)
    assert result.exit_code == 2
    assert "config.json: starts with a byte-order mark (BOM), which SimpleTuner cannot read — save the file as UTF-8 " \
           "without BOM" in _section(result.output, "error"), result.output


def test_a_null_option_in_config_json_warns_that_simpletuner_uses_its_default(make_run):
    # SimpleTuner drops null options: "lora_rank": null trains at its default rank, not what the file seems to say
    run, _ = make_run("json")
    json_edit(json_path(run), lambda c: c.update(lora_rank=None))
    result, _ = check(run)
    assert "config.json:lora_rank: null: SimpleTuner ignores the key and uses its default 16" \
           in _section(result.output, "warning"), result.output


def test_dataset_numbers_may_be_written_as_simpletuner_reads_them(make_run):
    # a quoted number fails (see CASES); an int where SimpleTuner takes a float, or 1.0 for an int it int()s, passes
    run, _ = make_run()
    backend_set(run, probability=1, repeats=0.0, crop=True, crop_aspect="random", crop_aspect_buckets=[1, 0.75])
    result, _ = check(run)
    assert result.exit_code == 0, result.output
    backend_set(run, repeats=0.5, probability=True)
    result, _ = check(run)
    errors = _section(result.output, "error")
    assert "images.repeats: 0.5: Input should be a valid integer" in errors
    assert "images.probability: true is not a number — write a number" in errors


def test_findings_are_file_key_problem_fix_lines(make_run):
    run, _ = make_run()
    env_set(run, "OPTIMIZER", "adamw")
    result, _ = check(run)
    line = next(line for line in result.output.splitlines() if "OPTIMIZER" in line)
    assert re.match(r"^  config\.env:OPTIMIZER \(line \d+\): .+ — .+$", line), line


def test_every_problem_is_reported_at_once(make_run, tmp_path):
    run, data = make_run()
    env_set(run, "OPTIMIZER", "adamw")
    env_set(run, "TRAIN_BATCH_SIZE", "two")  # an invalid value must not hide the other config checks
    env_set(run, "MODEL_NAME", str(tmp_path / "missing-model"))
    env_line(run, "LEARNIN_RATE='1e-4'")
    (data / "concept_04.txt").unlink()
    (data / "concept_03.png").write_bytes(b"garbage")
    backend_set(run, repeat=2)
    result, _ = check(run)
    assert result.exit_code == 2
    errors = _section(result.output, "error")
    for needle in ("OPTIMIZER", "TRAIN_BATCH_SIZE", "MODEL_NAME", "LEARNIN_RATE", "concept_04.txt", "concept_03.png",
                   "repeat"):
        assert needle in errors, (needle, result.output)
    assert re.search(r"^\d+ errors:$", result.output, flags=re.M)


def test_json_output_lists_errors_warnings_and_summary(make_run):
    run, data = make_run()
    result, _ = check(run, "--json")
    report = json.loads(result.output)
    assert result.exit_code == 0 and report["ok"] is True and report["errors"] == []
    assert {"images", "buckets", "steps", "steps_per_epoch", "epochs", "gpu_memory_gb"} <= set(report["summary"])
    assert report["summary"]["images"] == 8 and report["summary"]["buckets"] == {"64x64": 8}
    assert report["summary"]["steps"] == 4 and report["summary"]["epochs"] == 1.0

    env_set(run, "OPTIMIZER", "adamw")
    (data / "concept_04.txt").write_text("")
    result, _ = check(run, "--json")
    report = json.loads(result.output)
    assert result.exit_code == 2 and report["ok"] is False
    assert [e["key"] for e in report["errors"]] == ["OPTIMIZER"]  # as the user spells it, the line apart
    line = report["errors"][0]["line"]
    assert (run / "config" / "config.env").read_text().splitlines()[line - 1].startswith("OPTIMIZER=")
    assert set(report["errors"][0]) == {"severity", "file", "key", "line", "message", "hint"}
    empty = next(w for w in report["warnings"] if "empty" in w["message"])
    assert empty["key"] is None and empty["line"] is None  # a finding about a folder: no key, no line
    env_line(run, "this is no assignment")
    bad = next(e for e in json.loads(check(run, "--json")[0].output)["errors"] if "KEY=VALUE" in e["message"])
    assert bad["key"] is None and bad["line"] == len(env_path(run).read_text().splitlines())
    assert any("empty" in w["message"] for w in report["warnings"])


def test_warnings_alone_exit_zero(make_run):
    run, _ = make_run()
    env_set(run, "LEARNING_RATE", "0.01")  # high, but legal
    result, _ = check(run, env={"MODEL_NAME": "someone/else"})  # a stray variable SimpleTuner would read
    assert result.exit_code == 0, result.output
    warnings = _section(result.output, "warning")
    assert "LEARNING_RATE" in warnings and "environment:MODEL_NAME" in warnings
    assert result.output.rstrip().endswith("ok (with warnings)")


def test_a_run_resolution_no_dataset_uses_warns_and_one_a_dataset_inherits_does_not(make_run):
    # init writes the resolution into the dataset entry too, and SimpleTuner takes the dataset's: RESOLUTION edited
    # alone changed nothing that trained
    run, _ = make_run()
    env_set(run, "RESOLUTION", "128")
    result, _ = check(run)
    assert result.exit_code == 0, result.output
    assert re.search(r"RESOLUTION \(line \d+\): 128 here, but every dataset sets its own resolution \(images 64\)",
                     _section(result.output, "warning"))
    json_edit(backends_path(run), lambda data: image_backend(data).pop("resolution") and None)
    result, _ = check(run)  # now the dataset trains at RESOLUTION
    assert "every dataset sets its own" not in result.output and "128x128" in result.output


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
    errors = _section(result.output, "error")
    assert f"images.instance_data_dir: {data} is not writable; SimpleTuner writes its aspect-bucket cache" in errors
    assert f"images.cache_dir_vae: {run} is not writable, so {run / 'cache'}" in errors
    assert f"text-embeds.cache_dir: {run} is not writable" in errors
    assert re.search(rf"OUTPUT_DIR \(line \d+\): {run} is not writable, so {run / 'output'} cannot be made", errors)
    read_only.clear()
    assert check(run)[0].exit_code == 0


def test_hand_edits_simpletuner_reads_differently_from_a_shell_warn(make_run):
    # a second MAX_NUM_STEPS line silently won; $(...) in a double-quoted value is text to SimpleTuner but runs when
    # a shell sources the file (which sd3tune's own quoting never allows)
    run, _ = make_run()
    env_line(run, 'VALIDATION_PROMPT="$(touch /tmp/pwned) castle"')
    env_line(run, "MAX_NUM_STEPS=6")
    result, _ = check(run)
    warnings = _section(result.output, "warning")
    assert re.search(r"MAX_NUM_STEPS \(line \d+\): also set on line \d+; SimpleTuner takes this later value", warnings)
    assert re.search(r"VALIDATION_PROMPT \(line \d+\): holds \$\(...\)", warnings)
    assert "summary: 8 images; 1 bucket [64x64: 8]; effective batch 2; 6 steps" in result.output  # the later value
    env_line(run, "VALIDATION_PROMPT='$(not run) castle'")  # single quotes: bash expands nothing
    assert _section(check(run)[0].output, "warning").count("holds $(") == 1


def test_quotes_simpletuner_keeps_in_the_value_warn(make_run):
    # VALIDATION_PROMPT='unbalanced passed as "ok": SimpleTuner sampled "'unbalanced" and bash cannot source the file
    from sd3tune.simpletuner.envfile import parse_env_text

    run, _ = make_run()
    assert "unmatched or nested quotes" not in check(run)[0].output  # what init writes
    stray = ["'unbalanced", "closed'", "it's", "'a' 'b'", '"say "hi""']
    fine = ["'castle'", '"it\'s"', "'say \"hi\"'", "plain", "'", ""]
    entries, _ = parse_env_text("".join(f"K{i}={v}\n" for i, v in enumerate(stray + fine)))
    assert [e.stray_quotes for e in entries] == [True] * len(stray) + [False] * len(fine)
    env_line(run, "VALIDATION_PROMPT='sd3tune-style, a castle")
    warnings = _section(check(run)[0].output, "warning")
    assert re.search(r"VALIDATION_PROMPT \(line \d+\): unmatched or nested quotes in 'sd3tune-style, a castle: "
                     r"SimpleTuner reads the value as \"'sd3tune-style, a castle\", quotes kept", warnings), warnings


def test_captions_beside_the_images_that_the_caption_strategy_leaves_unused_warn(make_run):
    run, data = make_run()
    backend_set(run, caption_strategy="filename")
    warnings = _section(check(run)[0].output, "warning")
    assert "images.caption_strategy: 8 images have a .txt caption beside them, and caption_strategy filename " \
           "leaves them unused" in warnings
    for caption in data.glob("*.txt"):
        caption.unlink()
    assert "caption_strategy" not in check(run)[0].output


def test_a_copied_run_keeps_the_originals_bucket_cache_suffix_and_is_told(make_run, tmp_path):
    run, _ = make_run()
    assert "cache_file_suffix" not in check(run)[0].output
    copy = Path(shutil.copytree(run, tmp_path / "copy"))
    result, _ = check(copy)
    assert "images.cache_file_suffix" in result.output and "was made for another run folder" in result.output
    fix = re.search(r"set it to '([^']+)'", result.output)[1]
    json_edit(backends_path(copy), lambda data: image_backend(data).update(cache_file_suffix=fix))
    assert "cache_file_suffix" not in check(copy)[0].output


def test_gated_sd3m_without_a_token_warns_and_a_token_in_the_xdg_cache_counts(make_run, tmp_path):
    run, _ = make_run()
    env_set(run, "MODEL_NAME", "stabilityai/stable-diffusion-3-medium-diffusers")
    env = {"XDG_CACHE_HOME": str(tmp_path / "xdg"), "HF_HOME": None, "HF_HUB_CACHE": None, "HF_TOKEN": None,
           "HUGGING_FACE_HUB_TOKEN": None, "HF_TOKEN_PATH": None, "HF_HUB_OFFLINE": None}
    result, _ = check(run, env=env)
    assert "is gated and no Hugging Face token was found" in _section(result.output, "warning")
    token = tmp_path / "xdg" / "huggingface" / "token"  # where `hf auth login` writes it under XDG_CACHE_HOME
    token.parent.mkdir(parents=True)
    token.write_text("hf_x")
    result, _ = check(run, env=env)
    assert "no Hugging Face token was found" not in result.output


def test_token_overflow_of_captions_and_prompts_warns(make_run):
    run, data = make_run()
    (data / "concept_00.txt").write_text(" ".join(["a very detailed painting of an old stone castle"] * 10))
    (data / "concept_01.txt").write_text(" ".join(["castle"] * 200))
    extra_args(run, "--validation_disable=true", "--validation_disable=false")
    env_set(run, "VALIDATION_PROMPT", " ".join(["a misty lighthouse at dusk"] * 20))
    result, _ = check(run)
    assert result.exit_code == 0, result.output
    warnings = _section(result.output, "warning")
    assert "images.caption_strategy: 1 captions exceed about 154 T5 tokens" in warnings
    assert "captions exceed CLIP's 77 tokens" in warnings
    assert re.search(r"VALIDATION_PROMPT \(line \d+\): about \d+ CLIP tokens", warnings)
    assert "VALIDATION_STEPS" in warnings  # 250 > 4 steps: no validation image would be made


def test_lora_alpha_other_than_rank_warns(make_run):
    run, _ = make_run()
    extra_args(run, "--lora_alpha=16.0", "--lora_alpha=4")
    result, _ = check(run)
    assert result.exit_code == 0
    assert "TRAINER_EXTRA_ARGS (line 69) --lora_alpha: alpha 4 != rank 16" in _section(result.output, "warning")


def test_each_missing_required_key_is_reported_once_with_its_fix(make_run):
    # both paths missing made pydantic report the whole `paths` section too, next to the two keys
    run, _ = make_run()
    env_del(run, "OUTPUT_DIR")
    env_del(run, "DATALOADER_CONFIG")
    result, _ = check(run)
    assert result.exit_code == 2
    errors = _section(result.output, "error").splitlines()
    assert [e for e in errors if "OUTPUT_DIR" in e] == [
        "  config.env:OUTPUT_DIR: is not set — set OUTPUT_DIR to a folder for the LoRA and checkpoints"]
    assert len([e for e in errors if "DATALOADER_CONFIG" in e]) == 1
    assert not [e for e in errors if "paths" in e or "required but not set" in e]
    from sd3tune.config.models import RunConfig
    from sd3tune.simpletuner import keys

    required = [f"{name}.{sub}" for name, f in RunConfig.model_fields.items() if f.is_required()
                for sub, g in f.annotation.model_fields.items() if g.is_required()]
    assert required and all(keys.KEY_BY_PATH[path].option in keys.REQUIRED_OPTIONS for path in required)


def test_a_run_written_before_the_compile_and_prefetch_settings_still_checks_clean(make_run):
    # SimpleTuner's defaults fill the gaps: dynamo_mode '' (unset) reads as torch.compile's default mode
    run, _ = make_run()
    for option in ("--dataloader_prefetch=true", "--dynamo_backend=no", "--dynamo_use_regional_compilation=true",
                   "--dynamo_mode=reduce-overhead", "--dynamo_wrapper=python"):
        extra_args(run, " " + option, "")
    assert "dynamo" not in env_path(run).read_text()
    result, _ = check(run)
    assert result.exit_code == 0, result.output
    assert "error" not in result.output


def test_cuda_graphs_with_the_cpp_wrapper_warn(make_run):
    # measured on an H100: SimpleTuner's default C++ Inductor wrapper skips CUDA graphs, so reduce-overhead does nothing
    run, _ = make_run()
    extra_args(run, "--dynamo_backend=no", "--dynamo_backend=inductor")
    extra_args(run, "--dynamo_wrapper=python", "--dynamo_wrapper=cpp")
    result, _ = check(run)
    assert result.exit_code == 0
    assert re.search(r"--dynamo_wrapper: dynamo_mode=reduce-overhead asks for CUDA graphs.* — set "
                     r"--dynamo_wrapper=python", _section(result.output, "warning"))
    extra_args(run, "--dynamo_wrapper=cpp", "--dynamo_wrapper=python")
    result, _ = check(run)
    assert "CUDA graphs" not in result.output


def test_summary_reports_memory_for_the_preset_and_warns_when_it_does_not_fit(make_run):
    import sd3tune.checks as checks

    run, _ = make_run()
    report = checks.check_run(run)
    assert report.summary.preset == "24gb" and 4 < report.summary.gpu_memory_gb < 24
    assert checks.gpu_memory_estimate(1, 1024**2, False, False) == 10.8  # reference profile: SimpleTuner, batch 1
    assert checks.gpu_memory_estimate(4, 1024**2, False, False) == 28.0
    assert checks.gpu_memory_estimate(1, 1024**2, True, False) == 10.6
    env_set(run, "RESOLUTION", "1024")
    backend_set(run, resolution=1024)
    env_set(run, "TRAIN_BATCH_SIZE", "4")
    result, _ = check(run)
    assert "does not fit the 24gb preset" in _section(result.output, "warning")


def test_bucket_smaller_than_batch_is_dropped_with_a_warning(make_run, tmp_path):
    """Images of an odd aspect ratio land in their own bucket; with a minimum size set SimpleTuner drops it."""
    from PIL import Image

    run, data = make_run()
    backend_set(run, crop=False)
    Image.new("RGB", (128, 64)).save(data / "wide.png")
    (data / "wide.txt").write_text("a wide one")
    result, _ = check(run)
    assert result.exit_code == 0, result.output
    assert "1 images sit in aspect buckets smaller than the batch" in result.output
    assert "[64x64: 8]" in result.output


def test_disk_space_for_caches_is_checked(make_run, monkeypatch):
    import sd3tune.checks as checks

    run, _ = make_run()
    monkeypatch.setattr(checks.shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(10**12, 10**12, 1000))
    report = checks.check_run(run)
    assert not report.ok
    assert any(f.key == "cache_dir" and "GiB" in f.message for f in report.errors)


def test_unreadable_config_file_is_a_finding_not_a_traceback(make_run, monkeypatch):
    import pathlib

    import sd3tune.checks as checks

    run, _ = make_run()
    read_text = pathlib.Path.read_text

    def deny(self, *args, **kwargs):
        if self.name == "config.env":
            raise PermissionError(13, "Permission denied", str(self))
        return read_text(self, *args, **kwargs)

    monkeypatch.setattr(pathlib.Path, "read_text", deny)
    report = checks.check_run(run)
    assert [f.render() for f in report.errors] == ["config.env: cannot be read: Permission denied — check the "
                                                   "file's permissions"]


def test_a_bug_in_one_rule_is_reported_and_the_other_rules_still_run(make_run, monkeypatch):
    import sd3tune.checks as checks

    def broken(ctx):
        raise KeyError("boom")

    run, _ = make_run()
    env_set(run, "OPTIMIZER", "adamw")
    monkeypatch.delenv("SD3TUNE_DEBUG", raising=False)
    monkeypatch.setattr(checks, "RULES", (broken, *checks.RULES))
    report = checks.check_run(run)
    assert any(f.key == "broken" and "internal error" in f.message for f in report.errors)
    assert any("OPTIMIZER" in f.key for f in report.errors)


def test_train_refuses_a_broken_run_before_launching(make_run, monkeypatch):
    from sd3tune.commands.train import TrainOptions, run_train
    from sd3tune.errors import ConfigError
    from sd3tune.simpletuner import launch

    def no_launch(*a, **k):
        raise AssertionError("SimpleTuner was launched")

    monkeypatch.setattr(launch, "run_plan", no_launch)
    monkeypatch.setattr("sd3tune.commands.train.run_plan", no_launch)
    run, _ = make_run()
    env_set(run, "OPTIMIZER", "adamw")
    with pytest.raises(ConfigError) as info:
        run_train(TrainOptions(run_dir=run))
    assert "OPTIMIZER" in str(info.value) and any("OPTIMIZER" in f.key for f in info.value.findings)
    assert not (run / "logs").exists() and not (run / "output").exists()


def test_real_process_output_names_the_culprits_without_traceback(make_run):
    run, data = make_run()
    ok = sd3tune("check", run)
    assert ok.code == 0 and "Traceback" not in ok.out + ok.err and ok.out.rstrip().endswith("ok (with warnings)")
    (data / "concept_03.png").write_bytes(b"garbage")
    env_set(run, "OPTIMIZER", "adamw")
    bad = sd3tune("check", run)
    assert "Traceback" not in bad.out + bad.err
    assert "concept_03.png" in bad.out and "OPTIMIZER" in bad.out and "check failed" in bad.out
    train = sd3tune("train", run)
    assert train.code == 2 and "Traceback" not in train.out + train.err
    assert "OPTIMIZER" in train.err and not (run / "logs").exists()


def test_real_process_check_exits_2_on_errors(make_run):
    run, _ = make_run()
    env_set(run, "OPTIMIZER", "adamw")
    assert sd3tune("check", run).code == 2


def test_check_imports_no_torch(make_run):
    """The whole `sd3tune check` path (CLI included) runs without torch, diffusers, transformers or SimpleTuner."""
    run, _ = make_run()
    code = ("import sys\n"
            "from sd3tune.cli import main\n"
            "try:\n"
            f"    main(['check', {str(run)!r}])\n"
            "except SystemExit as exc:\n"
            "    assert not exc.code, exc.code\n"
            "heavy = [m for m in ('torch', 'diffusers', 'transformers', 'simpletuner', 'accelerate') if m in sys.modules]\n"
            "assert not heavy, heavy\n"
            "print('clean')\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "clean" in proc.stdout, proc.stdout + proc.stderr


def test_a_run_folder_given_with_a_quoted_tilde_is_found(make_run):
    run, _ = make_run()
    home = run.parent
    for command in (["check"], ["train", "--dry-run"]):
        r = sd3tune(*command, f"~/{run.name}", env={"HOME": str(home)})
        assert r.code == 0, (command, r.err)


def test_a_copied_run_folder_is_refused_while_it_points_into_the_original(make_run):
    import shutil

    run, _ = make_run()
    copy = Path(shutil.copytree(run, run.with_name("copy")))
    r = sd3tune("check", copy)
    assert r.code == 2 and "inside another run's folder" in r.out and str(run) in r.out
    assert "OUTPUT_DIR" in r.out and "cache_dir_vae" in r.out
    assert sd3tune("check", run).code == 0  # the original is fine


def test_a_missing_required_option_is_named_in_the_runs_own_format(make_run):
    run, _ = make_run("json")
    config = json.loads((run / "config" / "config.json").read_text())
    del config["model_type"]
    (run / "config" / "config.json").write_text(json.dumps(config))
    r = sd3tune("check", run)
    assert r.code == 2 and "config.json:model_type: is not set — set model_type to lora" in r.out
