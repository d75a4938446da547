"""Fix 16: SimpleTuner's image decoder drops the alpha channel (``rgba_to_rgb_optimized`` keeps the colour under a
transparent pixel; a grey+alpha PNG reaches ``convert("RGB")`` as ``LA``, which drops it too), so a cut-out trains on
whatever colour its editor left under the transparent pixels (often black, or stray paint). Composite every image with
transparency (RGBA, LA, a palette or grey image with a transparent colour) on the run's background colour instead:
``ALPHA_BACKGROUND_ENV`` (``#rrggbb``, set by ``sd3tune train`` from the run's manifest), white when unset."""

from __future__ import annotations

import io
import os

from sd3tune.simpletuner.compat._patching import expect, replace

ALPHA_BACKGROUND_ENV = "SD3TUNE_ALPHA_BACKGROUND"
DEFAULT_BACKGROUND = "#ffffff"


def background() -> tuple[int, int, int]:
    """The run's background colour (``ALPHA_BACKGROUND_ENV``), white when unset or unreadable."""
    text = os.environ.get(ALPHA_BACKGROUND_ENV, DEFAULT_BACKGROUND).strip().lstrip("#")
    try:
        value = int(text, 16) if len(text) == 6 else 0xFFFFFF
    except ValueError:
        value = 0xFFFFFF
    return value >> 16, (value >> 8) & 0xFF, value & 0xFF


def composite(array, colour: tuple[int, int, int]):
    """An RGB uint8 array from an RGBA or grey+alpha array (uint8 or uint16), blended over ``colour``."""
    import numpy as np

    if array.dtype == np.uint8:  # the usual case, in Pillow's integer C code (~30x quicker than the float path)
        from PIL import Image

        image = Image.fromarray(array, "LA" if array.shape[2] == 2 else "RGBA").convert("RGBA")
        return np.asarray(Image.alpha_composite(Image.new("RGBA", image.size, (*colour, 255)), image).convert("RGB"))

    top = float(np.iinfo(array.dtype).max) if array.dtype.kind in "ui" else 1.0
    pixels = array.astype(np.float32) / top
    rgb = np.repeat(pixels[..., :1], 3, axis=2) if array.shape[2] == 2 else pixels[..., :3]
    alpha = pixels[..., -1:]
    out = rgb * alpha + np.asarray(colour, np.float32) / 255.0 * (1.0 - alpha)
    return np.clip(out * 255.0 + 0.5, 0, 255).astype(np.uint8)


def applies_to(module) -> str | None:
    return (expect(module, "_trainingsample_array_to_rgb_image", params=("img_tsr",),
                   source=("img_tsr.shape[2] == 4", "rgba_to_rgb_optimized"))
            or expect(module, "decode_image_with_pil", params=("img_data",),
                      source=('img_pil.mode == "RGBA"', "rgba_to_rgb_optimized"))
            or expect(module, "load_image", source=("_trainingsample_array_to_rgb_image(image_preload)",
                                                    "decode_image_with_pil(img_data)")))


def apply(module) -> None:
    def array_to_rgb(original):
        def composited_array_to_rgb_image(img_tsr):
            if img_tsr.ndim == 3 and img_tsr.shape[2] in (2, 4):
                from PIL import Image

                return Image.fromarray(composite(img_tsr, background()))
            return original(img_tsr)

        return composited_array_to_rgb_image

    def pil_decode(original):
        def composited_decode_image_with_pil(img_data):
            from PIL import Image

            image = Image.open(io.BytesIO(img_data) if isinstance(img_data, bytes) else img_data)
            if image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info:
                import numpy as np

                return Image.fromarray(composite(np.asarray(image.convert("RGBA")), background()))
            if hasattr(img_data, "seek"):
                img_data.seek(0)
            return original(img_data)

        return composited_decode_image_with_pil

    replace(module, "_trainingsample_array_to_rgb_image", array_to_rgb)
    replace(module, "decode_image_with_pil", pil_decode)
