"""pngfile: the PNGs `sd3tune preview` writes hold exactly the image's pixels, are valid PNG files (Pillow reads and
verifies them), and are compressed."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from sd3tune.pngfile import write_png


def noisy(mode: str, size: tuple[int, int], seed: int = 0) -> Image.Image:
    channels = {"L": 1, "LA": 2, "RGB": 3, "RGBA": 4}[mode]
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], channels), dtype=np.uint8)
    return Image.fromarray(pixels.squeeze(-1) if channels == 1 else pixels, mode)


@pytest.mark.parametrize("mode", ["L", "LA", "RGB", "RGBA"])
@pytest.mark.parametrize("size", [(1, 1), (1, 7), (9, 1), (33, 17)])
def test_written_pixels_are_exactly_the_images(tmp_path, mode, size):
    image = noisy(mode, size)
    path = tmp_path / "out.png"
    write_png(image, path)
    with Image.open(path) as read:
        read.verify()  # the chunks' CRCs and structure
    with Image.open(path) as read:
        assert read.format == "PNG" and read.mode == mode and read.size == size
        assert np.array_equal(np.asarray(read), np.asarray(image))


def test_other_modes_go_through_pillow_unchanged(tmp_path):
    palette = Image.new("P", (8, 8), 1)
    palette.putpalette([0, 0, 0, 255, 0, 0])
    wide = Image.fromarray(np.arange(64, dtype=np.uint16).reshape(8, 8) * 1000)
    for name, image in (("p.png", palette), ("i16.png", wide)):
        write_png(image, tmp_path / name)
        with Image.open(tmp_path / name) as read:
            assert np.array_equal(np.asarray(read), np.asarray(image)), name


def test_a_smooth_photo_like_image_is_compressed(tmp_path):
    base = noisy("RGB", (32, 24))
    photo = base.resize((512, 384), Image.Resampling.BICUBIC)  # smooth gradients, as a resized photo has
    write_png(photo, tmp_path / "photo.png")
    assert (tmp_path / "photo.png").stat().st_size < 0.7 * 512 * 384 * 3
