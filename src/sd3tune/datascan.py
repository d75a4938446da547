"""Scan a folder of training images: sizes from file headers (no full decode), captions, aspect buckets.

Fast enough for `sd3tune check` (no torch): PIL reads only the header of each file.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff"}
_CLIP_TOKEN = re.compile(r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\w]+|[^\s\w]+", re.UNICODE)


@dataclass(frozen=True)
class ImageInfo:
    path: Path
    width: int
    height: int
    caption: str | None  # text of the .txt beside the image, None when there is none


@dataclass
class ScanResult:
    folder: Path
    images: list[ImageInfo] = field(default_factory=list)
    corrupt: list[tuple[Path, str]] = field(default_factory=list)

    @property
    def uncaptioned(self) -> list[ImageInfo]:
        return [i for i in self.images if not (i.caption or "").strip()]


def list_images(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()
                  and not any(part.startswith(".") for part in p.relative_to(folder).parts))


def scan_folder(folder: str | Path) -> ScanResult:
    """Read every image's header and caption under ``folder`` (recursively, hidden folders skipped)."""
    from PIL import Image, UnidentifiedImageError

    folder = Path(folder)
    result = ScanResult(folder)
    for path in list_images(folder):
        try:
            with Image.open(path) as im:
                width, height = im.size
        except (UnidentifiedImageError, OSError, ValueError) as exc:
            result.corrupt.append((path, str(exc).split("\n")[0] or type(exc).__name__))
            continue
        caption_file = path.with_suffix(".txt")
        caption = None
        if caption_file.is_file():
            try:
                caption = caption_file.read_text(encoding="utf-8").strip()
            except UnicodeDecodeError:
                result.corrupt.append((caption_file, "caption is not UTF-8 text"))
        result.images.append(ImageInfo(path, width, height, caption))
    return result


def estimate_clip_tokens(text: str) -> int:
    """Approximate CLIP BPE token count (word pieces; long rare words split further) without loading a tokenizer."""
    count = 0
    for piece in _CLIP_TOKEN.findall(text.lower()):
        count += max(1, math.ceil(len(piece) / 7))
    return count


def bucket_of(width: int, height: int, resolution: int, resolution_type: str, alignment: int = 64) -> tuple[int, int]:
    """The aspect bucket SimpleTuner would put an image in (area-preserving, sides rounded to ``alignment``)."""
    if resolution_type == "pixel":
        scale = resolution / min(width, height)
    else:
        area = (resolution * resolution) if resolution_type == "pixel_area" else resolution * 1_000_000
        scale = math.sqrt(area / (width * height))
    w = max(alignment, int(round(width * scale / alignment)) * alignment)
    h = max(alignment, int(round(height * scale / alignment)) * alignment)
    return w, h


def bucket_counts(images: list[ImageInfo], resolution: int, resolution_type: str, crop_square: bool) -> Counter:
    if crop_square:
        side = resolution if resolution_type != "area" else int(math.sqrt(resolution * 1_000_000))
        side = max(64, side // 64 * 64)
        return Counter({(side, side): len(images)})
    return Counter(bucket_of(i.width, i.height, resolution, resolution_type) for i in images)


def too_small(info: ImageInfo, minimum: float | None, resolution_type: str) -> bool:
    if not minimum:
        return False
    if resolution_type == "area":
        return info.width * info.height / 1_000_000 < minimum
    return min(info.width, info.height) < minimum
