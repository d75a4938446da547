"""SimpleTuner's VAE latent cache, and the settings that made it.

SimpleTuner 4.10 reuses a dataset's cached latent whenever a file exists for the image (``cache_dir_vae``, one
``.pt`` per image, named by a hash of its path), whatever resolution or crop made it. So a run initialised again at
another resolution (``init --force``) or edited by hand trained on the old latents, without a word in its log (seen:
64 px latents in a "128 px" LoRA). ``train`` therefore records the settings that shape the latents beside them when it
launches, and re-encodes (clears) latents that other settings made: in a cache inside the run folder (sd3tune's own)
it clears them itself, elsewhere (a cache shared by hand) it refuses and says which folder to clear.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from sd3tune.config.dataset import ImageBackend
from sd3tune.errors import Sd3tuneError
from sd3tune.fsutil import atomic_write_text

RECORD = ".sd3tune-latents.json"  # beside the latents: the settings that made them
# The image dataset settings that change a latent: its size, aspect bucket or crop.
SHAPING = ("resolution", "resolution_type", "crop", "crop_aspect", "crop_aspect_buckets", "crop_style",
           "maximum_image_size", "target_downsample_size")


def latent_settings(backend: ImageBackend, model: str) -> dict[str, Any]:
    """What made (or will make) the dataset's latents: the shaping settings and the model whose VAE encodes them."""
    return {"model": model, **{key: getattr(backend, key) for key in SHAPING}}


def cache_folder(backend: ImageBackend, run_root: Path) -> Path:
    """The dataset's latent folder (a relative ``cache_dir_vae`` is read from the run folder, where training runs)."""
    folder = Path(backend.cache_dir_vae).expanduser()
    return folder if folder.is_absolute() else run_root / folder


def changed_settings(folder: Path, settings: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
    """``{setting: (cached with, wanted)}`` for latents in ``folder`` recorded with other settings; empty when there
    are no latents, no record (an older cache: nothing is known) or the same settings."""
    record = folder / RECORD
    if not record.is_file() or not any(folder.glob("*.pt")):
        return {}
    try:
        before = json.loads(record.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        before = {}
    before = before if isinstance(before, dict) else {}
    return {k: (before.get(k), v) for k, v in settings.items() if before.get(k) != v}


def prepare_latent_caches(backends: list, model: str, run_root: Path) -> list[str]:
    """Before a training launches: clear each image dataset's latents that other settings made (inside the run
    folder; refuse elsewhere) and record the settings the training will encode with. Returns notes for the user."""
    notes = []
    for backend in backends:
        if not isinstance(backend, ImageBackend) or backend.disabled:
            continue
        folder, settings = cache_folder(backend, run_root), latent_settings(backend, model)
        changed = changed_settings(folder, settings)
        if changed:
            what = ", ".join(f"{k} {old!r} -> {new!r}" for k, (old, new) in changed.items())
            if not folder.resolve().is_relative_to(run_root.resolve()):
                raise Sd3tuneError(f"the latents in {folder} were cached with other settings ({what}); SimpleTuner "
                                   "would train on them unchanged", hint=f"delete the .pt files in {folder}, or point "
                                   f"dataset {backend.id}'s cache_dir_vae at a new folder")
            for latent in folder.glob("*.pt"):
                latent.unlink()
            notes.append(f"dataset {backend.id}: cached latents were made with other settings ({what}); cleared, "
                         "SimpleTuner encodes them again")
        atomic_write_text(folder / RECORD, json.dumps(settings, indent=1) + "\n")
    return notes
