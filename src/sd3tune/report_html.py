"""report.html: one self-contained page (inline CSS and SVG, images referenced relative to the evaluation folder, no
script) that reads well from 800 to 1920 px wide: what the numbers support in words, each candidate's paired
difference from the base with its interval and verdict, metric-by-step charts, the images (a grid that scrolls in its
own box), how the run trained (loss curve, learning rate, settings, latest validation images), then the details."""

from __future__ import annotations

import html
from typing import Any

from sd3tune.charts import loss_chart, lr_chart, step_chart
from sd3tune.report import TABLE_COLUMNS, fmt, sampler_text
from sd3tune.stats import HEADLINE_METRICS, METRICS, shown

CSS = """
*{box-sizing:border-box}
html{-webkit-text-size-adjust:100%}
body{margin:0;font:15px/1.5 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;color:#1f2328;background:#f6f8fa}
main{max-width:1240px;margin:0 auto;padding:20px 16px 48px}
header h1{font-size:24px;margin:0 0 2px}
.sub{color:#59636e;margin:0;overflow-wrap:anywhere}
section{background:#fff;border:1px solid #d0d7de;border-radius:8px;padding:16px 18px;margin:16px 0;min-width:0}
h2{font-size:18px;margin:0 0 10px}
h3{font-size:15px;margin:14px 0 6px}
p{margin:6px 0}
code{font-size:13px;overflow-wrap:anywhere}
.scroll{overflow-x:auto;max-width:100%}
table{border-collapse:collapse;font-size:14px}
th,td{padding:6px 10px;border-bottom:1px solid #eaeef2;text-align:left;vertical-align:top}
th{font-weight:600;white-space:nowrap;background:#f6f8fa}
td.n{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}
.ci{display:block;color:#59636e;font-size:12px;font-weight:400;white-space:nowrap}
table.cmp td{text-align:right;min-width:150px}
.chip{display:inline-block;padding:0 8px;border-radius:10px;font-size:12px;font-weight:600;white-space:nowrap}
.better{background:#dafbe1;color:#1a7f37}.worse{background:#ffebe9;color:#cf222e}
.same{background:#eaeef2;color:#59636e}
ul.headline{margin:0;padding-left:20px}ul.headline li{margin:4px 0}
.best{font-weight:600}
.charts{display:grid;grid-template-columns:repeat(auto-fill,minmax(420px,1fr));gap:12px 24px}
figure{margin:0;min-width:0}figcaption{font-size:13px;color:#59636e}
svg{width:100%;height:auto;display:block}
.grid{max-height:80vh;overflow:auto;border:1px solid #eaeef2;border-radius:6px}
.grid table{border-collapse:separate;border-spacing:0}
.grid th{position:sticky;top:0;z-index:1}
.grid td:first-child,.grid th:first-child{position:sticky;left:0;background:#fff;z-index:2;width:220px;
  max-width:220px}
.grid th:first-child{background:#f6f8fa;z-index:3}
.grid img{width:160px;height:160px;object-fit:contain;display:block;background:#f6f8fa;border-radius:4px}
.trunc{display:-webkit-box;-webkit-line-clamp:3;-webkit-box-orient:vertical;overflow:hidden;overflow-wrap:anywhere}
ol.prompts{list-style:none;padding:0;margin:0}
ol.prompts li{white-space:nowrap;overflow:hidden;text-overflow:ellipsis;max-width:100%}
.kind{color:#59636e;font-size:12px}
.two{display:grid;grid-template-columns:repeat(auto-fit,minmax(320px,1fr));gap:12px 24px}
dl.kv{display:grid;grid-template-columns:max-content minmax(0,1fr);gap:2px 16px;margin:0;font-size:14px}
dl.kv dt{color:#59636e}dl.kv dd{margin:0;overflow-wrap:anywhere}
.val{display:flex;flex-wrap:wrap;gap:8px}.val figure{width:min(240px,100%)}.val img{width:100%;height:auto}
ul.plain{padding-left:20px;margin:4px 0}ul.plain li{overflow-wrap:anywhere}
@media (max-width:900px){main{padding:12px 10px 32px}section{padding:12px}th,td{padding:4px 6px}
  .grid img{width:120px;height:120px}.grid td:first-child,.grid th:first-child{width:150px;max-width:150px}}
"""
VERDICT_CLASS = {"better": "better", "worse": "worse"}
e = html.escape


def _chip(verdict: str) -> str:
    return f'<span class="chip {VERDICT_CLASS.get(verdict, "same")}">{e(verdict)}</span>'


def _verdict_words(text: str) -> str:
    for verdict in ("no measurable difference", "better", "worse"):
        if f" {verdict} (" in text:
            name, _, rest = text.partition(f" {verdict} (")
            return f"{e(name)} {_chip(verdict)} ({e(rest)}"
    return e(text)


def _headline(data: dict[str, Any]) -> str:
    items = []
    for line in data["headline"]:
        who, sep, said = line.partition(" vs base: ")
        if sep:  # one candidate's verdicts, one metric per line, the verdict in its colour
            parts = "".join(f"<li>{_verdict_words(part)}</li>" for part in said.split("; "))
            items.append(f"<li><b>{e(who)} vs base</b><ul class='plain'>{parts}</ul></li>")
        else:
            items.append(f"<li{' class=best' if line.startswith('best:') else ''}>{e(line)}</li>")
    return f'<section id="verdict"><h2>What the numbers say</h2><ul class="headline">{"".join(items)}</ul>' \
           f'<p class="sub">{e(data["statistics"]["method"])}.</p></section>'


def _cell(c: dict[str, Any] | None) -> str:
    if not c or c.get("diff") is None:
        return '<td class="n">n/a</td>'
    diff, ci = shown(c)
    tip = [f"n = {c['n']} {c['unit']}"]
    if c.get("why"):
        tip.append(c["why"])
    if c.get("more_needed"):
        tip.append(f"about {c['more_needed']} more {c['unit']} would resolve a difference this size")
    return (f'<td class="n" title="{e("; ".join(tip))}">{e(diff)}'
            f'<span class="ci">{"95% CI " + e(ci) if ci else "no interval"} · n {c["n"]}</span>{_chip(c["verdict"])}'
            + (f'<span class="ci">{e(c["why"])}</span>' if c.get("why") else "") + "</td>")


def _step(m: dict[str, Any]) -> str:
    return "" if m["step"] is None else f'<span class="ci">step {m["step"]}</span>'


def _comparison_table(data: dict[str, Any]) -> str:
    """One row per metric, one column per fine-tuned candidate (in step order): it stays narrow with few candidates
    and scrolls in its box with many."""
    candidates = [(label, m) for label, m in data["models"].items() if m["kind"] != "base"]
    head = "".join(f"<th>{e(m['title'])}{' ★' if label == data['best']['label'] else ''}{_step(m)}</th>"
                   for label, m in candidates)
    rows = "".join(f"<tr><th>{e(METRICS[k].name)} {'↑' if METRICS[k].higher_is_better else '↓'}</th>"
                   + "".join(_cell((m.get("vs_base") or {}).get(k)) for _, m in candidates) + "</tr>"
                   for k in HEADLINE_METRICS)
    scores = "".join(f"<tr><td>{e(m['title'])}</td><td class='n'>{'' if m['step'] is None else m['step']}</td>"
                     + "".join(f"<td class='n'>{e(fmt(m['metrics'][k], d))}</td>" for k, _, d in TABLE_COLUMNS)
                     + "</tr>" for m in data["models"].values())
    score_head = "".join(f"<th>{e(title)}</th>" for _, title, _ in TABLE_COLUMNS)
    return ('<section id="candidates"><h2>Each candidate against the base model</h2>'
            "<p>Mean paired difference (candidate − base, same prompts and seeds), its 95% bootstrap interval and "
            "what it supports; ↑/↓: which direction is better. Hover a cell for n and the power estimate.</p>"
            f'<div class="scroll"><table class="cmp"><tr><th>metric</th>{head}</tr>{rows}</table></div>'
            '<h3>Scores (mean ± std over images)</h3>'
            f'<div class="scroll"><table><tr><th>model</th><th>step</th>{score_head}</tr>{scores}</table></div>'
            f'<p class="sub">Reference: the training images\' own style similarity is '
            f'{e(fmt(data["reference"]["training_style_similarity"]))}.</p></section>')


def _step_charts(data: dict[str, Any]) -> str:
    candidates = [(label, m) for label, m in data["models"].items() if m["kind"] != "base"]
    known = all(m["step"] is not None for _, m in candidates)
    figures = []
    for metric in HEADLINE_METRICS:
        points = []
        for i, (label, m) in enumerate(candidates):
            c = (m.get("vs_base") or {}).get(metric)
            if c and c.get("diff") is not None:
                points.append((m["step"] if known else i + 1, m["title"], c["diff"],
                               tuple(c["ci95"]) if c.get("ci95") else None, c["verdict"]))
        if points:
            figures.append(f"<figure>{step_chart(points, METRICS[metric].name)}"
                           f"<figcaption>{e(METRICS[metric].name)}: difference from the base model "
                           f"with its 95% interval</figcaption></figure>")
    if not figures:
        return ""
    axis = "" if known else " (candidates in order; their steps are not all known)"
    return (f'<section id="by-step"><h2>Metrics by training step{e(axis)}</h2><div class="charts">{"".join(figures)}'
            "</div></section>")


def _images(data: dict[str, Any], sheet_name: str) -> str:
    models = list(data["models"].values())
    head = "".join(f"<th>{e(m['title'])}</th>" for m in models)
    rows = []
    for i, p in enumerate(data["prompts"]):
        cells = "".join(f'<td><img src="{e(m["images"][i][0])}" alt="{e(m["title"])}, prompt {i + 1}"></td>'
                        for m in models)
        rows.append(f'<tr><td><span class="trunc" title="{e(p["text"])}">{i + 1}. {e(p["text"])}</span>'
                    f'<span class="kind">{e(p["kind"])}</span></td>{cells}</tr>')
    return (f'<section id="images"><h2>Images</h2><p>Seed {data["seeds"][0]} of every prompt (rows) for each model '
            f'(columns, in step order); every seed is in <code>images/</code>, all in one picture in '
            f'<a href="{e(sheet_name)}">{e(sheet_name)}</a>.</p>'
            f'<div class="grid"><table><tr><th>prompt</th>{head}</tr>{"".join(rows)}</table></div></section>')


def _training(data: dict[str, Any]) -> str:
    t = data.get("training") or {}
    loss, lr = t.get("loss") or {}, t.get("lr") or {}
    parts = []
    if loss.get("steps"):
        values = loss["values"]
        parts.append(f"<figure>{loss_chart(loss['steps'], values, loss['smoothed'])}<figcaption>loss per step "
                     f"(dots; {len(values)} steps, last {values[-1]:g}, lowest {min(values):g}) and its moving "
                     f"average (line, weight {loss['smoothing']}); from SimpleTuner's progress bar, 3 significant "
                     "digits</figcaption></figure>")
    else:
        parts.append("<p>No loss per step found: the run's training logs (<code>logs/train-*.log</code>) are "
                     "missing or hold no step.</p>")
    lrs = lr.get("values") or []
    if lrs and len(set(lrs)) > 1:
        parts.append(f"<figure>{lr_chart(lr['steps'], lrs)}<figcaption>learning rate per step</figcaption></figure>")
    elif lrs:
        parts.append(f"<p>Learning rate {lrs[0]:g} at every logged step (steps {lr['steps'][0]}–{lr['steps'][-1]})."
                     "</p>")
    settings = "".join(f"<dt>{e(k)}</dt><dd>{e(str(v))}</dd>" for k, v in (t.get("settings") or {}).items()
                       if v is not None)
    trainings = "".join(f"<li>{e(str(r.get('started')))}: {e(str(r.get('status')))}, {r.get('steps')} steps, "
                        f"{r.get('seconds')} s{', resumed' if r.get('resume') else ''}</li>"
                        for r in t.get("trainings") or [])
    val = t.get("validation_images") or {}
    if val.get("files"):
        imgs = "".join(f'<figure><img src="{e(f)}" alt="validation image"><figcaption>'
                       f'{e(f.rsplit("/", 1)[-1])}</figcaption></figure>' for f in val["files"])
        validation = f"<h3>Latest validation images (step {val['step']})</h3><div class='val'>{imgs}</div>"
    else:
        validation = "<p>No validation images: the run saved none (validation off, or not yet reached).</p>"
    return (f'<section id="training"><h2>How the run trained</h2><div class="two"><div>{"".join(parts)}</div>'
            f'<div><h3>Key settings</h3><dl class="kv">{settings}</dl>'
            f'{"<h3>Trainings</h3><ul class=plain>" + trainings + "</ul>" if trainings else ""}</div></div>'
            f"{validation}</section>")


def render_html(data: dict[str, Any], sheet_name: str) -> str:
    """The whole page."""
    lora = data["lora"]
    prompts = "".join(f'<li title="{e(p["text"])}">{i + 1}. <span class="kind">{e(p["kind"])}</span> '
                      f'{e(p["text"])}</li>' for i, p in enumerate(data["prompts"]))
    defs = "".join(f"<li><b>{e(k)}</b>: {e(v)}</li>" for k, v in data["definitions"].items())
    notes = "".join(f"<li>{e(n)}</li>" for n in data["notes"])
    setup = {"run": data["run_dir"], "base model": data["model"], "LoRA": f"{lora['file']} (sha256 "
             f"{lora['sha256'][:12]})", "CLIP model": f"{data['clip_model']['name']} ({data['clip_model']['source']})",
             "sampler": sampler_text(data["sampler"]), "seeds per prompt": ", ".join(map(str, data["seeds"])),
             "training images": f"{data['training_images']['used']} of {data['training_images']['total']} in "
                                + ", ".join(data["training_images"]["folders"]),
             "best rule": data["best"]["rule"], "made by": f"sd3tune {data['sd3tune_version']}, {data['created']}"}
    kv = "".join(f"<dt>{e(k)}</dt><dd>{e(str(v))}</dd>" for k, v in setup.items())
    return ("<!doctype html><html lang='en'><head><meta charset='utf-8'>"
            "<meta name='viewport' content='width=device-width, initial-scale=1'>"
            f"<title>sd3tune evaluation: {e(data['run_dir'])}</title><style>{CSS}</style></head><body><main>"
            f"<header><h1>sd3tune evaluation</h1><p class='sub'>{e(data['run_dir'])} · {e(data['created'])}</p>"
            "</header>" + _headline(data) + _comparison_table(data) + _step_charts(data)
            + _images(data, sheet_name) + _training(data)
            + f"<section id='prompts'><h2>Prompts</h2><ol class='prompts'>{prompts}</ol>"
              "<p class='sub'>Hover a prompt for its full text.</p></section>"
            + f"<section id='setup'><h2>Setup</h2><dl class='kv'>{kv}</dl></section>"
            + f"<section id='definitions'><h2>What the numbers mean</h2><ul class='plain'>{defs}</ul></section>"
            + (f"<section id='notes'><h2>Notes</h2><ul class='plain'>{notes}</ul></section>" if notes else "")
            + "</main></body></html>\n")
