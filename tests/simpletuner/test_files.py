"""What `init` writes (golden files) and the round trip write -> SimpleTuner's parser / sd3tune's reader."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from sd3tune.config.models import RunConfig
from sd3tune.defaults import SD3M
from sd3tune.simpletuner.backends import ImageBackend, TextEmbedsBackend
from sd3tune.simpletuner.reader import read_run
from sd3tune.simpletuner.writer import render_backends, render_env, render_json

GOLDEN = Path(__file__).parents[1] / "golden"
UPDATE = os.environ.get("SD3TUNE_UPDATE_GOLDEN") == "1"


def reference_run() -> tuple[RunConfig, list]:
    cfg = RunConfig(paths={"output_dir": "/RUN/output", "data_backend_config": "/RUN/config/multidatabackend.json"},
                    validation={"prompt": "myst, a castle & a $(dragon) `at` \"dusk\"",
                                "prompt_library": "/RUN/config/validation_prompts.json"},
                    optim={"learning_rate": 2e-4, "lr_scheduler": "cosine", "lr_warmup_steps": 10},
                    tracking={"report_to": "tensorboard", "project_name": "art x"})
    backends = [ImageBackend(id="art", instance_data_dir="/DATA/art", cache_dir_vae="/RUN/cache/vae/art"),
                ImageBackend(id="sketches", instance_data_dir="/DATA/sketches", cache_dir_vae="/RUN/cache/vae/sketches",
                             repeats=3, instance_prompt="myst", prepend_instance_prompt=True, crop=True,
                             crop_style="center"),
                TextEmbedsBackend(id="text-embeds", dataset_type="text_embeds", cache_dir="/RUN/cache/text")]
    return cfg, backends


@pytest.mark.parametrize("name, render", [
    ("config.env", lambda cfg, b: render_env(cfg)),
    ("config.json", lambda cfg, b: render_json(cfg)),
    ("multidatabackend.json", lambda cfg, b: render_backends(b)),
])
def test_writers_match_golden_files(name, render):
    text = render(*reference_run())
    golden = GOLDEN / name
    if UPDATE:
        golden.write_text(text)
    assert text == golden.read_text(), f"{name} changed; review and rerun with SD3TUNE_UPDATE_GOLDEN=1"


@pytest.mark.parametrize("fmt", ["env", "json"])
def test_write_then_read_is_a_round_trip(tmp_path, fmt):
    cfg, backends = reference_run()
    cfg = cfg.model_copy(update={"paths": cfg.paths.model_copy(update={"output_dir": str(tmp_path / "output")})})
    (tmp_path / "config").mkdir()
    (tmp_path / "config" / f"config.{fmt}").write_text(render_env(cfg) if fmt == "env" else render_json(cfg))
    (tmp_path / "config" / "multidatabackend.json").write_text(render_backends(backends))
    run = read_run(tmp_path)
    assert run.findings == []
    assert run.config == cfg
    assert run.backends == backends


def test_default_true_options_are_turned_off_in_a_form_simpletuner_honours():
    text = render_env(reference_run()[0])
    assert "USE_GRADIENT_CHECKPOINTING" not in text  # KEY=false would be dropped by SimpleTuner
    extra = next(line for line in text.splitlines() if line.startswith("TRAINER_EXTRA_ARGS="))
    assert "--gradient_checkpointing=false" in extra


def test_simpletuner_reads_the_written_env_as_sd3m_lora(tmp_path):
    """SimpleTuner's own env loader turns our file into the CLI args we meant (SD3 Medium, LoRA, our dataset)."""
    from sd3tune.simpletuner.compat import install

    install()
    from simpletuner.helpers.configuration.env_file import load_env_config, parse_env_file

    cfg, _ = reference_run()
    path = tmp_path / "config.env"
    path.write_text(render_env(cfg))
    parsed = {k: " ".join(v) for k, v in parse_env_file(str(path)).items()}
    old = dict(os.environ)
    try:
        os.environ.update(parsed)
        args = load_env_config()
    finally:
        os.environ.clear()
        os.environ.update(old)
    assert "--model_type=lora" in args and "--model_family=sd3" in args
    assert f"--pretrained_model_name_or_path={SD3M}" in args
    assert "--data_backend_config=/RUN/config/multidatabackend.json" in args
    assert f"--validation_prompt={cfg.validation.prompt}" in args
    assert "--gradient_checkpointing=false" in args and "--lora_rank=16" in args


def test_backends_json_points_at_the_data_and_has_a_default_text_embeds():
    data = json.loads(render_backends(reference_run()[1]))
    assert data[0]["instance_data_dir"] == "/DATA/art" and data[0]["type"] == "local"
    assert data[-1] == {"id": "text-embeds", "type": "local", "dataset_type": "text_embeds", "default": True,
                       "cache_dir": "/RUN/cache/text"}


def test_options_simpletuners_env_loader_skips_go_to_extra_args(tmp_path):
    """TRAINER_DYNAMO_BACKEND is in SimpleTuner's env map but its loader drops it: compile must go in extra args."""
    cfg, backends = reference_run()
    cfg = cfg.model_copy(update={"extra": {"dynamo_backend": "inductor"}})
    text = render_env(cfg)
    assert "DYNAMO_BACKEND=" not in text
    assert "--dynamo_backend=inductor" in next(line for line in text.splitlines()
                                              if line.startswith("TRAINER_EXTRA_ARGS="))
    (tmp_path / "config").mkdir()
    (tmp_path / "config" / "config.env").write_text(text + "TRAINER_DYNAMO_BACKEND='inductor'\n")
    (tmp_path / "config" / "multidatabackend.json").write_text(render_backends(backends))
    findings = read_run(tmp_path).findings
    assert [(f.key.split(" ")[0], "--dynamo_backend" in f.hint) for f in findings] == [("TRAINER_DYNAMO_BACKEND", True)]


def _simpletuner_args(path: Path) -> list[str]:
    """The command line SimpleTuner's own env loader makes of a config.env (parse_env_file + load_env_config)."""
    from sd3tune.simpletuner.compat import install

    install()
    from simpletuner.helpers.configuration.env_file import load_env_config, parse_env_file

    parsed = {k: " ".join(v) for k, v in parse_env_file(str(path)).items()}
    old = dict(os.environ)
    try:
        os.environ.update(parsed)
        return load_env_config()
    finally:
        os.environ.clear()
        os.environ.update(old)


def _write_run(root: Path, env_text: str) -> None:
    (root / "config").mkdir(exist_ok=True)
    (root / "config" / "config.env").write_text(env_text)
    (root / "config" / "multidatabackend.json").write_text(render_backends(reference_run()[1]))


@pytest.mark.parametrize("extra_arg", ["--gradient_checkpointing=false", None])
def test_a_key_false_line_is_dropped_and_what_else_sets_the_flag_decides(tmp_path, extra_arg):
    text = render_env(reference_run()[0]) + "USE_GRADIENT_CHECKPOINTING=false\n"
    if extra_arg is None:
        text = text.replace(" --gradient_checkpointing=false", "")
    _write_run(tmp_path, text)
    theirs = [a for a in _simpletuner_args(tmp_path / "config" / "config.env") if "gradient_checkpointing" in a]
    assert theirs == ([extra_arg] if extra_arg else [])  # the KEY=false line gives SimpleTuner nothing
    run = read_run(tmp_path)
    [finding] = [f for f in run.findings if f.key.startswith("USE_GRADIENT_CHECKPOINTING")]
    if extra_arg:  # the extra arg turns it off, as meant: only the useless line is reported
        assert finding.severity == "warning" and "is off (set by TRAINER_EXTRA_ARGS" in finding.message
        assert run.config.precision.gradient_checkpointing is False
    else:  # nothing turns it off: SimpleTuner's default (on) applies
        assert finding.severity == "error" and "stays ON (its default)" in finding.message
        assert run.config.precision.gradient_checkpointing is True


def test_extra_args_win_over_keys_wherever_they_stand_in_the_file(tmp_path):
    """SimpleTuner appends TRAINER_EXTRA_ARGS after every KEY's option, so argparse takes the extra arg."""
    text = render_env(reference_run()[0]).replace("TRAINER_EXTRA_ARGS='", "TRAINER_EXTRA_ARGS='--learning_rate=0.0002 ")
    text = "\n".join(line for line in text.splitlines() if not line.startswith("LEARNING_RATE=")) + "\n"
    extra = next(line for line in text.splitlines() if line.startswith("TRAINER_EXTRA_ARGS="))
    _write_run(tmp_path, text.replace(extra, f"{extra}\nLEARNING_RATE='0.0001'"))  # the key comes after
    theirs = [a for a in _simpletuner_args(tmp_path / "config" / "config.env") if a.startswith("--learning_rate")]
    assert theirs == ["--learning_rate=0.0001", "--learning_rate=0.0002"]
    run = read_run(tmp_path)
    assert run.config.optim.learning_rate == 0.0002
    assert [f.key.split(" (")[0] for f in run.findings] == ["TRAINER_EXTRA_ARGS"]  # "also set by LEARNING_RATE"


@pytest.mark.parametrize("line, key, fix", [
    ("learning_rate='2e-4'", "learning_rate", "config.env keys are upper case: rename learning_rate to LEARNING_RATE"),
    ("max_train_steps=5", "max_train_steps", "SimpleTuner's config.env key for --max_train_steps is MAX_NUM_STEPS: "
                                             "rename max_train_steps to MAX_NUM_STEPS"),
    ("MAX_TRAIN_STEPS=5", "MAX_TRAIN_STEPS", "rename MAX_TRAIN_STEPS to MAX_NUM_STEPS"),
    ("lora_type=standard", "lora_type", "rename lora_type to LORA_TYPE"),
    ("flow_schedule_shift=3", "flow_schedule_shift", "no config.env key: add --flow_schedule_shift=VALUE to "
                                                     "TRAINER_EXTRA_ARGS"),
])
def test_a_key_simpletuner_does_not_map_gets_its_real_key_as_the_fix(tmp_path, line, key, fix):
    _write_run(tmp_path, render_env(reference_run()[0]) + line + "\n")
    value = line.split("=", 1)[1].strip("'")
    assert not [a for a in _simpletuner_args(tmp_path / "config" / "config.env") if a.endswith(f"={value}")
                and key.lower() in a], "SimpleTuner read the key after all"
    [finding] = read_run(tmp_path).findings
    assert finding.key.startswith(key) and "unknown key; SimpleTuner silently ignores it" in finding.message
    assert fix in finding.hint


def test_init_refuses_a_prompt_simpletuner_would_not_read_back_and_json_takes_it(tmp_path, data_copy):
    from helpers import assert_one_line_user_error, sd3tune

    prompt = "myst, a lighthouse\u2028at dusk"  # pasted text with a Unicode line separator
    result = sd3tune("init", tmp_path / "env", "--data", data_copy, "--validation-prompt", prompt)
    assert_one_line_user_error(result, "VALIDATION_PROMPT", "U+2028", "--format json")
    assert not (tmp_path / "env" / "config").exists()
    result = sd3tune("init", tmp_path / "json", "--data", data_copy, "--validation-prompt", prompt, "--format", "json",
                     env={"HF_HUB_OFFLINE": "0"})  # init's check: the default Hub model is not cached here
    assert result.code == 0, result.err
    assert read_run(tmp_path / "json").config.validation.prompt == prompt
