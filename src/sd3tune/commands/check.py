"""`sd3tune check`: validate a run folder and preflight its data in well under a second, with no torch import.

Text output: every error, then every warning, as ``file:key: problem — fix``, then a one-line summary and the
verdict. ``--json`` prints the same as one JSON object (``ok``, ``errors``, ``warnings``, ``summary``).
"""

from __future__ import annotations

import json
from pathlib import Path

from sd3tune.checks import CheckReport, Summary, check_run
from sd3tune.findings import plural


def render_summary(s: Summary) -> str:
    if not s.images:
        return "summary: no usable training images found"
    parts = [f"{plural(s.images, 'image')}"]
    if s.usable != s.images:
        parts[0] += f" ({s.usable} usable)"
    buckets = ", ".join(f"{k}: {v}" for k, v in s.buckets.items())
    parts.append(f"{plural(len(s.buckets), 'bucket')} [{buckets}]" if s.buckets else "no bucket")
    if s.samples_per_epoch != s.usable:
        parts.append(f"{s.samples_per_epoch} samples/epoch with repeats")
    if s.effective_batch:
        parts.append(f"effective batch {s.effective_batch}")
    if s.steps and s.steps_per_epoch:
        parts.append(f"{plural(s.steps, 'step')} = {s.epochs:g} epoch{'' if s.epochs == 1 else 's'} of "
                     f"{plural(s.steps_per_epoch, 'step')}")
    if s.gpu_memory_gb is not None:
        preset = f", preset {s.preset}" if s.preset else ""
        parts.append(f"est. GPU memory ~{s.gpu_memory_gb:g} GB{preset}")
    if s.cache_gb is not None:
        parts.append(f"caches ~{s.cache_gb:g} GB")
    return "summary: " + "; ".join(parts)


def render_report(report: CheckReport) -> str:
    lines = [f"checked {report.run.paths.root}" + (f" ({report.run.format} config)" if report.run.format else "")]
    errors, warnings = report.errors, report.warnings
    if errors:
        lines.append(f"{plural(len(errors), 'error')}:")
        lines += [f"  {f.render()}" for f in errors]
    if warnings:
        lines.append(f"{plural(len(warnings), 'warning')}:")
        lines += [f"  {f.render()}" for f in warnings]
    lines.append(render_summary(report.summary))
    if report.ok:
        lines.append("ok" + (" (with warnings)" if warnings else ""))
    else:
        lines.append(f"check failed: fix the {plural(len(errors), 'error')} above, then run `{report.command}` again")
    return "\n".join(lines)


def run_check(run_dir: Path, as_json: bool = False, resume: bool = False) -> tuple[CheckReport, str]:
    report = check_run(run_dir, resume=resume)
    text = json.dumps(report.as_dict(), indent=2) if as_json else render_report(report)
    return report, text


# --- `sd3tune check` on the command line (sd3tune.cli loads it when the command runs or shows its help) ---

from typing import Annotated  # noqa: E402

import typer  # noqa: E402

from sd3tune.cli import command_app  # noqa: E402
from sd3tune.commands.options import RunDir  # noqa: E402

app = command_app()


@app.command("check")
def check_command(
    run_dir: RunDir,
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
    resume: Annotated[bool, typer.Option("--resume", help="Check as `sd3tune train --resume` would: continuing from the latest checkpoint.")] = False,
) -> None:
    """Validate a run's config and data before any model loads (exit 0: clean or warnings, 2: errors).

    \b
    examples:
      sd3tune check runs/art
      sd3tune check runs/art --json | jq .errors
      sd3tune check runs/art --resume
    """
    report, text = run_check(run_dir, as_json=as_json, resume=resume)
    typer.echo(text)
    if not report.ok:
        raise typer.Exit(2)
