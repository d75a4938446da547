"""What `sd3tune evaluate` writes about its numbers: metrics.json (strict JSON), report.md and report.html (settings,
prompts, the contact sheet, the metric table, the best checkpoint and what each number means)."""

from __future__ import annotations

import html
import json
import math
import os
import re
from pathlib import Path
from typing import Any


def fmt(stat: dict[str, Any] | None, digits: int = 3) -> str:
    """``mean ± std``; the mean alone when it is a single value (n 1: no spread to show). A value that rounds to
    zero shows as 0, never -0."""
    if not stat or stat.get("mean") is None:
        return "n/a"
    mean = _rounded(stat["mean"], digits)
    if stat.get("n") == 1 or stat.get("std") is None:
        return mean
    return f"{mean} ± {_rounded(stat['std'], digits)}"


def _rounded(value: float, digits: int) -> str:
    text = f"{value:.{digits}f}"
    return text[1:] if text.startswith("-") and float(text) == 0 else text


def _title(data: dict[str, Any], label: str | None) -> str:
    """A model's name as the tables show it (its title), from its label."""
    model = data["models"].get(label) if label is not None else None
    return model["title"] if model else str(label)


TABLE_COLUMNS = (("clip_score", "CLIP score ↑", 2), ("style_similarity", "style sim. ↑", 3),
                 ("diversity", "diversity", 3), ("kid", "KID ↓", 4), ("drift", "neutral drift", 3))


def render_markdown(data: dict[str, Any], sheet_name: str) -> str:
    """The report: settings, the contact sheet, the metric table, the best checkpoint and what each number means."""
    lines = [f"# sd3tune evaluation: {data['run_dir']}", ""]
    lines += [f"- base model: `{data['model']}`",
              f"- LoRA: `{data['lora']['file']}` (sha256 `{data['lora']['sha256'][:12]}`)",
              f"- CLIP model for the metrics: `{data['clip_model']['name']}` ({data['clip_model']['source']})",
              f"- sampler: {_sampler_text(data['sampler'])}",
              f"- seeds per prompt: {', '.join(map(str, data['seeds']))}",
              f"- training images: {data['training_images']['used']} of {data['training_images']['total']} in "
              + ", ".join(f"`{f}`" for f in data["training_images"]["folders"]),
              f"- sd3tune {data['sd3tune_version']}, {data['created']}", ""]
    lines += ["## Prompts", ""]
    for i, p in enumerate(data["prompts"]):
        lines.append(f"{i + 1}. ({p['kind']}) {_md(p['text'])}")
    lines += ["", "## Images", "",
              f"Rows: prompts (seed {data['seeds'][0]}); columns: {' | '.join(m['title'] for m in data['models'].values())}. "
              "Every image is under `images/`.", "", f"![contact sheet]({sheet_name})", ""]
    lines += ["## Metrics (mean ± std)", ""]
    header = ["model"] + [c[1] for c in TABLE_COLUMNS]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    best = data["best"]["label"]
    for label, m in data["models"].items():
        name = m["title"] + (" **(best)**" if label == best else "")
        lines.append("| " + " | ".join([name] + [fmt(m["metrics"][k], d) for k, _, d in TABLE_COLUMNS]) + " |")
    ref = data["reference"]["training_style_similarity"]
    lines += ["", f"Reference: the training images' own style similarity is {fmt(ref)}.", ""]
    lines += ["## Best checkpoint", "", f"**{_title(data, best)}** — {data['best']['rule']}.", ""]
    if data["best"]["scores"]:
        lines += ["| candidate | score |", "|---|---|"]
        lines += [f"| {_title(data, k)} | {v:+.3f} |" for k, v in data["best"]["scores"].items()]
        lines.append("")
    lines += ["## What the numbers mean", ""]
    lines += [f"- **{k}**: {v}" for k, v in data["definitions"].items()]
    lines += ["- std is the sample standard deviation across prompts and seeds (KID: across random subsets); a value "
              "without ± is a single one (n = 1)."]
    if data["notes"]:
        lines += ["", "## Notes", ""] + [f"- {_md(n)}" for n in data["notes"]]
    return "\n".join(lines) + "\n"


_MARKDOWN_SPECIAL = re.compile(r"([\\`*_{}\[\]()#+!|<>~])")


def _md(text: str) -> str:
    """``text`` as Markdown shows it literally (a prompt's ``*``, ``<b>`` or ``|`` is not markup)."""
    return _MARKDOWN_SPECIAL.sub(r"\\\1", text)


def render_html(data: dict[str, Any], sheet_name: str) -> str:
    """A self-contained HTML page with the same table and the contact sheet (for a browser)."""
    e = html.escape
    rows = []
    best = data["best"]["label"]
    for label, m in data["models"].items():
        cells = "".join(f"<td>{e(fmt(m['metrics'][k], d))}</td>" for k, _, d in TABLE_COLUMNS)
        mark = " <b>(best)</b>" if label == best else ""
        rows.append(f"<tr><td>{e(m['title'])}{mark}</td>{cells}</tr>")
    head = "".join(f"<th>{e(c[1])}</th>" for c in TABLE_COLUMNS)
    prompts = "".join(f"<li>({e(p['kind'])}) {e(p['text'])}</li>" for p in data["prompts"])
    defs = "".join(f"<li><b>{e(k)}</b>: {e(v)}</li>" for k, v in data["definitions"].items())
    notes = "".join(f"<li>{e(n)}</li>" for n in data["notes"])
    return (f"<!doctype html><meta charset='utf-8'><title>sd3tune evaluation</title>"
            f"<style>body{{font-family:sans-serif;max-width:1100px}}td,th{{padding:4px 8px;border:1px solid #ccc}}"
            f"table{{border-collapse:collapse}}</style>"
            f"<h1>sd3tune evaluation</h1><p>{e(data['run_dir'])}<br>base <code>{e(data['model'])}</code>, LoRA "
            f"<code>{e(data['lora']['file'])}</code> (sha256 <code>{e(data['lora']['sha256'][:12])}</code>), "
            f"CLIP <code>{e(data['clip_model']['name'])}</code><br>"
            f"{e(_sampler_text(data['sampler']))}; seeds {e(', '.join(map(str, data['seeds'])))}</p>"
            f"<h2>Prompts</h2><ol>{prompts}</ol><h2>Images</h2><img src='{e(sheet_name)}'>"
            f"<h2>Metrics (mean ± std)</h2><table><tr><th>model</th>{head}</tr>{''.join(rows)}</table>"
            f"<h2>Best checkpoint</h2><p><b>{e(_title(data, best))}</b> — {e(data['best']['rule'])}.</p>"
            f"<h2>What the numbers mean</h2><ul>{defs}</ul>" + (f"<h2>Notes</h2><ul>{notes}</ul>" if notes else ""))


def _sampler_text(s: dict[str, Any]) -> str:
    return (f"{s['steps']} steps, CFG {s['guidance']}, {s['width']}x{s['height']}, T5 length "
            f"{s['max_sequence_length']}, shift {s['shift']}")


def dumps(data: dict[str, Any]) -> str:
    """JSON with no NaN/Infinity (they are not JSON): a missing value is null."""
    return json.dumps(_finite(data), indent=2, allow_nan=False) + "\n"


def _finite(value: Any) -> Any:
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value


def relpath(path: Path, start: Path) -> str:
    try:
        return os.path.relpath(path, start)
    except ValueError:
        return str(path)
