"""SimpleTuner's dataset caches, and what made them.

SimpleTuner 4.10 trusts two caches over the run's dataset and its settings, without a word in sd3tune's output:

- **VAE latents** (``cache_dir_vae``, one ``.pt`` per image, named by a hash of the image's file stem) are reused
  whenever the file exists, whatever resolution or crop made it, and whatever the image holds now. A run initialised
  again at another resolution (``init --force``) trained on the old latents (seen: 64 px latents in a "128 px" LoRA);
  an image re-exported under the same name trained as it was.
- **The aspect-bucket cache** (``aspect_ratio_bucket_indices_SUFFIX.json`` and ``aspect_ratio_bucket_metadata_SUFFIX
  .json`` in the image folder) records the dataset settings it was made with, and SimpleTuner takes those over the
  dataset entry: a setting missing from the entry is filled from it, and one that differs is "put back" (an ERROR
  line in its log, then training goes on). Seen: ``crop`` changed to false by hand still trained square crops.

So ``train``, when it launches, records beside the latents what the training will encode: the dataset's settings as
SimpleTuner applies them (the run's RESOLUTION where the entry sets none), the model, how captions are read, and each
image's size and modification time. At the next launch, against that record:
- other shaping settings or another model: every latent is encoded again, and the bucket cache is made again;
- other caption settings: the bucket cache is made again (SimpleTuner rescans the images, seconds);
- a changed image: its latent is encoded again, and the bucket cache is made again (its size may differ).
Latents in a cache inside the run folder (sd3tune's own) are cleared here; in one elsewhere (shared by hand) train
refuses and says which folder to clear. A cache with no record (an older run) is left as it is: nothing is known.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from sd3tune.config.models import RunConfig
from sd3tune.errors import Sd3tuneError
from sd3tune.fsutil import atomic_write_text
from sd3tune.simpletuner.backends import ImageBackend
from sd3tune.simpletuner.dataset import list_images
from sd3tune.simpletuner.layout import RunPaths

RECORD = ".sd3tune-latents.json"  # beside the latents: what made them
# The image dataset settings that change a latent: its size, aspect bucket or crop.
SHAPING = ("resolution", "resolution_type", "crop", "crop_aspect", "crop_aspect_buckets", "crop_style",
           "maximum_image_size", "target_downsample_size")
# Settings the bucket cache also depends on (it lists each image's captions' source)
CAPTIONING = ("caption_strategy", "instance_prompt", "prepend_instance_prompt")
# SimpleTuner's aspect-bucket files: in the dataset's image folder, named with its cache_file_suffix (default: its id)
BUCKET_FILES = ("aspect_ratio_bucket_indices_{}.json", "aspect_ratio_bucket_metadata_{}.json")


def latent_settings(backend: ImageBackend, model: str) -> dict[str, Any]:
    """What makes the dataset's latents and buckets: the model whose VAE encodes them, and the dataset's shaping and
    caption settings (``backend`` as SimpleTuner applies it: ``ImageBackend.effective``)."""
    return {"model": model, **{key: getattr(backend, key) for key in (*SHAPING, *CAPTIONING)}}


def latent_file(cache: Path, images: Path, image: Path) -> Path:
    """The latent SimpleTuner caches for ``image`` (``VAECache.generate_vae_cache_filename`` with hash_filenames, its
    default): the image's subfolder under the cache, named by the SHA-256 of the file stem."""
    return cache / image.parent.relative_to(images) / (hashlib.sha256(image.stem.encode()).hexdigest() + ".pt")


def image_fingerprints(folder: Path) -> dict[str, list[int]]:
    """``{relative path: [size, mtime_ns]}`` of each file SimpleTuner lists in the image folder."""
    out = {}
    for path in list_images(folder):
        try:
            st = path.stat()
        except OSError:
            continue
        out[path.relative_to(folder).as_posix()] = [st.st_size, st.st_mtime_ns]
    return out


def run_bucket_suffix(dataset_id: str, run_root: Path) -> str:
    """The ``cache_file_suffix`` init gives a dataset: its own per run folder, as SimpleTuner keeps the bucket cache
    in the image folder and fills in (or puts back) settings from it, so runs sharing one mixed their settings."""
    return f"{dataset_id}-{hashlib.sha1(str(run_root.resolve()).encode()).hexdigest()[:8]}"


def bucket_files(backend: ImageBackend, paths: RunPaths) -> list[Path]:
    """The dataset's aspect-bucket cache files (indices first), whether or not they exist."""
    folder = paths.resolve(backend.instance_data_dir)
    return [folder / name.format(backend.cache_file_suffix or backend.id) for name in BUCKET_FILES]


def _describe(changed: dict[str, tuple[Any, Any]]) -> str:
    return ", ".join(f"{k} {old!r} -> {new!r}" for k, (old, new) in changed.items())


def _listed(names: list[str], most: int = 5) -> str:
    return ", ".join(names[:most]) + (" ..." if len(names) > most else "")


def _read_record(folder: Path) -> dict:
    """The record beside the latents; empty when there is none (nothing is known) or it is unreadable."""
    record = folder / RECORD
    if not record.is_file():
        return {}
    try:
        data = json.loads(record.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return {}
    return data if isinstance(data, dict) else {}


def _prepare(backend: ImageBackend, model: str, paths: RunPaths) -> list[str]:
    cache, images = paths.resolve(backend.cache_dir_vae), paths.resolve(backend.instance_data_dir)
    settings, prints = latent_settings(backend, model), image_fingerprints(images)
    before = _read_record(cache)
    notes: list[str] = []
    if before:
        changed = {k: (before.get(k), v) for k, v in settings.items() if before.get(k) != v}
        reshaped = {k: v for k, v in changed.items() if k not in CAPTIONING}
        old_prints = before.get("images") if isinstance(before.get("images"), dict) else {}
        edited = sorted(name for name, fp in prints.items() if name in old_prints and old_prints[name] != fp)
        stale = list(cache.rglob("*.pt")) if reshaped else [latent_file(cache, images, images / n) for n in edited]
        stale = [p for p in stale if p.is_file()]
        if stale:
            what = f"were made with other settings ({_describe(changed)})" if reshaped else \
                f"are of images changed since ({_listed(edited)})"
            if not cache.resolve().is_relative_to(paths.root.resolve()):
                raise Sd3tuneError(f"cached latents in {cache} {what}; SimpleTuner would train on them unchanged",
                                   hint=f"delete the .pt files in {cache}, or point dataset {backend.id}'s "
                                        "cache_dir_vae at a new folder")
            for latent in stale:
                latent.unlink()
            notes.append(f"dataset {backend.id}: {len(stale)} cached latents {what}; cleared, SimpleTuner encodes "
                         "them again")
        if changed or edited:
            buckets = [f for f in bucket_files(backend, paths) if f.is_file()]
            for file in buckets:
                file.unlink()
            if buckets and not stale:  # (a note about latents already says what changed)
                why = f"other settings ({_describe(changed)}), which it would have put back" if changed else \
                    f"images changed since ({_listed(edited)})"
                notes.append(f"dataset {backend.id}: SimpleTuner's bucket cache {buckets[0].name} was made with "
                             f"{why}; cleared, SimpleTuner scans the images again")
    atomic_write_text(cache / RECORD, json.dumps({**settings, "images": prints}, indent=1) + "\n")
    return notes


def prepare_dataset_caches(cfg: RunConfig, backends: list, paths: RunPaths) -> list[str]:
    """Before a training launches, for each enabled image dataset: clear the latents and bucket cache that other
    settings or since-changed images made (latents outside the run folder: refuse), and record what this training
    encodes. Returns notes for the user."""
    notes = []
    for backend in backends:
        if not isinstance(backend, ImageBackend) or backend.disabled:
            continue
        try:
            notes += _prepare(backend.effective(cfg.data), cfg.model.name_or_path, paths)
        except OSError as exc:
            raise Sd3tuneError(f"cannot clear dataset {backend.id}'s stale cache: {exc}",
                               hint="make the folder writable, or delete the stale files by hand") from exc
    return notes
