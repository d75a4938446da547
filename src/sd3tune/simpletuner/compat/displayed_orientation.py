"""Fix 15: SimpleTuner's image decoder (``load_image``: trainingsample's OpenCV decode, ``IMREAD_UNCHANGED``) keeps
the stored pixels and drops the EXIF block, so ``TrainingSample.correct_image``'s ``exif_transpose`` has no tag to
apply, while its metadata scan buckets the image by the size the tag says it displays at: a phone photo stored
1200x800 with orientation 6 (portrait on every screen) was squashed, landscape, into a portrait bucket. Apply the
file's orientation tag to the decoded image, so that training sees the image as displayed (all 8 orientations), as
``PIL.ImageOps.exif_transpose`` shows it."""

from __future__ import annotations

import io
import struct
import sys
import warnings

from sd3tune.simpletuner.compat._patching import expect, replace

ORIENTATION = 0x0112
_SWAPS = {5, 6, 7, 8}  # orientations whose displayed width is the stored height
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_METADATA_CHUNKS = {b"eXIf", b"tEXt", b"zTXt", b"iTXt"}  # where PIL finds a PNG's orientation (EXIF, raw text, XMP)


def applies_to(module) -> str | None:
    # load_image reads a path, a file or bytes, and decodes them itself (the tag is not on what it returns)
    return expect(module, "load_image", params=("img_data",), source=("img_data.read()", "imdecode_py(img_data, -1)"))


def metadata_after_pixels(png: bytes) -> bool:
    """Whether a PNG file has a chunk that can carry an orientation (EXIF, text, XMP) after its first image data
    chunk, or cannot be walked (True: let PIL read it whole)."""
    pos, seen_pixels = len(PNG_SIGNATURE), False
    while pos + 8 <= len(png):
        length, tag = struct.unpack_from(">I4s", png, pos)
        if tag == b"IEND":
            return False
        seen_pixels = seen_pixels or tag in (b"IDAT", b"fdAT")
        if seen_pixels and tag in _METADATA_CHUNKS:
            return True
        pos += 12 + length  # length, type, data, CRC
    return True


def stored_orientation(data: bytes) -> tuple[int, tuple[int, int]]:
    """(EXIF orientation, stored size) from the file's header (1 and (0, 0) when it has no tag or is unreadable)."""
    from PIL import Image

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with Image.open(io.BytesIO(data)) as image:
                if image.format == "PNG" and data.startswith(PNG_SIGNATURE) and not metadata_after_pixels(data):
                    # PIL's PNG getexif decodes every pixel first, to reach chunks after them: there are none that
                    # can carry a tag, so what it reads (EXIF, text, XMP chunks: in image.info since open) is all
                    exif = Image.Image.getexif(image)
                else:
                    exif = image.getexif()
                return int(exif.get(ORIENTATION) or 1), image.size
    except Exception:  # noqa: BLE001 - not something PIL reads: SimpleTuner's decoder decides
        return 1, (0, 0)


def as_displayed(image, orientation: int, stored: tuple[int, int]):
    """``image`` (decoded from a file with that tag and stored size) turned the way the tag says it displays."""
    from PIL import ImageOps
    from PIL.Image import Transpose

    if ORIENTATION in image.getexif():  # a decoder that kept the tag (PIL's): SimpleTuner's own call would apply it
        return ImageOps.exif_transpose(image)
    if orientation in _SWAPS and image.size != stored and image.size == stored[::-1]:
        return image  # a decoder that applied the tag already (OpenCV's IMREAD_COLOR fallback)
    method = {2: Transpose.FLIP_LEFT_RIGHT, 3: Transpose.ROTATE_180, 4: Transpose.FLIP_TOP_BOTTOM,
              5: Transpose.TRANSPOSE, 6: Transpose.ROTATE_270, 7: Transpose.TRANSVERSE,
              8: Transpose.ROTATE_90}.get(orientation)
    return image if method is None else image.transpose(method)


def apply(module) -> None:
    def make(load_image):
        def load_image_as_displayed(img_data):
            if isinstance(img_data, str):
                with open(img_data, "rb") as file:
                    img_data = file.read()
            elif hasattr(img_data, "read"):
                img_data = img_data.read()
            image = load_image(img_data)
            orientation, stored = stored_orientation(img_data)
            return image if orientation == 1 else as_displayed(image, orientation, stored)

        return load_image_as_displayed

    original = module.load_image
    replace(module, "load_image", make)
    for other in list(sys.modules.values()):  # data backends that imported it by name before this fix landed
        if getattr(other, "__name__", "").startswith("simpletuner.") and getattr(other, "load_image", None) is original:
            other.load_image = module.load_image
