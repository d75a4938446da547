"""Atomic file writes: a reader (or a crash) never sees a half-written file."""

from __future__ import annotations

import os
import shutil
import stat
import tempfile
from pathlib import Path

from sd3tune.errors import RefuseOverwriteError, Sd3tuneError


def _read_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_UMASK = _read_umask()  # read once, at import, before any thread: os.umask can only be read by setting it


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file in the same folder, renamed over ``path`` when complete.
    The file gets the permissions a plain ``open(path, "w")`` would give (an existing file's, else 0o666 less the
    umask), not mkstemp's 0o600. A folder or file that cannot be written is a user error."""
    path = Path(path)
    try:
        mode = stat.S_IMODE(path.stat().st_mode) if path.is_file() else 0o666 & ~_UMASK
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as exc:
        raise Sd3tuneError(f"cannot write {path}: {exc.strerror or exc}",
                           hint="choose a folder you can write to") from None
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fchmod(f.fileno(), mode)
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(exc, OSError):
            raise Sd3tuneError(f"cannot write {path}: {exc.strerror or exc}",
                               hint="free some disk space, or choose a folder you can write to") from None
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
        verb = 'exists' if len(existing) == 1 else 'exist'
        raise RefuseOverwriteError(f"{names} already {verb}; nothing was written",
                                   hint="pass --force to overwrite, or choose another folder")


def model_folder(model: str) -> Path | None:
    """The local folder a model spec names (a path-like spec, or a folder that exists), or None for a Hub id."""
    local = Path(model).expanduser()
    return local if model.startswith((".", "/", "~")) or local.exists() else None


def absolute_model(model: str) -> str:
    """A model given as a folder, as an absolute path (a run's config is read from the run folder, and outputs
    record where the model was, whatever folder a command ran in); a Hub id as it is."""
    folder = model_folder(model)
    return str(folder.resolve()) if folder is not None else model


def file_sha256(path: Path) -> str:
    """The file's SHA-256 (hex): which exact weights made an output, after the file at that path was replaced."""
    import hashlib

    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


PNG_RATIO = 0.6  # a generated image's PNG against its raw RGB bytes (SD3 images at 1024 px: ~0.4-0.6)
PNG_EXTRA = 16 * 1024  # provenance text chunks and headers, per image
SPACE_MARGIN = 1.1


def images_bytes(images: int, width: int, height: int, columns: int = 0, rows: int = 0) -> int:
    """Bytes that ``images`` generated PNGs take, about, with a contact sheet of ``columns`` x ``rows`` cells (of at
    most 256 px) when there is one, and a margin."""
    cell = 256 if max(width, height) >= 256 else 128
    sheet = (220 + columns * (cell + 4)) * (22 + rows * (cell + 4)) * 3 if columns and rows else 0
    return int(SPACE_MARGIN * (images * (width * height * 3 * PNG_RATIO + PNG_EXTRA) + sheet))


def check_free_space(folder: Path, needed: int, what: str, hint: str, reclaimed: int = 0) -> None:
    """Refuse work that writes about ``needed`` bytes (``what``: what they are) into ``folder`` when its disk has
    less free, before any model loads (``reclaimed``: bytes the work removes first). Unknown free space passes."""
    try:
        free = shutil.disk_usage(folder).free + reclaimed
    except OSError:
        return
    if free < needed:
        raise Sd3tuneError(f"{folder} has {free / 2**20:.1f} MiB free; writing {what} needs about "
                           f"{needed / 2**20:.1f} MiB; nothing was generated", hint=hint)
