"""An image dataset as SimpleTuner 4.10.1 reads it, without decoding an image or importing SimpleTuner.

- the files are exactly those SimpleTuner's local backend lists for an image dataset (every extension Pillow opens,
  plus SimpleTuner's video and audio ones: ``keys.DATASET_FILE_EXTENSIONS``), walked as it walks the folder;
- captions are the ``NAME.txt`` beside each listed file (``caption_strategy=textfile``), one caption per line, else
  the file name or the dataset's instance prompt; SimpleTuner keeps every other character of the file, control
  characters too (``caption_control``);
- aspect buckets and the minimum-size filter mirror SimpleTuner's ``MultiaspectImage`` and
  ``meets_resolution_requirements`` for SD3 (64 px alignment).
"""

from __future__ import annotations

import math
import os
import re
from collections import Counter
from pathlib import Path
from typing import Iterable, Protocol

from sd3tune.simpletuner import keys

# File names SimpleTuner's local backend lists in an image dataset (images, and videos and sounds too).
DATASET_SUFFIXES = keys.DATASET_FILE_SUFFIXES
# Folders SimpleTuner's local backend never walks into (helpers/data_backend/local.py).
SKIP_DIRS = {".Spotlight-V100", ".Trashes", ".fseventsd", ".TemporaryItems", ".zfs", ".ipynb_checkpoints"}
SD3_ALIGNMENT = keys.SD3_BUCKET_ALIGNMENT


class SizedImage(Protocol):
    """An image's size as SimpleTuner sees it (after EXIF rotation)."""

    @property
    def width(self) -> int: ...

    @property
    def height(self) -> int: ...


class CaptionedFile(Protocol):
    """A listed file and the text of its caption file (None when there is none)."""

    @property
    def path(self) -> Path: ...

    @property
    def caption(self) -> str | None: ...


# ----------------------------------------------------------------------------------------------- files


def list_images(folder: Path) -> list[Path]:
    """The files under ``folder`` that SimpleTuner's local backend lists for an image dataset (recursive, follows
    links; ``LocalDataBackend.list_files``): images of every format Pillow opens, and videos and sounds."""
    found: list[Path] = []
    seen: set[str] = set()
    for root, dirs, files in os.walk(folder, followlinks=True):
        real = os.path.realpath(root)
        if real in seen:
            dirs.clear()
            continue
        seen.add(real)
        dirs[:] = [d for d in dirs if d not in SKIP_DIRS]
        for name in files:
            if name.lower().endswith(DATASET_SUFFIXES):
                found.append(Path(root, name))
    found.sort()
    return found


# ----------------------------------------------------------------------------------------------- captions


def caption_path(path: Path) -> Path:
    """The caption file SimpleTuner reads for ``path`` (``os.path.splitext(path)[0] + ".txt"``)."""
    return Path(os.path.splitext(path)[0] + ".txt")


def read_caption(path: Path) -> tuple[str | None, str | None]:
    """(text, problem): the file's text as written (unstripped), None when there is no file."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return None, None
    except IsADirectoryError:
        return None, "is a folder, not a caption file"
    except OSError as exc:
        return None, f"cannot be read ({exc.strerror or exc})"
    try:
        return data.decode("utf-8"), None
    except UnicodeDecodeError as exc:
        return None, f"caption is not UTF-8 text (byte {exc.start})"


def caption_lines(text: str | None) -> list[str]:
    """SimpleTuner splits a multi-line caption file into one caption per non-empty line, at ``\n`` only
    (``prepare_instance_prompt_from_textfile``: a U+2028 or a lone ``\r`` stays inside a caption)."""
    if not text:
        return []
    return [line.strip() for line in text.split("\n") if line.strip()]


_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")  # Unicode's control characters (Cc) but tab and \n
_CONTROL_NAMES = {"\x00": "NUL byte", "\x08": "backspace", "\x0b": "vertical tab", "\x0c": "form feed",
                  "\r": "carriage return", "\x1b": "escape character", "\x7f": "delete character"}


def caption_control(text: str) -> tuple[int, int, str] | None:
    """(line, column, what) of the first control character in a caption file's text, both counted from 1 as an
    editor shows them, or None. SimpleTuner decodes the file and splits it at ``\n`` only, keeping every other
    character (``prepare_instance_prompt_from_textfile``): a NUL or an escape byte would be trained into the caption,
    and a carriage return that ends no line joins two lines into one caption. Allowed: tab, and ``\r`` before a line
    end (Windows line ends)."""
    for m in _CONTROL.finditer(text):
        ch, at = m.group(), m.start()
        if ch == "\r" and text[at + 1:at + 2] in ("\n", ""):
            continue  # a Windows line end
        line_start = text.rfind("\n", 0, at) + 1
        name = _CONTROL_NAMES.get(ch, "control character")
        what = f"{'an' if name[0] in 'aeiou' else 'a'} {name} (U+{ord(ch):04X})"
        if ch == "\r":
            what += " that ends no line: SimpleTuner splits captions at \\n only and reads the two lines as one"
        return text.count("\n", 0, at) + 1, at - line_start + 1, what
    return None


def dataset_captions(caption_strategy: str, instance_prompt: str | None,
                     files: Iterable[CaptionedFile], prepend: bool = False) -> list[str]:
    """The captions SimpleTuner trains an image dataset on, in file order: the instance prompt (``instanceprompt``;
    none when it is unset), each file's name with ``_`` as spaces (``filename``), or the lines of each caption file
    (``textfile``); with ``prepend`` (prepend_instance_prompt) the instance prompt and a space before each."""
    if caption_strategy == "instanceprompt":
        return [instance_prompt] if instance_prompt else []
    if caption_strategy == "filename":
        captions = [f.path.stem.replace("_", " ") for f in files]
    else:
        captions = [line for f in files for line in caption_lines(f.caption)]
    return [f"{instance_prompt} {c}" for c in captions] if prepend and instance_prompt else captions


# ----------------------------------------------------------------------------------------------- buckets


def _round_to(value: float, multiple: int = SD3_ALIGNMENT) -> int:
    return max(int(round(value / multiple)) * multiple, multiple)


def megapixels(resolution: float, resolution_type: str) -> float | None:
    """The area SimpleTuner targets for an ``area``/``pixel_area`` dataset (None for ``pixel``)."""
    if resolution_type == "pixel_area":
        return resolution * resolution / 1_000_000
    if resolution_type == "area":
        return float(resolution)
    return None


def bucket_of(width: int, height: int, resolution: float, resolution_type: str,
              crop_square: bool = False) -> tuple[int, int]:
    """The training size (aspect bucket) SimpleTuner gives an image: ``calculate_new_size_by_pixel_edge`` for
    ``pixel``, ``calculate_new_size_by_pixel_area`` for ``area`` and ``pixel_area``."""
    aspect = 1.0 if crop_square else round(width / height, 2)
    mp = megapixels(resolution, resolution_type)
    if mp is None:
        res = int(resolution)
        if width < height:
            w_t, h_t = res, int(res / aspect)
        else:
            w_t, h_t = int(res * aspect), res
        return _round_to(w_t), _round_to(h_t)
    edge = _round_to(int(math.sqrt(mp * 1_000_000)))
    if aspect == 1.0:
        return edge, edge
    return _round_to(edge * math.sqrt(aspect)), _round_to(edge / math.sqrt(aspect))


def assign_buckets(sizes: Iterable[tuple[int, int]], resolution: float, resolution_type: str,
                   crop_square: bool = False) -> list[tuple[int, int]]:
    """The bucket of each (width, height), in order. SimpleTuner keys buckets by the target's rounded aspect ratio
    and, for area datasets, reuses the size first stored for that aspect (``StateTracker`` aspect-resolution map)."""
    first: dict[float, tuple[int, int]] = {}
    out = []
    for width, height in sizes:
        w, h = bucket_of(width, height, resolution, resolution_type, crop_square)
        out.append(first.setdefault(round(w / h, 2), (w, h)))
    return out


def bucket_counts(images: Iterable[SizedImage], resolution: float, resolution_type: str,
                  crop_square: bool) -> Counter:
    """Images per bucket (w, h)."""
    return Counter(assign_buckets(((i.width, i.height) for i in images), resolution, resolution_type, crop_square))


def minimum_megapixels(minimum: float, resolution_type: str) -> float:
    """SimpleTuner's unit conversion of ``minimum_image_size`` for area datasets (pixel_area edges > 10 -> MP)."""
    if resolution_type == "pixel_area" and minimum > 10:
        return minimum * minimum / 1_000_000
    return float(minimum)


def too_small(info: SizedImage, minimum: float | None, resolution_type: str, crop_square: bool = False) -> bool:
    """Whether SimpleTuner's ``meets_resolution_requirements`` drops the image."""
    if not minimum:
        return False
    if resolution_type == "pixel":
        return min(info.width, info.height) < minimum
    mp = minimum_megapixels(minimum, resolution_type) * 1_000_000
    if crop_square and min(info.width, info.height) < math.floor(math.sqrt(mp)):
        return True
    return info.width * info.height < mp
