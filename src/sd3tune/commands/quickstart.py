"""`sd3tune quickstart`: the whole loop offline on a tiny random SD3 — build, init, train (real SimpleTuner),
generate base and LoRA samples, and measure that the LoRA changed the output."""

from __future__ import annotations

import json
import os
from contextlib import nullcontext
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from sd3tune.commands.generate import GenerateOptions, run_generate
from sd3tune.commands.init import InitOptions, run_init
from sd3tune.commands.train import TrainOptions, run_train
from sd3tune.config.models import MAX_STEPS
from sd3tune.errors import Sd3tuneError
from sd3tune.fsutil import atomic_write_text
from sd3tune.simpletuner.launch import Progress

TRIGGER = "sd3tune-style"
MARKER = ".sd3tune-quickstart"  # in a folder the quickstart made: a later quickstart may replace it
PROMPTS = [f"{TRIGGER}, concept art of a castle", f"{TRIGGER}, concept art of a robot"]

# A CPU-sized run: 64 px, batch 2, a high learning rate so 20 steps visibly change a random model.
TINY_OVERRIDES = {
    "precision": {"mixed_precision": "no"},
    "optim": {"train_batch_size": 2, "learning_rate": 2e-3},
    "data": {"resolution": 64, "resolution_type": "pixel", "minimum_image_size": 64},
    "validation": {"enabled": False, "resolution": "128x128"},
}
TINY_BACKEND = {"crop": True, "crop_aspect": "square"}


def tiny_init_options(run_dir: Path, data: Path, model: Path, steps: int, checkpoint_every: int,
                      force: bool = False) -> InitOptions:
    """`sd3tune init` options of a CPU-sized run of the tiny model (the quickstart's, and the tests'): its own copies
    of the settings, which a caller may change."""
    import copy

    return InitOptions(run_dir=run_dir, data=data, model=str(model), trigger=TRIGGER, steps=steps, force=force,
                       overrides=copy.deepcopy({**TINY_OVERRIDES, "checkpoints": {"step_interval": checkpoint_every}}),
                       image_backend_overrides=dict(TINY_BACKEND))


@dataclass
class QuickstartResult:
    folder: Path
    lora: Path
    samples: list[Path]
    sheet: Path
    mean_abs_diff: float  # LoRA vs base, in 0-255 pixel units, same seeds
    seconds: float
    timings: dict[str, float] = field(default_factory=dict)


def tiny_run(folder: Path, steps: int = 20, force: bool = False) -> tuple[Path, Path]:
    """Build the tiny model (+ a tiny CLIP for `evaluate`), the images and an initialised run under ``folder``;
    return (model, run_dir). The run's manifest names the tiny CLIP, so `sd3tune evaluate RUN` works offline."""
    from sd3tune.manifest import update_manifest
    from sd3tune.tiny import build_tiny_clip, build_tiny_sd3, make_concept_images

    model, data, run_dir, clip = folder / "model", folder / "data", folder / "run", folder / "clip"
    if not (model / "model_index.json").is_file():
        build_tiny_sd3(model)
    if not (clip / "config.json").is_file():
        build_tiny_clip(clip)
    if not data.is_dir():
        make_concept_images(data, count=8, size=64, trigger=TRIGGER)
    run_init(tiny_init_options(run_dir, data, model, steps, checkpoint_every=max(1, steps // 2), force=force))
    update_manifest(run_dir, "defaults", {"clip_model": str(clip)})
    return model, run_dir


def run_quickstart(folder: Path, steps: int = 20, force: bool = False,
                   on_status: Callable[[str], None] = lambda m: None,
                   on_progress: Callable[[Progress], None] | None = None) -> QuickstartResult:
    start = time.perf_counter()
    # every check before anything is built: a refused command leaves the folder as it was, so the corrected one runs
    if not 1 <= steps <= MAX_STEPS:
        raise Sd3tuneError(f"--steps {steps} must be at least 1" if steps < 1 else
                           f"--steps {steps} is over {MAX_STEPS:,}", hint="the quickstart's default is --steps 20")
    folder = folder.expanduser().resolve()
    blocker = next((p for p in (folder, *folder.parents) if p.exists() and not p.is_dir()), None)
    if blocker is not None:
        what = f"{folder} is a file" if blocker == folder else f"{blocker} (in the path {folder}) is a file"
        raise Sd3tuneError(f"{what}, not a folder", hint="pass a folder for the tiny model, data, run and samples "
                           "(a new one, or an empty one)")
    ours = (folder / MARKER).is_file()  # made by an earlier quickstart: replaced (its model and images are kept)
    if folder.exists() and any(folder.iterdir()) and not (force or ours):
        raise Sd3tuneError(f"{folder} is not empty (and not made by `sd3tune quickstart`)",
                           hint="pass --force to reuse it, or choose a new folder")
    if force or ours:  # the run's output (and a quickstart's own samples) go: the run trains from scratch
        import shutil

        from sd3tune.locks import folder_lock

        with folder_lock(folder / "run", "quickstart") if (folder / "run").is_dir() else nullcontext():
            pass  # refused while a training holds the run; its training takes the lock again

        for made in (folder / "run" / "output", *((folder / "samples",) if ours else ())):
            if made.is_dir() and not made.is_symlink():
                shutil.rmtree(made)
    else:  # a new or empty folder: the quickstart's own from now on
        folder.mkdir(parents=True, exist_ok=True)
        atomic_write_text(folder / MARKER, "made by `sd3tune quickstart`: the next quickstart here replaces it\n")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # everything here is local; never wait on the network
    timings: dict[str, float] = {}
    on_status(f"building a tiny random SD3 and 8 captioned images in {folder}")
    t = time.perf_counter()
    model, run_dir = tiny_run(folder, steps=steps, force=force or ours)
    timings["build_and_init"] = time.perf_counter() - t
    on_status(f"training {steps} steps with SimpleTuner (run folder {run_dir})")
    t = time.perf_counter()
    # the tiny demo's settings are deliberate (a high learning rate, so 20 steps visibly move 64 px images)
    trained = run_train(TrainOptions(run_dir=run_dir, warnings=False), on_progress=on_progress, on_status=on_status)
    timings["train"] = time.perf_counter() - t
    on_status("generating base and LoRA samples with the same seeds")
    t = time.perf_counter()

    samples = folder / "samples"
    grids = {}
    for tag, scale in (("base", 0.0), ("lora", 1.0)):
        result = run_generate(GenerateOptions(prompts=PROMPTS, lora=run_dir, scale=scale, out=samples / tag,
                                              num_images=1, steps=8, seed=0, grid=False), progress=False)
        grids[tag] = result.images
    timings["generate"] = time.perf_counter() - t
    from PIL import Image

    from sd3tune.inference import save_png
    from sd3tune.sheets import contact_sheet, mean_abs_diff, sheet_fields

    base = [Image.open(i.path) for i in grids["base"]]
    lora = [Image.open(i.path) for i in grids["lora"]]
    diff = mean_abs_diff([i.path for i in grids["base"]], [i.path for i in grids["lora"]])
    sheet_path = samples / "compare.png"
    columns = ["base", "LoRA"]
    # what made the images (model, LoRA file and SHA-256, sampler), as their own PNGs record it; the LoRA's scale
    # and adapter weight per column (the base column is the LoRA at scale 0)
    made = [json.loads(column[0].text["sd3tune"]) for column in (base, lora)]
    fields = sheet_fields(made[1], sheet="sd3tune quickstart comparison", rows="prompt", columns="model",
                          row_labels=PROMPTS, column_labels=columns, prompts=PROMPTS, seeds=[0],
                          lora_scale=[m["lora_scale"] for m in made],
                          lora_adapter_weight=[m["lora_adapter_weight"] for m in made],
                          images=[[str(a.path.relative_to(samples)), str(b.path.relative_to(samples))]
                                  for a, b in zip(grids["base"], grids["lora"])])
    save_png(contact_sheet([[a, b] for a, b in zip(base, lora)], PROMPTS, columns, cell=128), sheet_path, fields)
    assert trained.lora is not None
    return QuickstartResult(folder, trained.lora, [i.path for i in grids["base"] + grids["lora"]], sheet_path, diff,
                            time.perf_counter() - start, timings)


# --- `sd3tune quickstart` on the command line (sd3tune.cli loads it when the command runs or shows its help) ---

import shlex  # noqa: E402
from typing import Annotated  # noqa: E402

import typer  # noqa: E402

from sd3tune.cli import command_app  # noqa: E402
from sd3tune.console import TrainConsole  # noqa: E402

app = command_app()


@app.command("quickstart")
def quickstart_command(
    folder: Annotated[Path, typer.Argument(metavar="FOLDER", help="Folder for the tiny model, data, run and samples.")] = Path("sd3tune-quickstart"),
    steps: Annotated[int, typer.Option("--steps", help="Training steps.")] = 20,
    force: Annotated[bool, typer.Option("--force", help="Reuse a non-empty folder (its run output is replaced).")] = False,
) -> None:
    """The whole loop offline in about a minute: tiny random SD3, init, SimpleTuner training, samples.

    \b
    examples:
      sd3tune quickstart /tmp/demo
    """
    console = TrainConsole()
    try:
        result = run_quickstart(folder, steps=steps, force=force, on_status=console.status, on_progress=console)
    finally:  # what comes next starts on a line of its own
        console.close()
    typer.echo(f"LoRA:    {result.lora}")
    typer.echo(f"samples: {result.sheet.parent} (side by side: {result.sheet})")
    typer.echo(f"LoRA vs base, same seeds: mean |pixel difference| = {result.mean_abs_diff:.2f} / 255")
    parts = ", ".join(f"{k} {v:.1f} s" for k, v in result.timings.items())
    typer.echo(f"done in {result.seconds:.1f} s ({parts})")
    typer.echo(f"next: sd3tune evaluate {shlex.quote(str(result.folder / 'run'))} "
               f"--out {shlex.quote(str(result.folder / 'eval'))}")
