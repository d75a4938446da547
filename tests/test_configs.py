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


@pytest.mark.parametrize("path,extra,processes", [("multi_gpu.yaml", [], "2 processes"),
                                                  ("multi_node.yaml", ["--machine_rank", "1"], "16 processes")],
                         ids=["multi_gpu", "multi_node-node1"])
def test_accelerate_configs_dry_run_and_accelerate_accepts_the_launch(tiny_init_options, path, extra, processes):
    """--dry-run of each shipped file: sd3tune reads the processes (check counts them all), and the launch it prints
    passes accelerate's own validation (the function `accelerate launch` runs before it starts anything)."""
    import shlex

    from accelerate.commands.launch import _validate_launch_command, launch_command_parser

    tiny_init_options.image_backend_overrides["repeats"] = 3  # 8 images x 4 fill 16 processes x batch 2
    run_init(tiny_init_options)
    config = CONFIGS / "accelerate" / path
    r = sd3tune("train", tiny_init_options.run_dir, "--dry-run", "--accelerate-config", config, "--", *extra)
    assert r.code == 0, r.err
    argv = shlex.split(r.out.strip().splitlines()[-1].partition(" -m accelerate.commands.launch ")[2])
    args, defaults, _ = _validate_launch_command(launch_command_parser().parse_args(argv))
    assert defaults.distributed_type == "MULTI_GPU" and args.multi_gpu and args.num_processes >= 2
    assert args.machine_rank == int(extra[1] if extra else 0) < args.num_machines
    c = sd3tune("check", tiny_init_options.run_dir, "--accelerate-config", config)
    assert f"({processes} x batch x accumulation)" in c.out


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
