"""What `init` writes (golden files) and the round trip write -> SimpleTuner's parser / sd3tune's reader."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from sd3tune.config.dataset import ImageBackend, TextEmbedsBackend
from sd3tune.config.models import RunConfig
from sd3tune.defaults import SD3M
from sd3tune.simpletuner.files import read_run, render_backends, render_env, render_json

GOLDEN = Path(__file__).parents[1] / "golden"
UPDATE = os.environ.get("SD3TUNE_UPDATE_GOLDEN") == "1"


def reference_run() -> tuple[RunConfig, list]:
    cfg = RunConfig(paths={"output_dir": "/RUN/output", "data_backend_config": "/RUN/config/multidatabackend.json"},
                    validation={"prompt": "myst, a castle & a $(dragon) `at` \"dusk\""})
    backends = [ImageBackend(id="art", instance_data_dir="/DATA/art", cache_dir_vae="/RUN/cache/vae/art"),
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
    assert data[1] == {"id": "text-embeds", "type": "local", "dataset_type": "text_embeds", "default": True,
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
