"""SimpleTuner's dataset caches, and the settings that made them.

SimpleTuner 4.10 trusts two caches over the run's own dataset settings, without a word in sd3tune's output:

- **VAE latents** (``cache_dir_vae``, one ``.pt`` per image, named by a hash of its path) are reused whenever the file
  exists, whatever resolution or crop made it. A run initialised again at another resolution (``init --force``)
  trained on the old latents (seen: 64 px latents in a "128 px" LoRA).
- **The aspect-bucket cache** (``aspect_ratio_bucket_indices_SUFFIX.json`` and ``aspect_ratio_bucket_metadata_SUFFIX
  .json`` in the image folder) records the dataset settings it was made with, and SimpleTuner takes those over the
  dataset entry: a setting missing from the entry is filled from it, and one that differs is "put back" (an ERROR
  line in its log, then training goes on). Seen: ``crop`` changed to false by hand still trained square crops.

So ``train``, when it launches, clears the bucket cache of a dataset whose recorded settings differ (SimpleTuner scans
the images again, seconds), records the settings that shape the latents beside them, and re-encodes (clears) latents
that other settings made: in a cache inside the run folder (sd3tune's own) it clears them itself, elsewhere (a cache
shared by hand) it refuses and says which folder to clear.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from sd3tune.config.dataset import ImageBackend
from sd3tune.errors import Sd3tuneError
from sd3tune.fsutil import atomic_write_text
from sd3tune.simpletuner.files import RunPaths

RECORD = ".sd3tune-latents.json"  # beside the latents: the settings that made them
# The image dataset settings that change a latent: its size, aspect bucket or crop.
SHAPING = ("resolution", "resolution_type", "crop", "crop_aspect", "crop_aspect_buckets", "crop_style",
           "maximum_image_size", "target_downsample_size")
# SimpleTuner's aspect-bucket files: in the dataset's image folder, named with its cache_file_suffix (default: its id)
BUCKET_FILES = ("aspect_ratio_bucket_indices_{}.json", "aspect_ratio_bucket_metadata_{}.json")
# What the bucket cache's recorded settings are compared on: the shaping settings, and how captions are read
BUCKET_SETTINGS = (*SHAPING, "caption_strategy", "instance_prompt")
# Without an entry, SimpleTuner takes these from the run's RESOLUTION / RESOLUTION_TYPE, not from a fixed default
RUN_DEFAULTED = ("resolution", "resolution_type")


def latent_settings(backend: ImageBackend, model: str) -> dict[str, Any]:
    """What made (or will make) the dataset's latents: the shaping settings and the model whose VAE encodes them."""
    return {"model": model, **{key: getattr(backend, key) for key in SHAPING}}


def _describe(changed: dict[str, tuple[Any, Any]]) -> str:
    return ", ".join(f"{k} {old!r} -> {new!r}" for k, (old, new) in changed.items())


def _read_json_dict(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return {}
    return data if isinstance(data, dict) else {}


# ----------------------------------------------------------------------------------------------- latents


def changed_settings(folder: Path, settings: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
    """``{setting: (cached with, wanted)}`` for latents in ``folder`` recorded with other settings; empty when there
    are no latents, no record (an older cache: nothing is known) or the same settings."""
    record = folder / RECORD
    if not record.is_file() or not any(folder.glob("*.pt")):
        return {}
    before = _read_json_dict(record)
    return {k: (before.get(k), v) for k, v in settings.items() if before.get(k) != v}


def _prepare_latents(backend: ImageBackend, model: str, paths: RunPaths) -> list[str]:
    folder, settings = paths.resolve(backend.cache_dir_vae), latent_settings(backend, model)
    notes = []
    changed = changed_settings(folder, settings)
    if changed:
        if not folder.resolve().is_relative_to(paths.root.resolve()):
            raise Sd3tuneError(f"the latents in {folder} were cached with other settings ({_describe(changed)}); "
                               "SimpleTuner would train on them unchanged", hint=f"delete the .pt files in {folder}, "
                               f"or point dataset {backend.id}'s cache_dir_vae at a new folder")
        for latent in folder.glob("*.pt"):
            latent.unlink()
        notes.append(f"dataset {backend.id}: cached latents were made with other settings ({_describe(changed)}); "
                     "cleared, SimpleTuner encodes them again")
    atomic_write_text(folder / RECORD, json.dumps(settings, indent=1) + "\n")
    return notes


# ----------------------------------------------------------------------------------------------- aspect buckets


def bucket_files(backend: ImageBackend, paths: RunPaths) -> list[Path]:
    """The dataset's aspect-bucket cache files (indices first), whether or not they exist."""
    folder = paths.resolve(backend.instance_data_dir)
    return [folder / name.format(backend.cache_file_suffix or backend.id) for name in BUCKET_FILES]


def stale_bucket_settings(backend: ImageBackend, paths: RunPaths) -> dict[str, tuple[Any, Any]]:
    """``{setting: (recorded, wanted)}`` where the dataset's bucket cache was made with settings other than its entry
    says (SimpleTuner would train with the recorded ones); empty when there is no cache or it agrees."""
    recorded = _read_json_dict(bucket_files(backend, paths)[0]).get("config")
    if not isinstance(recorded, dict):
        return {}
    wanted = backend.model_dump(mode="json")
    return {key: (recorded[key], wanted[key]) for key in BUCKET_SETTINGS
            if key in recorded and recorded[key] != wanted[key]
            and (key in backend.model_fields_set or key not in RUN_DEFAULTED)}


def _prepare_buckets(backend: ImageBackend, paths: RunPaths) -> list[str]:
    changed = stale_bucket_settings(backend, paths)
    if not changed:
        return []
    files = bucket_files(backend, paths)
    for file in files:
        file.unlink(missing_ok=True)
    return [f"dataset {backend.id}: SimpleTuner's bucket cache {files[0].name} was made with other settings "
            f"({_describe(changed)}) and would have overridden them; cleared, SimpleTuner scans the images again"]


def prepare_dataset_caches(backends: list, model: str, paths: RunPaths) -> list[str]:
    """Before a training launches, for each enabled image dataset: clear a bucket cache made with other settings,
    clear latents that other settings made (inside the run folder; refuse elsewhere), and record the settings the
    training will encode with. Returns notes for the user."""
    notes = []
    for backend in backends:
        if not isinstance(backend, ImageBackend) or backend.disabled:
            continue
        try:
            notes += _prepare_buckets(backend, paths)
            notes += _prepare_latents(backend, model, paths)
        except OSError as exc:
            raise Sd3tuneError(f"cannot clear dataset {backend.id}'s stale cache: {exc}",
                               hint="make the folder writable, or delete the stale files by hand") from exc
    return notes
