"""Compat fixes 15 and 16, in this process through SimpleTuner's own loader and sample preparation (the VAE cache's
``prepare_sample`` on the discovery scan's metadata, driven by ``sd3tune.simpletuner.preview``): a JPEG trains as it
displays, in all 8 EXIF orientations, and an image with transparency trains composited on the run's colour."""

from __future__ import annotations

import numpy as np
import pytest
from helpers import sketch
from PIL import Image, ImageOps

from sd3tune.simpletuner.compat import ALPHA_BACKGROUND_ENV

RUN_ARGS = {"resolution": 256, "resolution_type": "pixel_area", "minimum_image_size": None, "train_batch_size": 1,
            "caption_strategy": "textfile", "aspect_bucket_alignment": 64, "aspect_bucket_rounding": 2,
            "metadata_update_interval": 3600}


def prepared(folder, files, tmp_path, background=None) -> dict:
    from sd3tune.simpletuner.preview import prepare_images

    entry = {"id": "images", "type": "local", "instance_data_dir": str(folder), "caption_strategy": "textfile",
             "resolution": 256, "resolution_type": "pixel_area", "cache_dir_vae": str(tmp_path / "vae")}
    scratch = tmp_path / "scratch"
    scratch.mkdir(exist_ok=True)
    return {p.source.name: p for p in prepare_images(entry, RUN_ARGS, files, scratch, background=background)}


def as_prepared(shown: Image.Image, item) -> Image.Image:
    """``shown`` resized and cropped as SimpleTuner prepared ``item`` (its intermediary size, then its crop)."""
    (top, left), (w, h) = item.crop, item.image.size
    return shown.resize(item.resized, Image.Resampling.LANCZOS).crop((left, top, left + w, top + h))


def mean_abs_diff(a: Image.Image, b: Image.Image) -> float:
    return float(np.abs(np.asarray(a.convert("RGB"), np.float32) - np.asarray(b.convert("RGB"), np.float32)).mean())


def test_upstream_decoder_still_drops_the_orientation(tmp_path):
    """Why fix 15 exists: SimpleTuner's decoder (trainingsample, IMREAD_UNCHANGED) returns the stored pixels."""
    import trainingsample

    exif = Image.Exif()
    exif[0x0112] = 6
    sketch().save(tmp_path / "turned.jpg", exif=exif, quality=95)
    assert trainingsample.imdecode_py((tmp_path / "turned.jpg").read_bytes(), -1).shape[:2] == (192, 320)


def test_every_exif_orientation_trains_as_displayed(tmp_path):
    files = []
    for orientation in range(1, 9):
        exif = Image.Exif()
        exif[0x0112] = orientation
        path = tmp_path / f"o{orientation}.jpg"
        sketch().save(path, exif=exif, quality=95)
        (tmp_path / f"o{orientation}.txt").write_text(f"orientation {orientation}")
        files.append(path)
    out = prepared(tmp_path, files, tmp_path)
    assert list(out) == [p.name for p in files]  # in file order, though each is prepared on a worker as it is scanned
    for orientation, path in enumerate(files, start=1):
        item = out[path.name]
        with Image.open(path) as stored:
            shown = ImageOps.exif_transpose(stored).convert("RGB")
        assert (item.bucket[0] < item.bucket[1]) == (orientation >= 5), (orientation, item.bucket)
        assert mean_abs_diff(item.image, as_prepared(shown, item)) <= 3, orientation
        if orientation != 1:  # the stored pixels (what trained before the fix) are far from it
            stored = sketch().resize(item.image.size, Image.Resampling.LANCZOS)
            assert mean_abs_diff(item.image, stored) > 10, orientation


def cutout(mode: str) -> Image.Image:
    """64x64: the left half opaque green, the right half transparent with red under it (what an editor may leave)."""
    image = Image.new("RGBA", (64, 64), (255, 0, 0, 0))
    image.paste((0, 160, 0, 255), (0, 0, 32, 64))
    if mode == "LA":
        return image.convert("LA")
    if mode == "P":
        palette = Image.new("P", (64, 64), 1)
        palette.putpalette([0, 160, 0, 255, 0, 0])
        palette.paste(0, (0, 0, 32, 64))
        palette.info["transparency"] = 1
        return palette
    return image


@pytest.mark.parametrize("background, colour", [("#3366cc", (0x33, 0x66, 0xCC)), (None, (255, 255, 255))])
def test_transparent_pixels_train_on_the_runs_background(tmp_path, monkeypatch, background, colour):
    monkeypatch.delenv(ALPHA_BACKGROUND_ENV, raising=False)
    files = []
    for mode in ("RGBA", "LA", "P"):
        path = tmp_path / f"cut-{mode}.png"
        image = cutout(mode)
        image.save(path, transparency=image.info["transparency"]) if mode == "P" else image.save(path)
        files.append(path)
    out = prepared(tmp_path, files, tmp_path, background=background)
    for path in files:
        pixels = np.asarray(out[path.name].image, np.float32)
        assert pixels.shape == (256, 256, 3), path.name
        left_green = (0, 160, 0) if "LA" not in path.name else (94,) * 3  # LA: grey of that green
        assert np.abs(pixels[:, 160:] - colour).max() <= 2, path.name  # transparent half: the background, no red
        assert np.abs(pixels[:, :100] - left_green).max() <= 2, path.name
