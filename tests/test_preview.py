"""`sd3tune preview`: the pixels SimpleTuner encodes, made by SimpleTuner's own sample preparation in-process (with
the compat fixes), and a contact sheet by bucket; bad input is one line and overwrites nothing."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageOps

from helpers import assert_one_line_user_error, sd3tune, sketch


@pytest.fixture()
def art(tmp_path) -> Path:
    """Phone photo of a sketch (stored landscape, EXIF orientation 6: displays portrait), a landscape PNG and a
    cut-out with red under its transparent half."""
    folder = tmp_path / "art"
    folder.mkdir()
    exif = Image.Exif()
    exif[0x0112] = 6
    sketch().save(folder / "phone.jpg", exif=exif, quality=95)
    sketch().save(folder / "scan.png")
    cut = Image.new("RGBA", (256, 256), (255, 0, 0, 0))
    cut.paste((0, 160, 0, 255), (0, 0, 128, 256))
    cut.save(folder / "cutout.png")
    for name, caption in (("phone", "a sketch photographed upright"), ("scan", "a scanned sketch"),
                          ("cutout", "a cut-out figure")):
        (folder / f"{name}.txt").write_text(f"myst, {caption}\n")
    return folder


@pytest.fixture()
def run(tmp_path, art) -> Path:
    result = sd3tune("init", tmp_path / "run", "--data", art, "--resolution", "256", "--steps", "10",
                     "--alpha-background", "black")
    assert "1 image has transparency and will train composited on black: cutout.png" in result.err + result.out
    return tmp_path / "run"


def test_preview_writes_what_simpletuner_encodes_as_displayed(run, art, tmp_path):
    out = tmp_path / "preview"
    result = sd3tune("preview", run, "--out", out)
    assert result.code == 0, result.err
    assert "wrote 3 images in 3 buckets (192x320, 256x256, 320x192)" in result.out
    record = json.loads((out / "preview.json").read_text())
    items = {Path(i["source"]).name: i for i in record["images"]}
    phone = items["phone.jpg"]
    assert phone["file"] == "192x320/phone.jpg.png" and phone["caption"] == "myst, a sketch photographed upright"
    written = Image.open(out / phone["file"])
    assert written.size == (192, 320)  # portrait, as the photo displays
    with Image.open(art / "phone.jpg") as stored:
        shown = ImageOps.exif_transpose(stored).convert("RGB")
    (top, left), (w, h) = phone["crop"], written.size
    expected = shown.resize(tuple(phone["resized"]), Image.Resampling.LANCZOS).crop((left, top, left + w, top + h))
    assert np.abs(np.asarray(written, np.float32) - np.asarray(expected, np.float32)).mean() <= 3
    cut = np.asarray(Image.open(out / items["cutout.png"]["file"]), np.float32)
    assert np.abs(cut[:, 160:]).max() <= 2 and items["cutout.png"]["transparent"]  # black, the run's colour
    sheet = Image.open(out / "contact_sheet.png")
    assert sheet.width >= 500 and sheet.height >= 3 * 160  # three buckets, one band each
    assert record["alpha_background"] == "black" and "SimpleTuner" in record["made_by"]
    # check's header-only bucket counts (sd3tune's own scan) agree with the buckets SimpleTuner prepared
    from sd3tune.checks import check_run

    assert check_run(run).summary.buckets == {i["bucket"]: 1 for i in record["images"]}
    assert "crops at random" not in result.err  # uncropped: the preview is what trains
    # a random crop is drawn again when SimpleTuner caches each latent: the preview says it shows one draw
    backends = run / "config" / "multidatabackend.json"
    entries = json.loads(backends.read_text())
    entries[0].update(crop=True, crop_style="random", crop_aspect="square")
    backends.write_text(json.dumps(entries))
    again = sd3tune("preview", run, "--out", out, "--limit", "1", "--force")
    assert again.code == 0 and "crops at random (crop_style random): the preview shows one draw" in again.err


def test_bad_input_is_one_line_and_overwrites_nothing(run, art, tmp_path):
    out = tmp_path / "preview"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert_one_line_user_error(sd3tune("preview", run, "--out", out), "is not empty", "--force")
    assert_one_line_user_error(sd3tune("preview", run, "--out", out, "--limit", "0"), "--limit 0")
    assert_one_line_user_error(sd3tune("preview", run, "--out", art / "preview"), "inside the image folder")
    assert_one_line_user_error(sd3tune("preview", tmp_path / "nothing", "--out", tmp_path / "other"), "nothing")
    data = (art / "scan.png").read_bytes()
    (art / "broken.png").write_bytes(data[: len(data) // 2])
    (art / "broken.txt").write_text("myst, broken")
    assert_one_line_user_error(sd3tune("preview", run, "--out", out, "--force"), "broken.png", "re-export")
    assert [p.name for p in out.iterdir()] == ["keep.txt"] and (out / "keep.txt").read_text() == "mine"
    assert not (art / "preview").exists() and not (tmp_path / "other").exists()
    (art / "broken.png").unlink()
    manifest = json.loads((run / "sd3tune.json").read_text())
    manifest["images"]["alpha_background"] = "refuse"
    (run / "sd3tune.json").write_text(json.dumps(manifest))
    assert_one_line_user_error(sd3tune("preview", run, "--out", out, "--force"),
                               "transparency, which this run refuses: cutout.png", "alpha_background")
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    manifest["images"]["alpha_background"] = "#ffffff"
    (run / "sd3tune.json").write_text(json.dumps(manifest))
    replaced = sd3tune("preview", run, "--out", out, "--force", "--limit", "1")
    assert replaced.code == 0, replaced.err
    assert sorted(p.name for p in out.iterdir()) == ["256x256", "contact_sheet.png", "preview.json"]  # cutout.png


def test_init_refuses_an_unknown_background_before_writing(tmp_path, art):
    assert_one_line_user_error(sd3tune("init", tmp_path / "run", "--data", art, "--alpha-background", "pink"),
                               "--alpha-background 'pink' is not a colour", "#rrggbb")
    assert not (tmp_path / "run").exists()


def test_a_failed_simpletuner_import_is_raised_once_where_the_images_are_made(run, tmp_path, monkeypatch, capfd):
    # the import runs on a thread beside the check: its failure printed "Exception in thread ..." with a traceback
    # before the same error was raised again where the images are prepared
    from sd3tune.commands.preview import PreviewOptions, run_preview
    from sd3tune.simpletuner import preview

    def broken():
        raise ImportError("SimpleTuner cannot be imported here")

    monkeypatch.setattr(preview, "import_simpletuner", broken)
    with pytest.raises(ImportError, match="cannot be imported here"):
        run_preview(PreviewOptions(run_dir=run, out=tmp_path / "preview"))
    assert "Exception in thread" not in capfd.readouterr().err
