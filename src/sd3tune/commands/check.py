"""`sd3tune check`: validate a run folder and preflight its data, in well under a second, with no torch import."""

from __future__ import annotations

import json
from pathlib import Path

from sd3tune.checks import CheckReport, check_run


def render_report(report: CheckReport) -> str:
    lines = []
    errors = [f for f in report.findings if f.severity == "error"]
    warnings = [f for f in report.findings if f.severity == "warning"]
    if errors:
        lines.append(f"{len(errors)} error(s):")
        lines += [f"  {f.render()}" for f in errors]
    if warnings:
        lines.append(f"{len(warnings)} warning(s):")
        lines += [f"  {f.render()}" for f in warnings]
    s = report.summary
    if s.images:
        buckets = ", ".join(f"{k} ({v})" for k, v in sorted(s.buckets.items()))
        lines.append(f"summary: {s.images} images in {len(s.buckets)} bucket(s) [{buckets}]; {s.steps} steps = "
                     f"{s.epochs} epochs of {s.steps_per_epoch} steps; est. GPU memory ~{s.gpu_memory_gb} GB")
    lines.append("ok" if report.ok else "check failed: fix the errors above, then run `sd3tune check` again")
    return "\n".join(lines)


def run_check(run_dir: Path, as_json: bool = False) -> tuple[CheckReport, str]:
    report = check_run(run_dir)
    text = json.dumps(report.as_dict(), indent=2) if as_json else render_report(report)
    return report, text
