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


def bucket_sheet(groups: Sequence[tuple[str, Sequence[tuple[object, str]]]], cell: int = 160, columns: int = 6):
    """A PIL image: one band per group (``label``, then its images in rows of ``columns``), each image fitted into
    ``cell`` pixels with its aspect kept, with its label (e.g. file name and caption) under it."""
    from PIL import Image, ImageDraw

    pad, head_h, text_h = 6, 24, 44
    font = label_font()
    rows = [(label, items[i:i + columns]) for label, items in groups for i in range(0, max(len(items), 1), columns)]
    width = pad + max(min(columns, max((len(items) for _, items in groups), default=1)), 3) * (cell + pad)
    height = pad + sum(head_h for _ in groups) + len(rows) * (cell + text_h + pad)
    sheet = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(sheet)
    y, last = pad, None
    for label, items in rows:
        if label != last:
            draw.text((pad, y + 4), label, fill="black", font=label_font(14))
            y += head_h
            last = label
        for c, (image, text) in enumerate(items):
            im = image.convert("RGB")  # type: ignore[attr-defined]
            im.thumbnail((cell, cell))
            x = pad + c * (cell + pad)
            sheet.paste(im, (x + (cell - im.width) // 2, y + (cell - im.height) // 2))
            draw.rectangle((x - 1, y - 1, x + cell, y + cell), outline="#cccccc")
            draw.text((x, y + cell + 2), "\n".join(_wrap(text, cell // 6).split("\n")[:3]), fill="black", font=font)
        y += cell + text_h + pad
    return sheet
