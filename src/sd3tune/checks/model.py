"""Rules from the base model's own files: the largest image its transformer can place. Read from the model's config
files (the local folder, else the cached Hub snapshot); nothing is downloaded, and without either the rule is skipped.

diffusers' SD3 transformer places an image through ``PatchEmbed.cropped_pos_embed``: a latent of ``pixels // vae
scale`` is cut into ``patch_size`` patches per side, and more than ``pos_embed_max_size`` patches on a side raise
``Height (72) cannot be greater than `pos_embed_max_size`: 64.`` at the first training step (or validation).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from sd3tune.findings import Finding, error
from sd3tune.hub import cached_snapshot_dir
from sd3tune.simpletuner.keys import BACKENDS_FILE as BACKENDS

if TYPE_CHECKING:
    from sd3tune.checks.engine import Context


@dataclass(frozen=True)
class SizeLimit:
    """What the transformer's positional embedding allows (transformer/config.json and vae/config.json)."""

    pos_embed_max_size: int  # patches per side
    patch_size: int
    vae_scale: int  # 2 ** (len(vae block_out_channels) - 1), as diffusers' SD3 pipeline computes it

    @property
    def max_side(self) -> int:
        """The largest side, in pixels, of an image (or bucket) the transformer places."""
        return self.pos_embed_max_size * self.patch_size * self.vae_scale

    def patches(self, pixels: int) -> int:
        return pixels // self.vae_scale // self.patch_size

    def refusal(self, width: int, height: int) -> str | None:
        """diffusers' error for an image of ``width`` x ``height`` pixels (height first, as it checks), or None."""
        for name, side in (("Height", height), ("Width", width)):
            if self.patches(side) > self.pos_embed_max_size:
                return f"{name} ({self.patches(side)}) cannot be greater than `pos_embed_max_size`: " \
                       f"{self.pos_embed_max_size}."
        return None


def read_size_limit(model_dir: Path) -> SizeLimit | None:
    """The size limit of the diffusers SD3 folder ``model_dir``; None when its configs do not say (no limit known)."""
    try:
        transformer = json.loads((model_dir / "transformer" / "config.json").read_text(encoding="utf-8"))
        vae = json.loads((model_dir / "vae" / "config.json").read_text(encoding="utf-8"))
        pos, patch, blocks = (transformer.get("pos_embed_max_size"), transformer.get("patch_size"),
                              vae.get("block_out_channels"))
    except (OSError, ValueError, AttributeError):
        return None
    if not (isinstance(pos, int) and isinstance(patch, int) and pos > 0 and patch > 0 and isinstance(blocks, list)
            and blocks):
        return None
    return SizeLimit(pos, patch, 2 ** (len(blocks) - 1))


def model_folder(ctx: Context) -> Path | None:
    """The base model's files on this machine: the local folder, else the cached Hub snapshot; None otherwise."""
    name = ctx.cfg.model.name_or_path
    path = ctx.path(name)
    if path.is_dir():
        return path
    if name.startswith((".", "/", "~")):
        return None
    return cached_snapshot_dir(name)


def check_model_sizes(ctx: Context) -> list[Finding]:
    """Every aspect bucket, and the validation size, within the largest side the base model's transformer places."""
    if not ctx.valid("pretrained_model_name_or_path") or not ctx.datasets:
        return []
    if {"pretrained_transformer_model_name_or_path", "pretrained_vae_model_name_or_path"} & set(ctx.run.args):
        return []  # parts from elsewhere: their limit is not this folder's
    folder = model_folder(ctx)
    limit = read_size_limit(folder) if folder is not None else None
    if limit is None:
        return []
    model = ctx.cfg.model.name_or_path
    why = (f"{model} places at most {limit.max_side} px per side (transformer pos_embed_max_size "
           f"{limit.pos_embed_max_size} x patch {limit.patch_size} x VAE scale {limit.vae_scale})")
    out = []
    for d in ctx.datasets:
        b = d.backend
        over = sorted(k for k in d.usable if limit.refusal(*k))
        if not over:
            continue
        where = (BACKENDS, f"{b.id}.resolution") if "resolution" in b.model_fields_set else \
            (ctx.file, ctx.where("resolution"))
        listed = ", ".join(f"{w}x{h}" for w, h in over)
        out.append(error(*where, f"dataset {b.id!r}: aspect bucket{'s' if len(over) > 1 else ''} {listed} "
                                 f"{'are' if len(over) > 1 else 'is'} too large: {why}; SimpleTuner would stop at the "
                                 f"first step ({limit.refusal(*over[0])})",
                         f"lower the resolution until no bucket side exceeds {limit.max_side} px (the long side of a "
                         "non-square bucket is larger than the resolution), or crop to square (crop true, "
                         "crop_aspect square)"))
    if ctx.valid("validation_resolution", "validation_disable") and ctx.cfg.validation.enabled:
        text = ctx.cfg.validation.resolution
        width, _, height = text.partition("x")
        refusal = limit.refusal(int(width), int(height or width)) if text.replace("x", "").isdigit() else None
        if refusal:
            out.append(error(ctx.file, ctx.where("validation_resolution"), f"{text} is too large: {why}; SimpleTuner "
                                                                           f"would stop at validation ({refusal})",
                             f"use at most {limit.max_side}x{limit.max_side}"))
    return out
