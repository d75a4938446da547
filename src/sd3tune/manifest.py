"""The run manifest (``RUN_DIR/sd3tune.json``): what made this run and what it produced, for provenance."""

from __future__ import annotations

import json
import platform
from datetime import datetime, timezone
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

from sd3tune import __version__
from sd3tune.fsutil import atomic_write_text

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
