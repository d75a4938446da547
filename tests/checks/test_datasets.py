"""Rules on the datasets (checks/datasets.py): entries, image folders, captions, sizes, and buckets against the
batch."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest
from check_helpers import (Case, assert_fails_naming_the_culprit, backend_set, backends_path, check, env_set,
                           image_backend, json_edit, section)


def _psd(path: Path, size: tuple[int, int] = (64, 64)) -> None:
    """A minimal RGB Photoshop file (PIL reads PSD but cannot write it): header, empty sections, raw planes."""
    w, h = size
    path.write_bytes(b"8BPS" + (1).to_bytes(2, "big") + bytes(6) + (3).to_bytes(2, "big") + h.to_bytes(4, "big")
                     + w.to_bytes(4, "big") + (8).to_bytes(2, "big") + (3).to_bytes(2, "big") + bytes(12)
                     + bytes(2) + bytes(3 * w * h))


# (id, config format, break(run, data, tmp) -> optional other path to check, strings the output must contain)
CASES: list[Case] = [
    # multidatabackend.json
    ("backends-no-text-embeds", "env", lambda r, d, t: json_edit(backends_path(r), lambda b: [image_backend(b)]),
     ("multidatabackend.json", "text_embeds")),
    ("backends-duplicate-id", "env", lambda r, d, t: json_edit(backends_path(r), lambda b: b[1].update(
        id=image_backend(b)["id"])), ("more than one dataset",)),
    ("backends-unknown-text-embeds", "env", lambda r, d, t: backend_set(r, text_embeds="nope"),
     ("text_embeds", "nope")),
    ("backends-max-size-without-target", "env", lambda r, d, t: backend_set(r, maximum_image_size=1024),
     ("maximum_image_size", "target_downsample_size")),
    ("backends-area-minimum-megapixels", "env",
     lambda r, d, t: backend_set(r, resolution_type="area", resolution=0.25, minimum_image_size=64),
     ("minimum_image_size", "megapixels")),
    # data folder
    ("data-missing", "env", lambda r, d, t: backend_set(r, instance_data_dir=str(t / "gone")),
     ("instance_data_dir", "gone")),
    ("data-empty", "env", lambda r, d, t: (shutil.rmtree(d), d.mkdir()), ("instance_data_dir", "no readable images")),
    ("data-corrupt-image", "env", lambda r, d, t: (d / "concept_03.png").write_bytes(b"not a png at all"),
     ("concept_03.png",)),
    ("data-truncated-image", "env", lambda r, d, t: (d / "concept_05.png").write_bytes(
        (d / "concept_05.png").read_bytes()[:200]), ("concept_05.png",)),
    ("data-empty-image-file", "env", lambda r, d, t: (d / "concept_02.png").write_bytes(b""), ("concept_02.png",)),
    # `echo > x.txt`: SimpleTuner reads no caption from it and stops (IndexError; with prefetch, train hung)
    ("data-caption-of-blank-lines", "env", lambda r, d, t: (d / "concept_06.txt").write_text("  \n"),
     ("concept_06.txt", "only blank lines")),
    ("data-uncaptioned-psd", "env", lambda r, d, t: _psd(d / "sketch.psd"), ("sketch.txt", "1 of 9 images")),
    ("data-uncaptioned-video", "env", lambda r, d, t: (d / "reference.mp4").write_bytes(b"\0\0\0\x18ftypmp42"),
     ("reference.txt", "1 of 9 files", "reference.mp4: a video file")),
    ("data-unreadable-psd", "env", lambda r, d, t: ((d / "sketch.psd").write_bytes(b"8BPS broken"),
                                                    (d / "sketch.txt").write_text("a sketch")), ("sketch.psd",)),
    ("captions-all-missing", "env", lambda r, d, t: [p.unlink() for p in d.glob("*.txt")],
     ("caption_strategy", ".txt")),
    ("captions-one-missing", "env", lambda r, d, t: (d / "concept_04.txt").unlink(), ("concept_04.txt",)),
    ("caption-not-utf8", "env", lambda r, d, t: (d / "concept_01.txt").write_bytes("caf\xe9".encode("latin-1")),
     ("concept_01.txt", "UTF-8")),
    # SimpleTuner keeps every character but \n of a caption file: a NUL trained into the caption, and check said ok
    ("caption-nul-byte", "env", lambda r, d, t: (d / "concept_03.txt").write_bytes(b"a castle\x00 on a hill"),
     ("concept_03.txt:line 1 column 9: holds a NUL byte (U+0000); SimpleTuner trains it into the caption",)),
    ("caption-escape-on-its-second-line", "env", lambda r, d, t: (d / "concept_05.txt").write_text(
        "a castle\n\x1b[31ma red castle"), ("concept_05.txt:line 2 column 1: holds an escape character (U+001B)",)),
    ("caption-lone-carriage-return", "env", lambda r, d, t: (d / "concept_02.txt").write_bytes(b"one\rtwo\r\n"),
     ("concept_02.txt:line 1 column 4", "ends no line")),
    ("instance-prompt-missing", "env", lambda r, d, t: backend_set(r, caption_strategy="instanceprompt"),
     ("instance_prompt",)),
    ("too-few-images-for-batch", "env", lambda r, d, t: env_set(r, "TRAIN_BATCH_SIZE", "16"), ("TRAIN_BATCH_SIZE",)),
    ("batch-times-accumulation-too-large", "env", lambda r, d, t: env_set(r, "GRADIENT_ACCUMULATION_STEPS", "8"),
     ("GRADIENT_ACCUMULATION_STEPS", "effective batch 16")),
    ("all-images-below-minimum-size", "env", lambda r, d, t: backend_set(r, minimum_image_size=128),
     ("minimum_image_size", "all 8")),
]


@pytest.mark.parametrize("case_id, fmt, breaker, needles", CASES, ids=[c[0] for c in CASES])
def test_a_broken_run_fails_naming_the_culprit(make_run, tmp_path, case_id, fmt, breaker, needles):
    assert_fails_naming_the_culprit(make_run, tmp_path, fmt, breaker, needles)


def test_dataset_numbers_may_be_written_as_simpletuner_reads_them(make_run):
    # a quoted number fails (see CASES); an int where SimpleTuner takes a float, or 1.0 for an int it int()s, passes
    run, _ = make_run()
    backend_set(run, probability=1, repeats=0.0, crop=True, crop_aspect="random", crop_aspect_buckets=[1, 0.75])
    result, _ = check(run)
    assert result.exit_code == 0, result.output
    backend_set(run, repeats=0.5, probability=True)
    result, _ = check(run)
    errors = section(result.output, "error")
    assert "images.repeats: 0.5: Input should be a valid integer" in errors
    assert "images.probability: true is not a number — write a number" in errors


def test_a_run_resolution_no_dataset_uses_warns_and_one_a_dataset_inherits_does_not(make_run):
    # init writes the resolution into the dataset entry too, and SimpleTuner takes the dataset's: RESOLUTION edited
    # alone changed nothing that trained
    run, _ = make_run()
    env_set(run, "RESOLUTION", "128")
    result, _ = check(run)
    assert result.exit_code == 0, result.output
    assert re.search(r"RESOLUTION \(line \d+\): 128 here, but every dataset sets its own resolution \(images 64\)",
                     section(result.output, "warning"))
    json_edit(backends_path(run), lambda data: image_backend(data).pop("resolution") and None)
    result, _ = check(run)  # now the dataset trains at RESOLUTION
    assert "every dataset sets its own" not in result.output and "128x128" in result.output


def test_captions_beside_the_images_that_the_caption_strategy_leaves_unused_warn(make_run):
    run, data = make_run()
    backend_set(run, caption_strategy="filename")
    warnings = section(check(run)[0].output, "warning")
    assert "images.caption_strategy: 8 images have a .txt caption beside them, and caption_strategy filename " \
           "leaves them unused" in warnings
    for caption in data.glob("*.txt"):
        caption.unlink()
    assert "caption_strategy" not in check(run)[0].output


def test_bucket_smaller_than_batch_is_dropped_with_a_warning(make_run, tmp_path):
    """Images of an odd aspect ratio land in their own bucket; with a minimum size set SimpleTuner drops it."""
    from PIL import Image

    run, data = make_run()
    backend_set(run, crop=False)
    Image.new("RGB", (128, 64)).save(data / "wide.png")
    (data / "wide.txt").write_text("a wide one")
    result, _ = check(run)
    assert result.exit_code == 0, result.output
    assert "1 images sit in aspect buckets smaller than the batch" in result.output
    assert "[64x64: 8]" in result.output


def test_captions_with_windows_line_ends_and_tabs_pass_and_many_bad_ones_are_counted(make_run):
    run, data = make_run()
    (data / "concept_00.txt").write_bytes(b"a castle,\tat night\r\na castle by day\r\n")
    assert check(run)[0].exit_code == 0
    for i in range(1, 8):
        (data / f"concept_0{i}.txt").write_text(f"castle {i}\x07")
    errors = section(check(run)[0].output, "error")
    assert errors.count("holds a control character (U+0007)") == 5
    assert "2 more caption files hold control characters: concept_06.txt, concept_07.txt" in errors


def test_images_with_transparency_are_named_composited_or_refused(make_run):
    """Never trained as-is: check names them with the run's background (the manifest's), or refuses them; train
    hands the colour to the training process (compat fix 16)."""
    import json

    from PIL import Image

    from sd3tune.simpletuner.compat import ALPHA_BACKGROUND_ENV

    run, data = make_run()
    Image.new("RGBA", (64, 64), (255, 0, 0, 0)).save(data / "cutout.png")
    Image.new("RGBA", (64, 64), (9, 9, 9, 255)).save(data / "opaque.png")  # RGBA, all opaque: nothing to say
    for name in ("cutout", "opaque"):
        (data / f"{name}.txt").write_text("a figure")
    result, _ = check(run)
    assert result.exit_code == 0, result.output
    assert "1 image has transparency and will train composited on white: cutout.png" in section(result.output,
                                                                                                 "warning")
    assert "opaque.png" not in result.output
    manifest = json.loads((run / "sd3tune.json").read_text())
    for policy, code in (("refuse", 2), ("#0a0b0c", 0)):
        manifest["images"]["alpha_background"] = policy
        (run / "sd3tune.json").write_text(json.dumps(manifest))
        result, _ = check(run)
        assert result.exit_code == code, result.output
    assert "composited on #0a0b0c: cutout.png" in result.output
    dry = _train_dry_run(run)
    assert f"{ALPHA_BACKGROUND_ENV}='#0a0b0c'" in dry or f"{ALPHA_BACKGROUND_ENV}=#0a0b0c" in dry


def _train_dry_run(run: Path) -> str:
    from typer.testing import CliRunner

    from sd3tune.cli import app

    result = CliRunner().invoke(app, ["train", str(run), "--dry-run"])
    assert result.exit_code == 0, result.output
    return result.output
