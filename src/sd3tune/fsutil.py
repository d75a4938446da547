"""Atomic file writes: a reader (or a crash) never sees a half-written file."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from sd3tune.errors import RefuseOverwriteError


def atomic_write_bytes(path: Path, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def refuse_existing(paths: list[Path], force: bool) -> None:
    """Raise before anything is written when any of ``paths`` exists and ``force`` is False."""
    if force:
        return
    existing = [p for p in paths if Path(p).exists()]
    if existing:
        names = ", ".join(str(p) for p in existing)
        raise RefuseOverwriteError(f"{names} already exists; nothing was written",
                                   hint="pass --force to overwrite, or choose another folder")
