"""What a run needs beyond the checks: disk for SimpleTuner's caches, and an estimate of its peak GPU memory
against the card the run's init preset is made for."""

from __future__ import annotations

import functools
import json
import os
import shutil
from dataclasses import dataclass
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


# ------------------------------------------------------------------------------------------------ peak GPU memory
# A linear model of the training process's peak GPU memory, fitted (least squares) to the measured peaks in
# memory_peaks.json: peak GiB = base + eager * images + checkpointing + checkpointed * images + quantised, where
# images = batch x pixels / 1024² split by the share of blocks checkpointed, and checkpointing / quantised are what
# turning them on adds at any size. A term the measured rows cannot determine keeps its prior (PRIORS, not
# measured: an int8 base stores SD3 Medium's 2.03 B frozen weights in 1 byte instead of 2; the plain loop's +0.63 GiB
# per checkpointed 1024² image): a per-image term needs rows at two sizes at least (one size cannot tell what grows
# with the images from what does not). Adding a row (a GPU measurement) refits every term it determines. The stated
# error holds for a setup some row measured (``measured``); any other is an extrapolation, and check says so.
PEAKS_FILE = Path(__file__).with_name("memory_peaks.json")
TERMS = ("base", "eager", "checkpointing", "checkpointed", "quantised")
PER_IMAGE = ("eager", "checkpointed")
PRIORS = {"checkpointing": 0.0, "checkpointed": 0.63, "quantised": -2.03e9 / 2**30}


def _features(batch: int, pixels: float, checkpointing: float, quantised: bool) -> list[float]:
    images = batch * pixels / 1024**2
    share = float(checkpointing)
    return [1.0, images * (1 - share), share, images * share, 1.0 if quantised else 0.0]


def _setup(batch: int, pixels: float, checkpointing: float, quantised: bool) -> tuple:
    return int(batch), round(float(pixels)), round(float(checkpointing), 3), bool(quantised)


def _row_setup(row: dict) -> tuple:
    """A measured row's (batch, pixels, checkpointing share, quantised), as the estimate takes them."""
    return row["batch"], row["side"] ** 2, row["checkpointing"], row["quantised"]


def _solve(a: list[list[float]], b: list[float]) -> list[float] | None:
    """Gaussian elimination with partial pivoting; None when the system is singular."""
    n = len(b)
    m = [row[:] + [b[i]] for i, row in enumerate(a)]
    for col in range(n):
        pivot = max(range(col, n), key=lambda r: abs(m[r][col]))
        if abs(m[pivot][col]) < 1e-9:
            return None
        m[col], m[pivot] = m[pivot], m[col]
        for r in range(n):
            if r != col:
                f = m[r][col] / m[col][col]
                m[r] = [x - f * y for x, y in zip(m[r], m[col])]
    return [m[i][n] / m[i][i] for i in range(n)]


@dataclass(frozen=True)
class MemoryFit:
    coefficients: dict[str, float]  # GiB per term
    fitted: tuple[str, ...]  # the terms the rows determined (the others are PRIORS)
    max_error_gib: float  # largest |estimate - measured| over the rows
    rows: int
    setups: frozenset = frozenset()  # the measured setups (batch, pixels, checkpointing share, quantised)

    def estimate(self, batch: int, pixels: float, checkpointing: float, quantised: bool) -> float:
        return sum(self.coefficients[t] * v for t, v in zip(TERMS, _features(batch, pixels, checkpointing, quantised)))

    def measured(self, batch: int, pixels: float, checkpointing: float, quantised: bool) -> bool:
        """Whether a row measured this setup: only there does ``max_error_gib`` hold."""
        return _setup(batch, pixels, checkpointing, quantised) in self.setups


def fit_memory(rows: list[dict]) -> MemoryFit:
    """Least-squares fit of TERMS to the measured ``rows`` (memory_peaks.json's); a term that no row exercises, or
    that the rows cannot tell from the others, keeps its prior."""
    xs, ys = [_features(*_row_setup(r)) for r in rows], [float(r["gib"]) for r in rows]
    free = [i for i, t in enumerate(TERMS)
            if t == "base" or len({x[i] for x in xs if x[i]}) >= (2 if t in PER_IMAGE else 1)]
    while True:
        fixed = {i: PRIORS[TERMS[i]] for i in range(len(TERMS)) if i not in free}
        target = [y - sum(x[i] * c for i, c in fixed.items()) for x, y in zip(xs, ys)]
        a = [[sum(x[i] * x[j] for x in xs) for j in free] for i in free]
        solved = _solve(a, [sum(x[i] * t for x, t in zip(xs, target)) for i in free])
        if solved is not None:
            break
        free.pop()  # the rows cannot separate the last term from the others: it keeps its prior
    coefficients = {**{TERMS[i]: c for i, c in fixed.items()}, **{TERMS[i]: c for i, c in zip(free, solved)}}
    error = max((abs(sum(coefficients[t] * v for t, v in zip(TERMS, x)) - y) for x, y in zip(xs, ys)), default=0.0)
    setups = frozenset(_setup(*_row_setup(r)) for r in rows)
    return MemoryFit(coefficients, tuple(TERMS[i] for i in free), round(error, 2), len(rows), setups)


@functools.cache
def measured_fit() -> MemoryFit:
    return fit_memory(json.loads(PEAKS_FILE.read_text())["rows"])


def gpu_memory_estimate(batch: int, pixels: float, checkpointing: float, quantised: bool) -> float:
    """Peak GiB of an SD3 Medium LoRA training (fitted to memory_peaks.json, see ``measured_fit().max_error_gib``);
    ``checkpointing`` is the share of blocks checkpointed (True: all)."""
    return round(measured_fit().estimate(batch, pixels, checkpointing, quantised), 1)


def check_memory(ctx: Context) -> list[Finding]:
    cfg, s = ctx.cfg, ctx.summary
    if cfg is None or not ctx.valid("train_batch_size", "gradient_checkpointing", "base_model_precision"):
        return []
    from sd3tune.manifest import read_manifest

    preset = (read_manifest(ctx.root).get("init") or {}).get("preset")
    s.preset = preset if isinstance(preset, str) else None
    largest = max((w * h for w, h in (map(int, k.split("x")) for k in s.buckets)), default=cfg.data.resolution ** 2)
    setup = (cfg.optim.train_batch_size, largest, cfg.precision.gradient_checkpointing,
             cfg.precision.base_model_precision != "no_change")
    fit = measured_fit()
    s.gpu_memory_gb = gpu_memory_estimate(*setup)
    s.gpu_memory_error_gb = fit.max_error_gib if fit.measured(*setup) else None  # None: extrapolated
    budget = PRESET_GB.get(s.preset or "")
    if budget and s.gpu_memory_gb > budget * 0.95:
        ways = f"lower {ctx.key('train_batch_size')} or the resolution" + (
            "" if cfg.precision.gradient_checkpointing else ", or turn gradient checkpointing on "
                                                            "(--gradient_checkpointing=true)")
        how = (f"within {fit.max_error_gib} GiB of each" if s.gpu_memory_error_gb is not None
               else "none of this setup: extrapolated")
        return [warning(ctx.file, ctx.where("train_batch_size"),
                        f"estimated peak GPU memory ~{s.gpu_memory_gb} GiB (fitted to {fit.rows} measured peaks, "
                        f"{how}) does not fit the {s.preset} preset's card", ways)]
    return []

