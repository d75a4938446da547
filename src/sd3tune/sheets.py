"""Contact sheets (a labelled grid of images, rows x columns) and pixel comparisons, for quickstart, evaluate and
the benchmarks."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence


def mean_abs_diff(a: Sequence[Path], b: Sequence[Path]) -> float:
    """Mean |pixel difference| (0..255) between two lists of image files made at the same seeds, pair by pair."""
    import numpy as np
    from PIL import Image

    def rgb(path: Path):
        with Image.open(path) as im:
            return np.asarray(im.convert("RGB"), dtype=np.float32)

    return float(np.mean([np.abs(rgb(x) - rgb(y)).mean() for x, y in zip(a, b)]))


PER_IMAGE_FIELDS = ("prompt", "seed")  # what differs from cell to cell: the sheet lists them instead


def sheet_fields(image_fields: dict[str, Any], *, sheet: str, rows: str, columns: str,
                 row_labels: Sequence[str], column_labels: Sequence[str], prompts: Sequence[str],
                 seeds: Sequence[int], **extra: Any) -> dict[str, Any]:
    """A contact sheet's provenance (``inference.save_png``'s fields): what made its images (``image_fields``, one
    image's, less what differs per cell: its prompt and seed), which ``sheet`` it is, what its rows and columns are
    (``rows`` / ``columns``: e.g. "prompt", "seed", "model"; the labels as drawn), and every prompt and seed shown."""
    fields = {k: v for k, v in image_fields.items() if k not in PER_IMAGE_FIELDS}
    fields.update(sheet=sheet, rows=rows, columns=columns, row_labels=list(row_labels),
                  column_labels=list(column_labels), prompts=list(prompts), seeds=list(seeds), **extra)
    return fields


def contact_sheet(rows: Sequence[Sequence[object]], row_labels: Sequence[str], col_labels: Sequence[str],
                  cell: int = 192):
    """A PIL image: one row per prompt, one column per model; each cell scaled to ``cell`` pixels."""
    from PIL import Image, ImageDraw

    label_w, label_h, pad = 220, 22, 4
    font = label_font()
    ncols = max((len(r) for r in rows), default=0)
    sheet = Image.new("RGB", (label_w + ncols * (cell + pad) + pad, label_h + len(rows) * (cell + pad) + pad), "white")
    draw = ImageDraw.Draw(sheet)
    for c, text in enumerate(col_labels):
        draw.text((label_w + pad + c * (cell + pad), 4), text[:30], fill="black", font=font)
    for r, row in enumerate(rows):
        y = label_h + pad + r * (cell + pad)
        draw.text((4, y + 4), _wrap(row_labels[r] if r < len(row_labels) else "", 34), fill="black", font=font)
        for c, image in enumerate(row):
            im = image.convert("RGB").resize((cell, cell), Image.Resampling.NEAREST)  # type: ignore[attr-defined]
            sheet.paste(im, (label_w + pad + c * (cell + pad), y))
    return sheet


def label_font(size: int = 11):
    """DejaVu Sans for the labels (accented prompts; Pillow's built-in font draws a box for any non-ASCII letter):
    matplotlib's copy when it is installed (SimpleTuner brings it), else the system's, else Pillow's own."""
    import importlib.util

    from PIL import ImageFont

    spec = importlib.util.find_spec("matplotlib")
    bundled = Path(spec.origin).parent / "mpl-data" / "fonts" / "ttf" / "DejaVuSans.ttf" if spec and spec.origin \
        else None
    for candidate in (bundled, "DejaVuSans.ttf"):
        if candidate is None:
            continue
        try:
            return ImageFont.truetype(str(candidate), size)
        except OSError:
            continue
    return ImageFont.load_default(size)


def _wrap(text: str, width: int) -> str:
    words, lines, line = text.split(), [], ""
    for w in words:
        if len(line) + len(w) + 1 > width:
            lines.append(line)
            line = w
        else:
            line = f"{line} {w}".strip()
    lines.append(line)
    return "\n".join(lines[:8])
