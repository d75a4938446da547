"""Preflight of a run: every configuration, dataset and SimpleTuner-trap problem at once, before any model loads.

Used by `sd3tune check` and at the start of `sd3tune train`. Imports no torch/diffusers/SimpleTuner.
"""

from __future__ import annotations

import difflib
import json
import math
import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sd3tune.config.dataset import ImageBackend, TextEmbedsBackend
from sd3tune.datascan import ScanResult, bucket_counts, estimate_clip_tokens, scan_folder, too_small
from sd3tune.findings import Finding, error, errors_in, warning
from sd3tune.simpletuner import keys
from sd3tune.simpletuner.catalog import Catalog, load_catalog
from sd3tune.simpletuner.files import LoadedRun, read_run

REQUIRED = {
    "model_type": "set MODEL_TYPE='lora'",
    "model_family": "set MODEL_FAMILY='sd3'",
    "pretrained_model_name_or_path": "set MODEL_NAME='stabilityai/stable-diffusion-3-medium-diffusers' "
                                     "(without it SimpleTuner trains SD3.5 Medium, not SD3 Medium)",
    "output_dir": "set OUTPUT_DIR to a folder for the LoRA and checkpoints",
    "data_backend_config": "set DATALOADER_CONFIG to the multidatabackend.json path",
}
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


@dataclass
class Summary:
    images: int = 0
    buckets: dict[str, int] = field(default_factory=dict)
    steps: int | None = None
    steps_per_epoch: int | None = None
    epochs: float | None = None
    gpu_memory_gb: float | None = None

    def as_dict(self) -> dict[str, Any]:
        return {"images": self.images, "buckets": self.buckets, "steps": self.steps,
                "steps_per_epoch": self.steps_per_epoch, "epochs": self.epochs, "gpu_memory_gb": self.gpu_memory_gb}


@dataclass
class CheckReport:
    run: LoadedRun
    findings: list[Finding]
    summary: Summary

    @property
    def ok(self) -> bool:
        return not errors_in(self.findings)

    def as_dict(self) -> dict[str, Any]:
        return {"ok": self.ok, "errors": [f.as_dict() for f in self.findings if f.severity == "error"],
                "warnings": [f.as_dict() for f in self.findings if f.severity == "warning"],
                "summary": self.summary.as_dict()}


def check_run(run_dir: str | Path, gpus: int = 1) -> CheckReport:
    """Read and check a run folder; never raises for a user mistake."""
    catalog = load_catalog()
    run = read_run(run_dir, catalog)
    findings = list(run.findings)
    summary = Summary()
    findings += check_required(run)
    findings += check_extra_options(run, catalog)
    if run.config is not None:
        findings += check_config(run, catalog)
    if run.backends is not None:
        findings += check_backends(run, summary, gpus)
    return CheckReport(run, _dedupe(findings), summary)


def _dedupe(findings: list[Finding]) -> list[Finding]:
    seen, out = set(), []
    for f in findings:
        if (f.severity, f.file, f.key, f.message) not in seen:
            seen.add((f.severity, f.file, f.key, f.message))
            out.append(f)
    return out


def _file(run: LoadedRun) -> str:
    return keys.JSON_FILE if run.format == "json" else keys.ENV_FILE


def _where(run: LoadedRun, option: str) -> str:
    if option in run.sources:
        return run.sources[option]
    if run.format == "env":
        return load_catalog().env_key_for().get(option) or f"{keys.EXTRA_ARGS_KEY} --{option}"
    return option


def check_required(run: LoadedRun) -> list[Finding]:
    if run.format is None:
        return []
    return [error(_file(run), _where(run, option), "is not set", hint)
            for option, hint in REQUIRED.items() if option not in run.args]


def check_extra_options(run: LoadedRun, catalog: Catalog) -> list[Finding]:
    out = []
    for option, value in run.args.items():
        if option in keys.KEY_BY_OPTION:
            continue
        opt = catalog.option(option)
        if opt is None:
            continue
        where = _where(run, option)
        text = str(value).strip()
        if opt.kind == "bool" and not isinstance(value, bool):
            out.append(error(_file(run), where, f"{text!r} is not true/false", f"write --{option}=true or false"))
        elif opt.kind == "int" and not isinstance(value, bool):
            try:
                int(text)
            except ValueError:
                out.append(error(_file(run), where, f"{text!r} is not an integer"))
        elif opt.kind == "float":
            try:
                float(text)
            except ValueError:
                out.append(error(_file(run), where, f"{text!r} is not a number"))
        if opt.choices and text not in opt.choices and not isinstance(value, bool):
            close = difflib.get_close_matches(text, opt.choices, n=1)
            out.append(error(_file(run), where, f"{text!r} is not a valid choice",
                             f"did you mean {close[0]}?" if close else f"use one of {', '.join(opt.choices)}"))
        if option in keys.BROKEN_OPTIONS and value is True:
            out.append(error(_file(run), where, keys.BROKEN_OPTIONS[option], f"remove --{option}"))
    return out


def check_model_path(run: LoadedRun, name: str) -> list[Finding]:
    """A local folder must be an SD3 diffusers pipeline; anything else must look like a Hub id.

    Relative paths are resolved against the run folder, SimpleTuner's working directory.
    """
    where = _where(run, "pretrained_model_name_or_path")
    path = Path(name).expanduser()
    if not path.is_absolute():
        path = run.paths.root / path
    if not path.exists() and not name.startswith((".", "/", "~")):
        if _HUB_ID.match(name):
            return []
        return [error(_file(run), where, f"{name!r} is neither an existing folder nor a Hub id (org/name)",
                      "use stabilityai/stable-diffusion-3-medium-diffusers or a local diffusers folder")]
    if not path.is_dir():
        return [error(_file(run), where, f"local model folder {path} does not exist",
                      "fix the path, or use the Hub id stabilityai/stable-diffusion-3-medium-diffusers")]
    index = path / "model_index.json"
    if not index.is_file():
        return [error(_file(run), where, f"{path} has no model_index.json: not a diffusers pipeline folder",
                      "point at the folder that holds model_index.json, transformer/ and vae/")]
    try:
        cls = json.loads(index.read_text()).get("_class_name", "")
    except (json.JSONDecodeError, UnicodeDecodeError):
        return [error(_file(run), where, f"{index} is not valid JSON", "re-download the model")]
    out = []
    if "StableDiffusion3" not in cls:
        out.append(error(_file(run), where, f"{path} is a {cls or 'unknown'} pipeline, not Stable Diffusion 3",
                         "use an SD3 diffusers folder"))
    for sub in ("transformer", "vae", "text_encoder", "text_encoder_2", "scheduler"):
        if not (path / sub).is_dir():
            out.append(error(_file(run), where, f"{path} lacks {sub}/", "use a complete SD3 diffusers folder"))
    return out


def check_config(run: LoadedRun, catalog: Catalog) -> list[Finding]:
    cfg = run.config
    assert cfg is not None
    f = _file(run)
    out: list[Finding] = []
    if "pretrained_model_name_or_path" in run.args:
        out += check_model_path(run, cfg.model.name_or_path)
    if cfg.optim.optimizer not in catalog.optimizers:
        close = difflib.get_close_matches(cfg.optim.optimizer, catalog.optimizers, n=1, cutoff=0.5)
        out.append(error(f, _where(run, "optimizer"), f"unknown optimizer {cfg.optim.optimizer!r}",
                         f"did you mean {close[0]}?" if close else "use torch-adamw"))
    bmp = catalog.option("base_model_precision")
    if bmp and bmp.choices and cfg.precision.base_model_precision not in bmp.choices:
        close = difflib.get_close_matches(cfg.precision.base_model_precision, bmp.choices, n=1)
        out.append(error(f, _where(run, "base_model_precision"),
                         f"{cfg.precision.base_model_precision!r} is not a valid choice",
                         f"did you mean {close[0]}?" if close else "use no_change or int8-quanto"))
    steps, epochs = cfg.optim.max_train_steps or 0, cfg.optim.num_train_epochs
    if steps > 0 and epochs > 0:
        out.append(error(f, _where(run, "num_train_epochs"), f"is {epochs} while max_train_steps is {steps}; "
                                                             "SimpleTuner refuses both", "set NUM_EPOCHS=0"))
    if steps == 0 and epochs == 0:
        out.append(error(f, _where(run, "max_train_steps"), "neither steps nor epochs are set: nothing to train",
                         "set MAX_NUM_STEPS (and NUM_EPOCHS=0)"))
    res = cfg.validation.resolution
    sides = [int(x) for x in res.split("x")]
    if any(s < keys.MEGAPIXEL_THRESHOLD for s in sides):
        out.append(error(f, _where(run, "validation_resolution"),
                         f"{res!r}: numbers below {keys.MEGAPIXEL_THRESHOLD} are read as megapixels "
                         f"({sides[0]} -> {sides[0] * 1000} px, out of memory)", "write WIDTHxHEIGHT, e.g. 1024x1024"))
    elif any(s % keys.SD3_BUCKET_ALIGNMENT for s in sides):
        out.append(warning(f, _where(run, "validation_resolution"), f"{res!r} is not a multiple of 64",
                           "SD3 works in 64 px steps"))
    if cfg.data.resolution_type == "area" and cfg.data.resolution > 20:
        out.append(error(f, _where(run, "resolution"), f"resolution_type=area reads {cfg.data.resolution} as "
                                                       "megapixels", "use resolution_type=pixel_area with 1024"))
    if cfg.data.resolution_type != "area" and cfg.data.resolution % keys.SD3_BUCKET_ALIGNMENT:
        out.append(warning(f, _where(run, "resolution"), f"{cfg.data.resolution} is not a multiple of 64",
                           "SD3 buckets are aligned to 64 px"))
    ratio = cfg.lora.effective_alpha / cfg.lora.rank
    if not 0.25 <= ratio <= 4:
        out.append(warning(f, _where(run, "lora_alpha"), f"alpha/rank = {ratio:g} scales the LoRA by that factor",
                           "alpha = rank is the usual choice"))
    if cfg.lora.rank > 128:
        out.append(warning(f, _where(run, "lora_rank"), f"rank {cfg.lora.rank} is unusually large for a style LoRA",
                           "16-64 is typical"))
    if cfg.optim.learning_rate > 1e-3:
        out.append(warning(f, _where(run, "learning_rate"), f"{cfg.optim.learning_rate:g} is high for SD3 LoRA",
                           "1e-4 is a good start"))
    if cfg.precision.mixed_precision == "fp16":
        out.append(warning(f, _where(run, "mixed_precision"), "SD3 overflows in fp16", "use bf16"))
    if cfg.model.family != "sd3":
        pass  # the Literal already reports it
    if steps and cfg.checkpoints.step_interval > steps:
        out.append(warning(f, _where(run, "checkpoint_step_interval"),
                           f"{cfg.checkpoints.step_interval} > {steps} steps: no checkpoint before the end",
                           "lower it to resume or compare checkpoints"))
    if cfg.validation.enabled and cfg.validation.prompt:
        tokens = estimate_clip_tokens(cfg.validation.prompt)
        if tokens > 75:
            out.append(warning(f, _where(run, "validation_prompt"), f"about {tokens} CLIP tokens; CLIP reads only 77",
                               "shorten the prompt"))
    if cfg.validation.enabled and not cfg.validation.prompt:
        out.append(warning(f, _where(run, "validation_prompt"), "validation is on but there is no prompt",
                           "set VALIDATION_PROMPT or turn validation off"))
    if cfg.tracking.report_to == "wandb" and not os.environ.get("WANDB_API_KEY") \
            and not (Path.home() / ".netrc").is_file():
        out.append(warning(f, _where(run, "report_to"), "wandb is selected but no WANDB_API_KEY is set",
                           "export WANDB_API_KEY or run `wandb login`"))
    return out


def _gpu_memory_estimate(bs: int, resolution: int, ckpt: bool, quantised: bool) -> float:
    """Rough peak GB, fitted to PERFORMANCE.md's SimpleTuner rows (SD3M, 1024 px): 10.8 at batch 1 and 28.0 at
    batch 4 without gradient checkpointing, 10.6 at batch 1 with it (+0.63 GB per extra image, plain loop)."""
    base, per_image = (9.97, 0.63) if ckpt else (5.07, 5.73)
    estimate = base + per_image * bs * (resolution / 1024) ** 2 - (2.0 if quantised else 0.0)
    return round(estimate, 1)


def check_backends(run: LoadedRun, summary: Summary, gpus: int) -> list[Finding]:
    name = keys.BACKENDS_FILE
    backends = run.backends or []
    out: list[Finding] = []
    ids = [b.id for b in backends]
    for dup in {i for i in ids if ids.count(i) > 1}:
        out.append(error(name, dup, "id is used by more than one dataset", "give each dataset a unique id"))
    text = [b for b in backends if isinstance(b, TextEmbedsBackend) and not b.disabled]
    images = [b for b in backends if isinstance(b, ImageBackend) and not b.disabled]
    if not [t for t in text if t.default]:
        out.append(error(name, "", "no default text_embeds dataset", 'add {"id": "text-embeds", "dataset_type": '
                                                                   '"text_embeds", "default": true, "cache_dir": ...}'))
    if not images:
        out.append(error(name, "", "no enabled image dataset", "add one pointing at your images"))
    cfg = run.config
    bs = cfg.optim.train_batch_size if cfg else 1
    accum = cfg.optim.gradient_accumulation_steps if cfg else 1
    total_samples = 0
    all_buckets: dict[str, int] = {}
    for b in images:
        out += _check_image_backend(b, bs, run, all_buckets)
        total_samples += all_buckets.pop(f"__samples__{b.id}", 0)
    summary.images = total_samples
    summary.buckets = all_buckets
    if cfg is not None and total_samples:
        per_epoch = max(1, math.ceil(total_samples / (bs * gpus) / accum))
        summary.steps_per_epoch = per_epoch
        steps = cfg.optim.max_train_steps or (cfg.optim.num_train_epochs * per_epoch)
        summary.steps = steps
        summary.epochs = round(steps / per_epoch, 2)
        summary.gpu_memory_gb = _gpu_memory_estimate(bs, cfg.data.resolution, cfg.precision.gradient_checkpointing,
                                                     cfg.precision.base_model_precision != "no_change")
        out += _check_disk(run, total_samples, cfg.data.resolution)
    return out


def _check_image_backend(b: ImageBackend, bs: int, run: LoadedRun, buckets_out: dict[str, int]) -> list[Finding]:
    name = keys.BACKENDS_FILE
    out: list[Finding] = []
    folder = Path(b.instance_data_dir).expanduser()
    if not folder.is_dir():
        return [error(name, f"{b.id}.instance_data_dir", f"{folder} does not exist", "fix the path")]
    scan: ScanResult = scan_folder(folder)
    for path, why in scan.corrupt:
        out.append(error(str(path), "", f"unreadable image or caption: {why}", "delete or re-export the file"))
    if not scan.images:
        out.append(error(name, f"{b.id}.instance_data_dir", f"no readable images in {folder}",
                         "add .png/.jpg/.webp images"))
        return out
    if b.caption_strategy == "textfile":
        missing = scan.uncaptioned
        if len(missing) == len(scan.images):
            out.append(error(name, f"{b.id}.caption_strategy", "textfile captions, but no image has a .txt caption",
                             "add NAME.txt beside each image, or use caption_strategy instance_prompt"))
        elif missing:
            out.append(warning(str(folder), "", f"{len(missing)} of {len(scan.images)} images have no caption, e.g. "
                                                f"{missing[0].path.name}", "add the .txt files"))
        long = [i for i in scan.images if i.caption and estimate_clip_tokens(i.caption) > 75]
        if long:
            out.append(warning(str(folder), "", f"{len(long)} captions exceed CLIP's 77 tokens (e.g. "
                                                f"{long[0].path.with_suffix('.txt').name}); T5 reads up to "
                                                f"{keys.SD3_T5_MAX_LENGTH}", "put the important words first"))
    if b.caption_strategy == "instance_prompt" and not b.instance_prompt:
        out.append(error(name, f"{b.id}.instance_prompt", "caption_strategy instance_prompt needs instance_prompt",
                         "set it to your trigger word"))
    kept = [i for i in scan.images if not too_small(i, b.minimum_image_size, b.resolution_type)]
    if len(kept) < len(scan.images):
        out.append(warning(name, f"{b.id}.minimum_image_size", f"{len(scan.images) - len(kept)} images are smaller "
                                                               f"than {b.minimum_image_size} and are skipped"))
    res = int(b.resolution) if b.resolution_type != "area" else b.resolution
    counts = bucket_counts(kept, res, b.resolution_type, b.crop and b.crop_aspect == "square")
    dropped = sum(n for n in counts.values() if n < bs)
    usable = len(kept) - dropped
    if dropped:
        small = ", ".join(f"{w}x{h} ({n})" for (w, h), n in sorted(counts.items()) if n < bs)
        out.append(warning(name, f"{b.id}", f"{dropped} images sit in aspect buckets smaller than the batch size "
                                            f"{bs} and are dropped: {small}",
                           "crop to square (crop true, crop_aspect square) or lower TRAIN_BATCH_SIZE"))
    if usable * (b.repeats + 1) < bs:
        out.append(error(name, b.id, f"{usable} usable images cannot fill one batch of {bs}",
                         "add images, raise repeats, or lower TRAIN_BATCH_SIZE"))
    for (w, h), n in counts.items():
        buckets_out[f"{w}x{h}"] = buckets_out.get(f"{w}x{h}", 0) + n
    buckets_out[f"__samples__{b.id}"] = usable * (b.repeats + 1)
    small_images = [i for i in kept if min(i.width, i.height) < 0.5 * res and b.resolution_type != "area"]
    if small_images:
        out.append(warning(str(folder), "", f"{len(small_images)} images are under half the training resolution "
                                            f"{res} px and will be upscaled", "use larger images or a lower resolution"))
    return out


def _check_disk(run: LoadedRun, samples: int, resolution: int) -> list[Finding]:
    latent = 16 * (resolution // 8) ** 2 * 4  # fp32 latents
    text = (77 + keys.SD3_T5_MAX_LENGTH) * 4096 * 4 + 2048 * 4
    need = samples * (latent + text)
    root = run.paths.root
    try:
        free = shutil.disk_usage(root).free
    except OSError:
        return []
    if free < need * 1.2:
        return [error(str(root), "cache", f"caches need about {need / 2**30:.1f} GiB but {free / 2**30:.1f} GiB is free",
                      "free disk space or move the run folder")]
    return []
