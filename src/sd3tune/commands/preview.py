"""`sd3tune preview`: the exact pixels SimpleTuner will encode for each training image, and a contact sheet."""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from sd3tune.checks import check_run
from sd3tune.errors import RefuseOverwriteError, Sd3tuneError
from sd3tune.manifest import now, package_versions, read_manifest
from sd3tune.simpletuner.backends import ImageBackend
from sd3tune.simpletuner.reader import with_simpletuner_defaults
from sd3tune.simpletuner.transparency import REFUSE, describe, run_alpha_background

SHEET = "contact_sheet.png"
RECORD = "preview.json"


@dataclass
class PreviewOptions:
    run_dir: Path
    out: Path
    limit: int | None = None
    force: bool = False


@dataclass
class PreviewResult:
    out: Path
    images: list[dict] = field(default_factory=list)  # one per written image (source, file, bucket, caption, ...)
    skipped: list[dict] = field(default_factory=list)
    sheet: Path | None = None
    seconds: float = 0.0


def _caption(backend: ImageBackend, info) -> str:
    """The caption SimpleTuner trains the image with (the first of several lines, and how many there are)."""
    if backend.caption_strategy == "instanceprompt":
        return backend.instance_prompt or ""
    if backend.caption_strategy == "filename":
        return info.path.stem.replace("_", " ")
    lines = info.captions
    return (lines[0] + (f" (+{len(lines) - 1} more)" if len(lines) > 1 else "")) if lines else ""


def _refuse_bad_options(opts: PreviewOptions) -> None:
    """--limit and --out as one line each, before anything is read or imported."""
    if opts.limit is not None and opts.limit < 1:
        raise Sd3tuneError(f"--limit {opts.limit} must be at least 1", hint="e.g. --limit 20")
    out = opts.out.expanduser()
    if out.exists() and not out.is_dir():
        raise RefuseOverwriteError(f"--out {out} is a file", hint="pass a folder for the preview images")
    if out.is_dir() and any(out.iterdir()) and not opts.force:
        raise RefuseOverwriteError(f"--out {out} is not empty", hint="pass an empty folder, or --force to replace it")


def _refuse_bad_input(opts: PreviewOptions):
    """The run as check reads it; its first data error (or an unreadable run) as one line, before anything runs."""
    out = opts.out.expanduser()
    report = check_run(opts.run_dir)
    run = report.run
    blocking = [f for f in report.errors if f.file != run.paths_name()] if run.config is not None else report.errors
    if blocking or run.backends is None:
        first = blocking[0] if blocking else report.errors[0]
        raise Sd3tuneError(first.render().split(" — ")[0], hint=first.hint or "run `sd3tune check` for every problem")
    for backend in run.backends:
        folder = run.paths.resolve(getattr(backend, "instance_data_dir", "") or "/nonexistent").resolve()
        if out.resolve().is_relative_to(folder):
            raise Sd3tuneError(f"--out {out} is inside the image folder {folder}: SimpleTuner would train on the "
                               "preview's images", hint="pass a folder outside the training images")
    return report


def run_preview(opts: PreviewOptions, on_status: Callable[[str], None] = lambda s: None) -> PreviewResult:
    """Write ``OUT/<W>x<H>/<image file name>.png`` for each training image (what SimpleTuner encodes), ``OUT/SHEET``
    grouped by bucket, and ``OUT/RECORD``; an existing non-empty ``OUT`` only with ``force`` (replaced whole)."""
    import contextlib
    import threading

    from sd3tune.datascan import scan_folder
    from sd3tune.pngfile import write_png
    from sd3tune.simpletuner.catalog import load_catalog
    from sd3tune.simpletuner.preview import import_simpletuner, prepare_images

    started = time.perf_counter()
    _refuse_bad_options(opts)  # first: a refused command starts no import

    def import_quietly() -> None:  # a failure is raised where the images are prepared, as one error, not here
        with contextlib.suppress(Exception):
            import_simpletuner()

    imports = threading.Thread(target=import_quietly, daemon=True)  # seconds of imports, beside the check
    imports.start()
    report = _refuse_bad_input(opts)
    imports.join()
    run, catalog = report.run, load_catalog()
    assert run.config is not None and run.backends is not None
    policy = run_alpha_background(read_manifest(run.paths.root))
    args = {name: opt.default for name, opt in catalog.options.items()}
    args.update(with_simpletuner_defaults(run.args, catalog))
    out = opts.out.expanduser().resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.preview-", dir=out.parent))
    result = PreviewResult(out)
    groups: dict[str, list] = {}
    thumbnails: dict[Path, object] = {}  # what the contact sheet shows, made on the worker threads
    try:
        left = opts.limit
        datasets = [b for b in run.backends if isinstance(b, ImageBackend) and not b.disabled]
        for backend in datasets:
            if left is not None and left <= 0:
                break
            backend = backend.effective(run.config.data)
            folder = run.paths.resolve(backend.instance_data_dir)
            infos = (report.scans.get(folder.resolve()) or scan_folder(folder)).images[:left]  # check's own scan
            left = None if left is None else left - len(infos)
            by_path = {i.path: i for i in infos}
            on_status(f"preparing {len(infos)} images of {backend.id} with SimpleTuner's own code ...")
            if backend.crop and backend.crop_style == "random":  # what sd3tune cannot show exactly: say so
                on_status(f"note: {backend.id} crops at random (crop_style random): the preview shows one draw; "
                          "SimpleTuner draws its own crop when it caches each latent")
            entry = backend.model_dump(mode="json", exclude_none=True)
            entry["instance_data_dir"] = str(folder)

            def target(item, folder=folder, ident=backend.id) -> Path:  # OUT/WxH[/dataset]/name.ext.png
                name = str(item.source.relative_to(folder)) + ".png"
                return staging / f"{item.bucket[0]}x{item.bucket[1]}" / (ident if len(datasets) > 1 else "") / name

            def write(item) -> None:  # on the worker thread that prepared it (encoders release the GIL)
                path = target(item)
                path.parent.mkdir(parents=True, exist_ok=True)
                write_png(item.image, path)  # lossless; about half the CPU of Pillow's quickest setting
                thumbnails[item.source] = _thumbnail(item.image)

            with tempfile.TemporaryDirectory(prefix="sd3tune-preview-") as scratch:
                for item in prepare_images(entry, args, list(by_path), Path(scratch), then=write,
                                           background=policy if policy != REFUSE else None):
                    info = by_path[item.source]
                    record = {"dataset": backend.id, "source": str(item.source), "caption": _caption(backend, info)}
                    if item.bucket is None:
                        result.skipped.append({**record, "why": item.skipped})
                        continue
                    bucket = f"{item.bucket[0]}x{item.bucket[1]}"
                    result.images.append({**record, "file": str(target(item).relative_to(staging)), "bucket": bucket,
                                          "original_size": list(item.original_size or ()),
                                          "resized": list(item.resized or ()), "crop": list(item.crop or ()),
                                          "transparent": info.transparent})
                    groups.setdefault(bucket, []).append((thumbnails.pop(item.source),
                                                          f"{item.source.name} — {record['caption']}"))
        _write_sheet_and_record(staging, result, groups, run.paths.root, policy)
        if out.exists():
            shutil.rmtree(out)  # --force (checked above): replaced whole
        staging.rename(out)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    result.sheet = out / SHEET
    result.seconds = time.perf_counter() - started
    return result


def _thumbnail(image, size: int = 160):
    small = image.copy()
    small.thumbnail((size, size))  # what the sheet shows; the full image is not kept in memory
    return small


def _write_sheet_and_record(folder: Path, result: PreviewResult, groups: dict[str, list], run_dir: Path,
                            policy: str) -> None:
    from sd3tune.pngfile import write_png
    from sd3tune.sheets import bucket_sheet

    ordered = sorted(groups.items(), key=lambda kv: (-len(kv[1]), kv[0]))
    sheet = bucket_sheet([(f"bucket {name} ({len(items)} image{'s' * (len(items) != 1)})", items)
                          for name, items in ordered])
    write_png(sheet, folder / SHEET)
    (folder / RECORD).write_text(json.dumps({
        "created": now(), "run": str(run_dir), "alpha_background": describe(policy),
        "made_by": "SimpleTuner's own sample preparation (prepare_sample) with sd3tune's compat fixes",
        "versions": package_versions("simpletuner"), "images": result.images, "skipped": result.skipped,
    }, indent=2) + "\n")


# --- `sd3tune preview` on the command line (sd3tune.cli loads it when the command runs or shows its help) ---

from typing import Annotated, Optional  # noqa: E402

import typer  # noqa: E402

from sd3tune.cli import command_app  # noqa: E402
from sd3tune.commands.options import RunDir  # noqa: E402

app = command_app()


@app.command("preview")
def preview_command(
    run_dir: RunDir,
    out: Annotated[Path, typer.Option("--out", help="Folder for the images and contact_sheet.png.")],
    limit: Annotated[Optional[int], typer.Option("--limit", help="Only the first N images.")] = None,
    force: Annotated[bool, typer.Option("--force", help="Replace a non-empty --out folder.")] = False,
) -> None:
    """Write the exact pixels SimpleTuner will encode for each training image, and a contact sheet by bucket.

    Made by SimpleTuner's own sample preparation (orientation, bucketing, resize, crop) with sd3tune's fixes; no
    model, no GPU.

    \b
    examples:
      sd3tune preview runs/art --out preview/
      sd3tune preview runs/art --out preview/ --limit 24 --force
    """
    result = run_preview(PreviewOptions(run_dir, out, limit, force), on_status=lambda s: typer.echo(s, err=True))
    for item in result.skipped:
        typer.echo(f"skipped {item['source']}: {item['why']}", err=True)
    buckets = sorted({i["bucket"] for i in result.images})
    typer.echo(f"wrote {len(result.images)} images in {len(buckets)} buckets ({', '.join(buckets)}) to {result.out} "
               f"in {result.seconds:.1f} s")
    typer.echo(f"contact sheet: {result.sheet}")
