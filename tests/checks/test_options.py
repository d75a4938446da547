"""Rules on the run's options (checks/options.py): extra options, SimpleTuner's traps, steps, LoRA and prompts, the
base model."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from check_helpers import (Case, assert_fails_naming_the_culprit, check, env_del, env_line, env_set, extra_args,
                           json_edit, json_path, section)


def fake_model(tmp: Path, class_name: str, parts: tuple[str, ...] = ()) -> Path:
    folder = tmp / f"fake-{class_name}"
    folder.mkdir()
    (folder / "model_index.json").write_text(json.dumps({"_class_name": class_name, "transformer": ["x", "y"]}))
    for p in parts:
        (folder / p).mkdir()
    return folder


# (id, config format, break(run, data, tmp) -> optional other path to check, strings the output must contain)
CASES: list[Case] = [
    # config.env: types, unknown keys, choices, syntax
    ("env-wrong-type-extra-arg", "env", lambda r, d, t: extra_args(r, "", "--aspect_bucket_rounding=two"),
     ("aspect_bucket_rounding", "not an integer")),
    ("env-bad-choice-extra-arg", "env", lambda r, d, t: extra_args(r, "", "--lora_type=loraa"),
     ("lora_type", "standard")),
    # the SimpleTuner traps
    ("trap-validation-megapixels", "env", lambda r, d, t: env_set(r, "VALIDATION_RESOLUTION", "64"),
     ("VALIDATION_RESOLUTION", "megapixels")),
    ("trap-optimizer-adamw", "env", lambda r, d, t: env_set(r, "OPTIMIZER", "adamw"), ("OPTIMIZER", "torch-adamw")),
    ("trap-use-dora", "env", lambda r, d, t: env_line(r, "USE_DORA='true'"), ("USE_DORA",)),
    ("trap-steps-and-epochs", "env", lambda r, d, t: env_set(r, "NUM_EPOCHS", "3"), ("NUM_EPOCHS", "MAX_NUM_STEPS")),
    ("trap-steps-with-default-epochs", "env", lambda r, d, t: env_del(r, "NUM_EPOCHS"), ("NUM_EPOCHS=0",)),
    # steps
    ("steps-nothing-to-train", "env", lambda r, d, t: env_set(r, "MAX_NUM_STEPS", "0"), ("MAX_NUM_STEPS",)),
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
    ("json-steps-and-epochs", "json", lambda r, d, t: json_edit(json_path(r), lambda c: c.update(num_train_epochs=2)),
     ("num_train_epochs",)),
    ("json-optimizer-adamw", "json", lambda r, d, t: json_edit(json_path(r), lambda c: c.update(optimizer="adamw")),
     ("optimizer", "torch-adamw")),
]


@pytest.mark.parametrize("case_id, fmt, breaker, needles", CASES, ids=[c[0] for c in CASES])
def test_a_broken_run_fails_naming_the_culprit(make_run, tmp_path, case_id, fmt, breaker, needles):
    assert_fails_naming_the_culprit(make_run, tmp_path, fmt, breaker, needles)


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
                                      "as megapixels" in section(result.output, "error")
    json_edit(json_path(run), lambda c: c.update(validation_resolution=512.5))
    result, _ = check(run)
    assert result.exit_code == 2 and "validation_resolution" in section(result.output, "error")


def test_gated_sd3m_without_a_token_warns_and_a_token_in_the_xdg_cache_counts(make_run, tmp_path):
    run, _ = make_run()
    env_set(run, "MODEL_NAME", "stabilityai/stable-diffusion-3-medium-diffusers")
    env = {"XDG_CACHE_HOME": str(tmp_path / "xdg"), "HF_HOME": None, "HF_HUB_CACHE": None, "HF_TOKEN": None,
           "HUGGING_FACE_HUB_TOKEN": None, "HF_TOKEN_PATH": None, "HF_HUB_OFFLINE": None}
    result, _ = check(run, env=env)
    assert "is gated and no Hugging Face token was found" in section(result.output, "warning")
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
    warnings = section(result.output, "warning")
    assert "images.caption_strategy: 1 captions exceed about 154 T5 tokens" in warnings
    assert "captions exceed CLIP's 77 tokens" in warnings
    assert re.search(r"VALIDATION_PROMPT \(line \d+\): about \d+ CLIP tokens", warnings)
    assert "VALIDATION_STEPS" in warnings  # 250 > 4 steps: no validation image would be made


def test_lora_alpha_other_than_rank_warns(make_run):
    run, _ = make_run()
    extra_args(run, "--lora_alpha=16.0", "--lora_alpha=4")
    result, _ = check(run)
    assert result.exit_code == 0
    assert "TRAINER_EXTRA_ARGS (line 69) --lora_alpha: alpha 4 != rank 16" in section(result.output, "warning")


def test_cuda_graphs_with_the_cpp_wrapper_warn(make_run):
    # measured on an H100: SimpleTuner's default C++ Inductor wrapper skips CUDA graphs, so reduce-overhead does nothing
    run, _ = make_run()
    extra_args(run, "--dynamo_backend=no", "--dynamo_backend=inductor")
    extra_args(run, "--dynamo_wrapper=python", "--dynamo_wrapper=cpp")
    result, _ = check(run)
    assert result.exit_code == 0
    assert re.search(r"--dynamo_wrapper: dynamo_mode=reduce-overhead asks for CUDA graphs.* — set "
                     r"--dynamo_wrapper=python", section(result.output, "warning"))
    extra_args(run, "--dynamo_wrapper=cpp", "--dynamo_wrapper=python")
    result, _ = check(run)
    assert "CUDA graphs" not in result.output
