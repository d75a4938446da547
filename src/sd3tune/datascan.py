"""Scan a folder of training images the way SimpleTuner 4.10.1 will see it, without decoding the images.

- the files, their captions and the aspect buckets are SimpleTuner's (``sd3tune.simpletuner.dataset``: the files its
  local backend lists, the ``NAME.txt`` caption it reads for each, ``MultiaspectImage``'s buckets);
- sizes are as the image displays, from file headers (PIL reads only the first bytes): an EXIF orientation of 5-8
  swaps width and height, as SimpleTuner's header scan buckets the image. SimpleTuner's own decoder drops the tag
  before its ``exif_transpose`` call and would train the stored pixels in that bucket; sd3tune's compat fix
  ``displayed_orientation`` makes the training process (and `sd3tune preview`) turn them as displayed, all 8
  orientations. Images with transparency are flagged (``transparency.py`` says what the run does with them);
  a cheap tail test (PNG ``IEND``, JPEG end marker, WebP RIFF size) spots truncated files,
  and only a suspicious file is fully decoded to confirm; a video or sound file, or one PIL cannot read, is reported
  as unusable;
- token counts are estimates (no tokenizer is loaded): CLIP BPE and T5 sentencepiece pieces.

Fast enough for `sd3tune check` (no torch): ~0.1 ms of work per image.
"""

from __future__ import annotations

import math
import os
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path

from sd3tune.simpletuner import keys
from sd3tune.simpletuner.dataset import caption_control, caption_lines, caption_path, list_images, read_caption
from sd3tune.simpletuner.transparency import has_transparency

CLIP_MAX_TOKENS = 77  # including the start and end tokens
T5_MAX_TOKENS = keys.SD3_T5_MAX_LENGTH  # SimpleTuner's SD3 T5 length, including the end token
_ROTATED = {5, 6, 7, 8}  # EXIF orientations that swap width and height
_PNG_END = b"IEND\xaeB`\x82"


@dataclass(frozen=True)
class ImageInfo:
    path: Path
    width: int  # as displayed (EXIF orientation applied), as SimpleTuner buckets it
    height: int
    caption: str | None  # text of NAME.txt (stripped); None when there is no such file
    # NAME.txt is blank but holds a line end: SimpleTuner reads it as an empty list of captions and stops with
    # IndexError when it draws the image (a blank file without one trains the image unconditioned)
    blank_lines: bool = False
    transparent: bool = False  # has a pixel that is not fully opaque (RGBA, LA, a transparent palette colour)

    @property
    def captions(self) -> list[str]:
        """The captions SimpleTuner reads from the caption file: one per non-empty line (``caption_lines``)."""
        return caption_lines(self.caption)


@dataclass
class ScanResult:
    folder: Path
    images: list[ImageInfo] = field(default_factory=list)
    corrupt: list[tuple[Path, str]] = field(default_factory=list)  # unusable listed files and unreadable captions
    files: list[Path] = field(default_factory=list)  # every file SimpleTuner lists (readable or not)
    missing_captions: list[Path] = field(default_factory=list)  # NAME.txt of each listed file that has none
    # caption files holding a control character SimpleTuner would train on: (file, line, column, what), the first each
    control_captions: list[tuple[Path, int, int, str]] = field(default_factory=list)

    @property
    def uncaptioned(self) -> list[ImageInfo]:
        """Images without a caption file."""
        return [i for i in self.images if i.caption is None]

    @property
    def empty_captions(self) -> list[ImageInfo]:
        return [i for i in self.images if i.caption is not None and not i.caption.strip()]


class _Unreadable(Exception):
    pass


def _tail_ok(fp, fmt: str | None) -> bool:
    """Whether the file ends the way a complete file of that format does (False means: decode to be sure)."""
    try:
        size = fp.seek(0, os.SEEK_END)
        if fmt == "PNG":
            fp.seek(max(0, size - 12))
            return _PNG_END in fp.read(12)
        if fmt == "JPEG":
            fp.seek(max(0, size - 64))
            return fp.read(64).rstrip(b"\x00\r\n ").endswith(b"\xff\xd9")
        if fmt == "WEBP":
            fp.seek(4)
            return int.from_bytes(fp.read(4), "little") + 8 <= size
    except (OSError, ValueError):
        return False
    return True


def read_size(path: Path) -> tuple[int, int, bool]:
    """(width, height, transparent): the size as displayed (EXIF orientation applied), from the header, and whether
    the image has transparency (decoded only when its mode can hold any); raises _Unreadable with the reason."""
    from PIL import Image

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # DecompressionBombWarning and friends: the size check reports them
            with Image.open(path) as im:
                width, height = im.size
                fmt = im.format
                # SimpleTuner's header scan reads the tag of any format (a PNG's getexif would decode the image
                # unless the eXIf chunk came before the pixels, where PIL's header read finds it)
                if (fmt != "PNG" or "exif" in im.info) and im.getexif().get(0x0112) in _ROTATED:
                    width, height = height, width
                complete = _tail_ok(im.fp, fmt) if im.fp is not None else True
                transparent = complete and has_transparency(im)
            if not complete:
                with Image.open(path) as im:
                    im.load()  # a suspicious tail: decode this one file to be sure
    except Image.DecompressionBombError:
        raise _Unreadable("too many pixels: PIL (and so SimpleTuner) refuses to open it") from None
    except Exception as exc:  # noqa: BLE001 - any failure of a third-party decoder means: unreadable
        text = str(exc).split("\n")[0].strip() or type(exc).__name__
        text = text.replace(f"{str(path)!r}", "").replace(str(path), "").strip(" :") or type(exc).__name__
        raise _Unreadable(text) from None
    if width <= 0 or height <= 0:
        raise _Unreadable(f"invalid size {width}x{height}")
    return width, height, transparent


def scan_folder(folder: str | Path) -> ScanResult:
    """Read the header and caption of every file SimpleTuner lists under ``folder``."""
    folder = Path(folder)
    result = ScanResult(folder)
    for path in list_images(folder):
        result.files.append(path)
        caption_file = caption_path(path)
        text, problem = read_caption(caption_file)
        caption = None if text is None else text.strip()
        if problem:
            result.corrupt.append((caption_file, problem))
            caption = ""  # present but unusable: not reported again as missing
        elif caption is None:
            result.missing_captions.append(caption_file)  # SimpleTuner reads every listed file's caption
        elif (control := caption_control(text)) is not None:
            result.control_captions.append((caption_file, *control))
        kind = keys.dataset_file_kind(path.name)
        if kind != "image":
            what = "a video" if kind == "video" else "audio"
            result.corrupt.append((path, f"{'an' if kind == 'audio' else 'a'} {kind} file: SimpleTuner lists it with "
                                         f"the images and loads it as {what}, not an image"))
            continue
        try:
            width, height, transparent = read_size(path)
        except _Unreadable as exc:
            result.corrupt.append((path, str(exc)))
            continue
        blank_lines = caption == "" and not problem and "\n" in text
        result.images.append(ImageInfo(path, width, height, caption, blank_lines, transparent))
    return result


# ----------------------------------------------------------------------------------------------- tokens

_CLIP_PIECE = re.compile(r"'s|'t|'re|'ve|'m|'ll|'d|[^\W\d_]+|\d|[^\s\w]+|_", re.UNICODE)
_T5_PIECE = re.compile(r"[^\W\d_]+|\d+|[^\s\w]|_", re.UNICODE)


def estimate_clip_tokens(text: str) -> int:
    """About how many CLIP BPE tokens ``text`` takes, start/end tokens included (CLIP reads 77).

    Mirrors CLIP's pre-tokenizer (letters, single digits, punctuation runs); a word longer than 8 letters is
    counted as several BPE pieces, since only common words are one token.
    """
    count = 2
    for piece in _CLIP_PIECE.findall(text.lower()):
        count += max(1, math.ceil(len(piece) / 8)) if piece[0].isalpha() else max(1, math.ceil(len(piece) / 3))
    return count


def estimate_t5_tokens(text: str) -> int:
    """About how many T5 sentencepiece tokens ``text`` takes, end token included (SD3 training reads 154)."""
    count = 1
    for piece in _T5_PIECE.findall(text):
        if piece[0].isalpha():
            count += max(1, math.ceil(len(piece) / 6))
        elif piece[0].isdigit():
            count += max(1, math.ceil(len(piece) / 2))
        else:
            count += 1
    return count
