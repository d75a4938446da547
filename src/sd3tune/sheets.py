"""Contact sheets: a labelled grid of images (rows x columns), for quickstart and evaluate."""

from __future__ import annotations

from typing import Sequence


def contact_sheet(rows: Sequence[Sequence[object]], row_labels: Sequence[str], col_labels: Sequence[str],
                  cell: int = 192):
    """A PIL image: one row per prompt, one column per model; each cell scaled to ``cell`` pixels."""
    from PIL import Image, ImageDraw

    label_w, label_h, pad = 220, 22, 4
    ncols = max((len(r) for r in rows), default=0)
    sheet = Image.new("RGB", (label_w + ncols * (cell + pad) + pad, label_h + len(rows) * (cell + pad) + pad), "white")
    draw = ImageDraw.Draw(sheet)
    for c, text in enumerate(col_labels):
        draw.text((label_w + pad + c * (cell + pad), 4), text[:30], fill="black")
    for r, row in enumerate(rows):
        y = label_h + pad + r * (cell + pad)
        draw.text((4, y + 4), _wrap(row_labels[r] if r < len(row_labels) else "", 34), fill="black")
        for c, image in enumerate(row):
            im = image.convert("RGB").resize((cell, cell), Image.Resampling.NEAREST)  # type: ignore[attr-defined]
            sheet.paste(im, (label_w + pad + c * (cell + pad), y))
    return sheet


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
