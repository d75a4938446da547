"""`sd3tune init`: scaffold a run folder with SimpleTuner's config and dataset files, from typed models."""

from __future__ import annotations

import math
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pydantic import ValidationError

from sd3tune.checks import CheckReport, check_run
from sd3tune.checks.datasets import OVERSUBSCRIBE, caption_control_errors
from sd3tune.config.models import RunConfig
from sd3tune.config.presets import DEFAULT_PRESET, PRESETS, merge
from sd3tune.datascan import scan_folder
from sd3tune.defaults import SD3M
from sd3tune.errors import ConfigError, Sd3tuneError
from sd3tune.findings import Finding, error, plural, warning
from sd3tune.fsutil import absolute_model, atomic_write_text, refuse_existing
from sd3tune.knobs import KNOB_FLAGS, TEXT_EMBEDS_ID, DataSpec, Knobs, caption_settings, dataset_ids, parse_spec
from sd3tune.locks import folder_lock
from sd3tune.manifest import now, package_versions, update_manifest
from sd3tune.simpletuner import keys
from sd3tune.simpletuner.backends import ImageBackend, TextEmbedsBackend
from sd3tune.simpletuner.caches import run_bucket_suffix
from sd3tune.simpletuner.dataset import bucket_counts
from sd3tune.simpletuner.layout import RunPaths
from sd3tune.simpletuner.transparency import MANIFEST_KEY, MANIFEST_SECTION, parse_alpha_background
from sd3tune.simpletuner.writer import render_backends, render_env, render_json, render_prompt_library


@dataclass
class InitOptions:
    run_dir: Path
    data: Path | str  # a folder, or (from the command line) DIR:key=value,... (knobs.parse_spec)
    model: str = SD3M
    trigger: str | None = None
    validation_prompt: str | None = None
    preset: str = DEFAULT_PRESET
    resolution: int | None = None
    rank: int | None = None
    steps: int | None = None
    format: Literal["env", "json"] = "env"
    force: bool = False
    knobs: Knobs = field(default_factory=Knobs)  # --lr, --optimizer, --tracker, ...
    more_prompts: list[str] = field(default_factory=list)  # --validation-prompt given again: config/validation_prompts.json
    more_data: list[str | Path] = field(default_factory=list)  # --data given again (DIR or DIR:key=value,...)
    reg_data: list[str | Path] = field(default_factory=list)  # --reg-data: regularisation images
    caption_strategy: Literal["textfile", "filename", "instanceprompt"] | None = None  # None: from the folder
    caption_prefix: str | None = None  # put before every caption (SimpleTuner's prepend_instance_prompt)
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


# The flag behind a setting, so that errors name what the user typed.
FLAGS = {"lora.rank": "--rank", "data.resolution": "--resolution", "optim.max_train_steps": "--steps",
         "model.name_or_path": "--model", "validation.prompt": "--validation-prompt", "validation.resolution": "--resolution",
         **KNOB_FLAGS}


def _raise_validation(exc: ValidationError, source: str) -> None:
    findings = []
    for err in exc.errors():
        key = ".".join(str(p) for p in err["loc"])
        findings.append(error(source, FLAGS.get(key, key), f"{err.get('input')!r}: {err['msg']}"))
    first = findings[0]
    raise ConfigError(f"{first.key}: {first.message}", hint="see `sd3tune init --help` for valid values",
                      findings=findings)


def _folder(spec: DataSpec) -> Path:
    data = spec.folder.expanduser()
    if data.exists() and not data.is_dir():
        raise Sd3tuneError(f"{spec.flag} {data} is a file, not a folder", hint=f"pass {spec.flag} with the folder of images")
    if not data.is_dir():
        raise Sd3tuneError(f"data folder {data} does not exist", hint=f"pass {spec.flag} with a folder of images")
    return data.resolve()


def _datasets(opts: InitOptions) -> list[tuple[DataSpec, Path, Any]]:
    """Each --data / --reg-data: its spec, resolved folder and scan; a folder given twice is refused."""
    specs = [parse_spec(opts.data), *(parse_spec(d) for d in opts.more_data),
             *(parse_spec(d, "--reg-data") for d in opts.reg_data)]
    out, seen = [], {}
    for spec in specs:
        folder = _folder(spec)
        if folder in seen:
            raise Sd3tuneError(f"{spec.flag} {folder} is given twice (also as {seen[folder]})",
                               hint="give each folder once; use repeats=N to weight it")
        seen[folder] = spec.flag
        scan = scan_folder(folder)
        if not scan.images:
            raise Sd3tuneError(f"no readable images in {folder}",
                               hint="put .png/.jpg/.webp images (with .txt captions) in that folder")
        out.append((spec, folder, scan))
    return out


def build_run(opts: InitOptions) -> InitResult:
    """Validate flags and data and build the models (writes nothing)."""
    if opts.preset not in PRESETS:
        raise Sd3tuneError(f"unknown preset {opts.preset!r}", hint=f"use one of {', '.join(PRESETS)}")
    if opts.steps is not None and opts.steps < 1:
        raise Sd3tuneError(f"--steps {opts.steps} must be at least 1", hint="e.g. --steps 1500")
    parse_alpha_background(opts.alpha_background)  # a wrong colour fails before anything is read or written
    if opts.caption_prefix is not None and opts.caption_strategy == "instanceprompt":
        raise Sd3tuneError("--caption-prefix does nothing with --caption-strategy instanceprompt",
                           hint="the trigger is the whole caption there; drop one of the two")
    opts.knobs.check()
    datasets = _datasets(opts)
    for _, folder, scan in datasets:
        control = caption_control_errors(scan)
        if control:  # before a caption becomes the validation prompt: said as itself, nothing written
            more = f" (and {plural(len(control) - 1, 'more caption file')})" if len(control) > 1 else ""
            raise Sd3tuneError(f"{control[0].file}:{control[0].key}: {control[0].message}{more}", hint=control[0].hint)
    warnings: list[Finding] = []
    preset = PRESETS[opts.preset]
    if not preset.verified:
        warnings.append(warning("flags", "--preset", preset.caveat))
    # unreadable files, missing or empty captions: judged by check once the run is written (run_init)
    captioning = [caption_settings(spec, folder, scan.images, opts.caption_strategy, opts.trigger, opts.caption_prefix,
                             warnings) for spec, folder, scan in datasets]

    prompt = opts.validation_prompt
    if prompt is None:
        captioned = [i for i in datasets[0][2].images if i.caption]
        prompt = f"{opts.trigger}, concept art of a castle on a hill" if opts.trigger else (
            captioned[0].caption.splitlines()[0] if captioned else "concept art of a castle on a hill")

    run_dir = opts.run_dir.expanduser().resolve()
    paths = RunPaths(run_dir)
    flags: dict[str, dict[str, Any]] = {"model": {"name_or_path": absolute_model(opts.model)},
                                        "validation": {"prompt": prompt}}
    if opts.more_prompts:
        flags["validation"]["prompt_library"] = str(paths.prompts)
    if opts.resolution is not None:
        flags["data"] = {"resolution": opts.resolution}
        side = max(opts.resolution, keys.MEGAPIXEL_THRESHOLD)  # smaller numbers are read as megapixels
        flags["validation"]["resolution"] = f"{side}x{side}"
    if opts.rank is not None:
        flags["lora"] = {"rank": opts.rank}
    if opts.steps is not None:
        flags["optim"] = {"max_train_steps": opts.steps, "num_train_epochs": 0}
    sections = merge(preset.overrides, flags, opts.knobs.overrides(), opts.overrides)
    sections["paths"] = {"output_dir": str(paths.output), "data_backend_config": str(paths.backends)}
    try:
        config = RunConfig.model_validate(sections)
    except ValidationError as exc:
        _raise_validation(exc, "flags")

    backends = []
    for (spec, data, _), captions, ident in zip(datasets, captioning, dataset_ids([(s, f) for s, f, _ in datasets])):
        image = {"id": ident, "instance_data_dir": str(data), **captions,
                 "resolution": config.data.resolution, "resolution_type": config.data.resolution_type,
                 "cache_dir_vae": str(paths.cache / "vae" / ident),
                 "cache_file_suffix": run_bucket_suffix(ident, run_dir)}
        if config.data.minimum_image_size is not None:
            image["minimum_image_size"] = config.data.minimum_image_size
        if spec.regularisation:
            image["is_regularisation_data"] = True
        image.update(opts.image_backend_overrides)
        image.update({k: v for k, v in spec.options.items() if k != "id"})
        try:
            backends.append(ImageBackend.model_validate(image))
        except ValidationError as exc:
            _raise_validation(exc, f"{spec.flag} {spec.folder}")
    backends.append(TextEmbedsBackend(id=TEXT_EMBEDS_ID, dataset_type="text_embeds", default=True,
                                      cache_dir=str(paths.cache / "text")))
    warnings += _fill_small_buckets(config, [(b, scan.images) for b, (_, _, scan) in zip(backends, datasets)],
                                    opts.preset)
    return InitResult(paths, config, backends, [], warnings)


def _fill_small_buckets(config: RunConfig, datasets: list[tuple[ImageBackend, list]], preset: str) -> list[Finding]:
    """Aspect buckets with fewer images than one batch make SimpleTuner refuse to start ("zero usable batches"). init
    turns on SimpleTuner's --allow_dataset_oversubscription, which repeats the images of those buckets only, rather
    than lowering the batch of every image (the preset's speed). Not when a minimum image size is set (SimpleTuner
    then drops those buckets, as check says), nor over the dataset's own repeats or the caller's own choice. The
    option covers every dataset: one warning names each dataset's small buckets."""
    if OVERSUBSCRIBE in config.extra:
        return []
    batch = config.optim.train_batch_size * config.optim.gradient_accumulation_steps
    found = []  # (dataset id, its image count, its small buckets)
    for image, images in datasets:
        e = image.effective(config.data)
        if e.minimum_image_size or image.repeats:
            continue
        counts = bucket_counts(images, e.resolution, e.resolution_type, image.crop and image.crop_aspect == "square")
        small = {k: n for k, n in sorted(counts.items()) if n < batch}
        if small:
            found.append((image.id, len(images), small))
    if not found:
        return []
    config.extra[OVERSUBSCRIBE] = True
    most = max(math.ceil(batch / n) for _, _, small in found for n in small.values())
    count = sum(sum(small.values()) for _, _, small in found)
    listed = [(f"{plural(sum(small.values()), 'image')} of {total}", ident,
               ", ".join(f"{w}x{h}: {n}" for (w, h), n in small.items())) for ident, total, small in found]
    if len(datasets) == 1:
        [(what, _, buckets)] = listed
        where = f"{what} {'sits' if count == 1 else 'sit'} in aspect buckets smaller than the batch of {batch} ({buckets})"
    else:  # name each dataset: the option repeats the small buckets' images of all of them
        held = [f"{what} in dataset {ident} ({buckets})" for what, ident, buckets in listed]
        where = (f"aspect buckets smaller than the batch of {batch} hold "
                 + (f"{', '.join(held[:-1])} and {held[-1]}" if len(held) > 1 else held[0]))
    said = (f"{where}, which SimpleTuner refuses; init turned on --{OVERSUBSCRIBE}: "
            f"SimpleTuner repeats only those images to fill a batch (each up to {most}x per epoch), and the batch "
            f"stays {batch} as the {preset} preset sets it, rather than shrinking for every image")
    return [warning("flags", "--preset", said, "to train every image equally often, crop to square (crop true, "
                    f"crop_aspect square in {keys.BACKENDS_FILE}), add images of those shapes, or use a smaller batch "
                    "(--preset 24gb)")]


def run_init(opts: InitOptions) -> InitResult:
    """Write ``config/config.env`` (or ``config.json``) and ``config/multidatabackend.json`` for a new run.

    Nothing is written when any flag or the data folder is wrong, or when a config exists and ``force`` is off.
    The written run is then checked as `sd3tune check` would (``result.check``): what train would refuse shows now.
    """
    result = build_run(opts)
    paths = result.paths
    config_file = paths.config_file(opts.format)
    others = [p for p in (paths.env, paths.json, paths.toml) if p != config_file]
    refuse_existing([paths.env, paths.json, paths.toml, paths.backends, paths.prompts], opts.force)
    text = render_env(result.config) if opts.format == "env" else render_json(result.config)
    backends_text = render_backends(result.backends)
    prompts = render_prompt_library(opts.more_prompts) if opts.more_prompts else None
    with folder_lock(paths.root, "init") if paths.root.is_dir() else nullcontext():  # refused while it trains
        atomic_write_text(paths.backends, backends_text)
        if prompts is not None:
            atomic_write_text(paths.prompts, prompts)
        else:  # with --force: no stale library beside a config that no longer names it
            paths.prompts.unlink(missing_ok=True)
        atomic_write_text(config_file, text)
        for other in others:  # with --force: a leftover config.json would silently shadow config.env
            other.unlink(missing_ok=True)
    update_manifest(paths.root, "init", {
        "created": now(), "preset": opts.preset, "format": opts.format, "data": result.backends[0].instance_data_dir,
        "datasets": [b.instance_data_dir for b in result.backends if isinstance(b, ImageBackend)],
        "model": result.config.model.name_or_path, "trigger": opts.trigger, "versions": package_versions("simpletuner"),
    })
    update_manifest(paths.root, MANIFEST_SECTION, {MANIFEST_KEY: parse_alpha_background(opts.alpha_background)})
    result.written = [config_file, paths.backends, *([paths.prompts] if prompts is not None else [])]
    result.check = check_run(paths.root)
    return result


# --- `sd3tune init` on the command line (sd3tune.cli loads it when the command runs or shows its help) ---

import shlex  # noqa: E402
from typing import Annotated, Optional  # noqa: E402

import typer  # noqa: E402

from sd3tune.checks.render import render_report  # noqa: E402
from sd3tune.cli import command_app  # noqa: E402
from sd3tune.commands.options import (Format, Preset, RunDir, choice_parser, choices, parse_format,  # noqa: E402
                                      parse_preset)
from sd3tune.simpletuner.layout import output_conflict  # noqa: E402

app = command_app()


CaptionStrategy = choices("CaptionStrategy", ("textfile", "filename", "instanceprompt"))


def _refuse_caption_strategy(value: str) -> None:
    raise Sd3tuneError(f"--caption-strategy {value!r} is not textfile, filename or instanceprompt",
                       hint="e.g. --caption-strategy textfile")


parse_caption_strategy = choice_parser(CaptionStrategy, _refuse_caption_strategy)
Opt = typer.Option


@app.command("init")
def init_command(
    run_dir: RunDir,
    data: Annotated[list[str], Opt("--data", help="Folder of training images (+ .txt captions); repeat for several "
                                                  "datasets, each DIR or DIR:repeats=3,resolution=768,crop=center "
                                                  "(also probability=P, id=NAME).")],
    model: Annotated[str, Opt("--model", help="Hub id or local diffusers folder.")] = SD3M,
    trigger: Annotated[Optional[str], Opt("--trigger", help="Trigger word of the concept.")] = None,
    validation_prompt: Annotated[Optional[list[str]], Opt("--validation-prompt", help="Prompt sampled during training; "
                                                                                      "repeat for several.")] = None,
    preset: Annotated[Preset, Opt("--preset", help="GPU memory preset: 8gb, 12gb, 16gb, 24gb or 80gb (below 24gb "
                                                   "unverified).", parser=parse_preset)] = Preset("24gb"),
    resolution: Annotated[Optional[int], Opt("--resolution", help="Training resolution in pixels.")] = None,
    rank: Annotated[Optional[int], Opt("--rank", help="LoRA rank.")] = None,
    steps: Annotated[Optional[int], Opt("--steps", help="Training steps.")] = None,
    reg_data: Annotated[Optional[list[str]], Opt("--reg-data", help="Regularisation (prior) images: DIR or "
                                                                    "DIR:probability=0.3,...; repeatable. Captioned "
                                                                    "by their .txt files (else file names), never "
                                                                    "with the trigger.")] = None,
    lr: Annotated[Optional[float], Opt("--lr", help="Peak learning rate (default 1e-4).")] = None,
    batch_size: Annotated[Optional[int], Opt("--batch-size", help="Images per step per GPU (preset's).")] = None,
    grad_accum: Annotated[Optional[int], Opt("--grad-accum", help="Steps accumulated per update (1).")] = None,
    optimizer: Annotated[Optional[str], Opt("--optimizer", help="SimpleTuner optimizer (torch-adamw; adamw_bf16, "
                                                                "prodigy, ...).")] = None,
    scheduler: Annotated[Optional[str], Opt("--scheduler", help="constant, constant_with_warmup, linear, cosine, "
                                                                "cosine_with_restarts, polynomial or sine.")] = None,
    warmup_steps: Annotated[Optional[int], Opt("--warmup-steps", help="Warm-up steps (0).")] = None,
    alpha: Annotated[Optional[float], Opt("--alpha", help="LoRA alpha (default: the rank).")] = None,
    checkpoint_every: Annotated[Optional[int], Opt("--checkpoint-every", help="Save a checkpoint every N steps.")] = None,
    validate_every: Annotated[Optional[int], Opt("--validate-every", help="Sample validation images every N steps.")] = None,
    seed: Annotated[Optional[int], Opt("--seed", help="Training seed (42).")] = None,
    tracker: Annotated[Optional[str], Opt("--tracker", help="none, wandb (WANDB_MODE=offline works offline) or "
                                                            "tensorboard (event files under RUN_DIR/output/logs).")] = None,
    tracker_project: Annotated[Optional[str], Opt("--tracker-project", help="Tracker project name.")] = None,
    tracker_run: Annotated[Optional[str], Opt("--tracker-run", help="Tracker run name.")] = None,
    caption_strategy: Annotated[Optional[CaptionStrategy], Opt("--caption-strategy", parser=parse_caption_strategy,
                                                               help="textfile, filename or instanceprompt (default: "
                                                                    "from the folder); --data only.")] = None,
    caption_prefix: Annotated[Optional[str], Opt("--caption-prefix", help="Put this (e.g. the trigger) and a space "
                                                                          "before every --data caption.")] = None,
    fmt: Annotated[Format, Opt("--format", help="Config file format: env (config.env) or json.", parser=parse_format)] = Format("env"),
    force: Annotated[bool, Opt("--force", help="Overwrite an existing run's config; keeps nothing of it, hand edits "
                                               "included (change one setting with `sd3tune set` instead).")] = False,
    alpha_background: Annotated[str, typer.Option(
        "--alpha-background", help="Images with transparency train composited on this colour (white, black, "
                                   "#rrggbb), or `refuse` makes check refuse them.")] = "white",
) -> None:
    """Scaffold a run: SimpleTuner config.env (or config.json) and multidatabackend.json.

    `init --force` rewrites the config from the flags alone: edits made since are lost. `sd3tune set RUN KEY=VALUE`
    changes one setting and keeps the rest of the file.

    \b
    examples:
      sd3tune init runs/art --data ~/art --trigger myst
      sd3tune init runs/art --data ~/art --preset 80gb --steps 2000 --format json
      sd3tune init runs/art --data ~/art --data ~/sketches:repeats=3 --lr 2e-4 --tracker tensorboard
    """
    prompts = validation_prompt or []
    knobs = Knobs(lr=lr, batch_size=batch_size, grad_accum=grad_accum, optimizer=optimizer, scheduler=scheduler,
                  warmup_steps=warmup_steps, alpha=alpha, checkpoint_every=checkpoint_every,
                  validate_every=validate_every, seed=seed, tracker=tracker, tracker_project=tracker_project,
                  tracker_run=tracker_run)
    result = run_init(InitOptions(run_dir=run_dir, data=data[0], more_data=data[1:], reg_data=reg_data or [],
                                  model=model, trigger=trigger, validation_prompt=prompts[0] if prompts else None,
                                  more_prompts=prompts[1:], preset=preset.value, resolution=resolution, rank=rank,
                                  steps=steps, format=fmt.value, force=force, knobs=knobs,  # type: ignore[arg-type]
                                  caption_strategy=caption_strategy.value if caption_strategy else None,  # type: ignore[arg-type]
                                  caption_prefix=caption_prefix, alpha_background=alpha_background))
    for finding in result.warnings:
        typer.echo(f"{finding.severity}: {finding.render()}", err=True)
    for path in result.written:
        typer.echo(f"wrote {path}")
    typer.echo(render_report(result.check))
    if not result.check.ok:  # written, but train would refuse it: `init ... && sd3tune train ...` stops here
        raise typer.Exit(2)
    if not output_conflict(Path(result.config.paths.output_dir), resume=False, steps=None):
        typer.echo(f"next: sd3tune train {shlex.quote(str(run_dir))}")
