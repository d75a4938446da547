"""Rules on the datasets (multidatabackend.json): ids and text-embed caches, each image dataset's folder, images,
captions, sizes and aspect buckets against the batch, and the summary's image and step counts."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sd3tune.checks.budget import check_disk, check_memory
from sd3tune.datascan import CLIP_MAX_TOKENS, ScanResult, T5_MAX_TOKENS, estimate_clip_tokens, estimate_t5_tokens
from sd3tune.findings import Finding, error, warning
from sd3tune.manifest import read_manifest
from sd3tune.simpletuner import keys
from sd3tune.simpletuner.backends import ImageBackend, TextEmbedsBackend
from sd3tune.simpletuner.dataset import (bucket_counts, caption_path, dataset_captions, megapixels,
                                        minimum_megapixels, too_small)
from sd3tune.checks.summary import bucket_name, summarise
from sd3tune.simpletuner.keys import BACKENDS_FILE as BACKENDS
from sd3tune.simpletuner.transparency import REFUSE, describe, run_alpha_background

if TYPE_CHECKING:
    from sd3tune.checks.engine import Context

MAX_LISTED = 5  # file names quoted in one finding
OVERSUBSCRIBE = "allow_dataset_oversubscription"  # SimpleTuner's option that repeats small buckets' images


@dataclass
class UsableDataset:
    """One enabled image dataset after SimpleTuner's size filter and bucket pruning."""

    backend: ImageBackend
    scanned: int  # images found in the folder, before any filter
    usable: Counter  # bucket (w, h) -> images left
    captions: set[str]


def check_backends(ctx: Context) -> list[Finding]:
    """multidatabackend.json: ids, text-embed caches, and each image dataset's folder, images, captions, buckets."""
    backends = ctx.backends
    if backends is None:
        return []
    out: list[Finding] = []
    ids = [b.id for b in backends]
    for dup in sorted({i for i in ids if ids.count(i) > 1}):
        out.append(error(BACKENDS, dup, "id is used by more than one dataset; SimpleTuner refuses it",
                         "give each dataset a unique id"))
    text = [b for b in backends if isinstance(b, TextEmbedsBackend) and not b.disabled]
    images = [b for b in backends if isinstance(b, ImageBackend) and not b.disabled]
    if not ctx.backends_partial:
        out += _check_text_embeds(text, images)
    if not images and not ctx.backends_partial:
        out.append(error(BACKENDS, "", "no enabled image dataset", 'add one: {"id": "images", "instance_data_dir": '
                                                                   '"/path/to/images", "cache_dir_vae": ...}'))
    vae_dirs: dict[Path, str] = {}
    for b in images:
        d = ctx.path(b.cache_dir_vae).resolve()
        if d in vae_dirs:
            out.append(warning(BACKENDS, f"{b.id}.cache_dir_vae", f"same folder as dataset {vae_dirs[d]!r}",
                               "give each dataset its own VAE cache folder"))
        vae_dirs.setdefault(d, b.id)
    datasets: list[UsableDataset] = []
    for b in images:
        found, dataset = _check_image_backend(ctx, b)
        out += found
        if dataset is not None:
            datasets.append(dataset)
    out += _check_run_resolution(ctx, images)
    out += _check_batches(ctx, datasets)
    ctx.datasets = datasets
    summarise(ctx, datasets)
    out += check_disk(ctx, datasets, text)
    out += check_memory(ctx)
    return out


def _check_text_embeds(text: list[TextEmbedsBackend], images: list[ImageBackend]) -> list[Finding]:
    """factory.py: at least one text_embeds dataset, at most one default, and image datasets must name real ones."""
    out = []
    if not text:
        return [error(BACKENDS, "", "no text_embeds dataset; SimpleTuner refuses to start",
                      'add {"id": "text-embeds", "dataset_type": "text_embeds", "default": true, '
                      '"cache_dir": "cache/text"}')]
    defaults = [t for t in text if "default" in t.model_fields_set and t.default]
    if len(defaults) > 1:
        out.append(error(BACKENDS, f"{defaults[1].id}.default", f"{len(defaults)} text_embeds datasets are default",
                         "mark exactly one default"))
    elif not defaults and len(text) > 1:
        out.append(error(BACKENDS, "", "several text_embeds datasets and none is default; SimpleTuner refuses it",
                         'add "default": true to one'))
    known = {t.id for t in text}
    for b in images:
        if b.text_embeds and b.text_embeds not in known:
            out.append(error(BACKENDS, f"{b.id}.text_embeds", f"no text_embeds dataset has id {b.text_embeds!r}",
                             f"use one of {', '.join(sorted(known))}"))
    return out


def _effective(ctx: Context, b: ImageBackend) -> tuple[float, str, float | None]:
    """(resolution, resolution_type, minimum_image_size): the dataset's own, else the config's (factory.py)."""
    e = b.effective(ctx.cfg.data) if ctx.cfg is not None else b
    return e.resolution, e.resolution_type, e.minimum_image_size


def _relative(path: Path, base: Path | None) -> str:
    try:
        return str(path.relative_to(base)) if base else path.name
    except ValueError:
        return str(path)


def _names(paths: list[Path], base: Path | None = None) -> str:
    shown = ", ".join(_relative(p, base) for p in paths[:MAX_LISTED])
    return shown + (f" and {len(paths) - MAX_LISTED} more" if len(paths) > MAX_LISTED else "")


def _check_transparency(ctx: Context, folder: Path, clear: list[Path]) -> list[Finding]:
    """Images with transparency are composited on the run's background (``transparency.py``) or refused."""
    if not clear:
        return []
    policy = run_alpha_background(read_manifest(ctx.root))
    what = "1 image has" if len(clear) == 1 else f"{len(clear)} images have"
    setting = "images.alpha_background in sd3tune.json (white, black, #rrggbb or refuse)"
    if policy == REFUSE:
        listed = ", ".join(_relative(p, folder) for p in clear[:40]) + (" ..." if len(clear) > 40 else "")
        return [error(str(folder), "", f"{what} transparency, which this run refuses: {listed}",
                      f"flatten them, or composite them on a colour: {setting}")]
    return [warning(str(folder), "", f"{what} transparency and will train composited on {describe(policy)}: "
                                     f"{_names(clear, folder)}", f"another background, or refuse them: {setting}")]


def _check_image_backend(ctx: Context, b: ImageBackend) -> tuple[list[Finding], UsableDataset | None]:
    out: list[Finding] = []
    key = f"{b.id}.instance_data_dir"
    folder = ctx.path(b.instance_data_dir)
    if not folder.exists():
        return [error(BACKENDS, key, f"{folder} does not exist",
                      "fix the path (a relative path is read from the run folder)")], None
    if not folder.is_dir():
        return [error(BACKENDS, key, f"{folder} is a file, not a folder of images", "point it at the folder")], None
    scan = ctx.scan(folder)
    for path, why in scan.corrupt[:MAX_LISTED]:
        if keys.dataset_file_kind(path.name) in ("video", "audio"):
            out.append(error(str(path), "", why, "move it out of the dataset folder"))
        else:
            out.append(error(str(path), "", f"unreadable: {why}",
                             "save it as UTF-8 text" if path.suffix == ".txt" else "delete it or re-export it"))
    if len(scan.corrupt) > MAX_LISTED:
        rest = [p for p, _ in scan.corrupt[MAX_LISTED:]]
        shown = ", ".join(_relative(p, folder) for p in rest[:40]) + (" ..." if len(rest) > 40 else "")
        out.append(error(str(folder), "", f"{len(rest)} more unreadable files: {shown}", "fix or delete them"))
    out += _check_transparency(ctx, folder, [i.path for i in scan.images if i.transparent])
    if not scan.images:
        out.append(error(BACKENDS, key, f"no readable images in {folder}",
                         "add .png/.jpg/.webp images (with .txt captions)"))
        return out, None

    # captions
    if b.caption_strategy == "textfile":
        # SimpleTuner reads the caption of every file it lists, unreadable images and videos included
        # (prompts.py get_all_captions -> FileNotFoundError at the first missing one)
        missing = scan.missing_captions
        if missing:
            noun = "images" if len(scan.files) == len(scan.images) else "files"
            what = f"no {noun[:-1]} has a" if len(missing) == len(scan.files) else \
                f"{len(missing)} of {len(scan.files)} {noun} {'has' if len(missing) == 1 else 'have'} no"
            out.append(error(BACKENDS, f"{b.id}.caption_strategy",
                             f"textfile captions, but {what} .txt caption ({_names(missing, folder)} missing); "
                             "SimpleTuner stops at the first one (FileNotFoundError)",
                             "add NAME.txt beside each file, remove the files that are not training images, or use "
                             "caption_strategy filename or instanceprompt"))
        unreadable = {p for p, _ in scan.corrupt}
        blank = [caption_path(i.path) for i in scan.empty_captions if i.blank_lines]
        if blank:
            what = "1 caption file holds" if len(blank) == 1 else f"{len(blank)} caption files hold"
            out.append(error(str(folder), "", f"{what} only blank lines ({_names(blank, folder)}); SimpleTuner reads "
                                              "no caption from them and stops when it draws that image (IndexError; "
                                              "with dataloader prefetch, the default, the loader stops instead)",
                             "write a caption in each, or empty the file (no line end) to train that image "
                             "unconditioned"))
        empty = [caption_path(i.path) for i in scan.empty_captions
                 if caption_path(i.path) not in unreadable and not i.blank_lines]
        if empty:
            what = "1 caption file is" if len(empty) == 1 else f"{len(empty)} caption files are"
            out.append(warning(str(folder), "", f"{what} empty ({_names(empty, folder)}); those images train "
                                                "unconditioned", "write a caption in each"))
        control = caption_control_errors(scan)
        out += control[:MAX_LISTED]
        if len(control) > MAX_LISTED:
            out.append(error(str(folder), "", f"{len(control) - MAX_LISTED} more caption files hold control "
                             f"characters: {_names([Path(f.file) for f in control[MAX_LISTED:]], folder)}",
                             "delete them from each file"))
    elif b.caption_strategy == "instanceprompt" and not b.instance_prompt:
        out.append(error(BACKENDS, f"{b.id}.instance_prompt", "caption_strategy instanceprompt needs "
                                                              "instance_prompt", "set it to your trigger word"))
    captions = set(dataset_captions(b.caption_strategy, b.instance_prompt, scan.images, b.prepend_instance_prompt))
    with_text = sum(1 for i in scan.images if i.caption)
    if b.caption_strategy != "textfile" and with_text:
        out.append(warning(BACKENDS, f"{b.id}.caption_strategy", f"{with_text} images have a .txt caption beside "
                                                                 f"them, and caption_strategy {b.caption_strategy} "
                                                                 "leaves them unused",
                           "set caption_strategy to textfile to train on them"))
    out += _caption_tokens(b, folder, captions)

    # sizes and buckets (meets_resolution_requirements, calculate_new_size_by_*)
    res, rtype, minimum = _effective(ctx, b)
    out += _check_sizes(b, res, rtype, minimum)
    crop_square = b.crop and b.crop_aspect == "square"
    kept = [i for i in scan.images if not too_small(i, minimum, rtype, crop_square)]
    if len(kept) < len(scan.images):
        kept_set = set(kept)
        small = [i.path for i in scan.images if i not in kept_set]
        what = "all" if not kept else f"{len(scan.images) - len(kept)} of"
        finding = error if not kept else warning
        out.append(finding(BACKENDS, f"{b.id}.minimum_image_size",
                           f"{what} {len(scan.images)} images are smaller than {minimum:g} "
                           f"({rtype}) and are skipped: {_names(small, folder)}",
                           "use larger images, or lower minimum_image_size / MINIMUM_RESOLUTION"))
    if not kept:
        return out, None
    if rtype == "pixel":
        upscaled = [i for i in kept if min(i.width, i.height) < 0.5 * res]
    else:
        area = (megapixels(res, rtype) or 0) * 1_000_000
        upscaled = [i for i in kept if i.width * i.height < 0.25 * area]
    if upscaled:
        what = "1 image is" if len(upscaled) == 1 else f"{len(upscaled)} images are"
        out.append(warning(str(folder), "", f"{what} under half the training resolution and will be upscaled "
                                            f"(blurry): {_names([i.path for i in upscaled], folder)}",
                           "use larger images or a lower resolution"))
    counts = bucket_counts(kept, res, rtype, crop_square)
    return out, UsableDataset(b, len(scan.images), counts, captions)


def caption_control_errors(scan: ScanResult) -> list[Finding]:
    """One error per caption file holding a control character (a NUL byte, an escape...) SimpleTuner would train on,
    at its first one."""
    return [error(str(path), f"line {line} column {column}", f"holds {what}; SimpleTuner trains it into the caption",
                 "delete it from the file (most editors show it as a blank or not at all), then save as UTF-8 text")
           for path, line, column, what in scan.control_captions]


def _check_run_resolution(ctx: Context, images: list[ImageBackend]) -> list[Finding]:
    """RESOLUTION / RESOLUTION_TYPE set in the config while every image dataset sets its own, and to another value:
    SimpleTuner takes the dataset's (factory.py), so editing the config alone changes nothing that trains."""
    out = []
    for option in ("resolution", "resolution_type"):
        if option not in ctx.run.sources or not ctx.valid(option) or not images:
            continue
        if any(option not in b.model_fields_set for b in images):
            continue  # the config's value applies to that dataset
        mine, theirs = getattr(ctx.cfg.data, option), {b.id: getattr(b, option) for b in images}
        if mine not in theirs.values():
            sets = ", ".join(f"{ident} {_show(value)}" for ident, value in theirs.items())
            out.append(warning(ctx.file, ctx.where(option), f"{_show(mine)} here, but every dataset sets its own "
                               f"{option} ({sets}) and SimpleTuner uses those", f"change {option} in {BACKENDS} "
                               "(or make the two equal)"))
    return out


def _show(value: Any) -> str:
    return f"{value:g}" if isinstance(value, (int, float)) else str(value)


def _check_sizes(b: ImageBackend, res: float, rtype: str, minimum: float | None) -> list[Finding]:
    """Dataset size settings SimpleTuner 4.10.1 rejects (data_backend/config/validators.py, factory.py)."""
    out = []
    if rtype == "area" and res > 20:
        out.append(error(BACKENDS, f"{b.id}.resolution", f"resolution_type area reads {res:g} as megapixels",
                         f"use resolution_type pixel_area with {res:g}, or area with ~1.0"))
    if rtype == "pixel_area" and not float(res).is_integer():
        out.append(error(BACKENDS, f"{b.id}.resolution", f"pixel_area needs a whole pixel edge, not {res!r}",
                         "write e.g. 1024"))
    if rtype != "area" and int(res) % keys.SD3_BUCKET_ALIGNMENT:
        low = int(res) // keys.SD3_BUCKET_ALIGNMENT * keys.SD3_BUCKET_ALIGNMENT
        out.append(warning(BACKENDS, f"{b.id}.resolution", f"{res:g} is not a multiple of 64 (SD3 buckets are "
                                                           "aligned to 64 px)",
                           f"use {low or keys.SD3_BUCKET_ALIGNMENT} or {low + keys.SD3_BUCKET_ALIGNMENT}"))
    if minimum and rtype != "pixel" and minimum_megapixels(minimum, rtype) > 5:
        out.append(error(BACKENDS, f"{b.id}.minimum_image_size", f"{minimum:g} is read as megapixels for an area "
                                                                 "dataset; SimpleTuner refuses values above 5",
                         "use e.g. 0.25, or resolution_type pixel_area with a pixel edge"))
    if b.maximum_image_size and not b.target_downsample_size:
        out.append(error(BACKENDS, f"{b.id}.maximum_image_size", "needs target_downsample_size too",
                         "add target_downsample_size, or remove maximum_image_size"))
    for name in ("maximum_image_size", "target_downsample_size"):
        value = getattr(b, name)
        if not value:
            continue
        mp = minimum_megapixels(value, rtype)
        if rtype == "pixel" and value < 512:
            out.append(error(BACKENDS, f"{b.id}.{name}", f"{value:g} is below SimpleTuner's minimum of 512 px",
                             "use at least 512"))
        elif rtype != "pixel" and mp >= 20:
            out.append(error(BACKENDS, f"{b.id}.{name}", f"{value:g} is {mp:g} megapixels; SimpleTuner needs < 20",
                             "use a smaller value"))
    if b.crop and b.crop_aspect in ("random", "closest") and not b.crop_aspect_buckets:
        out.append(error(BACKENDS, f"{b.id}.crop_aspect", f"crop_aspect {b.crop_aspect} needs crop_aspect_buckets",
                         "add e.g. \"crop_aspect_buckets\": [1.0, 0.75, 1.33], or use square or preserve"))
    return out


def _caption_tokens(b: ImageBackend, folder: Path, captions: set[str]) -> list[Finding]:
    over_t5 = sorted(c for c in captions if estimate_t5_tokens(c) > T5_MAX_TOKENS)
    over_clip = sorted(c for c in captions if estimate_clip_tokens(c) > CLIP_MAX_TOKENS)
    out = []
    if over_t5:
        out.append(warning(BACKENDS, f"{b.id}.caption_strategy",
                           f"{len(over_t5)} captions exceed about {T5_MAX_TOKENS} T5 tokens (SD3 training cuts "
                           f"the rest), e.g. {over_t5[0][:60]!r}...", "shorten them"))
    if over_clip:
        out.append(warning(BACKENDS, f"{b.id}.caption_strategy",
                           f"{len(over_clip)} captions exceed CLIP's {CLIP_MAX_TOKENS} tokens (CLIP cuts the rest; "
                           f"T5 reads up to {T5_MAX_TOKENS}), e.g. {over_clip[0][:60]!r}...",
                           "put the important words first"))
    return out


def _check_batches(ctx: Context, datasets: list[UsableDataset]) -> list[Finding]:
    """Buckets against the batch: SimpleTuner prunes buckets smaller than the batch (only when a minimum image size
    is set), then refuses to start when a bucket cannot fill batch x accumulation x GPUs
    (metadata/backends/base.py ``_prune_small_buckets`` and ``split_buckets_between_processes``)."""
    cfg = ctx.cfg
    if cfg is None or not datasets or not ctx.valid("train_batch_size", "gradient_accumulation_steps"):
        return []
    out: list[Finding] = []
    bs, accum = cfg.optim.train_batch_size, cfg.optim.gradient_accumulation_steps
    effective = bs * accum * ctx.gpus
    ctx.summary.effective_batch = effective
    batch_text = f"{ctx.key('train_batch_size')}={bs}"
    if accum > 1:
        batch_text += f" x {ctx.key('gradient_accumulation_steps')}={accum}"
    if ctx.gpus > 1:
        batch_text += f" x {ctx.gpus} processes"
    oversubscribe = ctx.flag(OVERSUBSCRIBE)
    pruning = not ctx.flag("disable_bucket_pruning")
    for d in datasets:
        b, mult = d.backend, d.backend.repeats + 1
        _, _, minimum = _effective(ctx, b)
        before = dict(d.usable)
        if minimum and pruning:
            pruned = {k: n for k, n in d.usable.items() if n * mult < bs}
            if pruned:
                lost = sum(pruned.values())
                listed = ", ".join(f"{bucket_name(k)} ({n})" for k, n in sorted(pruned.items()))
                if lost < sum(d.usable.values()):
                    out.append(warning(BACKENDS, b.id, f"{lost} images sit in aspect buckets smaller than the batch "
                                                       f"({batch_text}) and are dropped: {listed}",
                                       "crop to square (crop true, crop_aspect square), add images, or lower "
                                       f"{ctx.key('train_batch_size')}"))
                for k in pruned:
                    del d.usable[k]
        failing = {k: n for k, n in d.usable.items() if n * mult < effective}
        if not d.usable:
            listed = ", ".join(f"{bucket_name(k)}: {n}" for k, n in sorted(before.items()))
            out.append(error(ctx.file, ctx.where("train_batch_size"),
                             f"dataset {b.id!r}: no aspect bucket fills one batch of {batch_text} "
                             f"({listed}{f', x {mult} with repeats' if mult > 1 else ''}); SimpleTuner drops every "
                             "image",
                             f"lower {ctx.key('train_batch_size')}, add images, or raise repeats in {BACKENDS}"))
        elif failing:
            listed = ", ".join(f"{bucket_name(k)}: {n} x {mult}" for k, n in sorted(failing.items()))
            message = (f"dataset {b.id!r}: effective batch {effective} ({batch_text}) is larger than aspect "
                       f"bucket{'' if len(failing) == 1 else 's'} {listed}; "
                       "SimpleTuner refuses to start (zero usable batches)")
            if oversubscribe and b.repeats == 0:
                out.append(warning(ctx.file, ctx.where("train_batch_size"), message.replace(
                    "SimpleTuner refuses to start (zero usable batches)", "--allow_dataset_oversubscription repeats "
                                                                          "them to fit")))
            else:
                where = ctx.where("gradient_accumulation_steps") if accum > 1 and bs <= min(failing.values()) * mult \
                    else ctx.where("train_batch_size")
                fixes = [f"lower {ctx.key('train_batch_size')} or {ctx.key('gradient_accumulation_steps')}",
                         "add images", f"set repeats in {BACKENDS}", "crop to square so images share a bucket"]
                if not b.repeats:  # SimpleTuner's oversubscription leaves a dataset's own repeats as they are
                    fixes.append((f"add --{OVERSUBSCRIBE}=true to {keys.EXTRA_ARGS_KEY}" if ctx.run.format == "env"
                                  else f'set "{OVERSUBSCRIBE}": true') + " (repeats those buckets' images to fill one)")
                out.append(error(ctx.file, where, message, ", ".join(fixes[:-1]) + ", or " + fixes[-1]))
    return out
