"""The header-only image scan: sizes, captions, corrupt files and token estimates (the files SimpleTuner lists
and its buckets: tests/simpletuner/test_dataset.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image

from sd3tune.datascan import ImageInfo, estimate_clip_tokens, estimate_t5_tokens, scan_folder
from sd3tune.simpletuner.dataset import list_images


@pytest.fixture()
def folder(tmp_path) -> Path:
    img = Image.effect_noise((300, 200), 40).convert("RGB")
    for fmt in ("png", "jpg", "webp"):
        img.save(tmp_path / f"ok.{fmt}")
        data = (tmp_path / f"ok.{fmt}").read_bytes()
        (tmp_path / f"truncated.{fmt}").write_bytes(data[: len(data) * 2 // 3])
        (tmp_path / f"trailing.{fmt}").write_bytes(data + b"\0extra" * 500)  # legal: decoders stop at the end marker
    exif = Image.Exif()
    exif[0x0112] = 6  # displays turned 90°: bucketed as displayed (SimpleTuner's header scan), trained so by fix 15
    img.save(tmp_path / "rotated.jpg", exif=exif)
    (tmp_path / "garbage.png").write_bytes(b"not an image")
    (tmp_path / "empty.png").write_bytes(b"")
    (tmp_path / "ok.txt").write_text("first caption\n\nsecond caption\n")
    (tmp_path / "trailing.txt").write_bytes("caf\xe9".encode("latin-1"))
    (tmp_path / "rotated.txt").write_text("")
    (tmp_path / "notes.md").write_text("not an image")
    (tmp_path / ".ipynb_checkpoints").mkdir()
    img.save(tmp_path / ".ipynb_checkpoints" / "skipped.png")
    (tmp_path / "sub").mkdir()
    img.save(tmp_path / "sub" / "nested.png")
    return tmp_path


def test_scan_reads_sizes_captions_and_names_every_broken_file(folder):
    scan = scan_folder(folder)
    sizes = {i.path.name: (i.width, i.height) for i in scan.images}
    assert sizes == {"ok.png": (300, 200), "ok.jpg": (300, 200), "ok.webp": (300, 200), "trailing.png": (300, 200),
                     "trailing.jpg": (300, 200), "trailing.webp": (300, 200), "rotated.jpg": (200, 300),
                     "nested.png": (300, 200)}
    bad = {p.name for p, _ in scan.corrupt}
    assert bad == {"truncated.png", "truncated.jpg", "truncated.webp", "garbage.png", "empty.png", "trailing.txt"}
    by_name = {i.path.name: i for i in scan.images}
    assert by_name["ok.png"].captions == ["first caption", "second caption"]
    assert ImageInfo(Path("x.png"), 1, 1, "one\u2028caption\r\nand\rone more\n").captions == ["one\u2028caption",
                                                                                          "and\rone more"]
    assert by_name["nested.png"].caption is None and by_name["rotated.jpg"].caption == ""
    assert {i.path.name for i in scan.uncaptioned} >= {"nested.png"}
    assert "rotated.jpg" in {i.path.name for i in scan.empty_captions}


def test_sizes_are_as_displayed_in_all_8_orientations_and_transparency_is_flagged(tmp_path):
    """The size SimpleTuner's header scan buckets (and, with compat fix 15, trains): 5-8 swap width and height, in
    JPEG and WebP; only images with a pixel that is not opaque are transparent."""
    from sd3tune.datascan import read_size

    img = Image.new("RGB", (120, 80), (10, 120, 200))
    for orientation in range(1, 9):
        exif = Image.Exif()
        exif[0x0112] = orientation
        for fmt in ("jpg", "webp"):
            img.save(tmp_path / f"o{orientation}.{fmt}", exif=exif)
            shown = (80, 120) if orientation >= 5 else (120, 80)
            assert read_size(tmp_path / f"o{orientation}.{fmt}") == (*shown, False), (orientation, fmt)
    opaque_rgba = Image.new("RGBA", (8, 8), (1, 2, 3, 255))
    opaque_rgba.save(tmp_path / "opaque.png")
    cut = opaque_rgba.copy()
    cut.putpixel((0, 0), (1, 2, 3, 254))
    cut.save(tmp_path / "cut.png")
    cut.convert("LA").save(tmp_path / "grey.png")
    Image.new("P", (8, 8), 0).save(tmp_path / "keyed.png", transparency=0)
    Image.new("P", (8, 8), 0).save(tmp_path / "keyed.gif", transparency=0)
    assert {p.name: read_size(p)[2] for p in sorted(tmp_path.glob("*.png")) + [tmp_path / "keyed.gif"]} == {
        "cut.png": True, "grey.png": True, "keyed.png": True, "opaque.png": False, "keyed.gif": True}


def test_every_file_simpletuner_trains_on_is_listed_and_needs_a_caption(tmp_path):
    """SimpleTuner lists every format Pillow opens plus videos and sounds, and reads each one's NAME.txt."""
    Image.new("RGB", (96, 64)).save(tmp_path / "painted.png")
    (tmp_path / "painted.txt").write_text("a painting")
    Image.new("RGB", (80, 48)).save(tmp_path / "scan.PCX")  # a format the old image list missed
    (tmp_path / "scan.txt").write_text("a scan")
    Image.new("RGB", (64, 64)).save(tmp_path / "sketch.sgi")  # no caption
    (tmp_path / "reference.mp4").write_bytes(b"\0\0\0\x18ftypmp42")  # no caption
    (tmp_path / "voice.wav").write_bytes(b"RIFF\0\0\0\0WAVE")
    (tmp_path / "voice.txt").write_text("a voice")
    (tmp_path / "layers.xcf").write_bytes(b"gimp xcf")  # not a file SimpleTuner lists
    assert [p.name for p in list_images(tmp_path)] == ["painted.png", "reference.mp4", "scan.PCX", "sketch.sgi",
                                                      "voice.wav"]
    scan = scan_folder(tmp_path)
    assert {i.path.name: (i.width, i.height) for i in scan.images} == {"painted.png": (96, 64), "scan.PCX": (80, 48),
                                                                      "sketch.sgi": (64, 64)}
    assert [p.name for p in scan.missing_captions] == ["reference.txt", "sketch.txt"]
    reasons = dict((p.name, why) for p, why in scan.corrupt)
    assert reasons == {"reference.mp4": "a video file: SimpleTuner lists it with the images and loads it as a video, "
                                        "not an image",
                       "voice.wav": "an audio file: SimpleTuner lists it with the images and loads it as audio, "
                                    "not an image"}


def test_token_estimates_are_in_the_right_range():
    short = "sd3tune-style, concept art of a castle on a hill"
    assert 8 <= estimate_clip_tokens(short) <= 20 and 8 <= estimate_t5_tokens(short) <= 25
    long = " ".join(["a very detailed painting of an old stone castle"] * 10)
    assert estimate_clip_tokens(long) > 77 and estimate_t5_tokens(long) < 154
    assert estimate_t5_tokens(" ".join(["castle"] * 200)) > 154
