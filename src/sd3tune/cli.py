"""The `sd3tune` command line: registers the commands and maps user errors to one line and exit code 2.

Each command is a thin layer over a function in ``sd3tune.commands``; heavy libraries (torch, diffusers,
SimpleTuner) are imported inside the command that needs them, so `sd3tune --help` and `sd3tune check` stay fast.
Set SD3TUNE_DEBUG=1 to see tracebacks.
"""

from __future__ import annotations

import os
import shlex
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from sd3tune import __version__
from sd3tune.defaults import DEFAULT_CLIP, SD3M
from sd3tune.errors import Sd3tuneError
from sd3tune.findings import plural

app = typer.Typer(
    name="sd3tune",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)

RunDir = Annotated[Path, typer.Argument(metavar="RUN_DIR", help="Run folder (holds config/, output/, cache/, logs/).")]
ModelOpt = Annotated[Optional[str], typer.Option("--model", help="Base model: Hub id or local diffusers folder "
                                                                 "(default: the run's model, else SD3 Medium).")]


def _echo_findings(findings) -> None:
    for f in findings:
        typer.echo(f"{f.severity}: {f.render()}", err=True)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"sd3tune {__version__}")
        raise typer.Exit()


@app.callback()
def _root(version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True,
                                                help="Print the version and exit.")] = False) -> None:
    """Fine-tune Stable Diffusion 3 Medium with LoRA on your own images (SimpleTuner + diffusers).

    \b
    examples:
      sd3tune quickstart /tmp/demo           # the whole loop offline on a tiny model
      sd3tune init runs/art --data ~/art --trigger myst
      sd3tune check runs/art && sd3tune train runs/art
      sd3tune generate --lora runs/art --prompt "myst, a lighthouse"
    """


@app.command("init")
def init_cmd(
    run_dir: RunDir,
    data: Annotated[Path, typer.Option("--data", help="Folder of training images (+ .txt captions).")],
    model: Annotated[str, typer.Option("--model", help="Hub id or local diffusers folder.")] = SD3M,
    trigger: Annotated[Optional[str], typer.Option("--trigger", help="Trigger word of the concept.")] = None,
    validation_prompt: Annotated[Optional[str], typer.Option("--validation-prompt", help="Prompt sampled during training.")] = None,
    preset: Annotated[str, typer.Option("--preset", help="GPU memory preset: 16gb, 24gb or 80gb.")] = "24gb",
    resolution: Annotated[Optional[int], typer.Option("--resolution", help="Training resolution in pixels.")] = None,
    rank: Annotated[Optional[int], typer.Option("--rank", help="LoRA rank (alpha = rank).")] = None,
    steps: Annotated[Optional[int], typer.Option("--steps", help="Training steps.")] = None,
    fmt: Annotated[str, typer.Option("--format", help="Config file format: env (config.env) or json.")] = "env",
    force: Annotated[bool, typer.Option("--force", help="Overwrite an existing config.")] = False,
) -> None:
    """Scaffold a run: SimpleTuner config.env (or config.json) and multidatabackend.json.

    \b
    examples:
      sd3tune init runs/art --data ~/art --trigger myst
      sd3tune init runs/art --data ~/art --preset 80gb --steps 2000 --format json
    """
    from sd3tune.commands.init import InitOptions, run_init

    if fmt not in ("env", "json"):
        raise Sd3tuneError(f"--format {fmt!r} is not env or json", hint="use --format env or --format json")
    result = run_init(InitOptions(run_dir=run_dir, data=data, model=model, trigger=trigger,
                                  validation_prompt=validation_prompt, preset=preset, resolution=resolution,
                                  rank=rank, steps=steps, format=fmt, force=force))  # type: ignore[arg-type]
    from sd3tune.commands.check import render_report
    from sd3tune.simpletuner.files import output_conflict

    _echo_findings(result.warnings)
    for path in result.written:
        typer.echo(f"wrote {path}")
    typer.echo(render_report(result.check))
    if not result.check.ok:  # written, but train would refuse it: `init ... && sd3tune train ...` stops here
        raise typer.Exit(2)
    if not output_conflict(Path(result.config.paths.output_dir), resume=False, steps=None):
        typer.echo(f"next: sd3tune train {shlex.quote(str(run_dir))}")


@app.command("check")
def check_cmd(
    run_dir: RunDir,
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
    resume: Annotated[bool, typer.Option("--resume", help="Check as `sd3tune train --resume` would: continuing from the latest checkpoint.")] = False,
) -> None:
    """Validate a run's config and data before any model loads (exit 0: clean or warnings, 2: errors).

    \b
    examples:
      sd3tune check runs/art
      sd3tune check runs/art --json | jq .errors
      sd3tune check runs/art --resume
    """
    from sd3tune.commands.check import run_check

    report, text = run_check(run_dir, as_json=as_json, resume=resume)
    typer.echo(text)
    if not report.ok:
        raise typer.Exit(2)


@app.command("train", context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def train_cmd(
    ctx: typer.Context,
    run_dir: RunDir,
    resume: Annotated[bool, typer.Option("--resume", help="Continue from the latest checkpoint.")] = False,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Print the exact command and environment; run nothing.")] = False,
    gpus: Annotated[int, typer.Option("--gpus", help="Number of GPUs (processes) on this machine.")] = 1,
    accelerate_config: Annotated[Optional[Path], typer.Option("--accelerate-config", help="accelerate config file (multi-node, DeepSpeed, FSDP).")] = None,
    cuda_graphs: Annotated[bool, typer.Option("--cuda-graphs/--no-cuda-graphs", help="Replay the transformer's training passes from CUDA graphs: ~15% faster steps on an H100 (one CUDA GPU; no compile, no gradient checkpointing).")] = False,
) -> None:
    """Train the run with SimpleTuner through `accelerate launch` (one GPU by default).

    Arguments after `--` go to `accelerate launch`. The run is checked first and nothing
    is launched when it has errors.

    \b
    examples:
      sd3tune train runs/art
      sd3tune train runs/art --dry-run
      sd3tune train runs/art --gpus 4
      sd3tune train runs/art --cuda-graphs
      sd3tune train runs/art --accelerate-config fsdp.yaml -- --main_process_port 29501
    """
    from sd3tune.commands.train import ProgressPrinter, TrainOptions, run_train

    result = run_train(TrainOptions(run_dir=run_dir, resume=resume, dry_run=dry_run, gpus=gpus,
                                    accelerate_config=accelerate_config, extra_accelerate_args=list(ctx.args),
                                    cuda_graphs=cuda_graphs),
                       on_progress=ProgressPrinter(), on_status=lambda m: typer.echo(m, err=True))
    if dry_run:
        typer.echo(result.plan.shell())
        return
    typer.echo(f"trained in {result.seconds:.0f} s: {result.lora}")


@app.command("generate")
def generate_cmd(
    prompt: Annotated[Optional[list[str]], typer.Option("--prompt", "-p", help="Prompt (repeatable).")] = None,
    prompts_file: Annotated[Optional[Path], typer.Option("--prompts-file", help="One prompt per line (# comments).")] = None,
    model: ModelOpt = None,
    lora: Annotated[Optional[Path], typer.Option("--lora", help="Run folder, checkpoint folder or .safetensors file.")] = None,
    scale: Annotated[float, typer.Option("--scale", help="LoRA strength (0 = base model).")] = 1.0,
    seed: Annotated[int, typer.Option("--seed", help="First seed; image i uses seed + i.")] = 0,
    num_images: Annotated[int, typer.Option("--num-images", "-n", help="Images per prompt.")] = 1,
    steps: Annotated[Optional[int], typer.Option("--steps", help="Sampling steps (default 28).")] = None,
    guidance: Annotated[Optional[float], typer.Option("--guidance", help="CFG scale (default 7.0).")] = None,
    width: Annotated[Optional[int], typer.Option("--width", help="Width (default: the run's resolution, else 1024).")] = None,
    height: Annotated[Optional[int], typer.Option("--height", help="Height (default: as width).")] = None,
    negative: Annotated[Optional[str], typer.Option("--negative", help="Negative prompt.")] = None,
    out: Annotated[Path, typer.Option("--out", help="Output folder.")] = Path("samples"),
    device: Annotated[str, typer.Option("--device", help="auto, cuda, mps or cpu.")] = "auto",
    dtype: Annotated[str, typer.Option("--dtype", help="auto, bf16, fp16 or fp32.")] = "auto",
    max_sequence_length: Annotated[Optional[int], typer.Option("--max-sequence-length", help="T5 tokens (default: 154 for a LoRA run, as trained; else 256).")] = None,
    shift: Annotated[Optional[float], typer.Option("--shift", help="Scheduler shift (default: the run's).")] = None,
    drop_t5: Annotated[bool, typer.Option("--drop-t5", help="Load no T5 encoder (~9 GB less memory).")] = False,
    offload: Annotated[str, typer.Option("--offload", help="none, model (CPU offload) or sequential (least memory).")] = "none",
    batch_size: Annotated[int, typer.Option("--batch-size", help="Images per pipeline call.")] = 4,
    compile_: Annotated[bool, typer.Option("--compile", help="Fast path for many images: fuse the LoRA into the weights, compile the transformer blocks and the VAE decoder (CUDA): ~15 s once, then ~25% less time per image (1024 px); pays off from ~45 images.")] = False,
    fp8: Annotated[bool, typer.Option("--fp8", help="--compile with the transformer blocks' matmuls in FP8 (e4m3, row-wise scales): Ada/Hopper GPUs (compute capability 8.9+), bf16; images differ slightly from those without it.")] = False,
) -> None:
    """Generate images with SD3 Medium (+ a LoRA); PNGs carry their settings in text chunks.

    \b
    examples:
      sd3tune generate --lora runs/art --prompt "myst, a lighthouse at dusk" -n 4
      sd3tune generate --lora runs/art --prompts-file prompts.txt --scale 0.8 --seed 7
      sd3tune generate --prompt "a castle" --drop-t5 --offload model     # 16 GB cards
    """
    from sd3tune.commands.generate import GenerateOptions, run_generate

    written: list[Path] = []  # as each PNG lands (the writer thread), for an interrupted run's report
    try:
        result = run_generate(GenerateOptions(
            prompts=list(prompt or []), prompts_file=prompts_file, model=model, lora=lora, scale=scale, seed=seed,
            num_images=num_images, steps=steps, guidance=guidance, width=width, height=height, negative=negative,
            out=out, device=device, dtype=dtype, max_sequence_length=max_sequence_length,  # type: ignore[arg-type]
            shift=shift, drop_t5=drop_t5, offload=offload, batch_size=batch_size,  # type: ignore[arg-type]
            compile=compile_, fp8=fp8), on_image=lambda image: written.append(image.path))
    except KeyboardInterrupt:  # the images already written are complete PNGs: say which
        for path in written:
            typer.echo(str(path))
        raise Sd3tuneError(f"interrupted: {plural(len(written), 'image')} written"
                           + (f" to {out}" if written else ""), exit_code=130) from None
    for note in result.notes:
        typer.echo(f"note: {note}", err=True)
    for image in result.images:
        typer.echo(str(image.path))
    if result.grid is not None:
        typer.echo(f"grid: {result.grid}", err=True)
    n = len(result.images)
    typer.echo(f"{plural(n, 'image')} in {result.seconds:.1f} s ({result.seconds / max(n, 1):.2f} s/image) after "
               f"{result.load_seconds:.1f} s loading", err=True)


@app.command("evaluate")
def evaluate_cmd(
    run_dir: Annotated[Path, typer.Argument(metavar="RUN_DIR", help="Run folder (trained with `sd3tune train`).")],
    prompts: Annotated[Optional[Path], typer.Option(
        "--prompts", help="Prompts file, one per line; 'neutral: TEXT' marks a neutral prompt (default: the run's "
                          "validation prompt and 3 captions, plus 3 neutral prompts).")] = None,
    seeds: Annotated[int, typer.Option("--seeds", help="Seeds per prompt (0..N-1), the same for every model.")] = 4,
    checkpoints: Annotated[str, typer.Option(
        "--checkpoints", help="latest: base vs the LoRA; all: also every checkpoint-N of the run.")] = "latest",
    model: Annotated[Optional[str], typer.Option(
        "--model", help="Base model: Hub id or local diffusers folder (default: the run's model).")] = None,
    clip_model: Annotated[Optional[str], typer.Option(
        "--clip-model", help=f"CLIP for the metrics: Hub id or local transformers folder (default: the run's, "
                             f"else {DEFAULT_CLIP}).")] = None,
    out: Annotated[Optional[Path], typer.Option("--out", help="Output folder (default: RUN_DIR/eval).")] = None,
    steps: Annotated[Optional[int], typer.Option("--steps", help="Sampling steps (default 28).")] = None,
    guidance: Annotated[Optional[float], typer.Option("--guidance", help="CFG scale (default 7.0).")] = None,
    device: Annotated[str, typer.Option("--device", help="auto, cuda, mps or cpu.")] = "auto",
    dtype: Annotated[str, typer.Option("--dtype", help="auto, bf16, fp16 or fp32.")] = "auto",
    batch_size: Annotated[int, typer.Option("--batch-size", help="Images per pipeline call.")] = 4,
    force: Annotated[bool, typer.Option(
        "--force", help="Replace a previous evaluation in --out (its images/, metrics.json, contact sheet and "
                        "reports; other files stay).")] = False,
) -> None:
    """Compare the base model, the LoRA and its checkpoints on a fixed prompt x seed grid (one model load).

    Writes metrics.json (CLIP score, style similarity, diversity, KID, neutral-prompt drift: mean and std per
    model, and the best checkpoint), contact_sheet.png and report.md / report.html.

    \b
    examples:
      sd3tune evaluate runs/art
      sd3tune evaluate runs/art --checkpoints all --seeds 8 --out runs/art/eval-all
      sd3tune evaluate runs/art --force          # replace the previous runs/art/eval
      sd3tune evaluate runs/art --prompts prompts.txt --clip-model ~/models/clip-vit-large-patch14
    """
    from sd3tune.commands.evaluate import EvaluateOptions, evaluation_folder, format_table, run_evaluate

    try:
        result = run_evaluate(EvaluateOptions(
            run_dir=run_dir, prompts_file=prompts, seeds=seeds, checkpoints=checkpoints, model=model,
            clip_model=clip_model, out=out, steps=steps, guidance=guidance, device=device, dtype=dtype,
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
    best = result.metrics["best"]
    if best["label"] is not None:  # named as the table names it
        typer.echo(f"best: {best['title'] or best['label']} (* above; rule in metrics.json 'best.rule')")
    typer.echo(f"metrics: {result.metrics_file}")
    typer.echo(f"grid:    {result.sheet}")
    typer.echo(f"report:  {result.report} ({result.report_html.name} beside it)")
    typer.echo(f"done in {result.seconds:.1f} s", err=True)


@app.command("quickstart")
def quickstart_cmd(
    folder: Annotated[Path, typer.Argument(metavar="FOLDER", help="Folder for the tiny model, data, run and samples.")] = Path("sd3tune-quickstart"),
    steps: Annotated[int, typer.Option("--steps", help="Training steps.")] = 20,
    force: Annotated[bool, typer.Option("--force", help="Reuse a non-empty folder (its run output is replaced).")] = False,
) -> None:
    """The whole loop offline in about a minute: tiny random SD3, init, SimpleTuner training, samples.

    \b
    examples:
      sd3tune quickstart /tmp/demo
    """
    from sd3tune.commands.quickstart import run_quickstart
    from sd3tune.commands.train import ProgressPrinter

    result = run_quickstart(folder, steps=steps, force=force, on_status=lambda m: typer.echo(m, err=True),
                            on_progress=ProgressPrinter())
    typer.echo(f"LoRA:    {result.lora}")
    typer.echo(f"samples: {result.sheet.parent} (side by side: {result.sheet})")
    typer.echo(f"LoRA vs base, same seeds: mean |pixel difference| = {result.mean_abs_diff:.2f} / 255")
    parts = ", ".join(f"{k} {v:.1f} s" for k, v in result.timings.items())
    typer.echo(f"done in {result.seconds:.1f} s ({parts})")
    typer.echo(f"next: sd3tune evaluate {shlex.quote(str(result.folder / 'run'))} "
               f"--out {shlex.quote(str(result.folder / 'eval'))}")


def main(argv: list[str] | None = None) -> None:
    """Console entry point: one line and exit code 2 for user errors, tracebacks only with SD3TUNE_DEBUG=1."""
    try:
        code = app(args=argv, prog_name="sd3tune", standalone_mode=False)
        if isinstance(code, int) and code:  # typer.Exit(n) is returned, not raised, without standalone mode
            if code == 130:  # Ctrl-C elsewhere: typer turns it into a bare 130
                typer.echo("interrupted", err=True)
            sys.exit(code)
    except typer.TyperException as exc:  # a usage error (unknown option, missing argument, bad value, ...)
        _usage_error(exc)
    except Sd3tuneError as exc:
        if os.environ.get("SD3TUNE_DEBUG"):
            raise
        typer.echo(f"error: {exc.one_line()}", err=True)
        sys.exit(exc.exit_code)
    except typer.Exit as exc:
        sys.exit(exc.exit_code)
    except typer.Abort:
        typer.echo("aborted", err=True)
        sys.exit(130)
    except KeyboardInterrupt:
        typer.echo("interrupted", err=True)
        sys.exit(130)


def _usage_error(exc: typer.TyperException) -> None:
    """Typer's (vendored click's) usage errors as one line with a hint, exit 2; bare `sd3tune` shows the help."""
    ctx = getattr(exc, "ctx", None)
    if type(exc).__name__ == "NoArgsIsHelpError" and ctx is not None:  # typer checks it by name too
        typer.echo(ctx.get_help())
        sys.exit(exc.exit_code)
    command = ctx.command_path if ctx is not None else "sd3tune"
    error = Sd3tuneError(exc.format_message(), hint=f"see {command} --help")
    typer.echo(f"error: {error.one_line()}", err=True)
    sys.exit(error.exit_code)
