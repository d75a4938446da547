"""What a run needs beyond the checks: disk for SimpleTuner's caches, and an estimate of its peak GPU memory
against the card the run's init preset is made for."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

from sd3tune.checks.paths import existing_ancestor
from sd3tune.config.presets import PRESETS
from sd3tune.datascan import CLIP_MAX_TOKENS, T5_MAX_TOKENS
from sd3tune.findings import Finding, error, warning
from sd3tune.simpletuner.keys import BACKENDS_FILE as BACKENDS

if TYPE_CHECKING:
    from sd3tune.checks.datasets import UsableDataset
    from sd3tune.checks.engine import Context
    from sd3tune.simpletuner.backends import TextEmbedsBackend

PRESET_GB = {name: int(name.removesuffix("gb")) for name in PRESETS}  # card memory each init preset is made for


def check_disk(ctx: Context, datasets: list[UsableDataset], text: list[TextEmbedsBackend]) -> list[Finding]:
    """VAE latents (16 x H/8 x W/8) and SD3 text embeddings ((77 + 154) x 4096 + pooled 2048) per caption."""
    cfg = ctx.cfg
    if cfg is None or not datasets:
        return []
    width = 2 if cfg.precision.mixed_precision in ("bf16", "fp16") else 4
    need: dict[Path, int] = {}
    for d in datasets:
        latents = sum(n * 16 * (w // 8) * (h // 8) * width for (w, h), n in d.usable.items())
        key = ctx.path(d.backend.cache_dir_vae)
        need[key] = need.get(key, 0) + latents
    captions = set().union(*(d.captions for d in datasets))
    default = next((t for t in text if t.default), text[0] if text else None)
    if default is not None:
        per_caption = ((CLIP_MAX_TOKENS + T5_MAX_TOKENS) * 4096 + 2048) * width
        key = ctx.path(default.cache_dir)
        need[key] = need.get(key, 0) + (len(captions) + 2) * per_caption
    ctx.summary.cache_gb = round(sum(need.values()) / 2**30, 2)
    by_device: dict[int, tuple[Path, int, list[Path]]] = {}
    for path, size in need.items():
        anchor = existing_ancestor(path)
        if anchor is None:
            continue
        try:
            dev = anchor.stat().st_dev
        except OSError:
            continue
        prev = by_device.get(dev, (anchor, 0, []))
        by_device[dev] = (prev[0], prev[1] + size, prev[2] + [path])
    out = []
    for anchor, size, paths in by_device.values():
        try:
            free = shutil.disk_usage(anchor).free
        except OSError:
            continue
        if free < size * 1.1:  # only then walk the caches: what is already there need not be written again
            size = sum(max(0, need[p] - _folder_size(p)) for p in paths)
        if free < size * 1.1:
            out.append(error(BACKENDS, "cache_dir", f"caches ({', '.join(map(str, paths))}) need about "
                                                    f"{size / 2**30:.1f} GiB but {free / 2**30:.1f} GiB is free",
                             "free disk space or move the cache folders to a larger disk"))
    return out


def _folder_size(path: Path) -> int:
    """Bytes already cached in ``path`` (what is there need not be written again)."""
    total = 0
    if not path.is_dir():
        return 0
    for root, _, files in os.walk(path):
        for name in files:
            try:
                total += os.stat(os.path.join(root, name)).st_size
            except OSError:
                pass
    return total


def gpu_memory_estimate(batch: int, pixels: float, checkpointing: bool, quantised: bool) -> float:
    """Rough peak GB for SD3 Medium LoRA training, fitted to the reference profile's SimpleTuner rows at 1024 px:
    10.8 at batch 1 and 28.0 at batch 4 without gradient checkpointing, 10.6 at batch 1 with it (+0.63 GB per extra
    image, from the plain loop); activations scale with the image area (``pixels`` / 1024²). An int8 base saves ~2 GB.
    """
    base, per_image = (9.97, 0.63) if checkpointing else (5.07, 5.73)
    estimate = base + per_image * batch * pixels / 1024**2 - (2.0 if quantised else 0.0)
    return round(estimate, 1)


def check_memory(ctx: Context) -> list[Finding]:
    cfg, s = ctx.cfg, ctx.summary
    if cfg is None or not ctx.valid("train_batch_size", "gradient_checkpointing", "base_model_precision"):
        return []
    from sd3tune.manifest import read_manifest

    preset = (read_manifest(ctx.root).get("init") or {}).get("preset")
    s.preset = preset if isinstance(preset, str) else None
    largest = max((w * h for w, h in (map(int, k.split("x")) for k in s.buckets)), default=cfg.data.resolution ** 2)
    s.gpu_memory_gb = gpu_memory_estimate(cfg.optim.train_batch_size, largest, cfg.precision.gradient_checkpointing,
                                          cfg.precision.base_model_precision != "no_change")
    budget = PRESET_GB.get(s.preset or "")
    if budget and s.gpu_memory_gb > budget * 0.95:
        return [warning(ctx.file, ctx.where("train_batch_size"),
                        f"estimated peak GPU memory ~{s.gpu_memory_gb} GB does not fit the {s.preset} preset's card",
                        f"lower {ctx.key('train_batch_size')} or the resolution, or turn gradient checkpointing on "
                        f"(--gradient_checkpointing=true)")]
    return []

