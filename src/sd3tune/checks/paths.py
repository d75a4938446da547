"""Rules on the folders a run reads and writes: the dataset file, the output folder (resuming included), write
access, folders inside another run, and shell variables SimpleTuner would read."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import TYPE_CHECKING

from sd3tune.errors import Sd3tuneError
from sd3tune.findings import Finding, error, warning
from sd3tune.simpletuner import keys
from sd3tune.simpletuner.backends import ImageBackend
from sd3tune.simpletuner.caches import run_bucket_suffix
from sd3tune.simpletuner.layout import (checkpoints, find_run_root, incomplete_checkpoint, incomplete_hint,
                                       output_conflict)
from sd3tune.simpletuner.keys import BACKENDS_FILE as BACKENDS

if TYPE_CHECKING:
    from sd3tune.checks.engine import Context


def check_paths(ctx: Context) -> list[Finding]:
    """DATALOADER_CONFIG must be the file sd3tune checks; OUTPUT_DIR must be creatable."""
    out, f = [], ctx.file
    if "data_backend_config" in ctx.run.args and ctx.cfg is not None and ctx.valid("data_backend_config"):
        target = ctx.path(ctx.cfg.paths.data_backend_config)
        ours = ctx.run.paths.backends
        if target.resolve() == ours.resolve():
            pass  # a missing or broken file is reported by the reader
        elif not target.is_file():
            out.append(error(f, ctx.where("data_backend_config"), f"{target} does not exist",
                             f"point it at {ours}"))
        else:
            out.append(error(f, ctx.where("data_backend_config"),
                             f"SimpleTuner would read {target}, but the run's datasets are in {ours}",
                             f"point it at {ours}"))
    if "output_dir" in ctx.run.args and ctx.cfg is not None and ctx.valid("output_dir"):
        output = ctx.path(ctx.cfg.paths.output_dir)
        if output.exists() and not output.is_dir():
            out.append(error(f, ctx.where("output_dir"), f"{output} is a file", "choose a folder path"))
        else:
            out += _unwritable(output, f, ctx.where("output_dir"))
        out += _in_another_run(ctx, output, f, ctx.where("output_dir"), ctx.run.paths.output)
        if ctx.resume:  # what `sd3tune train --resume` refuses is an error here too: check said ok, train refused
            steps = ctx.cfg.optim.max_train_steps if ctx.valid("max_train_steps") else None
            conflict = output_conflict(output, resume=True, steps=steps)
            if conflict:
                out.append(error(f, ctx.where("output_dir"), conflict[0], conflict[1]))
            else:
                out += _resumed_checkpoint(ctx, output, f)
        elif output.is_dir() and (conflict := output_conflict(output, resume=False, steps=None)):
            # a finished or interrupted run: train refuses until the user says what they want
            out.append(warning(f, ctx.where("output_dir"), f"{conflict[0]}, so `sd3tune train` refuses",
                               conflict[1]))
    for b in ctx.run.backends or []:
        folder = ctx.path(b.cache_dir_vae if isinstance(b, ImageBackend) else b.cache_dir)
        key = f"{b.id}.{'cache_dir_vae' if isinstance(b, ImageBackend) else 'cache_dir'}"
        out += _in_another_run(ctx, folder, BACKENDS, key, ctx.run.paths.cache)
        if not b.disabled:
            out += _unwritable(folder, BACKENDS, key)
        if isinstance(b, ImageBackend) and b.cache_file_suffix:
            out += _other_runs_suffix(ctx, b)
        if isinstance(b, ImageBackend) and not b.disabled and ctx.path(b.instance_data_dir).is_dir():
            out += _unwritable(ctx.path(b.instance_data_dir), BACKENDS, f"{b.id}.instance_data_dir",
                               "SimpleTuner writes its aspect-bucket cache (aspect_ratio_bucket_*.json) into the "
                               "image folder", "copy the images to a folder you can write to")
    return out


def _other_runs_suffix(ctx: Context, b: ImageBackend) -> list[Finding]:
    """A run folder copied after `init` keeps the original's cache_file_suffix: the two runs then share (and fill in
    each other's settings from) SimpleTuner's bucket cache in the image folder."""
    ours = run_bucket_suffix(b.id, ctx.root)
    made_by_init = re.fullmatch(rf"{re.escape(b.id)}-[0-9a-f]{{8}}", b.cache_file_suffix or "")
    if not made_by_init or b.cache_file_suffix == ours:
        return []
    return [warning(BACKENDS, f"{b.id}.cache_file_suffix", f"{b.cache_file_suffix!r} was made for another run folder "
                                                           "(copied?); both runs would share SimpleTuner's bucket "
                                                           "cache in the image folder and mix their settings",
                    f"set it to {ours!r}")]


def _unwritable(path: Path, file: str, key: str, why: str = "",
                hint: str = "choose a folder you can write to") -> list[Finding]:
    """``path`` (a folder SimpleTuner writes, made if missing) cannot be written: it fails there after loading."""
    parent = existing_ancestor(path)
    if parent is None or os.access(parent, os.W_OK | os.X_OK):
        return []
    what = f"{parent} is not writable" + ("" if parent == path else f", so {path} cannot be made")
    return [error(file, key, what + (f"; {why}" if why else ""), hint)]


def _resumed_checkpoint(ctx: Context, output: Path, f: str) -> list[Finding]:
    """--resume: the checkpoint SimpleTuner resumes from (the latest) is incomplete, of another rank, or trained with
    other stamped settings."""
    from sd3tune.lora import changed_settings, lora_settings, read_safetensors_header

    latest = checkpoints(output)[-1]
    if incomplete_checkpoint(latest):
        return [error(f, ctx.where("output_dir"), f"{latest.name} is incomplete (its save was interrupted: it has no "
                                                  f"{keys.CHECKPOINT_GUARD}), and SimpleTuner fails resuming from it, "
                                                  "after loading the models", incomplete_hint(output, ctx.root))]
    try:
        stamp, tensors = read_safetensors_header(latest / keys.LORA_WEIGHT_NAME)
    except (Sd3tuneError, OSError):  # missing or cut short: SimpleTuner's own problem to report
        return []
    # the rank from the tensors themselves (a checkpoint sd3tune did not stamp has one too): SimpleTuner fails to load
    # a checkpoint of another rank, after loading every model
    ranks = {info["shape"][0] for name, info in tensors.items() if name.endswith("lora_A.weight") and info.get("shape")}
    if len(ranks) == 1 and ctx.valid("lora_rank") and ctx.cfg.lora.rank not in ranks:
        (rank,) = ranks
        return [error(f, ctx.where("lora_rank"), f"{rank} in {latest.name}, the checkpoint --resume continues, but "
                                                 f"{ctx.cfg.lora.rank} here: SimpleTuner cannot resume a LoRA of "
                                                 "another rank (it fails loading the checkpoint, after loading the "
                                                 "models)",
                      f"set {ctx.key('lora_rank')} back to {rank}, or train into a new output folder")]
    if ctx.bad or ctx.backends_partial:  # invalid values (reported) stand in as defaults: nothing to compare
        return []
    changes = changed_settings(stamp, lora_settings(ctx.cfg, ctx.backends or []))
    if not changes:
        return []
    return [warning(f, ctx.where("output_dir"), f"{latest.name} trained with other settings ({', '.join(changes)}); "
                                                "the resumed LoRA trains on with the new ones (its metadata records "
                                                "both, in sd3tune.history)",
                    "put the old values back to continue as before, or train into a new output folder")]


def _in_another_run(ctx: Context, path: Path, file: str, key: str, ours: Path) -> list[Finding]:
    """A run folder copied or moved after `init` keeps absolute paths into the old one: training would then write
    (and resume from) the other run's LoRA, checkpoints or caches."""
    other = find_run_root(path.parent if path.exists() else existing_ancestor(path) or path)
    if other is None or other.resolve() == ctx.run.paths.root.resolve():
        return []
    return [error(file, key, f"{path} is inside another run's folder ({other}): this run would write and resume "
                              "from that run's files (was the run folder copied or moved?)",
                  f"point it at this run's own folder, e.g. {ours}")]


def existing_ancestor(path: Path) -> Path | None:
    for p in (path, *path.parents):
        if p.exists():
            return p if p.is_dir() else None
    return None


def check_environment(ctx: Context) -> list[Finding]:
    """Stray shell variables SimpleTuner would read (sd3tune train scrubs them; a manual launch would not)."""
    stray = sorted(k for k in ctx.catalog.environment_variables() if k in os.environ)
    if not stray:
        return []
    return [warning("environment", ", ".join(stray), "set in this shell; SimpleTuner reads them and they override "
                                                     "the run's files (sd3tune train removes them, a manual "
                                                     "`simpletuner train` would not)", f"unset {' '.join(stray)}")]

