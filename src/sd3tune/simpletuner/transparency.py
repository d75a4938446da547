"""What a run does with images that have transparency (RGBA, LA, a palette or grey image with a transparent colour).

SimpleTuner 4.10.1 drops the alpha channel and trains the colour under each transparent pixel, whatever an editor left
there. sd3tune composites such images on one background colour, chosen at `init --alpha-background` (white by
default) and kept in the run's manifest (``sd3tune.json``: ``images.alpha_background``), which `train` hands to the
training process (compat fix ``alpha_on_background``) and `preview` applies the same way; or, with ``refuse``,
`check` refuses the run and names the files. `check` names them either way.
"""

from __future__ import annotations

import re
import warnings
from pathlib import Path
from typing import Any

from sd3tune.errors import Sd3tuneError
from sd3tune.simpletuner.compat.alpha_on_background import ALPHA_BACKGROUND_ENV, DEFAULT_BACKGROUND  # noqa: F401

REFUSE = "refuse"
MANIFEST_SECTION, MANIFEST_KEY = "images", "alpha_background"
_NAMED = {"white": "#ffffff", "black": "#000000"}
_HEX = re.compile(r"^#?([0-9a-fA-F]{6})$")
ALPHA_MODES = {"RGBA", "LA", "PA", "RGBa", "La"}


def parse_alpha_background(text: str) -> str:
    """``white``, ``black``, ``#rrggbb`` (as ``#rrggbb``) or ``refuse``; anything else is a user error."""
    value = text.strip().lower()
    if value in _NAMED:
        return _NAMED[value]
    if value == REFUSE:
        return REFUSE
    match = _HEX.match(value)
    if not match:
        raise Sd3tuneError(f"--alpha-background {text!r} is not a colour",
                           hint="use white, black, #rrggbb (e.g. #808080) or refuse")
    return f"#{match.group(1)}"


def run_alpha_background(manifest: dict[str, Any]) -> str:
    """The run's policy from its manifest: ``#rrggbb`` or ``refuse``; white for a run made before the setting."""
    section = manifest.get(MANIFEST_SECTION)
    value = section.get(MANIFEST_KEY) if isinstance(section, dict) else None
    try:
        return parse_alpha_background(value) if isinstance(value, str) else DEFAULT_BACKGROUND
    except Sd3tuneError:
        return DEFAULT_BACKGROUND


def describe(policy: str) -> str:
    return {"#ffffff": "white", "#000000": "black"}.get(policy, policy)


def has_transparency(image) -> bool:
    """Whether an open PIL image has a pixel that is not fully opaque (decodes only images that can have one)."""
    if image.mode not in ALPHA_MODES and "transparency" not in image.info:
        return False
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        alpha = image.convert("RGBA").getchannel("A") if image.mode not in ("RGBA", "LA") else image.getchannel("A")
        return alpha.getextrema()[0] < 255


def transparent_files(paths: list[Path]) -> list[Path]:
    """The files among ``paths`` with transparency (unreadable ones are someone else's finding)."""
    from PIL import Image

    found = []
    for path in paths:
        try:
            with Image.open(path) as image:
                if has_transparency(image):
                    found.append(path)
        except Exception:  # noqa: BLE001 - unreadable: reported by the data scan
            continue
    return found
