"""`sd3tune init`: scaffold a run folder with SimpleTuner's config and dataset files, from typed models."""

from __future__ import annotations

import re
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pydantic import ValidationError

from sd3tune.checks import CheckReport, check_run
from sd3tune.config.models import RunConfig
from sd3tune.config.presets import DEFAULT_PRESET, PRESETS, merge
from sd3tune.datascan import scan_folder
from sd3tune.defaults import SD3M
from sd3tune.errors import ConfigError, Sd3tuneError
from sd3tune.findings import Finding, error, warning
from sd3tune.fsutil import absolute_model, atomic_write_text, refuse_existing
from sd3tune.locks import folder_lock
from sd3tune.manifest import now, package_versions, update_manifest
from sd3tune.simpletuner import keys
from sd3tune.simpletuner.backends import ImageBackend, TextEmbedsBackend
from sd3tune.simpletuner.caches import run_bucket_suffix
from sd3tune.simpletuner.layout import RunPaths
from sd3tune.simpletuner.transparency import MANIFEST_KEY, MANIFEST_SECTION, parse_alpha_background
from sd3tune.simpletuner.writer import render_backends, render_env, render_json


@dataclass
class InitOptions:
    run_dir: Path
    data: Path
    model: str = SD3M
    trigger: str | None = None
    validation_prompt: str | None = None
    preset: str = DEFAULT_PRESET
    resolution: int | None = None
    rank: int | None = None
    steps: int | None = None
    format: Literal["env", "json"] = "env"
    force: bool = False
    alpha_background: str = "white"  # images with transparency: white, black, #rrggbb, or refuse (transparency.py)
    # Section overrides on top of the preset (used by quickstart and Python callers).
    overrides: dict[str, dict[str, Any]] = field(default_factory=dict)
    image_backend_overrides: dict[str, Any] = field(default_factory=dict)


@dataclass
class InitResult:
    paths: RunPaths
    config: RunConfig
    backends: list
    written: list[Path]
    warnings: list[Finding]  # init's own: the preset's caveat, how captions were chosen
    check: CheckReport | None = None  # `sd3tune check` of the written run (data, captions, buckets, memory, ...)


def _dataset_id(folder: Path) -> str:
    ident = re.sub(r"[^A-Za-z0-9_-]+", "-", folder.name).strip("-")
    return ident or "images"


# The flag behind a setting, so that errors name what the user typed.
FLAGS = {"lora.rank": "--rank", "data.resolution": "--resolution", "optim.max_train_steps": "--steps",
         "model.name_or_path": "--model", "validation.prompt": "--validation-prompt", "validation.resolution": "--resolution"}


def _raise_validation(exc: ValidationError, source: str) -> None:
    findings = []
    for err in exc.errors():
        key = ".".join(str(p) for p in err["loc"])
        findings.append(error(source, FLAGS.get(key, key), f"{err.get('input')!r}: {err['msg']}"))
    first = findings[0]
    raise ConfigError(f"{first.key}: {first.message}", hint="see `sd3tune init --help` for valid values",
                      findings=findings)


def build_run(opts: InitOptions) -> InitResult:
    """Validate flags and data and build the models (writes nothing)."""
    if opts.preset not in PRESETS:
        raise Sd3tuneError(f"unknown preset {opts.preset!r}", hint=f"use one of {', '.join(PRESETS)}")
    data = opts.data.expanduser()
    if data.exists() and not data.is_dir():
        raise Sd3tuneError(f"--data {data} is a file, not a folder", hint="pass --data with the folder of images")
    if not data.is_dir():
        raise Sd3tuneError(f"data folder {data} does not exist", hint="pass --data with a folder of images")
    data = data.resolve()
    if opts.steps is not None and opts.steps < 1:
        raise Sd3tuneError(f"--steps {opts.steps} must be at least 1", hint="e.g. --steps 1500")
    parse_alpha_background(opts.alpha_background)  # a wrong colour fails before anything is read or written
    scan = scan_folder(data)
    if not scan.images:
        raise Sd3tuneError(f"no readable images in {data}",
                           hint="put .png/.jpg/.webp images (with .txt captions) in that folder")
    warnings: list[Finding] = []
    preset = PRESETS[opts.preset]
    if not preset.verified:
        warnings.append(warning("flags", "--preset", preset.caveat))
    # unreadable files, missing or empty captions: judged by check once the run is written (run_init)
    captioned = [i for i in scan.images if i.caption]
    if captioned:
        strategy = "textfile"
        if opts.trigger and any(opts.trigger not in i.caption for i in captioned):
            missing = sum(opts.trigger not in i.caption for i in captioned)
            warnings.append(warning(str(data), "", f"{missing} captions do not contain the trigger {opts.trigger!r}",
                                    "add it to the captions so the LoRA binds to it"))
    elif opts.trigger:
        strategy = "instanceprompt"
    else:
        strategy = "filename"
        warnings.append(warning(str(data), "", "no .txt captions: file names are used as captions",
                                "add captions, or pass --trigger WORD to caption every image with it"))

    prompt = opts.validation_prompt
    if prompt is None:
        prompt = f"{opts.trigger}, concept art of a castle on a hill" if opts.trigger else (
            captioned[0].caption.splitlines()[0] if captioned else "concept art of a castle on a hill")

    run_dir = opts.run_dir.expanduser().resolve()
    paths = RunPaths(run_dir)
    flags: dict[str, dict[str, Any]] = {"model": {"name_or_path": absolute_model(opts.model)},
                                        "validation": {"prompt": prompt}}
    if opts.resolution is not None:
        flags["data"] = {"resolution": opts.resolution}
        side = max(opts.resolution, keys.MEGAPIXEL_THRESHOLD)  # smaller numbers are read as megapixels
        flags["validation"]["resolution"] = f"{side}x{side}"
    if opts.rank is not None:
        flags["lora"] = {"rank": opts.rank}
    if opts.steps is not None:
        flags["optim"] = {"max_train_steps": opts.steps, "num_train_epochs": 0}
    sections = merge(preset.overrides, flags, opts.overrides)
    sections["paths"] = {"output_dir": str(paths.output), "data_backend_config": str(paths.backends)}
    try:
        config = RunConfig.model_validate(sections)
    except ValidationError as exc:
        _raise_validation(exc, "flags")

    ident = _dataset_id(data)
    image = {"id": ident, "instance_data_dir": str(data), "caption_strategy": strategy,
             "resolution": config.data.resolution, "resolution_type": config.data.resolution_type,
             "cache_dir_vae": str(paths.cache / "vae" / ident),
             "cache_file_suffix": run_bucket_suffix(ident, run_dir)}
    if strategy == "instanceprompt":
        image["instance_prompt"] = opts.trigger
    if config.data.minimum_image_size is not None:
        image["minimum_image_size"] = config.data.minimum_image_size
    image.update(opts.image_backend_overrides)
    try:
        backends = [ImageBackend.model_validate(image),
                    TextEmbedsBackend.model_validate({"id": "text-embeds", "dataset_type": "text_embeds",
                                                      "default": True, "cache_dir": str(paths.cache / "text")})]
    except ValidationError as exc:
        _raise_validation(exc, "multidatabackend")
    return InitResult(paths, config, backends, [], warnings)


def run_init(opts: InitOptions) -> InitResult:
    """Write ``config/config.env`` (or ``config.json``) and ``config/multidatabackend.json`` for a new run.

    Nothing is written when any flag or the data folder is wrong, or when a config exists and ``force`` is off.
    The written run is then checked as `sd3tune check` would (``result.check``): what train would refuse shows now.
    """
    result = build_run(opts)
    paths = result.paths
    config_file = paths.config_file(opts.format)
    others = [p for p in (paths.env, paths.json, paths.toml) if p != config_file]
    refuse_existing([paths.env, paths.json, paths.toml, paths.backends], opts.force)
    text = render_env(result.config) if opts.format == "env" else render_json(result.config)
    backends_text = render_backends(result.backends)
    with folder_lock(paths.root, "init") if paths.root.is_dir() else nullcontext():  # refused while it trains
        atomic_write_text(paths.backends, backends_text)
        atomic_write_text(config_file, text)
        for other in others:  # with --force: a leftover config.json would silently shadow config.env
            other.unlink(missing_ok=True)
    update_manifest(paths.root, "init", {
        "created": now(), "preset": opts.preset, "format": opts.format, "data": str(opts.data.expanduser().resolve()),
        "model": result.config.model.name_or_path, "trigger": opts.trigger, "versions": package_versions("simpletuner"),
    })
    update_manifest(paths.root, MANIFEST_SECTION, {MANIFEST_KEY: parse_alpha_background(opts.alpha_background)})
    result.written = [config_file, paths.backends]
    result.check = check_run(paths.root)
    return result


# --- `sd3tune init` on the command line (sd3tune.cli loads it when the command runs or shows its help) ---

import shlex  # noqa: E402
from typing import Annotated, Optional  # noqa: E402

import typer  # noqa: E402

from sd3tune.checks.render import render_report  # noqa: E402
from sd3tune.cli import command_app  # noqa: E402
from sd3tune.commands.options import Format, Preset, RunDir, parse_format, parse_preset  # noqa: E402
from sd3tune.simpletuner.layout import output_conflict  # noqa: E402

app = command_app()


@app.command("init")
def init_command(
    run_dir: RunDir,
    data: Annotated[Path, typer.Option("--data", help="Folder of training images (+ .txt captions).")],
    model: Annotated[str, typer.Option("--model", help="Hub id or local diffusers folder.")] = SD3M,
    trigger: Annotated[Optional[str], typer.Option("--trigger", help="Trigger word of the concept.")] = None,
    validation_prompt: Annotated[Optional[str], typer.Option("--validation-prompt", help="Prompt sampled during training.")] = None,
    preset: Annotated[Preset, typer.Option("--preset", help="GPU memory preset: 16gb, 24gb or 80gb.", parser=parse_preset)] = Preset("24gb"),
    resolution: Annotated[Optional[int], typer.Option("--resolution", help="Training resolution in pixels.")] = None,
    rank: Annotated[Optional[int], typer.Option("--rank", help="LoRA rank (alpha = rank).")] = None,
    steps: Annotated[Optional[int], typer.Option("--steps", help="Training steps.")] = None,
    fmt: Annotated[Format, typer.Option("--format", help="Config file format: env (config.env) or json.", parser=parse_format)] = Format("env"),
    force: Annotated[bool, typer.Option("--force", help="Overwrite an existing config.")] = False,
    alpha_background: Annotated[str, typer.Option(
        "--alpha-background", help="Images with transparency train composited on this colour (white, black, "
                                   "#rrggbb), or `refuse` makes check refuse them.")] = "white",
) -> None:
    """Scaffold a run: SimpleTuner config.env (or config.json) and multidatabackend.json.

    \b
    examples:
      sd3tune init runs/art --data ~/art --trigger myst
      sd3tune init runs/art --data ~/art --preset 80gb --steps 2000 --format json
    """
    result = run_init(InitOptions(run_dir=run_dir, data=data, model=model, trigger=trigger,
                                  validation_prompt=validation_prompt, preset=preset.value, resolution=resolution,
                                  rank=rank, steps=steps, format=fmt.value, force=force,  # type: ignore[arg-type]
                                  alpha_background=alpha_background))
    for finding in result.warnings:
        typer.echo(f"{finding.severity}: {finding.render()}", err=True)
    for path in result.written:
        typer.echo(f"wrote {path}")
    typer.echo(render_report(result.check))
    if not result.check.ok:  # written, but train would refuse it: `init ... && sd3tune train ...` stops here
        raise typer.Exit(2)
    if not output_conflict(Path(result.config.paths.output_dir), resume=False, steps=None):
        typer.echo(f"next: sd3tune train {shlex.quote(str(run_dir))}")
