"""What `sd3tune evaluate` writes about its numbers: metrics.json (strict JSON), report.md (what the numbers support,
each candidate's paired difference from the base, how the run trained, settings, prompts, what each number means;
report.html is ``report_html``'s), the contact sheet, the table the command prints and the evaluation's entry in the
run's sd3tune.json; and which files of a previous evaluation --force replaces."""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path
from typing import Any

from sd3tune.stats import HEADLINE_METRICS, METRICS, shown

OUTPUT_FILES = ("metrics.json", "contact_sheet.png", "report.md", "report.html")  # + images/LABEL/NN-sS.png
IMAGES_DIR = "images"
_LABEL_DIR = re.compile(r"(base|lora|checkpoint-\d+)")
_IMAGE_FILE = re.compile(r"\d+-s\d+\.png")


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


TABLE_COLUMNS = (("clip_score", "CLIP score ↑", 2), ("style_similarity", "style sim. ↑", 3),
                 ("diversity", "diversity", 3), ("kid", "KID ↓", 4), ("drift", "neutral drift", 3))


def _md_cell(c: dict[str, Any] | None) -> str:
    if not c or c.get("diff") is None:
        return "n/a"
    diff, ci = shown(c)
    return f"{diff}" + (f" [{ci}]" if ci else "") + f" {c['verdict']}, n {c['n']}"


def _md_training(t: dict[str, Any]) -> list[str]:
    """How the run trained, in words (report.html draws the curves)."""
    lines = ["## How the run trained", ""]
    loss = t.get("loss") or {}
    if loss.get("steps"):
        v, smoothed = loss["values"], loss["smoothed"]
        lines.append(f"- loss over {len(v)} steps ({loss['steps'][0]}-{loss['steps'][-1]}): first {v[0]:g}, last "
                     f"{v[-1]:g}, lowest {min(v):g}; moving average {smoothed[0]:.3g} -> {smoothed[-1]:.3g} "
                     "(the curve is in report.html)")
    else:
        lines.append("- no loss per step found in the run's training logs")
    lrs = (t.get("lr") or {}).get("values") or []
    if lrs:
        lines.append(f"- learning rate: {lrs[0]:g}" + (f" -> {lrs[-1]:g}" if len(set(lrs)) > 1 else " (constant)"))
    lines += [f"- {k}: {_md(str(v))}" for k, v in (t.get("settings") or {}).items() if v is not None]
    val = t.get("validation_images") or {}
    if val.get("files"):
        lines += ["", f"Latest validation images (step {val['step']}):", ""]
        lines += [f"![validation image]({f})" for f in val["files"]]
    return lines + [""]


def render_markdown(data: dict[str, Any], sheet_name: str) -> str:
    """The report: settings, the contact sheet, the metric table, the best checkpoint and what each number means."""
    lines = [f"# sd3tune evaluation: {data['run_dir']}", ""] + [f"- **{_md(line)}**" for line in data["headline"]]
    lines.append("")
    lines += [f"- base model: `{data['model']}`",
              f"- LoRA: `{data['lora']['file']}` (sha256 `{data['lora']['sha256'][:12]}`)",
              f"- CLIP model for the metrics: `{data['clip_model']['name']}` ({data['clip_model']['source']})",
              f"- sampler: {sampler_text(data['sampler'])}",
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
    header = ["model", "step"] + [c[1] for c in TABLE_COLUMNS]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    best = data["best"]["label"]
    for label, m in data["models"].items():
        name = m["title"] + (" **(best)**" if label == best else "")
        step = "" if m["step"] is None else str(m["step"])
        lines.append("| " + " | ".join([name, step] + [fmt(m["metrics"][k], d) for k, _, d in TABLE_COLUMNS]) + " |")
    ref = data["reference"]["training_style_similarity"]
    lines += ["", f"Reference: the training images' own style similarity is {fmt(ref)}.", ""]
    lines += ["## Each candidate against the base model", "",
              "Mean paired difference (candidate - base) [95% bootstrap interval] verdict, n.", ""]
    header = ["candidate"] + [METRICS[m].name for m in HEADLINE_METRICS]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for m in data["models"].values():
        if m.get("vs_base"):
            lines.append("| " + " | ".join([m["title"]] + [_md_cell(m["vs_base"].get(k)) for k in HEADLINE_METRICS])
                         + " |")
    lines += ["", f"Method: {data['statistics']['method']}.", "", f"Best: {data['best']['rule']}.", ""]
    lines += _md_training(data.get("training") or {})
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


def sampler_text(s: dict[str, Any]) -> str:
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


# ----------------------------------------------------------------------------------------------- the files


def write_outputs(out: Path, data: dict[str, Any], made_with: dict[str, Any], models, prompts,
                  settings) -> dict[str, Path]:
    """Write the evaluation into ``out``: the contact sheet, report.md, report.html and, last, metrics.json."""
    from sd3tune.fsutil import atomic_write_text
    from sd3tune.inference import save_png
    from sd3tune.report_html import render_html
    from sd3tune.sheets import contact_sheet

    paths = {"metrics": out / "metrics.json", "sheet": out / "contact_sheet.png", "report": out / "report.md",
             "html": out / "report.html"}
    rows = [[m.images[p][0] for m in models] for p in range(len(prompts))]
    labels = [f"{i + 1}. ({p.kind}) {p.text}" for i, p in enumerate(prompts)]
    cell = 256 if max(settings.width, settings.height) >= 256 else 128
    sheet = contact_sheet(rows, labels, [m.title for m in models], cell=cell)
    save_png(sheet, paths["sheet"], _sheet_fields(data, made_with, models, prompts, labels))
    atomic_write_text(paths["report"], render_markdown(data, paths["sheet"].name))
    atomic_write_text(paths["html"], render_html(data, paths["sheet"].name))
    atomic_write_text(paths["metrics"], dumps(data))  # last: its presence means the evaluation finished
    return paths


def _sheet_fields(data: dict[str, Any], made_with: dict[str, Any], models, prompts,
                  labels: list[str]) -> dict[str, Any]:
    """The contact sheet's provenance: what made its images (``made_with``: base model, the run's LoRA and its
    SHA-256, sampler), its rows (prompts, first seed) and columns (models: each one's LoRA file, SHA-256 and
    adapter weight)."""
    from sd3tune.sheets import sheet_fields

    seed = data["seeds"][0]
    return sheet_fields(
        {**made_with, "run_dir": data["run_dir"]}, sheet="sd3tune evaluate contact sheet", rows="prompt",
        columns="model", row_labels=labels,
        column_labels=[m.title for m in models], prompts=[p.text for p in prompts], seeds=[seed],
        prompt_kinds=[p.kind for p in prompts],
        models=[{"label": m.label, "title": m.title, "lora": data["models"][m.label]["lora_file"],
                 "lora_sha256": data["models"][m.label]["lora_sha256"], "adapter_weight": m.adapter_weight}
                for m in models],
        images=[[data["models"][m.label]["images"][p][0] for m in models] for p in range(len(prompts))])


def record_in_manifest(run_dir: Path, out: Path, data: dict[str, Any]) -> None:
    """The evaluation's entry in the run's sd3tune.json (``evaluations``: one per out folder)."""
    from sd3tune.manifest import read_manifest, update_manifest

    best = data["best"]["label"]
    entry = {"created": data["created"], "out": str(out), "metrics": str(out / "metrics.json"),
             "lora_sha256": data["lora"]["sha256"], "clip_model": data["clip_model"]["name"],
             "models": list(data["models"]), "best": best}
    try:
        earlier = read_manifest(run_dir).get("evaluations")
        # one entry per out folder: an evaluation replaced there (--force) replaces its entry
        kept = [e for e in earlier if not (isinstance(e, dict) and e.get("out") == str(out))] \
            if isinstance(earlier, list) else []
        update_manifest(run_dir, "evaluations", kept + [entry])
    except OSError:  # a read-only run folder: the evaluation itself is complete in ``out``
        pass


def remove_previous(out: Path) -> None:
    """--force: remove what a previous evaluation wrote in ``out`` (metrics.json first: its presence means a finished
    evaluation), so the new one is never mixed with old images. Other files stay."""
    from sd3tune.runsummary import VALIDATION_COPY  # the copies of the run's latest validation images
    from sd3tune.simpletuner.layout import validation_image_name

    for name in OUTPUT_FILES:
        (out / name).unlink(missing_ok=True)
    validation = out / VALIDATION_COPY
    if validation.is_dir() and not validation.is_symlink():
        for file in validation.iterdir():
            if validation_image_name(file.name) and (file.is_file() or file.is_symlink()):
                file.unlink()
        if not any(validation.iterdir()):
            validation.rmdir()
    images = out / IMAGES_DIR
    if not images.is_dir():
        return
    for folder in images.iterdir():
        if folder.is_dir() and not folder.is_symlink() and _LABEL_DIR.fullmatch(folder.name):
            for file in folder.iterdir():
                if _IMAGE_FILE.fullmatch(file.name) and (file.is_file() or file.is_symlink()):
                    file.unlink()
            if not any(folder.iterdir()):
                folder.rmdir()
    if not any(images.iterdir()):
        images.rmdir()


# ----------------------------------------------------------------------------------------------- table


def format_table(metrics: dict[str, Any]) -> str:
    """A compact plain-text table: one line per model (in step order), mean ± std of each metric; * marks the best
    fine-tuned candidate, when one is measurably ahead of the others."""
    width = max([len("model")] + [len(m["title"]) + 2 for m in metrics["models"].values()]) + 2
    cols = [(k, title, d, max(len(title), 16) + 2) for k, title, d in TABLE_COLUMNS]
    lines = ["model".ljust(width) + "".join(title.ljust(w) for _, title, _, w in cols)]
    for label, m in metrics["models"].items():
        mark = " *" if label == metrics["best"]["label"] else ""
        lines.append((m["title"] + mark).ljust(width)
                     + "".join(fmt(m["metrics"][k], d).ljust(w) for k, _, d, w in cols))
    return "\n".join(line.rstrip() for line in lines)
