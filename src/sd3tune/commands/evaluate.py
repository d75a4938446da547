"""`sd3tune evaluate`: a fixed prompt x seed grid for the base model, the LoRA and (optionally) its checkpoints,
from ONE pipeline load (``evalgen``), scored with CLIP-based metrics (``evaluation``), each candidate compared with
the base model on the same prompts and seeds (``stats``); writes metrics.json, a contact sheet and a report with how
the run trained (``runsummary``)."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sd3tune.defaults import DEFAULT_CLIP
from sd3tune.errors import Sd3tuneError
from sd3tune.findings import plural
from sd3tune.locks import LOCK_NAME, folder_lock
from sd3tune.report import OUTPUT_FILES

if TYPE_CHECKING:
    from sd3tune.evaluation import Candidate

CHECKPOINT_CHOICES = ("latest", "all", "N,M,...")
EVAL_DIR = "eval"  # default --out, inside the run folder


@dataclass
class EvaluateOptions:
    run_dir: Path
    prompts_file: Path | None = None  # one prompt per line; "neutral: ..." marks a neutral prompt
    seeds: int = 4  # seeds 0..N-1 for every prompt and model
    checkpoints: str = "latest"  # latest: base vs the run's LoRA; all: also every checkpoint-N; N,M: those steps
    model: str | None = None  # base model (default: the run's)
    clip_model: str | None = None  # default: the run's manifest "defaults.clip_model", else DEFAULT_CLIP
    out: Path | None = None  # default RUN_DIR/eval
    steps: int | None = None
    guidance: float | None = None
    device: str = "auto"
    dtype: str = "auto"
    batch_size: int = 4
    lora: Path | None = None  # Python API only: evaluate this LoRA (file/folder) instead of the run's latest
    lora_scale: float = 1.0  # Python API only: LoRA strength for the LoRA and checkpoint columns
    force: bool = False  # replace a previous evaluation in ``out`` (only the files evaluate writes)


@dataclass
class EvaluateResult:
    out: Path
    metrics_file: Path
    sheet: Path
    report: Path
    report_html: Path
    metrics: dict[str, Any]
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0


def _check_options(opts: EvaluateOptions) -> None:
    from sd3tune.evaluation import checkpoint_steps

    try:
        checkpoint_steps(opts.checkpoints)
    except ValueError:
        raise Sd3tuneError(f"--checkpoints {opts.checkpoints!r} is not one of {', '.join(CHECKPOINT_CHOICES)}",
                           hint="latest compares base and the LoRA; all adds every checkpoint-N of the run; "
                                "10,20 those checkpoints (training steps)") from None
    if opts.seeds < 1:
        raise Sd3tuneError(f"--seeds {opts.seeds} must be at least 1", hint="2 or more also measures diversity")
    if opts.batch_size < 1:
        raise Sd3tuneError(f"--batch-size {opts.batch_size} must be at least 1",
                           hint="images per pipeline call; the default is 4, lower it when memory runs out")
    if not opts.lora_scale >= 0 or opts.lora_scale == float("inf"):  # nan fails every comparison
        raise Sd3tuneError(f"LoRA scale {opts.lora_scale} must be a finite number, not negative",
                           hint="0 gives the base model")
    from sd3tune.runtime import check_runtime_choices

    check_runtime_choices(opts.device, opts.dtype)


def _read_run(run_dir: Path):
    import shlex

    from sd3tune.findings import errors_in
    from sd3tune.simpletuner import keys
    from sd3tune.simpletuner.layout import find_run_root
    from sd3tune.simpletuner.reader import read_run

    run_dir = run_dir.expanduser()
    if not run_dir.is_dir():
        raise Sd3tuneError(f"run folder {run_dir} does not exist",
                           hint="pass the folder made by `sd3tune init` and trained with `sd3tune train`")
    if not (run_dir / keys.CONFIG_DIR).is_dir():
        parent = find_run_root(run_dir.resolve().parent)
        if parent is not None:
            raise Sd3tuneError(f"{run_dir} is inside the run folder {parent}", hint=f"pass {parent}")
    loaded = read_run(run_dir)
    if loaded.config is None:
        problems = errors_in(loaded.findings)
        first = problems[0].render() if problems else "its config cannot be read"
        raise Sd3tuneError(f"{run_dir} is not a readable sd3tune run: {first}",
                           hint=f"`sd3tune check {shlex.quote(str(run_dir))}` lists every problem")
    return run_dir.resolve(), loaded


def _candidates(opts: EvaluateOptions, output_dir: Path, lora, notes: list[str]) -> list[Candidate]:
    from sd3tune.evaluation import pick_candidates

    return pick_candidates(lora, output_dir, notes, opts.checkpoints, run_lora=opts.lora is None)


def evaluation_folder(run_dir: Path, out: Path | None) -> Path:
    """Where an evaluation of ``run_dir`` is written: ``out`` (--out), else RUN_DIR/eval."""
    return (out if out is not None else run_dir / EVAL_DIR).expanduser().resolve()


def _check_out(out: Path, force: bool, defaulted: bool) -> None:
    """Refuse an --out folder that holds anything (a previous evaluation above all) unless ``force``."""
    name = f"--out {out}" if not defaulted else f"{out} (the default --out)"
    if out.exists() and not out.is_dir():
        raise Sd3tuneError(f"{name} is a file", hint="pass a folder")
    if force or not out.is_dir() or all(p.name == LOCK_NAME for p in out.iterdir()):
        return
    from sd3tune.errors import RefuseOverwriteError

    held = "an evaluation (metrics.json)" if (out / "metrics.json").exists() else "files"
    raise RefuseOverwriteError(f"{name} already holds {held}; nothing was written",
                               hint="pass another --out, or --force to replace the previous evaluation there (its "
                                    f"images/, {', '.join(OUTPUT_FILES)}; other files stay)")


def run_evaluate(opts: EvaluateOptions, progress: bool = True) -> EvaluateResult:
    """Generate the grid for every model with one pipeline load, score it, and write metrics.json, the contact
    sheet and the report into ``opts.out`` (default ``RUN_DIR/eval``). User mistakes raise Sd3tuneError before
    any model loads."""
    start = time.perf_counter()
    _check_options(opts)
    run_dir, loaded = _read_run(opts.run_dir)
    out = evaluation_folder(run_dir, opts.out)
    _check_out(out, force=True, defaulted=opts.out is None)  # a file, not a folder
    with folder_lock(out, "evaluate", create=True):  # another evaluate into --out is refused, naming this one
        _check_out(out, opts.force, defaulted=opts.out is None)
        return _evaluate(opts, progress, start, run_dir, loaded, out)


def _evaluate(opts: EvaluateOptions, progress: bool, start: float, run_dir: Path, loaded, out: Path) -> EvaluateResult:
    from sd3tune import __version__
    from sd3tune.clip import ClipModel
    from sd3tune.evaluation import DEFINITIONS, ImageFiles, training_set
    from sd3tune.lora import resolve_lora
    from sd3tune.manifest import now, read_manifest
    from sd3tune.prompts import default_prompts, distinct_prompts, read_prompts_file
    from sd3tune.report import record_in_manifest, relpath, remove_previous, write_outputs
    from sd3tune.sampling import SamplerFlags, resolve_settings

    timings: dict[str, float] = {}
    config = loaded.config
    manifest = read_manifest(run_dir)
    trigger = (manifest.get("init") or {}).get("trigger")
    lora = resolve_lora(opts.lora, None) if opts.lora is not None else resolve_lora(run_dir, loaded)
    if lora.config is None:  # a bare .safetensors: the run's settings apply
        lora = replace(lora, config=config)
    notes: list[str] = []
    if opts.lora is None and not lora.file.is_relative_to(run_dir.resolve()):  # e.g. a copied run folder
        notes.append(f"the run's LoRA {lora.file} is outside {run_dir}: its "
                     f"{loaded.key_for('output_dir', located=False)} points there (a copied run still points into "
                     "the original's output)")
    candidates = _candidates(opts, loaded.output_dir(), lora, notes)
    train = training_set(loaded.backends, loaded.paths)
    if opts.prompts_file is not None:
        prompts, repeats = distinct_prompts(read_prompts_file(opts.prompts_file, trigger))
        if repeats:
            notes.append(f"{plural(repeats, 'repeated prompt')} in {opts.prompts_file} left out: each prompt is "
                         "evaluated once")
    else:
        prompts = default_prompts(config.validation.prompt, train.captions, trigger, notes=notes)
    model, settings, setting_notes = resolve_settings(
        SamplerFlags(model=opts.model, steps=opts.steps, guidance=opts.guidance), lora)
    notes += setting_notes
    seeds = list(range(opts.seeds))
    from sd3tune.evalgen import check_free_space, generate_grid

    check_free_space(out, len(candidates) * len(prompts) * len(seeds), settings.width, settings.height,
                     len(candidates), len(prompts), reclaimed=out / "images" if opts.force else None)

    clip_spec, clip_origin = opts.clip_model, None
    if clip_spec is None:
        clip_spec = manifest.get("defaults", {}).get("clip_model") or DEFAULT_CLIP
        if clip_spec != DEFAULT_CLIP:
            clip_origin = f"defaults.clip_model in {run_dir / 'sd3tune.json'}"
            notes.append(f"CLIP model {clip_spec} from the run's sd3tune.json (--clip-model overrides)")
    opts = replace(opts, clip_model=clip_spec)
    t = time.perf_counter()
    clip = ClipModel.load(clip_spec, origin=clip_origin)  # before the SD3 load: a wrong --clip-model fails in seconds
    timings["load_clip"] = time.perf_counter() - t
    if opts.force:  # after every check: a refused evaluation leaves the previous one intact
        remove_previous(out)

    t = time.perf_counter()
    models, made_with = generate_grid(opts, model, lora, settings, prompts, seeds, candidates, out, progress)
    device = made_with["device"]
    timings["generate"] = time.perf_counter() - t

    from sd3tune.evaluation import compare, compute_metrics
    from sd3tune.runsummary import training_summary

    t = time.perf_counter()
    clip.to(device)
    result = compute_metrics(models, prompts, seeds, ImageFiles(train.images), clip, progress=progress)
    compared = compare(models, result)
    timings["metrics"] = time.perf_counter() - t
    notes += result.notes
    if train.total > len(train.images):
        notes.append(f"{len(train.images)} of {train.total} training images used (evenly spaced)")

    from sd3tune.manifest import package_versions

    sha256 = {c.label: c.sha256 for c in candidates}
    data: dict[str, Any] = {
        "sd3tune_version": __version__,
        "created": now(),
        "run_dir": str(run_dir),
        "out": str(out),
        "model": model,
        "lora": {"file": str(lora.file), "sha256": lora.sha256, "alpha_over_rank": lora.alpha_over_rank,
                 "scale": opts.lora_scale},
        "checkpoints": opts.checkpoints,
        "clip_model": {"name": clip.name, "requested": opts.clip_model, "source": clip.source},
        "sampler": asdict(settings),
        "seeds": seeds,
        "prompts": [{"text": p.text, "kind": p.kind} for p in prompts],
        "trigger": trigger,
        "training_images": {"folders": [str(f) for f in train.folders], "used": len(train.images),
                            "total": train.total},
        "device": device,
        "dtype": made_with["dtype"],
        "models": {m.label: {"title": m.title, "kind": m.kind, "step": m.step,
                             "lora_file": str(m.lora_file) if m.lora_file else None,
                             "lora_sha256": sha256[m.label],
                             "adapter_weight": m.adapter_weight, "metrics": result.models[m.label],
                             "vs_base": compared["vs_base"].get(m.label),
                             "images": [[relpath(p, out) for p in row] for row in m.paths]}
                   for m in models},
        "headline": compared["headline"],
        "best": compared["best"],
        "statistics": {"method": compared["method"], **compared["bootstrap"]},
        "training": training_summary(run_dir, loaded.output_dir(), config, manifest, trigger, out),
        "reference": result.reference,
        "kid": result.kid,
        "definitions": dict(DEFINITIONS),
        "per_image": result.per_image,
        "notes": notes,
        "versions": package_versions("diffusers", "transformers", "torch", "torchmetrics", "peft"),
    }
    timings["total"] = time.perf_counter() - start
    data["timings"] = timings
    paths = write_outputs(out, data, made_with, models, prompts, settings)
    record_in_manifest(run_dir, out, data)
    return EvaluateResult(out, paths["metrics"], paths["sheet"], paths["report"], paths["html"], data, notes,
                          time.perf_counter() - start)


# --- `sd3tune evaluate` on the command line (sd3tune.cli loads it when the command runs or shows its help; this
# section imports all it uses, whatever the module above imports) ---

from typing import Annotated, Optional  # noqa: E402

import typer  # noqa: E402

from sd3tune.cli import command_app  # noqa: E402
from sd3tune.commands.options import (BatchSizeOpt, Device, DeviceOpt, Dtype, DtypeOpt, GuidanceOpt,  # noqa: E402
                                      StepsOpt)
from sd3tune.defaults import DEFAULT_CLIP  # noqa: E402,F811
from sd3tune.errors import Sd3tuneError  # noqa: E402,F811
from sd3tune.report import format_table  # noqa: E402



def parse_checkpoints(value: str) -> str:
    """--checkpoints: latest, all or N,M,... (refused with the Python API's one-line error)."""
    value = str(value).replace(" ", "")
    _check_options(EvaluateOptions(Path(), checkpoints=value))
    return value


app = command_app()


@app.command("evaluate")
def evaluate_command(
    run_dir: Annotated[Path, typer.Argument(metavar="RUN_DIR", help="Run folder (trained with `sd3tune train`).")],
    prompts: Annotated[Optional[Path], typer.Option(
        "--prompts", help="Prompts file, one per line; 'neutral: TEXT' marks a neutral prompt (default: the run's "
                          "validation prompt and 3 captions, plus 3 neutral prompts).")] = None,
    seeds: Annotated[int, typer.Option("--seeds", help="Seeds per prompt (0..N-1), the same for every model.")] = 4,
    checkpoints: Annotated[str, typer.Option(
        "--checkpoints", metavar="latest|all|N,M,...", help="latest: base vs the LoRA; all: also every checkpoint-N "
        "of the run; 10,20: the checkpoints of those steps. Always in step order.",
        parser=parse_checkpoints)] = "latest",
    model: Annotated[Optional[str], typer.Option(
        "--model", help="Base model: Hub id or local diffusers folder (default: the run's model).")] = None,
    clip_model: Annotated[Optional[str], typer.Option(
        "--clip-model", help=f"CLIP for the metrics: Hub id or local transformers folder (default: the run's, "
                             f"else {DEFAULT_CLIP}).")] = None,
    out: Annotated[Optional[Path], typer.Option("--out", help="Output folder (default: RUN_DIR/eval).")] = None,
    steps: StepsOpt = None,
    guidance: GuidanceOpt = None,
    device: DeviceOpt = Device("auto"),
    dtype: DtypeOpt = Dtype("auto"),
    batch_size: BatchSizeOpt = 4,
    force: Annotated[bool, typer.Option(
        "--force", help="Replace a previous evaluation in --out (its images/, metrics.json, contact sheet and "
                        "reports; other files stay).")] = False,
) -> None:
    """Compare the base model, the LoRA and its checkpoints on a fixed prompt x seed grid (one model load).

    Writes metrics.json (CLIP score, style similarity, diversity, KID, neutral-prompt drift per model; each
    candidate's paired difference from the base with a 95% bootstrap interval and a verdict), contact_sheet.png and
    report.md / report.html (with the run's loss curve and validation images).

    \b
    examples:
      sd3tune evaluate runs/art
      sd3tune evaluate runs/art --checkpoints all --seeds 8 --out runs/art/eval-all
      sd3tune evaluate runs/art --checkpoints 500,1000 --out runs/art/eval-500-1000
      sd3tune evaluate runs/art --force          # replace the previous runs/art/eval
      sd3tune evaluate runs/art --prompts prompts.txt --clip-model ~/models/clip-vit-large-patch14
    """
    try:
        result = run_evaluate(EvaluateOptions(
            run_dir=run_dir, prompts_file=prompts, seeds=seeds, checkpoints=checkpoints, model=model,
            clip_model=clip_model, out=out, steps=steps, guidance=guidance, device=device.value, dtype=dtype.value,
            batch_size=batch_size, force=force))
    except KeyboardInterrupt:
        folder = evaluation_folder(run_dir, out)
        if folder.is_dir() and any(folder.iterdir()) and not (folder / "metrics.json").exists():
            raise Sd3tuneError(f"evaluation interrupted: {folder} holds its unfinished images (no metrics.json)",
                               hint="run it again with --force to replace them", exit_code=130) from None
        raise Sd3tuneError("evaluation interrupted; nothing was written", exit_code=130) from None
    for note in result.notes:
        typer.echo(f"note: {note}", err=True)
    typer.echo(format_table(result.metrics))
    typer.echo("")
    for line in result.metrics["headline"]:  # what the paired intervals support, in words; "best" only if one leads
        typer.echo(line)
    typer.echo(f"metrics: {result.metrics_file}")
    typer.echo(f"grid:    {result.sheet}")
    typer.echo(f"report:  {result.report} ({result.report_html.name} beside it)")
    typer.echo(f"done in {result.seconds:.1f} s", err=True)
