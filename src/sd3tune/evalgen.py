"""The images `sd3tune evaluate` makes: a fixed prompt x seed grid for every candidate from ONE pipeline load, each
image written as a PNG (with its provenance) as soon as it is made, and a first write failure stopping the run at
once; and, before anything loads, whether the --out folder has room for them.

One load: the pipeline is loaded once with the run's LoRA (adapter ``sd3tune``); each checkpoint's LoRA is loaded
into the same pipeline as another adapter (``pipe.load_lora_weights(..., adapter_name=...)``), and each model is
selected with ``set_adapters`` (the base model is the LoRA at weight 0, exactly the base weights).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any


if TYPE_CHECKING:
    from sd3tune.evaluation import Candidate

def check_free_space(out: Path, images: int, width: int, height: int, columns: int, rows: int,
                     reclaimed: Path | None = None) -> None:
    """Refuse an evaluation whose images cannot fit in ``out``'s free space, before any model loads (``reclaimed``:
    a folder of images that --force removes first)."""
    from sd3tune.fsutil import check_free_space as refuse_when_full, images_bytes

    try:
        freed = sum(f.stat().st_size for f in reclaimed.rglob("*.png")) if reclaimed and reclaimed.is_dir() else 0
    except OSError:
        freed = 0
    needed = images_bytes(images, width, height, columns, rows) + 1024 * 1024  # and the reports
    refuse_when_full(out, needed, f"this evaluation's {images} images at {width}x{height}, the contact sheet and "
                     "reports", hint="free disk space, pass --out on a larger disk, or use fewer --seeds or prompts",
                     reclaimed=freed)


def generate_grid(opts: Any, model: str, lora, settings, prompts, seeds, candidates: list[Candidate], out: Path,
                  progress: bool):
    """Load the pipeline once (the run's LoRA + one adapter per checkpoint) and make every model's grid; returns
    the models' images and what made them all (an image's provenance with the run's LoRA, less prompt and seed)."""
    import gc
    from concurrent.futures import ThreadPoolExecutor

    from tqdm.auto import tqdm

    from sd3tune.evaluation import ModelImages
    from sd3tune.inference import chunks, load_adapter, load_pipeline, make_images, provenance

    pipe = load_pipeline(model, device=opts.device, dtype=opts.dtype, lora=lora, shift=settings.shift)
    for c in candidates:
        if c.kind == "checkpoint":
            assert c.file is not None and c.adapter is not None
            load_adapter(pipe.pipe, c.file, c.adapter)
    made_with = provenance(pipe, prompts[0].text, seeds[0], settings, opts.lora_scale, opts.lora_scale)
    del made_with["lora_adapter_weight"]  # each model's own: the sheet lists them per column
    made_grids = []  # per candidate: (candidate, adapter weight, images as futures, paths)
    total = len(candidates) * len(prompts) * len(seeds)
    # images reach the CPU and are written as PNGs on a thread while the next batch is made, as in generate; each
    # batch's writes are waited for once the next batch is under way, so a full disk stops the run one batch later
    previous: list = []
    with tqdm(total=total, unit="img", desc="generating", disable=not progress) as bar, \
            ThreadPoolExecutor(max_workers=1, thread_name_prefix="png") as writer:
        for c in candidates:
            w = pipe.set_lora_scale(0.0 if c.kind == "base" else opts.lora_scale,
                                    adapter=None if c.kind == "base" else c.adapter)
            grid, grid_paths = [], []
            for index, prompt in enumerate(prompts):
                row, row_paths = [], []
                for batch in chunks(seeds, opts.batch_size):
                    made = make_images(pipe, prompt.text, batch, settings)
                    current = []
                    for i, seed in enumerate(batch):
                        fields = provenance(pipe, prompt.text, seed, settings, opts.lora_scale, w)
                        fields.update(lora=str(c.file) if c.file else None, lora_sha256=c.sha256,
                                      lora_scale=None if c.kind == "base" else opts.lora_scale, evaluate_model=c.label)
                        path = out / "images" / c.label / f"{index:02d}-s{seed}.png"
                        current.append(writer.submit(_save_image, made, i, path, fields))
                        row_paths.append(path)
                        bar.update(1)
                    for written in previous:
                        written.result()  # a failed write raises here
                    row += current
                    previous = current
                grid.append(row)
                grid_paths.append(row_paths)
            made_grids.append((c, w, grid, grid_paths))
        models = [ModelImages(c.label, c.title, c.kind, c.step, c.file, w,  # type: ignore[arg-type]
                              [[image.result() for image in row] for row in grid], grid_paths)  # a failed write raises
                  for c, w, grid, grid_paths in made_grids]
    del pipe
    gc.collect()
    _empty_cache(made_with["device"])
    return models, made_with


def _save_image(made, index: int, path: Path, fields: dict):
    """The writer thread's job: image ``index`` of a batch (waiting for its copy from the GPU), saved as PNG."""
    from sd3tune.inference import save_png

    image = made.pil(index)
    save_png(image, path, fields)
    return image


def _empty_cache(device: str) -> None:
    import torch

    if device == "cuda":
        torch.cuda.empty_cache()
    elif device == "mps":
        torch.mps.empty_cache()
