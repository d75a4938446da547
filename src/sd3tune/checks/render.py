"""A check report as text: every error, then every warning, as ``file:key: problem — fix``, then a one-line summary
and the verdict. `sd3tune check` prints it, and `sd3tune init` for the run it wrote.
"""

from __future__ import annotations

from sd3tune.checks.engine import CheckReport, Summary
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
        over = f" ({s.processes} processes x batch x accumulation)" if s.processes > 1 else ""
        parts.append(f"effective batch {s.effective_batch}{over}")
    if s.steps and s.steps_per_epoch:
        parts.append(f"{plural(s.steps, 'step')} = {s.epochs:g} epoch{'' if s.epochs == 1 else 's'} of "
                     f"{plural(s.steps_per_epoch, 'step')}")
    if s.gpu_memory_gb is not None:
        preset = f", preset {s.preset}" if s.preset else ""
        within = (f" (±{s.gpu_memory_error_gb:g} over the measured peaks)" if s.gpu_memory_error_gb is not None
                  else " (extrapolated: no measured peak of this setup)")
        parts.append(f"est. GPU memory ~{s.gpu_memory_gb:g} GiB{within}{preset}")
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
    if len(report.summary.datasets) > 1:
        lines += [f"  {d.render()}" for d in report.summary.datasets]
    if report.ok:
        lines.append("ok" + (" (with warnings)" if warnings else ""))
    else:
        lines.append(f"check failed: fix the {plural(len(errors), 'error')} above, then run `{report.command}` again")
    return "\n".join(lines)
