"""SimpleTuner facts mirrored in ``sd3tune.simpletuner.keys``, compared with the installed SimpleTuner."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

from sd3tune.simpletuner import keys


def _simpletuner_source(module: str) -> str:
    return Path(importlib.util.find_spec(module).origin).read_text()


def test_dataset_file_extensions_match_the_installed_simpletuner():
    """The files an image dataset trains on: Pillow's openable extensions plus SimpleTuner's video and audio lists.
    A new SimpleTuner or Pillow that changes them fails here (and `sd3tune check` would miss or invent files)."""
    code = ("import json\n"
            "from PIL import Image\n"
            "import simpletuner.helpers.training as t\n"  # imports pillow_jxl first when installed, as it does
            "pil = {e.lower().lstrip('.') for e, f in t.supported_extensions.items() if f in Image.OPEN}\n"
            "print(json.dumps({'all': sorted(t.image_file_extensions), 'video': sorted(t.video_file_extensions),\n"
            "                  'audio': sorted(t.audio_file_extensions), 'pil': sorted(pil)}))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, "SIMPLETUNER_SKIP_TORCH": "1"})  # the lists only; no torch needed
    theirs = json.loads(out.stdout.strip().splitlines()[-1])
    assert sorted(keys.DATASET_FILE_EXTENSIONS) == theirs["all"]
    assert sorted(keys.VIDEO_FILE_EXTENSIONS) == theirs["video"]
    assert sorted(keys.AUDIO_FILE_EXTENSIONS) == theirs["audio"]
    assert sorted(keys.PIL_IMAGE_EXTENSIONS) == theirs["pil"]


def test_image_datasets_list_and_caption_files_by_that_set():
    """Which list the local backend's discovery and the caption reader use for an image dataset (the pin's code)."""
    discovery = _simpletuner_source("simpletuner.helpers.metadata.backends.discovery")
    assert "            else:\n                extension_pool = image_file_extensions\n" in discovery
    prompts = _simpletuner_source("simpletuner.helpers.prompts")
    assert "file_extensions=image_file_extensions" in prompts
    assert 'caption_file = os.path.splitext(image_path)[0] + ".txt"' in prompts
    assert 'raise FileNotFoundError(f"Caption file {caption_file} not found.")' in prompts
    local = _simpletuner_source("simpletuner.helpers.data_backend.local")
    assert "if extensions and not filename.lower().endswith(extensions):" in local


def test_files_load_by_extension_as_simpletuner_reads_them():
    assert keys.dataset_file_kind("sketch.psd") == keys.dataset_file_kind("A.PNG") == "image"
    assert keys.dataset_file_kind("reference.mp4") == keys.dataset_file_kind("clip.mpg") == "video"  # video wins
    assert keys.dataset_file_kind("voice.wav") == keys.dataset_file_kind("song.MP3") == "audio"
    assert keys.dataset_file_kind("notes.txt") is None and keys.dataset_file_kind("layers.xcf") is None
