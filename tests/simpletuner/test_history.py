"""The loss history of a run's trainings (from SimpleTuner's progress lines in its logs), and the latest validation
images of a run, as SimpleTuner 4.10.1 names them (validation_images.save_images:
step_{step}_{shortname}_{index}_{WxH or unknown}, .png, .webp or .jpg), and an evaluation's copies of them."""

from __future__ import annotations

from pathlib import Path

import pytest

from sd3tune.report import remove_previous
from sd3tune.simpletuner.history import latest_validation_images, loss_history
from sd3tune.simpletuner.layout import validation_images


def _files(folder: Path, *names: str) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for name in names:
        (folder / name).write_bytes(b"image")


def test_the_latest_step_s_png_images_by_prompt_then_index_and_nothing_else(tmp_path):
    folder = tmp_path / "validation_images"
    _files(folder, "step_10_validation_0_64x64.png", "step_20_validation_10_64x64.png",
           "step_20_validation_2_64x64.png", "step_20_validation_0_64x64.png", "step_20_castle_at_dusk_0_64x64.png",
           "step_30_notes.png", "step_30.png", "step_40_validation_0_64x64.png.txt", "readme.txt")
    (folder / "step_50_validation_0_64x64.png").mkdir()  # a folder, not an image
    step, images = latest_validation_images(tmp_path)
    assert step == 20
    assert [p.name for p in images] == ["step_20_castle_at_dusk_0_64x64.png", "step_20_validation_0_64x64.png",
                                        "step_20_validation_2_64x64.png", "step_20_validation_10_64x64.png"]
    assert all(p.parent == folder for p in images)


@pytest.mark.parametrize("names", [("step_5_validation_0_1024x1024.webp", "step_5_validation_1_1024x1024.webp"),
                                   ("step_5_validation_0_1024x1024.jpg", "step_5_validation_1_unknown.jpg")],
                         ids=["webp", "jpeg"])
def test_validation_images_saved_as_webp_or_jpeg_are_found_too(tmp_path, names):
    _files(tmp_path / "validation_images", "step_4_validation_0_1024x1024.png", *names)
    step, images = latest_validation_images(tmp_path)
    assert (step, [p.name for p in images]) == (5, list(names))
    assert [p.name for p, s in validation_images(tmp_path).items() if s == 5] == list(names)  # the one parser


def test_a_run_without_validation_images_has_none(tmp_path):
    assert latest_validation_images(tmp_path) == (None, [])
    _files(tmp_path / "validation_images", "notes.txt")
    assert latest_validation_images(tmp_path) == (None, [])


def test_force_removes_the_copied_validation_images_of_every_format_and_keeps_other_files(tmp_path):
    copies = tmp_path / "validation"
    _files(copies, "step_20_validation_0_64x64.png", "step_20_validation_1_64x64.webp",
           "step_20_validation_2_unknown.jpg")
    remove_previous(tmp_path)
    assert not copies.exists()
    _files(copies, "step_20_validation_0_64x64.png", "mine.png")
    remove_previous(tmp_path)
    assert [p.name for p in copies.iterdir()] == ["mine.png"]



def _log(path, steps, total=20, loss=1.0):
    lines = [f"Epoch 1/1, Steps:  {s * 5}%| | {s}/{total} [00:01<00:01,  1.00it/s, lr=0.001, step_loss={loss + s}]"
             for s in steps]
    path.write_text("\r".join(lines) + "\n")
    return path


def test_a_later_training_supersedes_the_steps_an_earlier_one_trained_past_its_resume_point(tmp_path):
    # trained to step 8 (checkpoint at 4), interrupted; resumed from checkpoint-4 and stopped at step 6: steps 7-8
    # of the first training are not in the LoRA's history (it drew them as if they were)
    first = _log(tmp_path / "train-1.log", range(1, 9))
    second = _log(tmp_path / "train-2.log", range(5, 7), loss=10.0)
    history = loss_history([first, second])
    assert history.steps == [1, 2, 3, 4, 5, 6]
    assert history.loss == [2.0, 3.0, 4.0, 5.0, 15.0, 16.0]  # 5 and 6 from the resumed training
    assert history.logs == [str(first), str(second)]
    # a training started over from step 1 replaces all of the earlier one
    again = _log(tmp_path / "train-3.log", range(1, 3), loss=20.0)
    assert loss_history([first, second, again]).steps == [1, 2]
