"""`sd3tune check`: validate a run folder and preflight its data in well under a second, with no torch import.

Text output: every error, then every warning, as ``file:key: problem — fix``, then a one-line summary and the
verdict. ``--json`` prints the same as one JSON object (``ok``, ``errors``, ``warnings``, ``summary``).
"""

from __future__ import annotations

import json
from pathlib import Path

from sd3tune.checks import CheckReport, check_run
from sd3tune.checks.render import render_report
from sd3tune.simpletuner.processes import plan_processes


def run_check(run_dir: Path, as_json: bool = False, resume: bool = False, gpus: int = 1,
              accelerate_config: Path | None = None) -> tuple[CheckReport, str]:
    """The report for a training on ``gpus`` processes or the ones ``accelerate_config`` starts (all machines)."""
    processes = plan_processes(gpus, accelerate_config)
    report = check_run(run_dir, gpus=processes.total, resume=resume)
    text = json.dumps(report.as_dict(), indent=2) if as_json else render_report(report)
    return report, text


# --- `sd3tune check` on the command line (sd3tune.cli loads it when the command runs or shows its help) ---

from typing import Annotated, Optional  # noqa: E402

import typer  # noqa: E402

from sd3tune.cli import command_app  # noqa: E402
from sd3tune.commands.options import RunDir  # noqa: E402

app = command_app()


@app.command("check")
def check_command(
    run_dir: RunDir,
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
    resume: Annotated[bool, typer.Option("--resume", help="Check as `sd3tune train --resume` would: continuing from the latest checkpoint.")] = False,
    gpus: Annotated[int, typer.Option("--gpus", help="Check for a training on N GPUs (processes), as `train --gpus N`.")] = 1,
    accelerate_config: Annotated[Optional[Path], typer.Option("--accelerate-config", help="Check for the processes this accelerate config file starts (all machines).")] = None,
) -> None:
    """Validate a run's config and data before any model loads (exit 0: clean or warnings, 2: errors).

    \b
    examples:
      sd3tune check runs/art
      sd3tune check runs/art --json | jq .errors
      sd3tune check runs/art --resume
      sd3tune check runs/art --gpus 4
    """
    report, text = run_check(run_dir, as_json=as_json, resume=resume, gpus=gpus, accelerate_config=accelerate_config)
    typer.echo(text)
    if not report.ok:
        raise typer.Exit(2)
