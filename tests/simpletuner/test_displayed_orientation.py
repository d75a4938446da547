"""Fix 11's reading of a file's orientation (``stored_orientation``): a PNG's tag read exactly as PIL reads it (EXIF,
text and XMP chunks), without decoding its pixels unless a chunk after them could carry one (PIL's own PNG
``getexif`` decodes the whole image to look)."""

from __future__ import annotations

import io
import struct
import zlib

import pytest
from PIL import Image, PngImagePlugin

from sd3tune.simpletuner.compat.displayed_orientation import ORIENTATION, metadata_after_pixels, stored_orientation


def chunk(tag: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))


def png(orientation: int | None = None) -> bytes:
    out = io.BytesIO()
    exif = Image.Exif()
    if orientation is not None:
        exif[ORIENTATION] = orientation
    Image.new("RGB", (48, 32), (10, 200, 30)).save(out, "PNG", exif=exif if orientation is not None else None)
    return out.getvalue()


def moved(data: bytes, tag: bytes) -> bytes:
    """``data`` with its ``tag`` chunk moved from before the pixels to just before IEND."""
    start = data.index(tag) - 4
    length = struct.unpack_from(">I", data, start)[0]
    piece, rest = data[start:start + 12 + length], data[:start] + data[start + 12 + length:]
    end = rest.index(b"IEND") - 4
    return rest[:end] + piece + rest[end:]


def inserted(data: bytes, piece: bytes, *, after_pixels: bool) -> bytes:
    at = (data.index(b"IEND") if after_pixels else data.index(b"IDAT")) - 4
    return data[:at] + piece + data[at:]


def xmp(orientation: int) -> bytes:
    text = f'<x:xmpmeta><rdf:Description tiff:Orientation="{orientation}"/></x:xmpmeta>'.encode()
    return chunk(b"iTXt", b"XML:com.adobe.xmp\x00\x00\x00\x00\x00" + text)


def pil_reads(data: bytes) -> tuple[int, tuple[int, int]]:
    with Image.open(io.BytesIO(data)) as image:
        return int(image.getexif().get(ORIENTATION) or 1), image.size


CASES = {
    "no metadata": (png(), False),
    "EXIF before the pixels": (png(6), False),
    "generator text before the pixels": (inserted(png(), chunk(b"tEXt", b"parameters\x00a cat"), after_pixels=False),
                                         False),
    "XMP before the pixels": (inserted(png(), xmp(8), after_pixels=False), False),
    "EXIF after the pixels": (moved(png(5), b"eXIf"), True),
    "XMP after the pixels": (inserted(png(), xmp(3), after_pixels=True), True),
    "text after the pixels": (inserted(png(), chunk(b"tEXt", b"Comment\x00hi"), after_pixels=True), True),
    "truncated": (png(6)[:-20], True),
}


@pytest.mark.parametrize("name", CASES)
def test_a_pngs_orientation_is_what_pil_reads_and_its_pixels_stay_undecoded_when_no_chunk_after_them_can_tell(
        name, monkeypatch):
    data, left_to_pil = CASES[name]
    expected = pil_reads(data)
    decoded = []
    load = PngImagePlugin.PngImageFile.load
    monkeypatch.setattr(PngImagePlugin.PngImageFile, "load", lambda self: decoded.append(1) or load(self))
    assert metadata_after_pixels(data) is left_to_pil
    assert stored_orientation(data) == expected
    if not left_to_pil:
        assert decoded == [], name
    if name.startswith(("EXIF", "XMP")):
        assert expected[0] != 1, name  # these cases do carry a tag


def test_a_file_pil_cannot_read_is_left_to_simpletuners_decoder():
    assert stored_orientation(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40) == (1, (0, 0))
