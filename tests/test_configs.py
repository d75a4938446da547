"""Every file shipped in configs/ is valid for the tool that reads it."""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers import sd3tune

from sd3tune.commands.generate import GenerateOptions, read_prompts
from sd3tune.commands.init import run_init
from sd3tune.prompts import read_prompts_file

CONFIGS = Path(__file__).parents[1] / "configs"


@pytest.mark.parametrize("path", sorted((CONFIGS / "accelerate").glob("*.yaml")), ids=lambda p: p.name)
def test_accelerate_configs_load_with_accelerate(path):
    from accelerate.commands.config.config_args import ClusterConfig

    cfg = ClusterConfig.from_yaml_file(str(path))
    assert cfg.distributed_type == "MULTI_GPU" and cfg.num_processes >= 2 and cfg.mixed_precision == "bf16"


def test_accelerate_config_reaches_the_launch_command(tiny_init_options):
    run_init(tiny_init_options)
    config = CONFIGS / "accelerate" / "multi_gpu.yaml"
    r = sd3tune("train", tiny_init_options.run_dir, "--dry-run", "--accelerate-config", config)
    assert r.code == 0 and f"--config_file {config}" in r.out


@pytest.mark.parametrize("path", sorted((CONFIGS / "prompts").glob("*.txt")), ids=lambda p: p.name)
def test_prompt_files_parse_for_evaluate_and_generate(path):
    prompts = read_prompts_file(path, trigger="myst")
    kinds = {p.kind for p in prompts}
    assert kinds == {"concept", "neutral"}
    texts = read_prompts(GenerateOptions(prompts_file=path))
    assert len(texts) == len(prompts) and not any(t.lower().startswith("neutral:") for t in texts)
