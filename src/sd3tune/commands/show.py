"""`sd3tune show`: a run's options as SimpleTuner will read them, each with where it is set."""

from __future__ import annotations

from pathlib import Path

from sd3tune.errors import Sd3tuneError
from sd3tune.findings import plural
from sd3tune.simpletuner.reader import read_run
from sd3tune.simpletuner.writer import value_text


def run_show(run_dir: Path) -> str:
    run = read_run(run_dir)
    if run.format is None:
        raise Sd3tuneError(f"{run_dir} has no config/config.env or config/config.json",
                           hint="create the run with `sd3tune init` first")
    lines = [f"{run.paths.root} ({run.format} config)"]
    width = max((len(o) for o in run.args), default=0)
    lines += [f"  {option:<{width}} = {value_text(value)}    # {run.sources.get(option, '')}"
              for option, value in run.args.items()]
    if run.findings:  # credentials are reported, never shown
        lines.append(f"{plural(len(run.findings), 'problem')} in the files: see `sd3tune check {run.paths.root}`")
    return "\n".join(lines)


# --- `sd3tune show` on the command line (sd3tune.cli loads it when the command runs or shows its help) ---

import typer  # noqa: E402

from sd3tune.cli import command_app  # noqa: E402
from sd3tune.commands.options import RunDir  # noqa: E402

app = command_app()


@app.command("show")
def show_command(run_dir: RunDir) -> None:
    """Show a run's options as SimpleTuner will read them, each with the line or key that sets it.

    \b
    examples:
      sd3tune show runs/art
      sd3tune set runs/art LEARNING_RATE=2e-4 && sd3tune show runs/art
    """
    typer.echo(run_show(run_dir))
