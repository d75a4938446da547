"""`sd3tune generate`: SD3 (+ LoRA) samples through diffusers, with train/inference parity and PNG provenance."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Literal

from sd3tune.errors import Sd3tuneError
from sd3tune.findings import plural
from sd3tune.inference import ImageBatch, chunks, load_pipeline, make_images, provenance, save_png, slug
from sd3tune.locks import claim_name, folder_lock
from sd3tune.lora import LoraSource, resolve_lora
from sd3tune.runtime import check_runtime_choices
from sd3tune.sampling import SamplerSettings, resolve_settings


@dataclass
class GenerateOptions:
    prompts: list[str] = field(default_factory=list)
    prompts_file: Path | None = None
    model: str | None = None
    lora: Path | None = None
    scale: float = 1.0
    seed: int = 0
    num_images: int = 1
    steps: int | None = None
    guidance: float | None = None
    width: int | None = None
    height: int | None = None
    negative: str | None = None
    out: Path = Path("samples")
    device: str = "auto"
    dtype: Literal["auto", "bf16", "fp16", "fp32"] = "auto"
    max_sequence_length: int | None = None
    shift: float | None = None
    drop_t5: bool = False
    offload: Literal["none", "model", "sequential"] = "none"
    batch_size: int = 4
    compile: bool = False  # fast path: LoRA fused into the weights, blocks compiled (CUDA); see Pipeline.fast_path
    fp8: bool = False  # the fast path (implied) with the blocks' matmuls in FP8 (sd3tune.fp8)
    grid: bool = True  # also write a prompt x seed contact sheet when there is more than one image

    def __post_init__(self) -> None:  # the Python API takes str paths and a single prompt too
        if isinstance(self.prompts, str):
            self.prompts = [self.prompts]
        self.out = Path(self.out)
        self.lora = Path(self.lora) if self.lora is not None else None
        self.prompts_file = Path(self.prompts_file) if self.prompts_file is not None else None


@dataclass
class GeneratedImage:
    path: Path
    prompt: str
    seed: int


@dataclass
class GenerateResult:
    images: list[GeneratedImage]
    notes: list[str]
    load_seconds: float
    seconds: float
    grid: Path | None = None


SEED_MAX = 2 ** 64 - 1  # torch.Generator.manual_seed's largest (a negative one wraps around; refused for clarity)


def read_prompts(opts: GenerateOptions) -> list[str]:
    """--prompt values, then the prompts file (same format as `evaluate --prompts`: # comments, neutral: prefix)."""
    from sd3tune.prompts import read_prompts_file

    prompts = list(opts.prompts)
    if opts.prompts_file is not None:
        prompts += [p.text for p in read_prompts_file(opts.prompts_file, trigger=None)]
    if not prompts:
        raise Sd3tuneError("no prompt given", hint="pass --prompt TEXT or --prompts-file FILE")
    return prompts


def run_generate(opts: GenerateOptions, on_image: Callable[[GeneratedImage], None] | None = None,
                 progress: bool = True) -> GenerateResult:
    """Generate every prompt x seed with one pipeline load. ``on_image`` is called from the PNG writer thread, in
    order, as soon as each file is written (while later batches are still being made)."""
    check_runtime_choices(opts.device, opts.dtype, opts.offload)
    given = read_prompts(opts)
    prompts = list(dict.fromkeys(given))  # the same prompt at the same seeds would make the same images again
    if opts.num_images < 1:
        raise Sd3tuneError(f"--num-images {opts.num_images} must be at least 1",
                           hint="-n N makes N images per prompt, at seeds --seed, --seed + 1, ...")
    if opts.seed < 0 or opts.seed + opts.num_images - 1 > SEED_MAX:  # torch's generator seed is a uint64
        last = "" if opts.num_images == 1 else f" (its last image's seed {opts.seed + opts.num_images - 1})"
        raise Sd3tuneError(f"--seed {opts.seed}{last} is outside 0..{SEED_MAX}",
                           hint="seeds are whole numbers from 0; image i uses seed --seed + i")
    if not opts.scale >= 0 or opts.scale == float("inf"):  # nan fails every comparison
        raise Sd3tuneError(f"--scale {opts.scale} must be a finite number, not negative",
                           hint="0 gives the base model, 1 the LoRA as trained")
    if opts.batch_size < 1:
        raise Sd3tuneError(f"--batch-size {opts.batch_size} must be at least 1",
                           hint="images per pipeline call; the default is 4, lower it when memory runs out")
    lora = resolve_lora(opts.lora) if opts.lora is not None else None
    model, settings, notes = resolve_settings(opts, lora)
    if len(prompts) < len(given):
        notes.append(f"{plural(len(given) - len(prompts), 'repeated prompt')} left out: the same prompt at the same "
                     "seeds makes the same images")
    if lora is None and opts.scale != 1.0:
        notes.append(f"--scale {opts.scale:g} ignored: no --lora")
    if opts.out.exists() and not opts.out.is_dir():
        raise Sd3tuneError(f"--out {opts.out} is a file", hint="pass a folder for the images")
    created = not opts.out.exists()
    try:
        opts.out.mkdir(parents=True, exist_ok=True)  # before minutes of loading
    except OSError as exc:
        raise Sd3tuneError(f"cannot create the --out folder {opts.out}: {exc.strerror or exc}",
                           hint="pass a folder you can write to") from None
    try:
        with folder_lock(opts.out, "generate", on_note=notes.append):  # another generate here is refused
            _check_space(opts, len(prompts), settings)
            return _generate(opts, prompts, lora, model, settings, notes, on_image, progress)
    except BaseException:
        if created and not any(opts.out.iterdir()):  # no image made: leave no empty folder behind
            opts.out.rmdir()
        raise


def _check_space(opts: GenerateOptions, prompts: int, settings: SamplerSettings) -> None:
    """Refuse before loading when the images (and the grid) cannot fit on the --out folder's disk."""
    from sd3tune.fsutil import check_free_space, images_bytes

    total = prompts * opts.num_images
    grid = opts.grid and total > 1
    needed = images_bytes(total, settings.width, settings.height, opts.num_images if grid else 0,
                          prompts if grid else 0)
    check_free_space(opts.out, needed, f"{plural(total, 'image')} at {settings.width}x{settings.height}"
                     + (" and their grid" if grid else ""),
                     hint="free disk space, pass --out on a larger disk, or make fewer images (-n, prompts)")


def _generate(opts: GenerateOptions, prompts: list[str], lora: LoraSource | None, model: str,
              settings: SamplerSettings, notes: list[str], on_image: Callable[[GeneratedImage], None] | None,
              progress: bool) -> GenerateResult:
    if opts.drop_t5:
        notes.append("T5 dropped (--drop-t5): lower memory, weaker prompt following")
    if opts.fp8:
        _check_fp8(opts)
        if not opts.compile:
            notes.append("--fp8 implies --compile (LoRA fused into the weights, blocks compiled on a GPU)")
    t0 = time.perf_counter()
    pipe = load_pipeline(model, device=opts.device, dtype=opts.dtype, lora=lora, drop_t5=opts.drop_t5,
                         offload=opts.offload, shift=settings.shift)
    weight = pipe.set_lora_scale(opts.scale)
    notes += pipe.truncation_notes(prompts, settings)
    seeds = [opts.seed + i for i in range(opts.num_images)]
    total = len(prompts) * len(seeds)
    if opts.compile or opts.fp8:
        notes += pipe.fast_path(images=total, fp8=opts.fp8)
    load_seconds = time.perf_counter() - t0
    images: list[GeneratedImage] = []
    from concurrent.futures import ThreadPoolExecutor

    from tqdm.auto import tqdm

    t1 = time.perf_counter()
    # 8-bit conversion on the GPU, then PNG encoding (~0.1 s for 1024 px) on a writer thread while the GPU makes the
    # next batch: the GPU never waits for the CPU between batches. Interrupted, the writer finishes the images made;
    # the bar closes after it (its line ends before the command's last words).
    claimed: list[Path] = []  # names claimed (an empty file each) until their image is written
    try:
        with tqdm(total=total, unit="img", desc="generating", disable=not progress) as bar, \
                ThreadPoolExecutor(max_workers=1, thread_name_prefix="png") as writer:
            pending = []
            for index, prompt in enumerate(prompts):
                for batch in chunks(seeds, opts.batch_size):
                    made = make_images(pipe, prompt, batch, settings)  # queued on the GPU; copied as it finishes
                    for i, seed in enumerate(batch):
                        item = GeneratedImage(claim_name(opts.out, f"{index:03d}-{slug(prompt)}-s{seed}",
                                                         into=claimed), prompt, seed)
                        fields = provenance(pipe, prompt, seed, settings, opts.scale, weight)
                        pending.append((item, writer.submit(_write, made, i, item, fields, on_image)))
                        bar.update(1)
                    for _, future in pending:  # a write that failed (a full disk) stops the making at once
                        if future.done() and future.exception() is not None:
                            future.result()
            for item, future in pending:
                future.result()
                images.append(item)
    finally:  # interrupted or failed: a name claimed but never written leaves no empty file
        for path in claimed:
            _unclaim(path)
    seconds = time.perf_counter() - t1
    grid = None
    if opts.grid and len(images) > 1:
        made_with = provenance(pipe, prompts[0], seeds[0], settings, opts.scale, weight)  # less the prompt and seed
        grid = _write_grid(opts.out, prompts, seeds, images, made_with)
    return GenerateResult(images, notes, load_seconds, seconds, grid)


def _check_fp8(opts: GenerateOptions) -> None:
    """Refuse --fp8 on a device or dtype without the FP8 matmul before minutes of loading."""
    from sd3tune.fp8 import check_supported
    from sd3tune.runtime import pick_device, pick_dtype

    device = pick_device(opts.device)
    check_supported(device, pick_dtype(opts.dtype, device))


def _write(made: ImageBatch, index: int, item: GeneratedImage, fields: dict,
           on_image: Callable[[GeneratedImage], None] | None) -> None:
    """The writer thread's job: wait for image ``index`` of its batch, save it as PNG, then tell ``on_image`` (in
    generation order, as each file lands)."""
    save_png(made.pil(index), item.path, fields)
    if on_image:
        on_image(item)


def _write_grid(out: Path, prompts: list[str], seeds: list[int], images: list[GeneratedImage],
                made_with: dict) -> Path:
    """A contact sheet: one row per prompt, one column per seed; its PNG records what made the images
    (``made_with``: one image's provenance), its rows and columns, and the file of each cell."""
    from PIL import Image

    from sd3tune.sheets import contact_sheet, sheet_fields

    rows = [images[r * len(seeds):(r + 1) * len(seeds)] for r in range(len(prompts))]
    columns = [f"seed {s}" for s in seeds]
    sheet = contact_sheet([[Image.open(i.path) for i in row] for row in rows], prompts, columns)
    fields = sheet_fields(made_with, sheet="sd3tune generate grid", rows="prompt", columns="seed",
                          row_labels=prompts, column_labels=columns, prompts=prompts, seeds=seeds,
                          images=[[i.path.name for i in row] for row in rows])
    claimed: list[Path] = []
    try:
        path = claim_name(out, "grid", into=claimed)
        save_png(sheet, path, fields)
    except BaseException:
        for name in claimed:
            _unclaim(name)
        raise
    return path


def _unclaim(path: Path) -> None:
    """Remove a claimed name that no image was written to (an empty file)."""
    try:
        if path.stat().st_size == 0:
            path.unlink()
    except OSError:
        pass


# --- `sd3tune generate` on the command line (sd3tune.cli loads it when the command runs or shows its help; this
# section imports all it uses, whatever the module above imports) ---

from typing import Annotated, Optional  # noqa: E402

import typer  # noqa: E402

from sd3tune.cli import command_app  # noqa: E402
from sd3tune.commands.options import (BatchSizeOpt, Device, DeviceOpt, Dtype, DtypeOpt, GuidanceOpt,  # noqa: E402
                                      ModelOpt, Offload, StepsOpt, parse_offload)
from sd3tune.errors import Sd3tuneError  # noqa: E402,F811
from sd3tune.findings import plural  # noqa: E402,F811

app = command_app()


@app.command("generate")
def generate_command(
    prompt: Annotated[Optional[list[str]], typer.Option("--prompt", "-p", help="Prompt (repeatable).")] = None,
    prompts_file: Annotated[Optional[Path], typer.Option("--prompts-file", help="One prompt per line (# comments).")] = None,
    model: ModelOpt = None,
    lora: Annotated[Optional[Path], typer.Option("--lora", help="Run folder, checkpoint folder or .safetensors file.")] = None,
    scale: Annotated[float, typer.Option("--scale", help="LoRA strength (0 = base model).")] = 1.0,
    seed: Annotated[int, typer.Option("--seed", help="First seed; image i uses seed + i.")] = 0,
    num_images: Annotated[int, typer.Option("--num-images", "-n", help="Images per prompt.")] = 1,
    steps: StepsOpt = None,
    guidance: GuidanceOpt = None,
    width: Annotated[Optional[int], typer.Option("--width", help="Width (default: the run's resolution, else 1024).")] = None,
    height: Annotated[Optional[int], typer.Option("--height", help="Height (default: as width).")] = None,
    negative: Annotated[Optional[str], typer.Option("--negative", help="Negative prompt.")] = None,
    out: Annotated[Path, typer.Option("--out", help="Output folder.")] = Path("samples"),
    device: DeviceOpt = Device("auto"),
    dtype: DtypeOpt = Dtype("auto"),
    max_sequence_length: Annotated[Optional[int], typer.Option("--max-sequence-length", help="T5 tokens (default: 154 for a LoRA run, as trained; else 256).")] = None,
    shift: Annotated[Optional[float], typer.Option("--shift", help="Scheduler shift (default: the run's).")] = None,
    drop_t5: Annotated[bool, typer.Option("--drop-t5", help="Load no T5 encoder (~9 GB less memory).")] = False,
    offload: Annotated[Offload, typer.Option("--offload", help="none, model (CPU offload) or sequential (least memory).", parser=parse_offload)] = Offload("none"),
    batch_size: BatchSizeOpt = 4,
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
    written: list[Path] = []  # as each PNG lands (the writer thread), for an interrupted run's report
    try:
        result = run_generate(GenerateOptions(
            prompts=list(prompt or []), prompts_file=prompts_file, model=model, lora=lora, scale=scale, seed=seed,
            num_images=num_images, steps=steps, guidance=guidance, width=width, height=height, negative=negative,
            out=out, device=device.value, dtype=dtype.value, max_sequence_length=max_sequence_length,  # type: ignore[arg-type]
            shift=shift, drop_t5=drop_t5, offload=offload.value, batch_size=batch_size,  # type: ignore[arg-type]
            compile=compile_, fp8=fp8), on_image=lambda image: written.append(image.path))
    except KeyboardInterrupt:  # the images already written are complete PNGs: say which
        for path in written:
            typer.echo(str(path))
        raise Sd3tuneError(f"interrupted: {plural(len(written), 'image')} written"
                           + (f" to {out}" if written else ""), exit_code=130) from None
    except Sd3tuneError as exc:  # a failed write (a full disk): the images before it are complete, say which
        if written:
            for path in written:
                typer.echo(str(path))
            exc.message += f"; {plural(len(written), 'image')} written, listed above"
        raise
    for note in result.notes:
        typer.echo(f"note: {note}", err=True)
    for image in result.images:
        typer.echo(str(image.path))
    if result.grid is not None:
        typer.echo(f"grid: {result.grid}", err=True)
    n = len(result.images)
    typer.echo(f"{plural(n, 'image')} in {result.seconds:.1f} s ({result.seconds / max(n, 1):.2f} s/image) after "
               f"{result.load_seconds:.1f} s loading", err=True)
