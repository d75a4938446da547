"""The run manifest (``RUN_DIR/sd3tune.json``): what made this run and what it produced, for provenance."""

from __future__ import annotations

import json
import platform
from datetime import datetime, timezone
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

from sd3tune import __version__
from sd3tune.config.models import RunConfig
from sd3tune.fsutil import atomic_write_text
from sd3tune.simpletuner import keys
from sd3tune.simpletuner.backends import ImageBackend

MANIFEST_NAME = "sd3tune.json"


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def package_versions(*names: str) -> dict[str, str]:
    out = {"sd3tune": __version__, "python": platform.python_version()}
    for name in names:
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = "not installed"
    return out


def read_manifest(run_dir: Path) -> dict[str, Any]:
    path = Path(run_dir) / MANIFEST_NAME
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        return {}
    return data if isinstance(data, dict) else {}  # a hand-edited manifest that is not an object: start afresh


def update_manifest(run_dir: Path, key: str, entry: dict[str, Any], append: bool = False) -> dict[str, Any]:
    """Set (or append to) ``key`` in the manifest and write it atomically."""
    data = read_manifest(run_dir)
    if append:
        data.setdefault(key, []).append(entry)
    else:
        data[key] = entry
    atomic_write_text(Path(run_dir) / MANIFEST_NAME, json.dumps(data, indent=2) + "\n")
    return data


# The LoRA stamp (safetensors metadata, "sd3tune.*"): how it trained, so it samples as it trained wherever it is copied.
HISTORY_KEY = "sd3tune.history"
SETTING_LABELS = {  # stamped training settings -> how a message names them
    "sd3tune.base_model": "base model", "sd3tune.model_family": "model family", "sd3tune.lora_rank": "LoRA rank",
    "sd3tune.lora_alpha": "LoRA alpha", "sd3tune.t5_max_length": "T5 length",
    "sd3tune.flow_schedule_shift": "schedule shift", "sd3tune.resolution": "resolution",
    "sd3tune.resolution_type": "resolution type",
}


def lora_settings(cfg: RunConfig, backends: list[Any]) -> dict[str, str]:
    """The training settings a LoRA's stamp records (``SETTING_LABELS``' keys), from the validated run."""
    # the resolution the images train at: the (first) dataset's, which SimpleTuner uses over RESOLUTION
    trained = next((b.effective(cfg.data) for b in backends if isinstance(b, ImageBackend) and not b.disabled),
                   cfg.data)
    return {
        "sd3tune.base_model": cfg.model.name_or_path, "sd3tune.model_family": cfg.model.family,
        "sd3tune.lora_rank": str(cfg.lora.rank), "sd3tune.lora_alpha": repr(cfg.lora.effective_alpha),
        "sd3tune.t5_max_length": str(keys.SD3_T5_MAX_LENGTH),
        "sd3tune.flow_schedule_shift": repr(cfg.timesteps.schedule_shift),
        "sd3tune.resolution": str(trained.resolution), "sd3tune.resolution_type": trained.resolution_type,
    }


def changed_settings(earlier: dict[str, str], settings: dict[str, str]) -> list[str]:
    """'resolution 64 -> 128' for each stamped setting ``earlier`` (a LoRA's stamp) records otherwise."""
    return [f"{label} {earlier[key]} -> {settings[key]}" for key, label in SETTING_LABELS.items()
            if key in earlier and key in settings and earlier[key] != settings[key]]


def resumed_history(checkpoint: Path, stamp: dict[str, str]) -> str:
    """The ``sd3tune.history`` stamp of a training resumed from ``checkpoint`` (its folder, holding ``stamp``, its
    LoRA's metadata): the parts trained before, oldest first, each with the step it ended at and its settings (none
    for a checkpoint sd3tune did not stamp)."""
    from sd3tune.simpletuner.files import checkpoint_step

    try:
        earlier = json.loads(stamp.get(HISTORY_KEY, "[]"))
    except json.JSONDecodeError:
        earlier = []
    part: dict[str, Any] = {"until_step": checkpoint_step(checkpoint), "checkpoint": checkpoint.name}
    part.update({k.removeprefix("sd3tune."): v for k, v in stamp.items() if k in SETTING_LABELS})
    if "sd3tune.trained_at" in stamp:
        part["trained_at"] = stamp["sd3tune.trained_at"]
    return json.dumps([*(earlier if isinstance(earlier, list) else []), part])
