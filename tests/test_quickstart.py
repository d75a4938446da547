"""`sd3tune quickstart`: the whole offline loop, as the README's first command runs it."""

from __future__ import annotations

import hashlib
import json
import re

from helpers import assert_one_line_user_error, sd3tune
from PIL import Image

from sd3tune.lora import read_safetensors_header


def test_quickstart_runs_the_whole_loop(tmp_path):
    folder = tmp_path / "qs"
    r = sd3tune("quickstart", folder)
    assert r.code == 0, r.err[-3000:]
    lora = folder / "run" / "output" / "pytorch_lora_weights.safetensors"
    _, tensors = read_safetensors_header(lora)
    assert any(".attn.to_q.lora_A." in k for k in tensors)
    assert len(list((folder / "samples" / "base").glob("*.png"))) == 2
    assert len(list((folder / "samples" / "lora").glob("*.png"))) == 2
    # the side-by-side sheet says what made it: model, the LoRA file and its SHA-256, prompts, seeds, rows, columns
    text = Image.open(folder / "samples" / "compare.png").text
    made = json.loads(text["sd3tune"])
    assert made["lora"] == text["sd3tune:lora"] == str(lora.resolve())
    assert made["lora_sha256"] == text["sd3tune:lora_sha256"] == hashlib.sha256(lora.read_bytes()).hexdigest()
    assert made["model"] == text["sd3tune:model"] == str((folder / "model").resolve())
    assert made["sd3tune_version"] == text["sd3tune:sd3tune_version"]
    assert len(made["prompts"]) == 2 and made["seeds"] == [0] and made["lora_scale"] == [0.0, 1.0]
    assert (made["rows"], made["columns"], made["column_labels"]) == ("prompt", "model", ["base", "LoRA"])
    diff = float(re.search(r"mean \|pixel difference\| = ([\d.]+) / 255", r.out).group(1))
    assert diff >= 1.0
    assert re.search(r"done in [\d.]+ s", r.out)
    # the README's first command run again (a newcomer's retry): the folder it made is replaced, not added to
    assert (folder / ".sd3tune-quickstart").is_file()
    r = sd3tune("quickstart", folder, "--steps", "2")
    assert r.code == 0, r.err[-3000:]
    assert len(list((folder / "samples" / "base").glob("*.png"))) == 2
    manifest = json.loads((folder / "run" / "sd3tune.json").read_text())
    assert manifest["trainings"][-1]["status"] == "ok" and manifest["trainings"][-1]["steps"] == 2


def test_a_file_or_zero_steps_is_refused_before_anything_is_built(tmp_path):
    image = tmp_path / "photo.png"
    image.write_bytes(b"\x89PNG\r\n\x1a\n")
    assert_one_line_user_error(sd3tune("quickstart", image), f"{image} is a file", "pass a folder")
    assert_one_line_user_error(sd3tune("quickstart", image / "demo"), f"{image} (in the path", "is a file")
    # --steps 0 is refused before the model and images are built: the folder stays empty, so the corrected command
    # is not refused as "not empty"
    folder = tmp_path / "demo"
    assert_one_line_user_error(sd3tune("quickstart", folder, "--steps", "0"), "--steps 0 must be at least 1")
    assert not folder.exists()


def test_the_tiny_run_options_are_a_fresh_copy_each_time(tmp_path):
    # a test that added repeats to its options changed every later tiny run on that worker (shared dicts)
    from sd3tune.commands.quickstart import tiny_init_options

    first = tiny_init_options(tmp_path / "a", tmp_path, tmp_path, steps=4, checkpoint_every=2)
    first.image_backend_overrides["repeats"] = 3
    first.overrides["data"]["resolution"] = 128
    again = tiny_init_options(tmp_path / "b", tmp_path, tmp_path, steps=4, checkpoint_every=2)
    assert "repeats" not in again.image_backend_overrides and again.overrides["data"]["resolution"] == 64
