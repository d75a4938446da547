"""SimpleTuner's view of an image dataset (sd3tune/simpletuner/dataset.py): the files it lists, the captions it reads,
and the aspect bucket and minimum-size filter of each image."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
from PIL import Image

from sd3tune.datascan import ImageInfo
from sd3tune.simpletuner.dataset import (assign_buckets, bucket_of, caption_lines, dataset_captions, list_images,
                                        too_small)


def test_listing_follows_simpletuner_walk(tmp_path):
    img = Image.new("RGB", (32, 32))
    (tmp_path / ".ipynb_checkpoints").mkdir()
    img.save(tmp_path / ".ipynb_checkpoints" / "skipped.png")
    (tmp_path / "sub").mkdir()
    img.save(tmp_path / "sub" / "nested.png")
    (tmp_path / "notes.md").write_text("not an image")
    names = {p.name for p in list_images(tmp_path)}
    assert "nested.png" in names and "skipped.png" not in names and "notes.md" not in names


def test_captions_are_read_as_simpletuner_reads_them_for_each_caption_strategy():
    # one rule for check (what trains) and evaluate (the concept prompts): evaluate split caption files at every line
    # end Python knows, SimpleTuner only at \n
    files = [ImageInfo(Path("a/old_castle.png"), 1, 1, "one\u2028caption\r\nand\rone more\n\n  \n"),
             ImageInfo(Path("a/sea_view.png"), 1, 1, None)]
    assert caption_lines(files[0].caption) == ["one\u2028caption", "and\rone more"] and caption_lines("") == []
    assert dataset_captions("textfile", None, files) == ["one\u2028caption", "and\rone more"]
    assert dataset_captions("filename", "myst", files) == ["old castle", "sea view"]
    assert dataset_captions("instanceprompt", "myst", files) == ["myst"]
    assert dataset_captions("instanceprompt", None, files) == []  # check reports the missing instance_prompt


def test_minimum_size_mirrors_simpletuner_units():
    small = ImageInfo(Path("x.png"), 600, 400, None)
    assert too_small(small, 512, "pixel") and not too_small(small, 400, "pixel")
    # pixel_area: an edge above 10 becomes an area (512² = 0.26 MP > 0.24 MP)
    assert too_small(small, 512, "pixel_area") and not too_small(small, 480, "pixel_area")
    assert not too_small(small, 0.2, "area") and too_small(small, 0.3, "area")
    assert too_small(small, 0.15, "area", crop_square=True) is False  # 387 px square fits 600x400
    assert too_small(small, 0.2, "area", crop_square=True)  # a 447 px square does not
    assert too_small(ImageInfo(Path("x.png"), 1000, 200, None), 0.16, "area", crop_square=True)


def test_buckets_for_sd3():
    assert bucket_of(1024, 1024, 1024, "pixel_area") == (1024, 1024)
    assert bucket_of(1536, 1024, 1024, "pixel_area") == (1280, 832)
    assert bucket_of(1500, 1000, 1024, "pixel") == (1536, 1024)
    assert bucket_of(1500, 1000, 64, "pixel", crop_square=True) == (64, 64)
    assert all(side % 64 == 0 for side in bucket_of(777, 1333, 768, "pixel_area"))


@pytest.mark.e2e  # imports SimpleTuner's bucket code
def test_buckets_match_simpletuners_own_code(tmp_path):
    """The same sizes through SimpleTuner 4.10.1's MultiaspectImage (imports torch: ~10 s)."""
    pytest.importorskip("simpletuner")
    from types import SimpleNamespace

    from sd3tune.simpletuner.compat import install

    install()
    from simpletuner.helpers.multiaspect.image import MultiaspectImage
    from simpletuner.helpers.training.state_tracker import StateTracker

    StateTracker.set_args(SimpleNamespace(aspect_bucket_alignment=64, aspect_bucket_rounding=2,
                                          output_dir=str(tmp_path)))
    rng = random.Random(0)
    for resolution, rtype in [(1024, "pixel"), (512, "pixel"), (1024, "pixel_area"), (768, "pixel_area"),
                              (1.0, "area")]:
        StateTracker.aspect_resolution_map = {}
        sizes = [(rng.randint(64, 4000), rng.randint(64, 4000)) for _ in range(300)]
        theirs = []
        for w, h in sizes:
            aspect = MultiaspectImage.calculate_image_aspect_ratio((w, h))
            if rtype == "pixel":
                target, _, _ = MultiaspectImage.calculate_new_size_by_pixel_edge(aspect, resolution, (w, h))
            else:
                mp = resolution * resolution / 1e6 if rtype == "pixel_area" else resolution
                target, _, _ = MultiaspectImage.calculate_new_size_by_pixel_area(aspect, mp, (w, h))
            theirs.append(tuple(target))
        ours = assign_buckets(sizes, resolution, rtype)
        if rtype == "pixel":  # no size map: compare each image's own target
            ours = [bucket_of(w, h, resolution, rtype) for w, h in sizes]
        assert ours == theirs, rtype


@pytest.mark.parametrize("text, found", [
    ("a castle\x00 on a hill", (1, 9, "a NUL byte (U+0000)")),
    ("a castle\n\x1b[1mat night", (2, 1, "an escape character (U+001B)")),
    ("one\rtwo", (1, 4, "a carriage return (U+000D) that ends no line: SimpleTuner splits captions at \\n only and "
                        "reads the two lines as one")),
    ("a\x85b", (1, 2, "a control character (U+0085)")),
    ("a castle,\tat night\r\nby day\r\n", None),  # tabs and Windows line ends
    ("é 漢字\u2028more", None),  # letters of any script, and separators that are no control characters
])
def test_control_characters_simpletuner_would_train_into_a_caption_are_found_at_their_line(text, found):
    from sd3tune.simpletuner.dataset import caption_control

    assert caption_control(text) == found
